//! Re-ranking service: the business rules between a ranked list and what the
//! user sees. Hard filters (request exclusions, already purchased, out of
//! stock, category and price filters, optionally recently viewed) are never
//! relaxed. Then come boosts for promoted items and new arrivals, a share of
//! exploration slots, and MMR diversity under per-category and per-brand
//! caps (`recmesh_algo::rerank`). Every item keeps its retrieval reasons, and
//! boosts and exploration add theirs. The rules are a validated config section
//! (`[rules]`), overridable per experiment variant.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use recmesh_algo::EventKind;
use recmesh_algo::rerank::{Boost, RerankItem, RerankRequest, RerankRules, rerank, seed_of};
use recmesh_algo::rules::HardFilters;
use recmesh_mesh::convert::{FieldError, event_kind};
use recmesh_mesh::lean::Candidates;
use recmesh_proto::v1::{self as pb, reranker_server::RerankerServer};
use recmesh_server::GrpcServer;
use recmesh_server::config::{ConfigError, ServerConfig, ServiceConfig, at_least_one};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

/// Default gRPC port of the reranker.
pub const DEFAULT_PORT: u16 = 50054;

/// Reason shown on an exploration pick.
pub const EXPLORE_REASON: &str = "something different for you";

/// Configuration of the reranker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC and admin server.
    pub server: ServerConfig,
    /// The re-ranking rules when no experiment overrides them.
    pub rules: RerankRules,
    /// Most candidates one request may carry.
    pub max_candidates: usize,
    /// Longest final list.
    pub max_count: u32,
    /// Most excluded or purchased ids one request may carry.
    pub max_ids: usize,
    /// Most seen-item keys one request may carry (`seen_items`).
    pub max_seen_items: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::on_port(DEFAULT_PORT),
            rules: RerankRules::default(),
            max_candidates: 2_000,
            max_count: 200,
            max_ids: 5_000,
            max_seen_items: 20_000,
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.rules
            .validate()
            .map_err(|e| ConfigError::invalid(format!("rules.{}", e.key), e.reason))?;
        at_least_one(&[
            ("max_candidates", self.max_candidates as u64),
            ("max_count", u64::from(self.max_count)),
            ("max_seen_items", self.max_seen_items as u64),
        ])
    }
}

/// The reranker gRPC service.
#[derive(Debug, Clone)]
pub struct RerankerService {
    config: Arc<Config>,
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl RerankerService {
    /// A reranker with `config`.
    pub fn new(config: Config) -> Self {
        RerankerService {
            config: Arc::new(config),
        }
    }

    /// Applies the rules to a request, with `now_s` as the current time.
    /// The rules read each candidate from the lean list, and only the ones
    /// placed in the answer become whole `Candidate`s.
    pub fn rerank(
        &self,
        req: pb::RerankRequest,
        now_s: i64,
    ) -> Result<pb::RerankResponse, FieldError> {
        let c = &self.config;
        if req.count == 0 || req.count > c.max_count {
            return Err(FieldError::new(
                "count",
                format!("must be in 1..={}", c.max_count),
            ));
        }
        for (field, ids) in [
            ("exclude_item_ids", &req.exclude_item_ids),
            ("purchased_item_ids", &req.purchased_item_ids),
        ] {
            if ids.len() > c.max_ids {
                return Err(FieldError::new(field, format!("at most {} ids", c.max_ids)));
            }
        }
        if req.seen_items.len() > c.max_seen_items {
            return Err(FieldError::new(
                "seen_items",
                format!("at most {} item keys", c.max_seen_items),
            ));
        }
        let list = Candidates::new(req.candidates.clone().unwrap_or_default(), "candidates")?;
        if list.len() > c.max_candidates {
            return Err(FieldError::new(
                "candidates",
                format!("at most {} per call", c.max_candidates),
            ));
        }
        let overrides: HashMap<String, String> = req.rule_overrides.clone().into_iter().collect();
        let rules = c
            .rules
            .with(&overrides)
            .map_err(|e| FieldError::new(format!("rule_overrides.{}", e.key), e.reason))?;
        let f = req.filters.clone().unwrap_or_default();
        let input = RerankRequest {
            filters: HardFilters {
                excluded: req.exclude_item_ids.iter().map(String::as_str).collect(),
                purchased: req.purchased_item_ids.iter().map(String::as_str).collect(),
                seen: req.seen_items.iter().copied().collect(),
                categories: f.categories.iter().map(String::as_str).collect(),
                min_price: f.min_price,
                max_price: f.max_price,
            },
            recent_views: req
                .recent
                .iter()
                .filter(|r| event_kind(r.event_type) == Some(EventKind::View))
                .map(|r| (r.item_id.as_str(), r.timestamp_ms / 1000))
                .collect(),
            usual_categories: req.usual_categories.iter().map(String::as_str).collect(),
            now_s,
            seed: seed_of(&req.request_id),
            count: req.count as usize,
        };
        let items: Vec<RerankItem<'_>> = (0..list.len())
            .map(|k| {
                let a = list.attributes(k).unwrap_or_default();
                RerankItem {
                    rule: list.rule_item(k),
                    brand: a.brand,
                    promoted: a.promoted,
                    created_at_s: a.created_at,
                    score: list.score(k),
                }
            })
            .collect();
        let out = rerank(&items, &rules, &input);
        for (rule, n) in &out.removed {
            metrics::counter!("recmesh_reranker_removed_total", "rule" => rule.as_str())
                .increment(u64::from(*n));
        }
        let explored = out.items.iter().filter(|p| p.explore).count();
        metrics::counter!("recmesh_reranker_exploration_total").increment(explored as u64);
        let mut candidates = Vec::with_capacity(out.items.len());
        // Each candidate is placed at most once, whatever the rules return.
        let mut placed_already = vec![false; list.len()];
        for placed in out.items {
            if placed.index >= list.len()
                || std::mem::replace(&mut placed_already[placed.index], true)
            {
                continue;
            }
            let mut cand = list.candidate(placed.index);
            cand.score = placed.score;
            let category = cand
                .attributes
                .as_ref()
                .map(|a| a.category.clone())
                .unwrap_or_default();
            for boost in placed.boosts {
                cand.reasons.push(match boost {
                    Boost::Promoted => "promoted".to_owned(),
                    Boost::NewArrival => format!("new in {category}"),
                });
            }
            if placed.explore {
                cand.exploration = true;
                cand.reasons.insert(0, EXPLORE_REASON.to_owned());
            }
            candidates.push(cand);
        }
        Ok(pb::RerankResponse {
            candidates,
            removed: out
                .removed
                .into_iter()
                .map(|(r, n)| (r.as_str().to_owned(), n))
                .collect(),
        })
    }
}

#[tonic::async_trait]
impl pb::reranker_server::Reranker for RerankerService {
    async fn rerank(
        &self,
        request: Request<pb::RerankRequest>,
    ) -> Result<Response<pb::RerankResponse>, Status> {
        Ok(Response::new(RerankerService::rerank(
            self,
            request.into_inner(),
            now_s(),
        )?))
    }
}

/// The reranker server, ready to start or run.
pub fn server(config: Config) -> GrpcServer {
    GrpcServer::new("reranker", config.server.clone())
        .add_service(RerankerServer::new(RerankerService::new(config)))
}

/// Serves until `shutdown`, then drains.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    server(config).run(shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn candidate(id: &str, category: &str, in_stock: bool) -> pb::Candidate {
        pb::Candidate {
            item_id: id.into(),
            score: 1.0,
            reasons: vec![format!("because you viewed {id}0")],
            attributes: Some(pb::ItemAttributes {
                category: category.into(),
                brand: format!("brand-{id}"),
                in_stock,
                price: 10.0,
                created_at: NOW - 365 * 86_400,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// The lean list of whole candidates, as ranking would send it.
    fn listed(candidates: Vec<pb::Candidate>) -> Option<pb::CandidateList> {
        Some(recmesh_mesh::lean::from_candidates(&candidates).expect("known sources"))
    }

    fn overrides(pairs: &[(&str, &str)]) -> std::collections::HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c: Config = recmesh_server::config::load(None).expect("defaults load");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn invalid_rules_are_config_errors_naming_the_rule() {
        let mut c = Config::default();
        c.rules.mmr_lambda = 1.5;
        let err = c.validate().expect_err("out of range");
        assert!(err.to_string().contains("rules.mmr_lambda"), "{err}");
    }

    #[test]
    fn drops_excluded_purchased_out_of_stock_and_caps() {
        let s = RerankerService::new(Config::default());
        let out = s
            .rerank(
                pb::RerankRequest {
                    user_id: "u".into(),
                    candidates: listed(vec![
                        candidate("a", "x", true),
                        candidate("b", "x", false),
                        candidate("c", "x", true),
                        candidate("d", "x", true),
                        candidate("e", "y", true),
                        candidate("f", "y", true),
                        candidate("g", "y", true),
                        candidate("h", "y", true),
                    ]),
                    count: 10,
                    exclude_item_ids: vec!["e".into()],
                    purchased_item_ids: vec!["f".into()],
                    seen_items: vec![recmesh_algo::seen::item_key("h")],
                    rule_overrides: overrides(&[
                        ("category_cap", "2"),
                        ("mmr_lambda", "1"),
                        ("exploration_share", "0"),
                    ]),
                    ..Default::default()
                },
                NOW,
            )
            .expect("ok");
        let ids: Vec<&str> = out.candidates.iter().map(|c| c.item_id.as_str()).collect();
        assert_eq!(ids, vec!["a", "c", "g"]);
        assert_eq!(out.removed["out_of_stock"], 1);
        assert_eq!(out.removed["category_cap"], 1);
        assert_eq!(out.removed["excluded"], 1);
        assert_eq!(out.removed["purchased"], 1);
        assert_eq!(out.removed["seen"], 1);
    }

    #[test]
    fn boosts_exploration_and_reasons_show_in_the_list() {
        let s = RerankerService::new(Config::default());
        let mut promoted = candidate("p", "x", true);
        promoted.score = 0.9;
        promoted.attributes.as_mut().expect("attrs").promoted = true;
        let mut fresh = candidate("n", "y", true);
        fresh.score = 0.9;
        fresh.attributes.as_mut().expect("attrs").created_at = NOW - 86_400;
        let mut top = candidate("t", "z", true);
        top.score = 1.0;
        let mut others: Vec<pb::Candidate> = (0..20)
            .map(|i| {
                let mut c = candidate(&format!("o{i}"), &format!("c{i}"), true);
                c.score = 0.5;
                c
            })
            .collect();
        let mut candidates = vec![top, promoted, fresh];
        candidates.append(&mut others);
        let request = pb::RerankRequest {
            user_id: "u".into(),
            candidates: listed(candidates),
            count: 10,
            request_id: "req-1".into(),
            usual_categories: vec!["x".into(), "y".into(), "z".into()],
            rule_overrides: overrides(&[("mmr_lambda", "1")]),
            ..Default::default()
        };
        let out = s.rerank(request.clone(), NOW).expect("ok");
        let ids: Vec<&str> = out.candidates.iter().map(|c| c.item_id.as_str()).collect();
        // 0.9 × 1.2 = 1.08 and 0.9 × 1.15 = 1.035 both pass the unboosted 1.0.
        assert_eq!(&ids[..3], &["p", "n", "t"], "{ids:?}");
        assert_eq!(
            out.candidates[0].reasons,
            vec!["because you viewed p0", "promoted"]
        );
        assert_eq!(
            out.candidates[1].reasons,
            vec!["because you viewed n0", "new in y"]
        );
        let explored: Vec<&pb::Candidate> =
            out.candidates.iter().filter(|c| c.exploration).collect();
        assert_eq!(explored.len(), 1, "10% of 10 slots");
        assert_eq!(explored[0].reasons[0], EXPLORE_REASON);
        assert!(
            explored[0].item_id.starts_with('o'),
            "outside the usual categories"
        );
        // Reproducible from the request id.
        let again = s.rerank(request, NOW).expect("ok");
        assert_eq!(
            again
                .candidates
                .iter()
                .map(|c| &c.item_id)
                .collect::<Vec<_>>(),
            out.candidates
                .iter()
                .map(|c| &c.item_id)
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn recently_viewed_items_are_dropped_inside_the_window_only() {
        let s = RerankerService::new(Config::default());
        let view = |id: &str, ago_s: i64| pb::Interaction {
            item_id: id.into(),
            event_type: pb::EventType::View as i32,
            timestamp_ms: (NOW - ago_s) * 1000,
        };
        let out = s
            .rerank(
                pb::RerankRequest {
                    user_id: "u".into(),
                    candidates: listed(vec![candidate("a", "x", true), candidate("b", "y", true)]),
                    count: 5,
                    recent: vec![view("a", 60), view("b", 7_200)],
                    rule_overrides: overrides(&[("recently_viewed_window_s", "3600")]),
                    ..Default::default()
                },
                NOW,
            )
            .expect("ok");
        let ids: Vec<&str> = out.candidates.iter().map(|c| c.item_id.as_str()).collect();
        assert_eq!(ids, vec!["b"]);
        assert_eq!(out.removed["recently_viewed"], 1);
    }

    #[test]
    fn bad_input_names_the_field() {
        let s = RerankerService::new(Config::default());
        let err = s
            .rerank(pb::RerankRequest::default(), NOW)
            .expect_err("count 0");
        assert_eq!(err.field, "count");
        let err = s
            .rerank(
                pb::RerankRequest {
                    count: 5,
                    rule_overrides: overrides(&[("mmr_lambda", "7")]),
                    ..Default::default()
                },
                NOW,
            )
            .expect_err("bad override");
        assert_eq!(err.field, "rule_overrides.mmr_lambda");
        // A list whose arrays do not line up is refused naming the array.
        let mut broken = listed(vec![
            candidate("a", "books", true),
            candidate("b", "toys", true),
        ]);
        if let Some(l) = broken.as_mut() {
            l.flags.pop();
        }
        let err = s
            .rerank(
                pb::RerankRequest {
                    count: 5,
                    candidates: broken,
                    ..Default::default()
                },
                NOW,
            )
            .expect_err("broken list");
        assert_eq!(err.field, "candidates.flags");
        assert_eq!(err.reason, "1 entries for 2 candidates");
    }
}

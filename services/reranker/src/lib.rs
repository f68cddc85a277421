//! Re-ranking service: the business rules between a ranked list and what the
//! user sees. Hard filters (request exclusions, already purchased, out of
//! stock, category and price filters) are never relaxed; a per-category cap
//! keeps one category from filling the list. The gateway applies the same
//! rules (`recmesh_algo::rules`) itself when this service is down.

#![forbid(unsafe_code)]

use std::future::Future;
use std::sync::Arc;

use recmesh_algo::rules::{HardFilters, select};
use recmesh_mesh::convert::{FieldError, check_id, rule_item};
use recmesh_proto::v1::{self as pb, reranker_server::RerankerServer};
use recmesh_server::GrpcServer;
use recmesh_server::config::{ConfigError, ServerConfig, ServiceConfig, at_least_one};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

/// Default gRPC port of the reranker.
pub const DEFAULT_PORT: u16 = 50054;

/// Configuration of the reranker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC and admin server.
    pub server: ServerConfig,
    /// Items per category allowed in the final list when the request sets no
    /// cap (0 = no cap).
    pub default_category_cap: u32,
    /// Most candidates one request may carry.
    pub max_candidates: usize,
    /// Longest final list.
    pub max_count: u32,
    /// Most excluded or purchased ids one request may carry.
    pub max_ids: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::on_port(DEFAULT_PORT),
            // With 10 items shown, at most 4 from one category keeps at least
            // three categories on screen.
            default_category_cap: 4,
            max_candidates: 2_000,
            max_count: 200,
            max_ids: 5_000,
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        at_least_one(&[
            ("max_candidates", self.max_candidates as u64),
            ("max_count", u64::from(self.max_count)),
        ])
    }
}

/// The reranker gRPC service.
#[derive(Debug, Clone)]
pub struct RerankerService {
    config: Arc<Config>,
}

impl RerankerService {
    /// A reranker with `config`.
    pub fn new(config: Config) -> Self {
        RerankerService {
            config: Arc::new(config),
        }
    }

    /// Applies the rules to a request.
    pub fn rerank(&self, req: pb::RerankRequest) -> Result<pb::RerankResponse, FieldError> {
        let c = &self.config;
        if req.count == 0 || req.count > c.max_count {
            return Err(FieldError::new(
                "count",
                format!("must be in 1..={}", c.max_count),
            ));
        }
        if req.candidates.len() > c.max_candidates {
            return Err(FieldError::new(
                "candidates",
                format!("at most {} per call", c.max_candidates),
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
        for (n, cand) in req.candidates.iter().enumerate() {
            check_id(&format!("candidates[{n}].item_id"), &cand.item_id)?;
        }
        let f = req.filters.clone().unwrap_or_default();
        let filters = HardFilters {
            excluded: req.exclude_item_ids.iter().map(String::as_str).collect(),
            purchased: req.purchased_item_ids.iter().map(String::as_str).collect(),
            categories: f.categories.iter().map(String::as_str).collect(),
            min_price: f.min_price,
            max_price: f.max_price,
        };
        let cap = if req.category_cap == 0 {
            c.default_category_cap
        } else {
            req.category_cap
        };
        let items: Vec<_> = req.candidates.iter().map(rule_item).collect();
        let (kept, removed) = select(&items, &filters, req.count as usize, cap as usize);
        for (rule, n) in &removed {
            metrics::counter!("recmesh_reranker_removed_total", "rule" => rule.as_str())
                .increment(u64::from(*n));
        }
        let mut candidates = req.candidates;
        let mut slots: Vec<Option<pb::Candidate>> = candidates.drain(..).map(Some).collect();
        Ok(pb::RerankResponse {
            candidates: kept.into_iter().filter_map(|i| slots[i].take()).collect(),
            removed: removed
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

    fn candidate(id: &str, category: &str, in_stock: bool) -> pb::Candidate {
        pb::Candidate {
            item_id: id.into(),
            attributes: Some(pb::ItemAttributes {
                category: category.into(),
                in_stock,
                price: 10.0,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c: Config = recmesh_server::config::load(None).expect("defaults load");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn drops_excluded_purchased_out_of_stock_and_caps() {
        let s = RerankerService::new(Config::default());
        let out = s
            .rerank(pb::RerankRequest {
                user_id: "u".into(),
                candidates: vec![
                    candidate("a", "x", true),
                    candidate("b", "x", false),
                    candidate("c", "x", true),
                    candidate("d", "x", true),
                    candidate("e", "y", true),
                    candidate("f", "y", true),
                    candidate("g", "y", true),
                ],
                count: 10,
                exclude_item_ids: vec!["e".into()],
                purchased_item_ids: vec!["f".into()],
                category_cap: 2,
                ..Default::default()
            })
            .expect("ok");
        let ids: Vec<&str> = out.candidates.iter().map(|c| c.item_id.as_str()).collect();
        assert_eq!(ids, vec!["a", "c", "g"]);
        assert_eq!(out.removed["out_of_stock"], 1);
        assert_eq!(out.removed["category_cap"], 1);
        assert_eq!(out.removed["excluded"], 1);
        assert_eq!(out.removed["purchased"], 1);
    }

    #[test]
    fn count_zero_names_the_field() {
        let s = RerankerService::new(Config::default());
        let err = s.rerank(pb::RerankRequest::default()).expect_err("count 0");
        assert_eq!(err.field, "count");
    }
}

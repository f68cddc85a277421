//! Ranking service: orders candidates by how likely the user is to engage.
//!
//! Item features for the whole batch come from the features service in one
//! call, bounded by its own budget inside the caller's deadline. The model is
//! the documented baseline formula of `recmesh_algo::scoring` until a learned
//! model ships in the bundle. When features are missing or late the service
//! still answers, scoring on retrieval evidence alone, and says so in the
//! model version (`baseline-1+no-features`).

#![forbid(unsafe_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use recmesh_algo::scoring::{BaselineInput, BaselineWeights, baseline_scores};
use recmesh_mesh::convert::{FieldError, check_id};
use recmesh_mesh::{Deadline, bounded, check_address, lazy_channel, outgoing, request_id};
use recmesh_proto::v1::{
    self as pb, features_client::FeaturesClient, ranking_server::RankingServer,
};
use recmesh_server::GrpcServer;
use recmesh_server::config::{ConfigError, ServerConfig, ServiceConfig, at_least_one};
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

/// Default gRPC port of the ranking service.
pub const DEFAULT_PORT: u16 = 50053;

/// Version string of the baseline model.
pub const BASELINE_VERSION: &str = "baseline-1";

/// Configuration of the ranking service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC and admin server.
    pub server: ServerConfig,
    /// Address of the features service.
    pub features_addr: String,
    /// Budget of the batched item-features call, inside the caller's deadline.
    pub features_budget_ms: u64,
    /// Time kept back from the caller's deadline for scoring and the answer.
    pub scoring_reserve_ms: u64,
    /// Most candidates one request may carry.
    pub max_candidates: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::on_port(DEFAULT_PORT),
            // The features service's default address (see its DEFAULT_PORT).
            features_addr: "http://127.0.0.1:50056".into(),
            // A batched in-memory lookup takes well under 5 ms; 20 leaves room
            // for a Redis round trip in production.
            features_budget_ms: 20,
            // Scoring 500 candidates with the baseline takes far below 1 ms.
            scoring_reserve_ms: 2,
            max_candidates: 2_000,
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        at_least_one(&[
            ("features_budget_ms", self.features_budget_ms),
            ("max_candidates", self.max_candidates as u64),
        ])?;
        check_address("features_addr", &self.features_addr)?;
        Ok(())
    }
}

/// The ranking gRPC service.
#[derive(Debug, Clone)]
pub struct RankingService {
    features: FeaturesClient<Channel>,
    config: Arc<Config>,
}

impl RankingService {
    /// A service that fetches features through `features`.
    pub fn new(config: Config, features: Channel) -> Self {
        RankingService {
            features: FeaturesClient::new(features),
            config: Arc::new(config),
        }
    }

    fn validate(&self, req: &pb::RankRequest) -> Result<(), FieldError> {
        check_id("user_id", &req.user_id)?;
        if req.candidates.len() > self.config.max_candidates {
            return Err(FieldError::new(
                "candidates",
                format!("at most {} candidates per call", self.config.max_candidates),
            ));
        }
        for (n, c) in req.candidates.iter().enumerate() {
            check_id(&format!("candidates[{n}].item_id"), &c.item_id)?;
        }
        Ok(())
    }
}

/// Scores and orders `candidates` with the baseline; `features` are the
/// batch's item features when they arrived (matched by id).
pub fn rank(
    mut candidates: Vec<pb::Candidate>,
    features: Option<&pb::GetItemsResponse>,
) -> Vec<pb::Candidate> {
    let by_id: std::collections::HashMap<&str, &pb::ItemFeatures> = features
        .map(|f| f.items.iter().map(|i| (i.item_id.as_str(), i)).collect())
        .unwrap_or_default();
    let sources: std::collections::HashSet<&str> = candidates
        .iter()
        .flat_map(|c| c.source_scores.keys().map(String::as_str))
        .collect();
    let total_sources = sources.len();
    let inputs: Vec<BaselineInput> = candidates
        .iter()
        .map(|c| BaselineInput {
            retrieval_score: c.score,
            popularity: by_id.get(c.item_id.as_str()).map_or(0.0, |f| f.popularity),
            sources: c.source_scores.len().max(1),
        })
        .collect();
    let scores = baseline_scores(&inputs, total_sources, BaselineWeights::default());
    for (c, s) in candidates.iter_mut().zip(scores) {
        c.score = s;
        // Fresh attributes (stock above all) from the features service win
        // over what retrieval knew.
        if let Some(f) = by_id.get(c.item_id.as_str())
            && f.attributes.is_some()
        {
            c.attributes = f.attributes.clone();
        }
    }
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
    candidates
}

#[tonic::async_trait]
impl pb::ranking_server::Ranking for RankingService {
    async fn rank(
        &self,
        request: Request<pb::RankRequest>,
    ) -> Result<Response<pb::RankResponse>, Status> {
        let deadline =
            Deadline::from_metadata(request.metadata(), self.config.server.request_timeout());
        let rid = request_id(&request);
        let req = request.into_inner();
        self.validate(&req)?;
        if !req.model.is_empty() && req.model != "baseline" {
            tracing::debug!(model = %req.model, "unknown model requested; serving the baseline");
        }
        let reserve = Duration::from_millis(self.config.scoring_reserve_ms);
        let budget = deadline
            .budget(Duration::from_millis(self.config.features_budget_ms))
            .min(deadline.remaining().saturating_sub(reserve));
        let ids: Vec<String> = req.candidates.iter().map(|c| c.item_id.clone()).collect();
        let mut client = self.features.clone();
        let features = bounded(budget, |t| {
            client.get_items(outgoing(pb::GetItemsRequest { item_ids: ids }, t, &rid))
        })
        .await;
        let (features, version, detail) = match features {
            Ok(f) => (Some(f), BASELINE_VERSION.to_owned(), String::new()),
            Err(e) => {
                metrics::counter!("recmesh_ranking_features_fallback_total", "outcome" => e.outcome())
                    .increment(1);
                tracing::warn!(error = %e, "item features unavailable; scoring on retrieval evidence only");
                (
                    None,
                    format!("{BASELINE_VERSION}+no-features"),
                    format!("item features unavailable ({e}); scored on retrieval evidence only"),
                )
            }
        };
        let candidates = rank(req.candidates, features.as_ref());
        metrics::counter!("recmesh_ranking_scored_total", "model" => version.clone())
            .increment(candidates.len() as u64);
        Ok(Response::new(pb::RankResponse {
            candidates,
            model_version: version,
            degraded: !detail.is_empty(),
            detail,
        }))
    }
}

/// The ranking server, ready to start or run.
pub fn server(config: Config) -> Result<GrpcServer, recmesh_mesh::AddressError> {
    let features = lazy_channel("features_addr", &config.features_addr)?;
    Ok(GrpcServer::new("ranking", config.server.clone())
        .add_service(RankingServer::new(RankingService::new(config, features))))
}

/// Serves until `shutdown`, then drains.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    server(config)?.run(shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: &str, score: f64, sources: &[&str]) -> pb::Candidate {
        pb::Candidate {
            item_id: id.into(),
            score,
            source_scores: sources.iter().map(|s| (s.to_string(), score)).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c: Config = recmesh_server::config::load(None).expect("defaults load");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn popularity_reorders_close_candidates() {
        let features = pb::GetItemsResponse {
            items: vec![
                pb::ItemFeatures {
                    item_id: "a".into(),
                    popularity: 0.0,
                    ..Default::default()
                },
                pb::ItemFeatures {
                    item_id: "b".into(),
                    popularity: 1.0,
                    ..Default::default()
                },
            ],
            unknown: vec![],
        };
        let ranked = rank(
            vec![candidate("a", 1.0, &["cf"]), candidate("b", 0.9, &["cf"])],
            Some(&features),
        );
        // a: 0.6·1 + 0 + 0.1 = 0.70 ; b: 0.6·0.9 + 0.3 + 0.1 = 0.94
        assert_eq!(ranked[0].item_id, "b");
        assert!((ranked[0].score - 0.94).abs() < 1e-9);
        // Without features the retrieval order stands.
        let ranked = rank(
            vec![candidate("a", 1.0, &["cf"]), candidate("b", 0.9, &["cf"])],
            None,
        );
        assert_eq!(ranked[0].item_id, "a");
    }

    #[tokio::test]
    async fn without_features_it_still_ranks_and_says_so() {
        use pb::ranking_server::Ranking;
        // Port 1 on loopback: nothing listens, the connection is refused.
        let channel = lazy_channel("features_addr", "http://127.0.0.1:1").expect("address");
        let svc = RankingService::new(Config::default(), channel);
        let answer = svc
            .rank(Request::new(pb::RankRequest {
                user_id: "u1".into(),
                candidates: vec![candidate("a", 0.5, &["cf"]), candidate("b", 1.0, &["cf"])],
                ..Default::default()
            }))
            .await
            .expect("ranks anyway")
            .into_inner();
        assert!(answer.degraded);
        assert!(
            answer.detail.starts_with("item features unavailable"),
            "{}",
            answer.detail
        );
        assert_eq!(answer.model_version, "baseline-1+no-features");
        assert_eq!(
            answer.candidates[0].item_id, "b",
            "retrieval evidence alone orders them"
        );
    }

    #[test]
    fn bad_features_address_is_a_config_error() {
        let c = Config {
            features_addr: "127.0.0.1:1".into(),
            ..Config::default()
        };
        let err = c.validate().expect_err("no scheme");
        assert!(err.to_string().contains("features_addr"));
    }
}

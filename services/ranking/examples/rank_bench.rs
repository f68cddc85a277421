//! Times `Rank` on 500 candidates inside the ranking service, item features
//! served from its cache (warmed by a first call to a real features service),
//! on one core (a current-thread runtime), with the LightGBM fixture model
//! and with the baseline.
//!
//! `cargo run --release -p recmesh-ranking --example rank_bench`

use std::time::{Duration, Instant};

use recmesh_catalog::demo::{DemoSpec, generate};
use recmesh_proto::v1::{self as pb, ranking_server::Ranking};
use recmesh_ranking::{Config, RankingService};

const CANDIDATES: usize = 500;
const RUNS: usize = 5_000;

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let data = generate(&DemoSpec::default());
        let features = recmesh_features::server(
            recmesh_features::Config {
                server: recmesh_server::ServerConfig::ephemeral(),
                event_log: recmesh_features::EventLogConfig {
                    path: Default::default(),
                    fsync: false,
                    exposures_path: Default::default(),
                },
                ..Default::default()
            },
            &data,
        )
        .await?
        .start()
        .await?;
        let model = concat!(env!("CARGO_MANIFEST_DIR"), "/../../libs/algo/fixtures/lightgbm/model.txt");
        for (name, model_path) in [("lightgbm fixture (40 trees, 15 leaves)", model), ("baseline", "")] {
            let config = Config {
                features_addr: features.grpc_uri(),
                model_path: model_path.into(),
                // The whole run inside one TTL: this measures scoring from cache.
                item_cache_ttl_ms: 600_000,
                ..Config::default()
            };
            let features = recmesh_mesh::balance::Balanced::new("features_addr", &config.features_addr, &config.balance)?;
            let svc = RankingService::new(config, features)?;
            let candidates: Vec<pb::Candidate> = data.items[..CANDIDATES]
                .iter()
                .enumerate()
                .map(|(i, it)| pb::Candidate {
                    item_id: it.id.clone(),
                    score: 1.0 - i as f64 / CANDIDATES as f64,
                    source: "cf".into(),
                    source_scores: [("cf".to_string(), 0.5)].into(),
                    ..Default::default()
                })
                .collect();
            let candidates = recmesh_mesh::lean::from_candidates(&candidates)?;
            let recent: Vec<pb::Interaction> = data.interactions[..20]
                .iter()
                .map(|e| pb::Interaction {
                    item_id: e.item.clone(),
                    event_type: pb::EventType::View as i32,
                    timestamp_ms: e.timestamp_ms,
                })
                .collect();
            let request = || {
                tonic::Request::new(pb::RankRequest {
                    user_id: "u1".into(),
                    candidates: Some(candidates.clone()),
                    model: String::new(),
                    recent: recent.clone(),
                })
            };
            let warm = svc.rank(request()).await?.into_inner();
            assert!(!warm.degraded, "features reachable for the warm-up");
            let mut timings = Vec::with_capacity(RUNS);
            for _ in 0..RUNS {
                let req = request();
                let started = Instant::now();
                let out = svc.rank(req).await?.into_inner();
                timings.push(started.elapsed());
                assert_eq!(out.candidates.map_or(0, |l| l.id_ends.len()), CANDIDATES);
            }
            timings.sort();
            let q = |p: f64| timings[((timings.len() - 1) as f64 * p) as usize];
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            println!(
                "rank {CANDIDATES} candidates, {name}, {RUNS} runs, one core: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                ms(q(0.5)),
                ms(q(0.99)),
                ms(q(1.0))
            );
        }
        features.shutdown().await?;
        Ok(())
    })
}

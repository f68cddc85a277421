//! The `recmesh` client commands: call the gateway and print what a person
//! wants to read, items with their reasons first and the stage report after.

use std::fmt::Write as _;

use recmesh_proto::v1::{self as pb, gateway_client::GatewayClient};
use tonic::transport::Channel;

/// Connects to the gateway at `addr` (`http://host:port`).
pub async fn connect(addr: &str) -> anyhow::Result<GatewayClient<Channel>> {
    let endpoint = recmesh_mesh::check_address("--gateway", addr)?;
    let channel = endpoint.connect().await.map_err(|e| {
        anyhow::anyhow!("cannot reach the gateway at {addr}: {e}. Is the mesh up (`recmesh up`)? Set --gateway or RECMESH_GATEWAY if it runs elsewhere.")
    })?;
    Ok(GatewayClient::new(channel))
}

fn outcome(o: i32) -> &'static str {
    match pb::StageOutcome::try_from(o).unwrap_or(pb::StageOutcome::Unspecified) {
        pb::StageOutcome::Ok => "ok",
        pb::StageOutcome::Timeout => "TIMEOUT",
        pb::StageOutcome::Error => "ERROR",
        pb::StageOutcome::Skipped => "skipped",
        pb::StageOutcome::Unspecified => "?",
    }
}

/// A response as text.
pub fn render(r: &pb::RecommendResponse) -> String {
    let mut out = String::new();
    let _ = write!(out, "request {}", r.request_id);
    if !r.model_version.is_empty() {
        let _ = write!(out, "  model {}", r.model_version);
    }
    for a in &r.assignments {
        let _ = write!(out, "  experiment {}={}", a.experiment_id, a.variant);
    }
    if r.cached {
        out.push_str("  (cached)");
    }
    if r.degraded {
        out.push_str("  DEGRADED");
    }
    out.push('\n');
    if r.items.is_empty() {
        out.push_str("  (no items)\n");
    }
    for (n, item) in r.items.iter().enumerate() {
        let _ = writeln!(
            out,
            "{:>3}. {:<8} {:<12} {:>8.2}  score {:.3}  [{}] {}",
            n + 1,
            item.item_id,
            item.category,
            item.price,
            item.score,
            if item.exploration {
                "explore"
            } else {
                item.source.as_str()
            },
            item.reasons.join(" · ")
        );
    }
    if !r.stages.is_empty() {
        let stages: Vec<String> = r
            .stages
            .iter()
            .map(|s| {
                let mut t = format!(
                    "{} {} {:.1}ms",
                    s.stage,
                    outcome(s.outcome),
                    f64::from(s.latency_us) / 1000.0
                );
                if !s.fallback.is_empty() {
                    let _ = write!(t, " → {}", s.fallback);
                }
                t
            })
            .collect();
        let _ = writeln!(out, "stages: {}", stages.join(" | "));
    }
    out
}

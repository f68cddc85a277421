//! Observability contract: every metric name in the code is in the one
//! catalog (`recmesh_server::telemetry::METRICS`), and the exposition of a
//! mesh that has served traffic passes `promtool check metrics` (Debian's
//! `prometheus` package; tests/run.sh installs it when missing).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use recmesh_e2e::TestMesh;
use recmesh_proto::v1 as pb;
use recmesh_server::telemetry::METRICS;

fn names_in(dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).expect("readable").flatten() {
        let path = entry.path();
        if path.is_dir() {
            names_in(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("utf-8");
            for piece in text.split("\"recmesh_").skip(1) {
                let name: String = piece
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                if piece[name.len()..].starts_with('"') {
                    out.insert(format!("recmesh_{name}"));
                }
            }
        }
    }
}

#[test]
fn every_metric_in_the_code_is_in_the_catalog() {
    let root = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    let mut used = BTreeSet::new();
    names_in(&root.join("services"), &mut used);
    names_in(&root.join("libs"), &mut used);
    // The proto descriptor constant, not a metric.
    used.remove("recmesh_descriptor");
    let catalog: BTreeSet<String> = METRICS.iter().map(|m| m.0.to_owned()).collect();
    // The catalog's own file names them all; only the other files count.
    let missing: Vec<_> = used.difference(&catalog).collect();
    assert!(
        missing.is_empty(),
        "metrics without a catalog entry: {missing:?}"
    );
    assert_eq!(catalog.len(), METRICS.len(), "no duplicates");
    for (name, _, help) in METRICS {
        assert!(!help.is_empty(), "{name} has no help");
    }
}

#[test]
fn the_dashboard_uses_only_cataloged_metrics() {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../helm/recmesh/dashboards/recmesh.json"
    ));
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("json");
    let catalog: BTreeSet<&str> = METRICS.iter().map(|m| m.0).collect();
    let mut used = 0;
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for piece in expr.split("recmesh_").skip(1) {
                let name: String = piece
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                    .collect();
                let full = format!("recmesh_{name}");
                let base = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| full.strip_suffix(s))
                    .unwrap_or(&full);
                assert!(
                    catalog.contains(base),
                    "{} uses unknown metric {full}",
                    panel["title"]
                );
                used += 1;
            }
        }
    }
    assert!(used > 20, "{used}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exposition_passes_promtool() {
    let mesh = TestMesh::start().await;
    let mut client = mesh.client().await;
    for n in 0..5 {
        client
            .recommend(pb::RecommendRequest {
                user_id: format!("u{n}"),
                count: 10,
                ..Default::default()
            })
            .await
            .expect("answer");
    }
    client
        .track(pb::TrackRequest {
            event_id: "metrics-1".into(),
            user_id: "u1".into(),
            item_id: "i1".into(),
            event_type: pb::EventType::Click as i32,
            timestamp_ms: 0,
        })
        .await
        .expect("tracked");
    let response = recmesh_e2e::http_get(mesh.mesh.gateway.admin_addr, "/metrics").await;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    assert!(
        body.contains("# HELP recmesh_gateway_stage_duration_seconds"),
        "help text present"
    );
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (tests/run.sh installs the prometheus package when missing)");
    promtool
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write");
    let out = promtool.wait_with_output().expect("promtool ends");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

//! The load generator against a real mesh: a short open-loop run of the CI
//! scenario gives a report, a verdict, and an HTML page with its plots; an
//! SLO nobody can meet gives a failing verdict.

use recmesh_e2e::TestMesh;
use recmesh_loadtest::{Scenario, connect, html, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_loop_run_reports_and_judges() {
    let mesh = TestMesh::start().await;
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../loadtest/scenarios/ci.toml");
    let scenario = Scenario::from_file(&path).expect("ci scenario");
    let clients = connect(&mesh.mesh.gateway.grpc_uri())
        .await
        .expect("gateway");
    let report = run(&clients, &scenario).await.expect("run");
    // Open loop: every intended request was sent, warm-up included.
    let expected = ((scenario.warmup_s + scenario.duration_s) * scenario.rate).round() as u64;
    assert!(
        report.sent.abs_diff(expected) <= 1,
        "sent {} of {expected}",
        report.sent
    );
    assert!(
        report.measured > 0 && report.measured < report.sent,
        "warm-up not counted"
    );
    assert_eq!(
        report.errors.values().sum::<u64>(),
        0,
        "{:?}",
        report.errors
    );
    assert!(report.verdict.pass, "{}", report.text());
    assert!(report.per_call.contains_key("recommend"));
    for stage in ["assign", "features", "retrieval", "ranking", "rerank"] {
        assert!(
            report.per_stage.contains_key(stage),
            "stage {stage} from the stage reports"
        );
    }
    let p = &report.latency;
    assert!(p.p50 <= p.p90 && p.p90 <= p.p99 && p.p99 <= p.p999 && p.p999 <= p.max);
    let page = html::report(&report);
    assert!(
        page.contains("<svg") && page.contains("Latency over time") && page.contains("SLO PASS")
    );
    let json = serde_json::to_value(&report).expect("json");
    assert!(json["latency"]["p99"].as_f64().is_some());

    // The same traffic against an SLO of 1 µs fails, and says why.
    let mut strict = scenario.clone();
    strict.slo.p99_ms = 0.001;
    strict.duration_s = 1.0;
    strict.warmup_s = 0.0;
    let r = run(&clients, &strict).await.expect("run");
    assert!(!r.verdict.pass);
    assert!(
        r.verdict.checks[0].starts_with("FAIL p99"),
        "{:?}",
        r.verdict.checks
    );

    // One user asking again and again: after the first answer the gateway's
    // response cache answers, and the report counts it, unless the scenario
    // bypasses the cache.
    let mut repeat = scenario.clone();
    repeat.users = recmesh_loadtest::scenario::Users {
        cold: 0.0,
        active: 1.0,
        power: 0.0,
        population: 1,
        power_users: 1,
    };
    repeat.calls = recmesh_loadtest::scenario::Calls {
        recommend: 1.0,
        similar: 0.0,
        trending: 0.0,
        track: 0.0,
    };
    repeat.rate = 20.0;
    repeat.duration_s = 1.0;
    repeat.warmup_s = 0.0;
    let r = run(&clients, &repeat).await.expect("run");
    assert!(r.cache_hit_rate >= 0.5, "{}", r.text());
    assert!(
        r.text()
            .contains("Recommends from the gateway's response cache")
    );
    repeat.bypass_cache = true;
    let r = run(&clients, &repeat).await.expect("run");
    assert_eq!(r.measured, 20);
    assert_eq!(r.cache_hit_rate, 0.0, "{}", r.text());
}

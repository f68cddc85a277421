//! Balancing end to end: a `dns://` upstream resolved and re-resolved, and
//! a static list with a dead instance that the gateway ejects. In a test
//! binary of its own, so the process-wide metrics it checks are only its own.

use recmesh_e2e::{TestMesh, all_healthy, http_get, recommend_for};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_upstream_resolves_and_a_dead_listed_instance_is_ejected() {
    // A port nothing listens on: connections are refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let probe = TestMesh::start().await;
    let retrieval_port = probe.mesh.stages.retrieval.grpc_addr.port();
    let reranker = probe.mesh.stages.reranker.grpc_uri();
    let mesh = TestMesh::start_configured(
        |_| {},
        |g| {
            g.cache.ttl_ms = 0;
            g.upstreams.retrieval = format!("dns://localhost:{retrieval_port}");
            g.upstreams.reranker = format!("{reranker},http://{dead}");
            g.balance.eject_after = 2;
            g.balance.eject_ms = 60_000;
        },
    )
    .await;
    let mut client = mesh.client().await;
    // Re-ranking is not retried, so a call the balancer sends to the dead
    // instance falls back, until that instance is ejected (after 2).
    let mut degraded = 0;
    for i in 0..30 {
        let r = recommend_for(&mut client, &format!("u{i}")).await;
        let retrieval = r
            .stages
            .iter()
            .find(|s| s.stage == "retrieval")
            .expect("retrieval");
        assert!(
            retrieval.fallback.is_empty(),
            "dns upstream answers: {:?}",
            r.stages
        );
        // Only the re-ranking stage is under test: another stage late on a
        // loaded debug build is not the balancer's doing.
        let rerank = r
            .stages
            .iter()
            .find(|s| s.stage == "rerank")
            .expect("rerank");
        if !rerank.fallback.is_empty() {
            degraded += 1;
            eprintln!("call {i}: rerank fell back: {rerank:?}");
        }
    }
    assert!(
        degraded <= 2,
        "{degraded} re-rankings fell back before the ejection"
    );
    let metrics = http_get(mesh.mesh.gateway.admin_addr, "/metrics").await;
    assert!(
        metrics
            .lines()
            .any(|l| l
                .starts_with("recmesh_upstream_ejections_total{upstream=\"upstreams.reranker\"} ")),
        "ejection counted"
    );
    all_healthy(&mut client, 20, "after ejection").await;
}

//! The model bundle end to end: the mesh serves a published bundle, and a
//! newer one published while clients keep calling `Recommend` is swapped in
//! by retrieval and ranking without a failed request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use recmesh_catalog::bundle::{BuildParams, Bundle};
use recmesh_e2e::{TestMesh, http_get, scratch_dir, test_data};
use recmesh_proto::v1 as pb;

/// The LightGBM fixture (features named as recmesh's rows).
const MODEL: &str = include_str!("../libs/algo/fixtures/lightgbm/model.txt");

fn bundle(version: &str, factors: usize, ranker: String) -> Bundle {
    let mut params = BuildParams::default();
    params.als.factors = factors;
    params.als.iterations = 3;
    params.als.threads = 1;
    let mut b = Bundle::build(&test_data(), &params, |_| {});
    b.manifest.version = version.to_owned();
    b.ranker = Some(ranker);
    b
}

fn serving(metrics: &str, version: &str) -> bool {
    metrics.lines().any(|l| {
        l.starts_with("recmesh_bundle_info")
            && l.contains(&format!("version=\"{version}\""))
            && l.ends_with(" 1")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_bundle_is_swapped_in_while_requests_keep_succeeding() {
    let root = scratch_dir("bundles");
    bundle("v0000000000001-first", 0, MODEL.to_owned())
        .publish(&root)
        .expect("publish the first bundle");
    let dir = root.display().to_string();
    let t = TestMesh::start_with(|c| {
        c.retrieval.bundle_dir = dir.clone();
        c.retrieval.bundle_reload_ms = 50;
        c.ranking.bundle_dir = dir.clone();
        c.ranking.model_reload_ms = 50;
    })
    .await;
    let retrieval_admin = t.mesh.stages.retrieval.admin_addr;
    let metrics = http_get(retrieval_admin, "/metrics").await;
    assert!(
        serving(&metrics, "v0000000000001-first"),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("bundle") || l.starts_with("HTTP"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let versions = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut clients = Vec::new();
    for n in 0..3 {
        let mut client = t.client().await;
        let (stop, ok, failed, versions) =
            (stop.clone(), ok.clone(), failed.clone(), versions.clone());
        clients.push(tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let req = pb::RecommendRequest {
                    user_id: format!("u{}", (n * 97 + i) % 400),
                    count: 10,
                    ..Default::default()
                };
                match client.recommend(req).await {
                    Ok(r) if !r.get_ref().items.is_empty() => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        let v = r.into_inner().model_version;
                        let mut seen = versions.lock().expect("lock");
                        if seen.last() != Some(&v) {
                            seen.push(v);
                        }
                    }
                    Ok(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("recommend failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ok.load(Ordering::Relaxed);

    // Publish a second bundle (now with ALS vectors, and another ranker)
    // while the clients run; wait until retrieval serves it.
    let second = "v0000000000002-second";
    let publish = {
        let root = root.clone();
        tokio::task::spawn_blocking(move || {
            bundle(second, 8, format!("{MODEL}\n"))
                .publish(&root)
                .expect("publish the second bundle")
        })
    };
    publish.await.expect("publish task");
    let mut swapped = false;
    for _ in 0..200 {
        if serving(&http_get(retrieval_admin, "/metrics").await, second) {
            swapped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("client task");
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let versions = versions.lock().expect("lock").clone();
    eprintln!(
        "{ok} answered ({before} before the publish), {failed} failed; ranker versions {versions:?}"
    );
    assert!(swapped, "retrieval serves the second bundle");
    assert_eq!(failed, 0, "no request failed across the swap");
    assert!(ok > before, "requests were answered after the publish too");
    // Ranking followed `current` to the second bundle's ranker.
    assert!(versions.len() >= 2, "the ranker changed: {versions:?}");
    assert_ne!(versions.first(), versions.last());
    t.mesh.shutdown().await.expect("shutdown");
    let _ = std::fs::remove_dir_all(&root);
}

/// Retrieval on the `qdrant` backend against a real Qdrant server (the one
/// `tools/build-qdrant.sh` builds, started here; or `QDRANT_URL`): the
/// bundle's item vectors go into a collection of the server, the `ann`
/// source answers from it, and `Recommend` returns a full answer. Skips, and
/// says so, when there is no server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recommend_is_served_with_the_ann_index_in_a_real_qdrant_server() {
    // QDRANT_URL, else the server tools/build-qdrant.sh built, started
    // here; else say why the test does nothing.
    let Some((url, _server)) = recmesh_vector::testkit::server_for_test(&scratch_dir("qdrant"))
    else {
        return;
    };
    let root = scratch_dir("qdrant-bundles");
    bundle("v0000000000003-qdrant", 8, MODEL.to_owned())
        .publish(&root)
        .expect("publish a bundle with item vectors");
    let dir = root.display().to_string();
    let t = TestMesh::start_with(|c| {
        c.retrieval.bundle_dir = dir.clone();
        c.ranking.bundle_dir = dir.clone();
        c.retrieval.ann.backend = recmesh_retrieval::AnnBackend::Qdrant;
        c.retrieval.ann.qdrant_url = url.clone();
        c.retrieval.ann.qdrant_collection_prefix = format!("recmesh-e2e-{}-", std::process::id());
    })
    .await;
    let mut retrieval =
        pb::retrieval_client::RetrievalClient::connect(t.mesh.stages.retrieval.grpc_uri())
            .await
            .expect("retrieval");
    let mut ann_offered = 0;
    for user in ["u1", "u2", "u3", "u4", "u5"] {
        let answer = retrieval
            .retrieve(pb::RetrieveRequest {
                user_id: user.into(),
                count: 100,
                ..Default::default()
            })
            .await
            .expect("retrieve")
            .into_inner();
        let ann = answer
            .sources
            .iter()
            .find(|s| s.source == "ann")
            .expect("an ann report");
        assert_ne!(ann.outcome, "error", "{user}: {ann:?}");
        if ann.outcome == "ok" {
            ann_offered += ann.candidates;
        }
    }
    assert!(ann_offered > 0, "the ann source answered from Qdrant");
    let mut client = t.client().await;
    let r = client
        .recommend(pb::RecommendRequest {
            user_id: "u1".into(),
            count: 10,
            ..Default::default()
        })
        .await
        .expect("recommend")
        .into_inner();
    assert_eq!(r.items.len(), 10);
    assert!(!r.degraded, "{:?}", r.stages);
}

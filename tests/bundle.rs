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

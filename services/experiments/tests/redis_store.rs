//! The experiments state in a real `redis-server`, shared by two replicas:
//! a push on one reaches the other, concurrent changes do not overwrite each
//! other, sticky assignments and the state survive a restart of both.

use std::time::{Duration, Instant};

use recmesh_experiments::{Config, ExperimentDef, Experiments, VariantDef};
use recmesh_features::testkit::RedisServer;

fn experiment(id: &str, layer: &str, weights: [u32; 2], sticky: bool) -> ExperimentDef {
    ExperimentDef {
        id: id.into(),
        layer: layer.into(),
        traffic: 1.0,
        status: "running".into(),
        start_ms: 0,
        end_ms: 0,
        guardrails: vec![],
        sticky,
        cuped: false,
        variants: vec![
            VariantDef {
                name: "control".into(),
                weight: weights[0],
                params: Default::default(),
                stopped_reason: String::new(),
            },
            VariantDef {
                name: "b".into(),
                weight: weights[1],
                params: Default::default(),
                stopped_reason: String::new(),
            },
        ],
    }
}

fn config(url: &str) -> Config {
    Config {
        redis_url: url.into(),
        redis_poll_ms: 50,
        state_dir: String::new(),
        features_addr: String::new(),
        ..Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_the_state_in_redis() {
    let dir = std::env::temp_dir().join(format!("recmesh-exp-redis-{}", std::process::id()));
    let server = RedisServer::start(&dir).expect("redis-server");
    // Two replicas.
    let a = Experiments::open(&config(&server.url()))
        .await
        .expect("replica a");
    let b = Experiments::open(&config(&server.url()))
        .await
        .expect("replica b");
    assert_eq!(
        a.current().version,
        b.current().version,
        "both start from the seeded demo set"
    );

    // A change on one replica is saved only over the version it read. b
    // has not seen a's change yet: its change starts from Redis anyway, so
    // it builds on a's instead of overwriting it.
    let v = a
        .change(|set| set.put(experiment("shared", "l1", [1, 1], true), None))
        .await
        .expect("saved")
        .expect("valid");
    let w = b
        .change(|set| set.put(experiment("other", "l2", [1, 1], false), None))
        .await
        .expect("saved")
        .expect("valid");
    assert!(w > v);
    assert!(b.current().get("shared").is_some() && b.current().get("other").is_some());

    // a follows b's change through its poll, without changing anything.
    a.spawn_redis_poll(Duration::from_millis(50));
    let started = Instant::now();
    while a.current().version < w {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a never saw b's change"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(a.current().get("other").is_some());

    // Sticky: assignments recorded in Redis survive a weight change and a
    // restart of every replica.
    let first: Vec<String> = (0..100)
        .map(|u| {
            a.assign(&format!("u{u}"))
                .assignments
                .iter()
                .find(|x| x.experiment_id == "shared")
                .expect("in shared")
                .variant
                .clone()
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await; // HSETNX in the background
    drop((a, b));
    let again = Experiments::open(&config(&server.url()))
        .await
        .expect("restart");
    again
        .change(|set| set.put(experiment("shared", "l1", [50, 1], true), None))
        .await
        .expect("saved")
        .expect("valid");
    for (u, want) in first.iter().enumerate() {
        let got = again.assign(&format!("u{u}"));
        let got = &got
            .assignments
            .iter()
            .find(|x| x.experiment_id == "shared")
            .expect("in shared")
            .variant;
        assert_eq!(got, want, "u{u}");
    }
}

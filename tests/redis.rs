//! The mesh with its features on a real `redis-server`: `redis-server` is
//! killed with SIGKILL in the middle of a stream of `Track` calls and
//! restarted; every acknowledged event must be in the Redis event stream
//! exactly once after the replay.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fred::prelude::*;
use recmesh_e2e::{BUDGET_SCALE, scratch_dir, test_budgets, test_data};
use recmesh_features::testkit::RedisServer;
use recmesh_proto::v1::{self as pb, gateway_client::GatewayClient};

#[derive(Default)]
struct Tally {
    acked: Vec<String>,
    buffered: usize,
    failed: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_redis_mid_stream_loses_no_acknowledged_track() {
    let dir = scratch_dir("redis-restart");
    let mut redis = RedisServer::start(&dir.join("redis")).expect("redis-server");
    let data = Arc::new(test_data());
    let mut stages = recmesh::StageConfigs::default();
    stages.ranking.features_budget_ms *= BUDGET_SCALE;
    stages.features.backend = recmesh_features::Backend::Redis;
    stages.features.redis.url = redis.url();
    stages.features.redis.buffer_path = dir.join("buffer.tsv");
    stages.experiments.state_dir = dir.join("experiments").display().to_string();
    stages.features.redis.replay_interval_ms = 20;
    let mesh = recmesh::start(
        Arc::clone(&data),
        recmesh::PortPlan::EPHEMERAL,
        stages,
        |g| {
            g.budgets = test_budgets();
        },
    )
    .await
    .expect("mesh starts on redis");

    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for sender in 0..4 {
        let stop = Arc::clone(&stop);
        let uri = mesh.gateway.grpc_uri();
        let items: Vec<String> = data.items.iter().take(200).map(|i| i.id.clone()).collect();
        senders.push(tokio::spawn(async move {
            let mut client = GatewayClient::connect(uri).await.expect("gateway");
            let mut tally = Tally::default();
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("s{sender}-{n}");
                let r = client
                    .track(pb::TrackRequest {
                        event_id: id.clone(),
                        user_id: format!("stream-user-{sender}"),
                        item_id: items[n % items.len()].clone(),
                        event_type: pb::EventType::View as i32,
                        timestamp_ms: 0,
                    })
                    .await;
                match r {
                    Ok(r) => {
                        let r = r.into_inner();
                        assert!(
                            r.applied || r.buffered,
                            "a new id is never a duplicate: {r:?}"
                        );
                        tally.buffered += usize::from(r.buffered);
                        tally.acked.push(id);
                    }
                    Err(e) => tally.failed.push(format!("{id}: {e:?}")),
                }
                n += 1;
            }
            tally
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let redis = tokio::task::spawn_blocking(move || {
        redis.restart().expect("redis restarts");
        redis
    })
    .await
    .expect("restart task");
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, Ordering::Relaxed);
    let mut tally = Tally::default();
    for s in senders {
        let t = s.await.expect("sender");
        tally.acked.extend(t.acked);
        tally.buffered += t.buffered;
        tally.failed.extend(t.failed);
    }
    assert!(
        tally.buffered > 0,
        "the outage was exercised: some events were buffered"
    );
    assert!(
        tally.failed.is_empty(),
        "refused while the buffer had room: {:?}",
        tally.failed
    );

    // Wait for the buffer to replay, then compare the stream with the acks.
    let client = Client::new(
        Config::from_url(&redis.url()).expect("url"),
        None,
        None,
        None,
    );
    client.init().await.expect("redis client");
    let started = Instant::now();
    let mut len: usize = 0;
    while started.elapsed() < Duration::from_secs(20) {
        len = client.xlen("rm:events").await.expect("xlen");
        if len >= tally.acked.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let entries: Vec<(String, std::collections::HashMap<String, String>)> = client
        .xrange("rm:events", "-", "+", None)
        .await
        .expect("xrange");
    let in_stream: Vec<&str> = entries.iter().map(|(_, f)| f["id"].as_str()).collect();
    let unique: HashSet<&str> = in_stream.iter().copied().collect();
    assert_eq!(
        unique.len(),
        in_stream.len(),
        "no event twice in the stream"
    );
    let acked: HashSet<&str> = tally.acked.iter().map(String::as_str).collect();
    let lost: Vec<&&str> = acked.difference(&unique).collect();
    assert!(
        lost.is_empty(),
        "acknowledged but not in the stream: {lost:?}"
    );
    assert_eq!(
        (len, in_stream.len()),
        (tally.acked.len(), tally.acked.len()),
        "events acknowledged = events in the stream"
    );

    // A malformed event is refused naming the field, and nothing reaches the stream.
    let mut gateway = GatewayClient::connect(mesh.gateway.grpc_uri())
        .await
        .expect("gateway");
    for (field, req) in [
        (
            "event_type",
            pb::TrackRequest {
                event_id: "bad-1".into(),
                user_id: "u1".into(),
                item_id: "i1".into(),
                event_type: 99,
                timestamp_ms: 0,
            },
        ),
        (
            "timestamp_ms",
            pb::TrackRequest {
                event_id: "bad-2".into(),
                user_id: "u1".into(),
                item_id: "i1".into(),
                event_type: pb::EventType::View as i32,
                timestamp_ms: 1_700_000_000, // seconds, not ms
            },
        ),
    ] {
        let err = gateway.track(req).await.expect_err(field);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().starts_with(field), "{}", err.message());
    }
    let after: usize = client.xlen("rm:events").await.expect("xlen");
    assert_eq!(after, len, "nothing of the refused events was appended");

    eprintln!(
        "acknowledged {} events ({} while redis was down), all in the stream",
        tally.acked.len(),
        tally.buffered
    );
    mesh.gateway.shutdown().await.expect("gateway stops");
}

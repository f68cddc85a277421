//! Times `Ingest` of one event while Redis is down, so every event goes to
//! the outage buffer and is fsynced before it is acknowledged: CALLERS
//! concurrent callers, each ingesting one event after another, for SECONDS.
//! Prints the calls made, their p50, p99 and worst latency, and the
//! buffer's writes (one fsync each) per call.
//!
//! `cargo run --release -p recmesh-features --example buffer_bench [CALLERS] [SECONDS] [DIR]`
//!
//! DIR (default: the system's temp directory) decides which disk is timed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use recmesh_catalog::{Dataset, EventKind};
use recmesh_features::redis::{RedisConfig, RedisStore};
use recmesh_features::testkit::RedisServer;
use recmesh_features::{FeatureStore, ValidEvent};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let callers: usize = args.next().map_or(Ok(16), |a| a.parse())?;
    let seconds: f64 = args.next().map_or(Ok(5.0), |a| a.parse())?;
    let base = args.next().map_or_else(std::env::temp_dir, Into::into);
    let dir = base.join(format!("recmesh-buffer-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut server = RedisServer::start(&dir.join("redis"))?;
    let config = RedisConfig {
        url: server.url(),
        buffer_path: dir.join("buffer.tsv"),
        max_buffered: usize::MAX,
        // Nothing to replay into while the bench runs.
        replay_interval_ms: 3_600_000,
        ..RedisConfig::default()
    };
    let store = RedisStore::open(
        config,
        &Dataset::default(),
        recmesh_features::Config::default().limits(),
    )
    .await?;
    server.kill();

    let until = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for c in 0..callers {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let mut took = Vec::new();
            let mut n = 0u64;
            while Instant::now() < until {
                let event = ValidEvent {
                    event_id: format!("c{c}-{n}"),
                    user: format!("u{c}"),
                    item: "i1".into(),
                    kind: EventKind::View,
                    timestamp_ms: 1_700_000_000_000,
                };
                let started = Instant::now();
                store.ingest(&[event]).await?;
                took.push(started.elapsed());
                n += 1;
            }
            anyhow::Ok(took)
        }));
    }
    let mut took = Vec::new();
    for t in tasks {
        took.extend(t.await??);
    }
    took.sort();
    let at = |q: f64| took[((took.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    println!(
        "{callers} callers, {seconds} s: {} calls ({:.0}/s), p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; buffered {} in {} writes",
        took.len(),
        took.len() as f64 / seconds,
        at(0.5),
        at(0.99),
        at(1.0),
        store.buffered(),
        store.buffer_writes(),
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

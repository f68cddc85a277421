//! The feature-store contract, run against both backends (the memory one
//! with its event file, the Redis one against a real `redis-server`), and
//! the Redis backend's outage behaviour: stale reads, the durable buffer, a
//! kill -9 of Redis in the middle of a stream of `Ingest` calls.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use recmesh_catalog::{Dataset, EventKind, Interaction, Item, item_key};
use recmesh_features::redis::{RedisConfig, RedisStore};
use recmesh_features::testkit::RedisServer;
use recmesh_features::{Backend, Config, EventLogConfig, FeatureStore, ValidEvent, open_store};
use recmesh_proto::v1 as pb;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn scratch(what: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "recmesh-contract-{what}-{}-{n}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// Ten items in two categories; u0 viewed i1 then bought i2 a day ago.
fn data() -> Dataset {
    let items = (0..10)
        .map(|n| Item {
            id: format!("i{n}"),
            category: if n < 5 { "books" } else { "games" }.into(),
            brand: "acme".into(),
            price: 10.0 + f64::from(n),
            in_stock: true,
            promoted: false,
            created_at: 1_700_000_000,
            title: format!("Item {n}"),
        })
        .collect();
    let day_ago = now_ms() - 86_400_000;
    let interactions = vec![
        Interaction {
            user: "u0".into(),
            item: "i1".into(),
            kind: EventKind::View,
            timestamp_ms: day_ago,
        },
        Interaction {
            user: "u0".into(),
            item: "i2".into(),
            kind: EventKind::Purchase,
            timestamp_ms: day_ago + 1_000,
        },
    ];
    Dataset {
        items,
        interactions,
    }
}

fn event(id: &str, user: &str, item: &str, kind: EventKind, ts: i64) -> ValidEvent {
    ValidEvent {
        event_id: id.into(),
        user: user.into(),
        item: item.into(),
        kind,
        timestamp_ms: ts,
    }
}

fn memory_config(dir: &std::path::Path) -> Config {
    Config {
        event_log: EventLogConfig {
            path: dir.join("events.tsv"),
            fsync: true,
            exposures_path: dir.join("exposures.jsonl"),
        },
        ..Config::default()
    }
}

fn redis_config(server: &RedisServer, dir: &std::path::Path) -> Config {
    Config {
        backend: Backend::Redis,
        redis: RedisConfig {
            url: server.url(),
            buffer_path: dir.join("buffer.tsv"),
            replay_interval_ms: 20,
            ..RedisConfig::default()
        },
        ..Config::default()
    }
}

/// For the slow-Redis tests: patient by default (a plain read waits out a
/// pause), and without the known-users filter (its own test has it).
fn patient_without_known_users(server: &RedisServer, dir: &std::path::Path) -> Config {
    let mut config = redis_config(server, dir);
    config.redis.command_timeout_ms = 10_000;
    config.redis.known_users = 0;
    config
}

/// Holds every client's commands for `ms` (`CLIENT PAUSE … ALL`), as
/// reads wait behind a write stuck in a slow fsync.
async fn pause_redis(server: &RedisServer, ms: u64) {
    use fred::prelude::*;
    let raw = Builder::from_config(Config::from_url(&server.url()).expect("url"))
        .build()
        .expect("client");
    raw.init().await.expect("raw client");
    let pause =
        fred::types::CustomCommand::new_static("CLIENT", fred::types::ClusterHash::Random, false);
    let _: String = raw
        .custom(
            pause,
            vec!["PAUSE".to_owned(), ms.to_string(), "ALL".to_owned()],
        )
        .await
        .expect("CLIENT PAUSE");
}

/// The Redis backend with the service's default limits.
async fn open_redis(config: RedisConfig, data: &Dataset) -> Arc<RedisStore> {
    RedisStore::open(config, data, Config::default().limits())
        .await
        .expect("open the redis store")
}

/// What every backend must do.
async fn contract(store: Arc<dyn FeatureStore>) {
    // The dataset's history is there from the start.
    let u0 = store.user("u0", 10).await.expect("u0");
    assert!(u0.known);
    let recent: Vec<&str> = u0.recent.iter().map(|r| r.item_id.as_str()).collect();
    assert_eq!(recent, ["i2", "i1"], "newest first");
    assert_eq!(u0.purchased_item_ids, ["i2"]);
    assert_eq!(u0.top_categories, ["books"]);
    assert_eq!((u0.events_24h, u0.events_7d), (0, 2), "a day old: 7 d only");
    // The seen set: every item of the history, newest first, with the
    // newest time of each event kind.
    let day_ago_s = ((now_ms() - 86_400_000) / 1000) as u32;
    assert_eq!(u0.seen_items, [item_key("i2"), item_key("i1")]);
    assert_eq!(u0.seen_at_s.len(), 8);
    let (i2, i1) = (&u0.seen_at_s[..4], &u0.seen_at_s[4..]);
    assert_eq!((i2[0], i2[1], i2[2]), (0, 0, 0), "i2 was only bought");
    assert!(i2[3].abs_diff(day_ago_s + 1) <= 5, "{i2:?}");
    assert!(
        i1[0].abs_diff(day_ago_s) <= 5 && i1[1..] == [0, 0, 0],
        "{i1:?}"
    );

    let now = now_ms();
    let batch = vec![
        event("e1", "u9", "i3", EventKind::View, now - 3_000),
        event("e2", "u9", "i3", EventKind::Click, now - 2_000),
        event("e3", "u9", "i7", EventKind::Purchase, now - 1_000),
    ];
    let r = store.ingest(&batch).await.expect("ingest");
    assert_eq!((r.applied, r.duplicates, r.buffered), (3, 0, 0));

    // Idempotent: a replay applies nothing, a duplicate inside one batch once.
    let mut again = batch.clone();
    again.push(event("e4", "u9", "i3", EventKind::View, now));
    let r = store.ingest(&again).await.expect("replay");
    assert_eq!((r.applied, r.duplicates), (1, 3));
    let twice = vec![
        event("e5", "u9", "i4", EventKind::View, now),
        event("e5", "u9", "i4", EventKind::View, now),
    ];
    let r = store.ingest(&twice).await.expect("batch duplicate");
    assert_eq!((r.applied, r.duplicates), (1, 1));

    // An item the catalog does not know is applied and flagged as new.
    let r = store
        .ingest(&[event("e6", "u9", "brand-new", EventKind::View, now)])
        .await
        .expect("new item");
    assert_eq!(r.applied, 1);
    assert_eq!(r.new_items, ["brand-new"]);

    let u9 = store.user("u9", 3).await.expect("u9");
    assert!(u9.known);
    assert_eq!(u9.recent.len(), 3, "max_recent is honoured");
    assert_eq!(u9.purchased_item_ids, ["i7"]);
    // games: a purchase (8); books: view, click, view, view (5).
    assert_eq!(u9.top_categories, ["games", "books"]);
    assert!((u9.category_affinity["games"] - 1.0).abs() < 1e-9);
    let books = u9.category_affinity["books"];
    assert!(
        (0.6..0.63).contains(&books),
        "5/8 with a few seconds of decay: {books}"
    );
    assert_eq!((u9.events_24h, u9.events_7d), (6, 6));
    // Every item u9 touched is seen, past `max_recent` too; i3 keeps its
    // newest view (the replayed batch's e4) and its click.
    let mut seen = u9.seen_items.clone();
    seen.sort();
    let mut want: Vec<u64> = ["i3", "i7", "i4", "brand-new"].map(item_key).to_vec();
    want.sort();
    assert_eq!(seen, want);
    let at = |id: &str| {
        let n = u9
            .seen_items
            .iter()
            .position(|k| *k == item_key(id))
            .expect("seen");
        u9.seen_at_s[n * 4..n * 4 + 4].to_vec()
    };
    let s = |ms: i64| (ms / 1000) as u32;
    assert_eq!(at("i3"), [s(now), s(now - 2_000), 0, 0]);
    assert_eq!(at("i7"), [0, 0, 0, s(now - 1_000)]);

    // One call for many items: counters, CTR, popularity; unknown listed.
    let ids: Vec<String> = ["i3", "i7", "nope", "brand-new"].map(String::from).to_vec();
    let items = store.items(&ids).await.expect("items");
    let by_id = |id: &str| -> &pb::ItemFeatures {
        items
            .items
            .iter()
            .find(|i| i.item_id == id)
            .expect("item present")
    };
    let i3 = by_id("i3");
    assert_eq!((i3.views, i3.clicks, i3.carts, i3.purchases), (2, 1, 0, 0));
    assert!((i3.ctr - 0.5).abs() < 1e-12);
    assert_eq!(
        i3.attributes.as_ref().map(|a| a.category.as_str()),
        Some("books")
    );
    let i7 = by_id("i7");
    assert_eq!(i7.purchases, 1);
    // i7 and i2 (bought in the dataset) share the top score 8; i3 has 1+2+1.
    assert!((i7.popularity - 1.0).abs() < 1e-12);
    assert!((i3.popularity - 0.5).abs() < 1e-12);
    assert_eq!(items.unknown, ["nope", "brand-new"]);

    // A user never seen is cold, not an error.
    let cold = store.user("nobody", 10).await.expect("cold user");
    assert!(!cold.known && cold.recent.is_empty());

    // Exposures come back as logged, with the CUPED covariate when the
    // gateway knew it and without when it did not.
    let exposure = |user: &str, covariate: Option<u32>| pb::Exposure {
        request_id: format!("r-{user}"),
        user_id: user.into(),
        timestamp_ms: now,
        assignments: vec![pb::Assignment {
            experiment_id: "x".into(),
            variant: "b".into(),
            params: Default::default(),
        }],
        item_ids: vec!["i3".into(), "i7".into()],
        user_events_7d: covariate,
    };
    let logged = vec![exposure("u9", Some(6)), exposure("nobody", None)];
    assert_eq!(store.log_exposures(&logged).await.expect("log"), 2);
    let page = store
        .read_log(recmesh_features::LogKind::Exposures, "", 10)
        .await
        .expect("read exposures");
    assert_eq!(page.exposures, logged);
}

#[tokio::test]
async fn memory_backend_keeps_the_contract() {
    let dir = scratch("memory");
    let store = open_store(&memory_config(&dir), &data())
        .await
        .expect("open");
    contract(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backend_keeps_the_contract() {
    let dir = scratch("redis");
    let server = RedisServer::start(&dir.join("redis")).expect("redis-server");
    let store = open_store(&redis_config(&server, &dir), &data())
        .await
        .expect("open");
    contract(store).await;
}

/// With room for two items, the third pushes out the one whose newest event
/// is oldest, on both backends, and a newer event keeps an item in.
async fn seen_set_is_bounded(store: Arc<dyn FeatureStore>) {
    let now = now_ms();
    let events = [
        event("b1", "b", "i1", EventKind::View, now - 5_000),
        event("b2", "b", "i2", EventKind::View, now - 4_000),
        event("b3", "b", "i1", EventKind::Click, now - 3_000),
        event("b4", "b", "i3", EventKind::View, now - 2_000),
    ];
    for e in &events {
        store.ingest(std::slice::from_ref(e)).await.expect("ingest");
    }
    let b = store.user("b", 10).await.expect("b");
    assert_eq!(
        b.seen_items,
        [item_key("i3"), item_key("i1")],
        "i2 (newest at -4 s) went; i1 stayed by its click at -3 s"
    );
}

#[tokio::test]
async fn memory_backend_bounds_the_seen_set() {
    let dir = scratch("memory-seen");
    let mut config = memory_config(&dir);
    config.max_seen_per_user = 2;
    let store = open_store(&config, &data()).await.expect("open");
    seen_set_is_bounded(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_backend_bounds_the_seen_set() {
    let dir = scratch("redis-seen");
    let server = RedisServer::start(&dir.join("redis")).expect("redis-server");
    let mut config = redis_config(&server, &dir);
    config.max_seen_per_user = 2;
    let store = open_store(&config, &data()).await.expect("open");
    seen_set_is_bounded(store).await;
}

#[tokio::test]
async fn memory_backend_replays_its_event_file_after_a_restart() {
    let dir = scratch("memory-restart");
    let config = memory_config(&dir);
    let data = data();
    let store = open_store(&config, &data).await.expect("open");
    let now = now_ms();
    store
        .ingest(&[event("r1", "u5", "i8", EventKind::AddToCart, now)])
        .await
        .expect("ingest");
    drop(store);
    let store = open_store(&config, &data).await.expect("reopen");
    let u5 = store.user("u5", 10).await.expect("u5");
    assert_eq!(u5.recent.len(), 1, "the acknowledged event survived");
    let r = store
        .ingest(&[event("r1", "u5", "i8", EventKind::AddToCart, now)])
        .await
        .expect("replay");
    assert_eq!(r.duplicates, 1, "and its id is still remembered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_bulk_load_runs_once_and_refuses_another_dataset() {
    let dir = scratch("redis-load");
    let server = RedisServer::start(&dir.join("redis")).expect("redis-server");
    let config = redis_config(&server, &dir);
    let data = data();
    let store = open_store(&config, &data).await.expect("first open loads");
    store
        .ingest(&[event("x1", "u0", "i1", EventKind::View, now_ms())])
        .await
        .expect("ingest");
    drop(store);
    let store = open_store(&config, &data).await.expect("second open");
    let u0 = store.user("u0", 10).await.expect("u0");
    assert_eq!(u0.recent.len(), 3, "history not loaded twice: 2 + 1");

    let mut other = data.clone();
    other.items.truncate(3);
    other.interactions.clear();
    let err = open_store(&config, &other)
        .await
        .expect_err("another dataset")
        .to_string();
    assert!(err.contains("`redis.key_prefix`"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_reads_stale_buffers_writes_and_refuses_past_the_bound() {
    let dir = scratch("redis-outage");
    let mut server = RedisServer::start(&dir.join("redis")).expect("redis-server");
    let mut config = redis_config(&server, &dir);
    config.redis.max_buffered = 3;
    let data = data();
    let store = open_redis(config.redis.clone(), &data).await;
    let ids = vec!["i1".to_string(), "i2".to_string()];
    let before = store.user("u0", 10).await.expect("u0");
    let items_before = store.items(&ids).await.expect("items");
    // w1 has history but is never read here before the outage: its event
    // comes through another instance (one ingested here would be read
    // right after it), and this one learns of it from the stream.
    let mut other_config = config.redis.clone();
    other_config.buffer_path = dir.join("other-buffer.tsv");
    let other = open_redis(other_config, &data).await;
    other
        .ingest(&[event("w1", "w1", "i1", EventKind::View, now_ms())])
        .await
        .expect("w1");
    let started = Instant::now();
    while !store.has_no_history("nobody") || store.has_no_history("w1") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the known-users scan and the stream follower did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    drop(other);

    server.kill();
    // Let the L1 entries expire: what answers now is the snapshot.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert_eq!(store.user("u0", 10).await.expect("stale u0"), before);
    assert_eq!(store.items(&ids).await.expect("stale items"), items_before);
    let err = store.user("w1", 10).await.expect_err("no snapshot");
    assert!(err.to_string().contains("unavailable"), "{err}");
    // A user without history gets what Redis would answer.
    let nobody = store.user("nobody", 10).await.expect("no history");
    assert!(!nobody.known && nobody.recent.is_empty(), "{nobody:?}");

    let now = now_ms();
    let r = store
        .ingest(&[
            event("o1", "u0", "i3", EventKind::View, now),
            event("o2", "u0", "i4", EventKind::View, now),
        ])
        .await
        .expect("buffered");
    assert_eq!((r.applied, r.buffered), (0, 2));
    let err = store
        .ingest(&[
            event("o3", "u0", "i5", EventKind::View, now),
            event("o4", "u0", "i6", EventKind::View, now),
        ])
        .await
        .expect_err("past the bound");
    assert!(err.to_string().contains("redis.max_buffered"), "{err}");
    assert_eq!(
        store.buffered(),
        2,
        "the refused batch left the buffer as it was"
    );

    server.restart().expect("restart");
    let started = Instant::now();
    while store.buffered() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "replay did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let u0 = store.user("u0", 10).await.expect("u0 after replay");
    let recent: Vec<&str> = u0.recent.iter().map(|r| r.item_id.as_str()).collect();
    assert_eq!(
        &recent[..2]
            .iter()
            .copied()
            .collect::<std::collections::BTreeSet<_>>(),
        &["i3", "i4"].into_iter().collect()
    );
    // w1's event and the two replayed.
    assert_eq!(store.stream_stats().await.expect("xlen").0, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_exports_through_a_consumer_group_once_per_event() {
    use recmesh_features::redis::{Export, export_stream};
    let dir = scratch("redis-export");
    let server = RedisServer::start(&dir.join("redis")).expect("redis-server");
    let config = redis_config(&server, &dir);
    let store = open_redis(config.redis.clone(), &data()).await;
    let now = now_ms();
    let first: Vec<ValidEvent> = (0..5)
        .map(|n| event(&format!("x{n}"), "u1", "i1", EventKind::Click, now + n))
        .collect();
    store.ingest(&first).await.expect("ingest");
    let export = Export {
        url: server.url(),
        key_prefix: "rm".into(),
        group: "trainer".into(),
        consumer: "test".into(),
        out: dir.join("export.tsv"),
        follow: false,
    };
    assert_eq!(export_stream(&export).await.expect("export"), 5);
    assert_eq!(
        export_stream(&export).await.expect("again"),
        0,
        "nothing new"
    );
    let more = vec![event("x9", "u2", "i2", EventKind::Purchase, now)];
    store.ingest(&more).await.expect("ingest");
    let (len, groups) = store.stream_stats().await.expect("stats");
    assert_eq!(
        (len, groups),
        (6, vec![("trainer".to_string(), 1)]),
        "one event not yet exported"
    );
    assert_eq!(export_stream(&export).await.expect("export"), 1);
    let exported = recmesh_features::log::read_events(&export.out).expect("read");
    let mut expected = first;
    expected.extend(more);
    assert_eq!(exported, expected, "in order, each once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_answers_a_hurried_read_from_the_last_read_features() {
    let dir = scratch("redis-slow");
    let server = RedisServer::start(&dir.join("redis")).expect("redis-server");
    let config = patient_without_known_users(&server, &dir);
    let store = open_redis(config.redis.clone(), &data()).await;
    let before = store.user("u0", 10).await.expect("u0");
    // A newer event the snapshot does not hold (ingesting drops the L1
    // entry), so an answer from Redis and one from the snapshot differ.
    store
        .ingest(&[event("slow1", "u0", "i9", EventKind::View, now_ms())])
        .await
        .expect("ingested");

    // Every other client's commands wait while Redis is paused, as reads
    // wait behind a write stuck in a slow fsync.
    pause_redis(&server, 3_000).await;

    let hurried = store
        .user_within("u0", 10, Duration::from_millis(100))
        .await
        .expect("answered from the snapshot");
    assert_eq!(hurried, before, "the last read features, not a wait");
    let err = store
        .user_within("never-read", 10, Duration::from_millis(100))
        .await
        .expect_err("nothing read before");
    assert!(err.to_string().contains("unavailable"), "{err}");

    // The patient read waits out the pause and sees the new event.
    let after = store.user("u0", 10).await.expect("u0 after the pause");
    assert_eq!(
        after.recent.first().map(|r| r.item_id.as_str()),
        Some("i9"),
        "{after:?}"
    );
}

/// Two instances started on `config`'s Redis: one as configured, once its
/// warm-up is over, and one with its warm-up turned off by `cold`.
async fn warmed_and_cold(
    config: &Config,
    data: &Dataset,
    dir: &std::path::Path,
    cold: impl FnOnce(&mut RedisConfig),
) -> (Arc<RedisStore>, Arc<RedisStore>) {
    let warm = open_redis(config.redis.clone(), data).await;
    let mut cold_config = config.redis.clone();
    cold(&mut cold_config);
    cold_config.buffer_path = dir.join("cold-buffer.tsv");
    let cold = open_redis(cold_config, data).await;
    let started = Instant::now();
    while !warm.snapshot_warmed() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "warm-up did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (warm, cold)
}

/// A restarted instance reads the users of the event stream's latest events
/// into its snapshot at start, so while Redis is slow it answers them as the
/// instance before it would have, instead of `UNAVAILABLE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_instance_answers_recent_users_while_redis_is_slow() {
    let dir = scratch("redis-warm");
    let server = RedisServer::start(&dir.join("redis")).expect("redis-server");
    let mut config = patient_without_known_users(&server, &dir);
    // The event stream's users only (the scan is the next test's).
    config.redis.warm_from_scan = 0;
    let data = data();
    let before = open_redis(config.redis.clone(), &data).await;
    let now = now_ms();
    before
        .ingest(&[
            event("warm1", "u0", "i9", EventKind::View, now),
            event("warm2", "u1", "i8", EventKind::Click, now + 1),
        ])
        .await
        .expect("ingested");
    drop(before);

    // Two instances start on that Redis: one warms its snapshot (the
    // default), one does not.
    let (warm, cold) = warmed_and_cold(&config, &data, &dir, |c| c.warm_from_events = 0).await;

    pause_redis(&server, 3_000).await;
    let hurried = Duration::from_millis(100);
    for (user, item) in [("u0", "i9"), ("u1", "i8")] {
        let u = warm
            .user_within(user, 10, hurried)
            .await
            .expect("answered from the warmed snapshot");
        assert_eq!(
            u.recent.first().map(|r| r.item_id.as_str()),
            Some(item),
            "{user}: {u:?}"
        );
        let err = cold
            .user_within(user, 10, hurried)
            .await
            .expect_err("nothing read by the cold instance");
        assert!(err.to_string().contains("unavailable"), "{err}");
    }
    // A user without an event in the stream was not read.
    let err = warm
        .user_within("u2", 10, hurried)
        .await
        .expect_err("u2 has no event in the stream");
    assert!(err.to_string().contains("unavailable"), "{err}");
}

/// A starting instance also reads the users a scan of the user keys finds
/// (bulk-loaded users have no events in the stream), so it answers them
/// while Redis is slow before any `GetUser` has read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_instance_answers_bulk_loaded_users_while_redis_is_slow() {
    let dir = scratch("redis-warm-scan");
    let server = RedisServer::start(&dir.join("redis")).expect("redis-server");
    let mut config = patient_without_known_users(&server, &dir);
    config.redis.warm_from_events = 0;
    // u0's history is bulk-loaded: nothing of it is in the event stream.
    let (scanned, cold) = warmed_and_cold(&config, &data(), &dir, |c| c.warm_from_scan = 0).await;

    pause_redis(&server, 3_000).await;
    let hurried = Duration::from_millis(100);
    let u = scanned
        .user_within("u0", 10, hurried)
        .await
        .expect("answered from the scanned snapshot");
    let items: Vec<&str> = u.recent.iter().map(|r| r.item_id.as_str()).collect();
    assert_eq!(
        items,
        ["i2", "i1"],
        "u0's bulk-loaded history, latest first"
    );
    let err = cold
        .user_within("u0", 10, hurried)
        .await
        .expect_err("nothing read by the cold instance");
    assert!(err.to_string().contains("unavailable"), "{err}");
}

/// With the known-users filter, a hurried read of a user who has no history
/// in Redis answers the empty profile Redis would give, while every user
/// with history (bulk-loaded, or ingested by another instance) that was
/// never read here is still `UNAVAILABLE`. A user with an event ingested
/// here is read right after it, so is answered with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_answers_a_user_without_history_with_the_empty_profile() {
    let dir = scratch("redis-known");
    let server = RedisServer::start(&dir.join("redis")).expect("redis-server");
    let mut config = redis_config(&server, &dir);
    config.redis.command_timeout_ms = 10_000;
    // The filter alone: no warm-up reads users with history beforehand.
    config.redis.warm_from_events = 0;
    config.redis.warm_from_scan = 0;
    let data = data();
    let here = open_redis(config.redis.clone(), &data).await;
    // Another instance on the same Redis (its own outage buffer).
    let mut other_config = config.redis.clone();
    other_config.buffer_path = dir.join("other-buffer.tsv");
    let other = open_redis(other_config, &data).await;
    let until = |what: &str, done: &dyn Fn() -> bool| {
        let what = what.to_owned();
        let ok = (0..200).any(|_| {
            if done() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(25));
            false
        });
        assert!(ok, "{what} within 5 s");
    };
    until("the start scan", &|| here.has_no_history("nobody"));
    assert!(!here.has_no_history("u0"), "u0's history was bulk-loaded");
    here.ingest(&[event("k1", "via-here", "i1", EventKind::View, now_ms())])
        .await
        .expect("ingested here");
    other
        .ingest(&[event("k2", "via-other", "i2", EventKind::View, now_ms())])
        .await
        .expect("ingested by the other instance");
    assert!(!here.has_no_history("via-here"));
    until("the stream follower", &|| !here.has_no_history("via-other"));
    until("the read after the event", &|| here.has_read("via-here"));

    pause_redis(&server, 3_000).await;

    let nobody = here
        .user_within("nobody", 10, Duration::from_millis(100))
        .await
        .expect("a user without history is answered");
    assert_eq!(nobody.user_id, "nobody");
    assert!(
        nobody.recent.is_empty() && nobody.top_categories.is_empty(),
        "{nobody:?}"
    );
    let via_here = here
        .user_within("via-here", 10, Duration::from_millis(100))
        .await
        .expect("read right after its event");
    assert_eq!(
        via_here.recent.first().map(|r| r.item_id.as_str()),
        Some("i1"),
        "{via_here:?}"
    );
    for user in ["u0", "via-other"] {
        let err = here
            .user_within(user, 10, Duration::from_millis(100))
            .await
            .expect_err("history exists but was never read here");
        assert!(err.to_string().contains("unavailable"), "{user}: {err}");
    }
}

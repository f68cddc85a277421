use super::KnownUsers;

#[test]
fn known_users_never_forget_and_rarely_imagine() {
    let known = KnownUsers::new(100_000);
    known.insert("u1");
    assert!(
        !known.surely_new("nobody"),
        "not usable before the scan ends"
    );
    known.mark_complete();
    for n in 0..100_000 {
        known.insert(&format!("user-{n}"));
    }
    assert!((0..100_000).all(|n| !known.surely_new(&format!("user-{n}"))));
    assert!(!known.surely_new("u1"));
    let imagined = (0..100_000)
        .filter(|n| !known.surely_new(&format!("stranger-{n}")))
        .count();
    // About 1% at capacity with 10 bits and 7 hashes per user.
    assert!(
        imagined < 2_000,
        "{imagined} of 100000 strangers taken for known"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_staged_during_a_write_share_the_next_one() {
    use super::{RedisConfig, RedisStore};
    use crate::store::ValidEvent;
    use recmesh_catalog::{Dataset, EventKind};
    use std::sync::Arc;
    use std::time::Duration;
    let dir = std::env::temp_dir().join(format!("recmesh-group-commit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let server = crate::testkit::RedisServer::start(&dir.join("redis")).expect("redis-server");
    let config = RedisConfig {
        url: server.url(),
        buffer_path: dir.join("buffer.tsv"),
        max_buffered: 25,
        // No replay during the test: the buffer keeps what was written.
        replay_interval_ms: 600_000,
        ..RedisConfig::default()
    };
    let store = RedisStore::open(
        config,
        &Dataset::default(),
        crate::Config::default().limits(),
    )
    .await
    .expect("open");
    let event = |n: usize| ValidEvent {
        event_id: format!("e{n}"),
        user: format!("u{n}"),
        item: "i1".into(),
        kind: EventKind::View,
        timestamp_ms: 1_700_000_000_000,
    };
    // Until `n` batches are staged; a staging that never comes fails
    // the test instead of hanging it.
    let staged_past = async |store: &RedisStore, n: usize| {
        let staged = async {
            while store.staged.lock().map(|s| s.len()).unwrap_or(0) < n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), staged)
            .await
            .expect("batches staged");
    };
    // A write on a slow disk holds the buffer; meanwhile twenty calls
    // of one event each, then one of ten, are staged.
    let held = store.buffer.lock().await;
    let mut calls = Vec::new();
    for n in 0..20 {
        let store = Arc::clone(&store);
        calls.push(tokio::spawn(async move {
            store.buffer(&[event(n)], "test").await
        }));
    }
    staged_past(&store, 20).await;
    let big: Vec<ValidEvent> = (20..30).map(event).collect();
    let too_many = {
        let store = Arc::clone(&store);
        tokio::spawn(async move { store.buffer(&big, "test").await })
    };
    staged_past(&store, 21).await;
    drop(held);
    for call in calls {
        let done = call.await.expect("call").expect("buffered");
        assert_eq!(done.buffered, 1);
    }
    let err = too_many.await.expect("call").expect_err("past the bound");
    assert!(err.to_string().contains("redis.max_buffered"), "{err}");
    assert_eq!(store.buffer_writes(), 1, "one write for the twenty batches");
    assert_eq!(store.buffered(), 20, "the refused batch left nothing");
    let mut on_file: Vec<String> = crate::log::read_events(&dir.join("buffer.tsv"))
        .expect("buffer file")
        .into_iter()
        .map(|e| e.event_id)
        .collect();
    on_file.sort();
    let mut want: Vec<String> = (0..20).map(|n| format!("e{n}")).collect();
    want.sort();
    assert_eq!(on_file, want);
    let _ = std::fs::remove_dir_all(&dir);
}

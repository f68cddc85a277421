//! End-to-end tests: the six services over real gRPC on loopback.

use std::collections::HashSet;
use std::time::Duration;

use recmesh_e2e::{Fault, TestMesh, http_get};
use recmesh_proto::v1::{self as pb, features_client::FeaturesClient};
use tonic::Code;

fn recommend(user: &str, count: u32) -> pb::RecommendRequest {
    pb::RecommendRequest {
        user_id: user.into(),
        count,
        ..Default::default()
    }
}

/// A request the client gives up on after 2 s: far above the gateway's
/// 150 ms budget, so only a gateway that hangs on a stalled stage fails it.
fn bounded<T>(message: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.set_timeout(Duration::from_secs(2));
    req
}

fn ids(r: &pb::RecommendResponse) -> Vec<String> {
    r.items.iter().map(|i| i.item_id.clone()).collect()
}

async fn features(mesh: &TestMesh) -> FeaturesClient<tonic::transport::Channel> {
    FeaturesClient::connect(mesh.mesh.stages.features.grpc_uri())
        .await
        .expect("features reachable")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recommend_returns_count_distinct_allowed_items_with_reasons() {
    let mesh = TestMesh::start().await;
    let mut client = mesh.client().await;
    let mut features = features(&mesh).await;
    for user in ["u1", "u2", "u3", "u10", "u57", "someone-new"] {
        let r = client
            .recommend(recommend(user, 10))
            .await
            .expect("answer")
            .into_inner();
        assert_eq!(r.items.len(), 10, "{user}");
        assert_eq!(
            ids(&r).iter().collect::<HashSet<_>>().len(),
            10,
            "distinct for {user}"
        );
        assert!(
            r.items.iter().all(|i| !i.reasons.is_empty()),
            "every item has a reason"
        );
        assert!(!r.degraded, "{:?}", r.stages);
        assert_eq!(r.stages.len(), 5);
        assert!(
            r.stages
                .iter()
                .all(|s| s.outcome == pb::StageOutcome::Ok as i32 && s.fallback.is_empty())
        );
        assert!(!r.request_id.is_empty());
        assert_eq!(r.model_version, "baseline-1");
        assert_eq!(
            r.assignments.len(),
            1,
            "the demo experiment covers all traffic"
        );

        let profile = features
            .get_user(pb::GetUserRequest {
                user_id: user.into(),
                max_recent: 50,
            })
            .await
            .expect("user")
            .into_inner();
        let purchased: HashSet<_> = profile.purchased_item_ids.iter().collect();
        assert!(
            ids(&r).iter().all(|i| !purchased.contains(i)),
            "nothing already bought"
        );
        let items = features
            .get_items(pb::GetItemsRequest { item_ids: ids(&r) })
            .await
            .expect("items")
            .into_inner();
        assert_eq!(items.items.len(), 10);
        assert!(
            items
                .items
                .iter()
                .all(|i| i.attributes.as_ref().is_some_and(|a| a.in_stock)),
            "all in stock"
        );
        if profile.known {
            assert!(
                r.items
                    .iter()
                    .any(|i| i.reasons.iter().any(|x| x.starts_with("because you"))),
                "a known user gets history-based items: {:?}",
                r.items
            );
        }
    }

    // What re-ranking adds, across these users' lists: category variety
    // (default cap 4, 3 in the wide-retrieval variant), exploration picks marked
    // and explained, and boosted items explained.
    let mut explored = 0;
    let mut boosted = 0;
    for user in ["u1", "u2", "u3", "u10", "u57", "u88", "u120", "u200"] {
        let r = client
            .recommend(recommend(user, 10))
            .await
            .expect("answer")
            .into_inner();
        let mut per_category: std::collections::HashMap<&str, usize> = Default::default();
        for i in &r.items {
            *per_category.entry(i.category.as_str()).or_default() += 1;
        }
        assert!(
            per_category.values().all(|&n| n <= 4),
            "{user}: {per_category:?}"
        );
        let picks: Vec<_> = r.items.iter().filter(|i| i.exploration).collect();
        assert!(picks.len() <= 1, "10% of 10 slots at most");
        assert!(
            picks
                .iter()
                .all(|i| i.reasons[0] == "something different for you")
        );
        explored += picks.len();
        boosted += r
            .items
            .iter()
            .filter(|i| {
                i.reasons
                    .iter()
                    .any(|x| x == "promoted" || x.starts_with("new in "))
            })
            .count();
    }
    assert!(explored > 0, "some list has an exploration pick");
    assert!(
        boosted > 0,
        "some list has a promoted item or a new arrival, explained"
    );

    // Exclusions hold, and the list is still full.
    let first = client
        .recommend(recommend("u1", 10))
        .await
        .expect("answer")
        .into_inner();
    let excluded: Vec<String> = ids(&first)[..3].to_vec();
    let mut req = recommend("u1", 10);
    req.exclude_item_ids = excluded.clone();
    let r = client.recommend(req).await.expect("answer").into_inner();
    assert_eq!(r.items.len(), 10);
    assert!(ids(&r).iter().all(|i| !excluded.contains(i)));

    // Category filter and the largest count.
    let mut req = recommend("u2", 100);
    req.filters = Some(pb::Filters {
        categories: vec!["books".into()],
        ..Default::default()
    });
    let r = client.recommend(req).await.expect("answer").into_inner();
    assert!(!r.items.is_empty());
    assert!(r.items.iter().all(|i| i.category == "books"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn similar_items_and_trending_by_category() {
    let mesh = TestMesh::start_with(|c| c.retrieval.trending_poll_ms = 50).await;
    let mut client = mesh.client().await;
    let books = || pb::TrendingRequest {
        category: "books".into(),
        count: 5,
    };
    let trending = client
        .trending(books())
        .await
        .expect("trending")
        .into_inner();
    assert_eq!(trending.items.len(), 5);
    assert!(
        trending
            .items
            .iter()
            .all(|i| i.category == "books" && i.reasons[0] == "trending in books")
    );

    // Trending follows what users do: purchases of a book outside the top
    // five reach retrieval through the features service's event log.
    let rising = mesh
        .mesh
        .data
        .items
        .iter()
        .rev()
        .find(|i| i.category == "books" && i.in_stock && !ids(&trending).contains(&i.id))
        .expect("another book")
        .id
        .clone();
    for n in 0..30 {
        client
            .track(pb::TrackRequest {
                event_id: format!("rising-{n}"),
                user_id: format!("reader-{n}"),
                item_id: rising.clone(),
                event_type: pb::EventType::Purchase as i32,
                timestamp_ms: 0,
            })
            .await
            .expect("tracked");
    }
    let waited = std::time::Instant::now();
    let top = loop {
        let now = client
            .trending(books())
            .await
            .expect("trending")
            .into_inner();
        if now.items[0].item_id == rising || waited.elapsed() > Duration::from_secs(30) {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(top.items[0].item_id, rising, "{:?}", ids(&top));
    assert_eq!(top.items[0].reasons[0], "trending in books");

    let overall = client
        .trending(pb::TrendingRequest {
            category: String::new(),
            count: 10,
        })
        .await
        .expect("ok")
        .into_inner();
    assert_eq!(overall.items.len(), 10);
    let categories: HashSet<_> = overall.items.iter().map(|i| &i.category).collect();
    assert!(categories.len() > 1, "overall trending spans categories");

    let anchor = trending.items[0].item_id.clone();
    let similar = client
        .similar_items(pb::SimilarItemsRequest {
            item_id: anchor.clone(),
            count: 5,
            ..Default::default()
        })
        .await
        .expect("similar")
        .into_inner();
    assert_eq!(similar.items.len(), 5);
    assert!(similar.items.iter().all(|i| i.item_id != anchor));
    assert!(
        similar.items[0].reasons[0].starts_with("similar to"),
        "{:?}",
        similar.items[0]
    );

    // A named user never gets what they bought among the similar items.
    let bought = similar.items[0].item_id.clone();
    client
        .track(pb::TrackRequest {
            event_id: "buy-1".into(),
            user_id: "shopper".into(),
            item_id: bought.clone(),
            event_type: pb::EventType::Purchase as i32,
            timestamp_ms: 0,
        })
        .await
        .expect("tracked");
    let for_shopper = client
        .similar_items(pb::SimilarItemsRequest {
            item_id: anchor.clone(),
            user_id: "shopper".into(),
            count: 5,
            ..Default::default()
        })
        .await
        .expect("similar")
        .into_inner();
    assert_eq!(for_shopper.items.len(), 5);
    assert!(
        !ids(&for_shopper).contains(&bought),
        "{:?}",
        ids(&for_shopper)
    );
    assert_eq!(for_shopper.stages.len(), 2, "features and retrieval");
    assert!(!for_shopper.degraded);

    let err = client
        .similar_items(pb::SimilarItemsRequest {
            item_id: "no-such-item".into(),
            count: 5,
            ..Default::default()
        })
        .await
        .expect_err("unknown item");
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tracked_event_changes_that_users_next_recommend() {
    let mesh = TestMesh::start().await;
    let mut client = mesh.client().await;
    let user = "fresh-visitor";
    let before = client
        .recommend(recommend(user, 10))
        .await
        .expect("answer")
        .into_inner();
    // Degraded answers are not cached; the rest needs a full one.
    assert!(!before.degraded, "{:?}", before.stages);
    assert!(
        before
            .items
            .iter()
            .all(|i| i.source == "trending" || i.source == "popular"),
        "a new user starts on trending and popular items"
    );
    // A second identical request is served from the cache...
    let again = client
        .recommend(recommend(user, 10))
        .await
        .expect("answer")
        .into_inner();
    assert!(again.cached);
    assert_eq!(ids(&again), ids(&before));
    // ...unless the client asks for a fresh one (what the load test's
    // --bypass-cache sends), which is then stored like any other.
    let mut fresh = tonic::Request::new(recommend(user, 10));
    fresh
        .metadata_mut()
        .insert("cache-control", "no-cache".parse().expect("ascii"));
    let fresh = client.recommend(fresh).await.expect("answer").into_inner();
    assert!(!fresh.cached && !fresh.degraded, "{:?}", fresh.stages);
    assert!(
        client
            .recommend(recommend(user, 10))
            .await
            .expect("answer")
            .into_inner()
            .cached
    );

    // ...until the user does something.
    let viewed = mesh.mesh.data.interactions[0].item.clone();
    let track = pb::TrackRequest {
        event_id: "evt-1".into(),
        user_id: user.into(),
        item_id: viewed.clone(),
        event_type: pb::EventType::View as i32,
        timestamp_ms: 0,
    };
    assert!(
        client
            .track(track.clone())
            .await
            .expect("tracked")
            .into_inner()
            .applied
    );
    let after = client
        .recommend(recommend(user, 10))
        .await
        .expect("answer")
        .into_inner();
    assert!(!after.cached, "the Track dropped the cached answer");
    assert_ne!(ids(&after), ids(&before));
    assert!(
        after.items.iter().any(|i| i.source == "cf"
            && i.reasons
                .iter()
                .any(|r| r.starts_with("because you viewed"))),
        "{:?}",
        after.items
    );
    assert!(
        !ids(&after).contains(&viewed),
        "the item just viewed is not recommended back"
    );

    // A replayed event is acknowledged but not applied twice.
    assert!(
        !client
            .track(track)
            .await
            .expect("tracked")
            .into_inner()
            .applied
    );
}

/// The heaviest user of the test data and every item they touched.
fn heaviest_user(mesh: &TestMesh) -> (String, HashSet<String>) {
    let mut per_user: std::collections::HashMap<&str, HashSet<String>> = Default::default();
    for e in &mesh.mesh.data.interactions {
        per_user
            .entry(e.user.as_str())
            .or_default()
            .insert(e.item.clone());
    }
    let (user, items) = per_user
        .into_iter()
        .max_by_key(|(u, items)| (items.len(), std::cmp::Reverse(*u)))
        .expect("users");
    (user.to_owned(), items)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_the_user_already_had_is_recommended_back() {
    // Features keeps only 5 recent items per user: what keeps the rest of
    // the history out is the seen set.
    let mesh = TestMesh::start_with(|c| c.features.max_recent_per_user = 5).await;
    let (user, history) = heaviest_user(&mesh);
    assert!(history.len() > 50, "{} items", history.len());
    let mut client = mesh.client().await;
    let mut req = recommend(&user, 30);
    req.debug = true;
    let answer = client
        .recommend(req.clone())
        .await
        .expect("answer")
        .into_inner();
    assert!(!answer.degraded, "{:?}", answer.stages);
    assert_eq!(answer.items.len(), 30, "the list is still full");
    let back: Vec<String> = ids(&answer)
        .into_iter()
        .filter(|i| history.contains(i))
        .collect();
    assert!(back.is_empty(), "recommended back: {back:?}");

    // A tracked event joins the seen set at once.
    let shown = answer.items[0].item_id.clone();
    let track = pb::TrackRequest {
        event_id: "seen-1".into(),
        user_id: user.clone(),
        item_id: shown.clone(),
        event_type: pb::EventType::View as i32,
        timestamp_ms: 0,
    };
    assert!(
        client
            .track(track)
            .await
            .expect("tracked")
            .into_inner()
            .applied
    );
    let next = client.recommend(req).await.expect("answer").into_inner();
    assert!(!ids(&next).contains(&shown), "the item just viewed is seen");
    drop(mesh);

    // The policy is what keeps them out: with `[seen] kinds = "none"` the
    // same user is shown items of their history again (beyond the last 5).
    let open = TestMesh::start_configured(
        |c| c.features.max_recent_per_user = 5,
        |g| g.seen.kinds = "none".into(),
    )
    .await;
    let mut client = open.client().await;
    let mut req = recommend(&user, 30);
    req.debug = true;
    let answer = client.recommend(req).await.expect("answer").into_inner();
    assert!(
        ids(&answer).iter().any(|i| history.contains(i)),
        "without the policy the history leaks back"
    );
}

/// Per stage: the fallback the gateway must use when it fails.
const FALLBACKS: [(&str, &str); 5] = [
    ("assign", "control"),
    ("features", "anonymous"),
    ("retrieval", "popularity"),
    ("ranking", "retrieval_order"),
    ("rerank", "gateway_rules"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_stage_down_or_stalled_falls_back_and_recovers() {
    let mesh = TestMesh::start().await;
    let mut client = mesh.client().await;
    for (stage, fallback) in FALLBACKS {
        for (fault, outcome) in [
            (Fault::Refuse, pb::StageOutcome::Error),
            (Fault::Stall, pb::StageOutcome::Timeout),
        ] {
            mesh.proxy(stage).set(fault);
            let mut req = recommend("u3", 10);
            req.debug = true;
            let r = client
                .recommend(bounded(req))
                .await
                .unwrap_or_else(|e| panic!("{stage} {fault:?}: the gateway must answer: {e}"))
                .into_inner();
            assert!(r.degraded, "{stage} {fault:?}");
            let report = r
                .stages
                .iter()
                .find(|s| s.stage == stage)
                .expect("stage reported");
            // What the fallback looked like, for the record (`-- --nocapture`).
            eprintln!(
                "{stage:>9} {fault:?}: outcome {:?}, fallback {}, {:.1} ms of a {:.0} ms budget, {} items",
                pb::StageOutcome::try_from(report.outcome).unwrap_or_default(),
                report.fallback,
                f64::from(report.latency_us) / 1000.0,
                f64::from(report.budget_us) / 1000.0,
                r.items.len()
            );
            assert_eq!(report.fallback, fallback, "{stage} {fault:?}: {report:?}");
            assert_eq!(
                report.outcome, outcome as i32,
                "{stage} {fault:?}: {report:?}"
            );
            assert!(
                report.latency_us <= report.budget_us + 50_000,
                "{stage} {fault:?}: bounded by its budget: {report:?}"
            );
            // Idempotent reads refused with UNAVAILABLE are retried once
            // inside their budget; ranking and re-ranking are not.
            let retried = report.detail.contains("retry");
            let reads = ["assign", "features", "retrieval"].contains(&stage);
            assert_eq!(
                retried,
                reads && fault == Fault::Refuse,
                "{stage} {fault:?}: {report:?}"
            );
            let others: Vec<_> = r
                .stages
                .iter()
                .filter(|s| s.stage != stage && !s.fallback.is_empty())
                .collect();
            assert!(
                others.is_empty(),
                "{stage} {fault:?}: only the failed stage falls back: {others:?}"
            );
            assert_eq!(r.items.len(), 10, "{stage} {fault:?}");
            assert_eq!(ids(&r).iter().collect::<HashSet<_>>().len(), 10);
            assert!(r.items.iter().all(|i| !i.reasons.is_empty()));
            if stage == "ranking" {
                assert!(r.model_version.is_empty(), "no model ordered the list");
            }
            if stage == "assign" {
                assert!(r.assignments.is_empty(), "control params, no assignment");
            }

            mesh.proxy(stage).set(Fault::None);
            // Channels reconnect on their own; the stage is back within seconds.
            let mut recovered = false;
            for _ in 0..100 {
                let mut req = recommend("u3", 10);
                req.debug = true;
                if !client
                    .recommend(bounded(req))
                    .await
                    .expect("answer")
                    .into_inner()
                    .degraded
                {
                    recovered = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(
                recovered,
                "{stage} {fault:?}: back to normal after the fault clears"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_user_keeps_their_variant_while_experiments_is_down() {
    // The assignment cache holds what `Assign` answered: with local
    // assignment off, every user's assignment comes from the service.
    let mesh = TestMesh::start_configured(|_| {}, |g| g.assign_locally = false).await;
    let mut client = mesh.client().await;
    let assign = |r: &pb::RecommendResponse| {
        r.stages
            .iter()
            .find(|s| s.stage == "assign")
            .cloned()
            .expect("assign reported")
    };
    // Different counts are different queries: never the response cache.
    let mut count = 1;
    let mut ask = async |user: &str, debug: bool| {
        count += 1;
        let mut req = recommend(user, count);
        req.debug = debug;
        client
            .recommend(bounded(req))
            .await
            .expect("answer")
            .into_inner()
    };
    // Once the gateway knows the config version, u5's second request takes
    // its assignment from the gateway's cache.
    let mut first = None;
    for _ in 0..100 {
        let r = ask("u5", false).await;
        if assign(&r).detail.contains("assignment cache") {
            first = Some(r);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = first.expect("u5's assignment is cached within 5 s");
    assert_eq!(first.assignments.len(), 1, "the demo experiment");

    mesh.proxy("assign").set(Fault::Refuse);
    let r = ask("u5", false).await;
    let report = assign(&r);
    assert!(report.fallback.is_empty(), "{report:?}");
    assert_eq!(r.assignments, first.assignments, "same variant");
    assert!(!r.degraded, "{:?}", r.stages);

    // Someone the gateway has not seen, and a debug request (which skips
    // the cache), fall back to control as before.
    for (user, debug) in [("u6", false), ("u5", true)] {
        let r = ask(user, debug).await;
        assert_eq!(assign(&r).fallback, "control", "{user} debug {debug}");
        assert!(r.assignments.is_empty());
    }
}

/// Assignment and features run in parallel and the step waits for features
/// anyway, so an assignment later than its own budget is still used while
/// features is awaited: it costs no time. (With features already answered,
/// a late assignment falls back to control at its budget, as
/// `each_stage_down_or_stalled_falls_back_and_recovers` checks.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_assignment_is_used_while_features_is_still_awaited() {
    let mesh = TestMesh::start_configured(
        |_| {},
        |gateway| {
            gateway.budgets.features_ms = 1_500;
            gateway.budgets.request_ms = 3_000;
        },
    )
    .await;
    let assign_budget_ms = recmesh_e2e::test_budgets().assign_ms;
    let mut client = mesh.client().await;
    let mut req = recommend("u3", 10);
    req.debug = true;
    let warm = client
        .recommend(bounded(req.clone()))
        .await
        .expect("answer");
    assert!(
        !warm.into_inner().assignments.is_empty(),
        "u3 is in the demo experiment"
    );

    mesh.proxy("assign").set(Fault::Stall);
    mesh.proxy("features").set(Fault::Stall);
    let mut asking = client.clone();
    let mut slow = tonic::Request::new(req);
    slow.set_timeout(Duration::from_secs(5));
    let answer = tokio::spawn(async move { asking.recommend(slow).await });
    // Well past assignment's budget, but features has not answered yet.
    tokio::time::sleep(Duration::from_millis(assign_budget_ms * 5)).await;
    mesh.proxy("assign").set(Fault::None);
    tokio::time::sleep(Duration::from_millis(assign_budget_ms * 5)).await;
    mesh.proxy("features").set(Fault::None);
    let r = answer.await.expect("joined").expect("answer").into_inner();

    let report = r
        .stages
        .iter()
        .find(|s| s.stage == "assign")
        .expect("assign reported");
    assert_eq!(report.outcome, pb::StageOutcome::Ok as i32, "{report:?}");
    assert!(report.fallback.is_empty(), "{report:?}");
    assert!(report.latency_us > report.budget_us, "late: {report:?}");
    assert!(
        report.detail.contains("features were still awaited"),
        "{report:?}"
    );
    assert!(
        !r.assignments.is_empty(),
        "the variant's assignment is used"
    );
    assert!(!r.degraded, "{:?}", r.stages);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_stage_down_the_gateway_answers_from_popularity() {
    let mesh = TestMesh::start().await;
    let mut client = mesh.client().await;
    // A real shutdown of one stage, proxy refusals for the rest.
    for (stage, _) in FALLBACKS {
        mesh.proxy(stage).set(Fault::Refuse);
    }
    let TestMesh {
        mesh: recmesh::Mesh {
            gateway,
            stages,
            data,
        },
        proxies,
        ..
    } = mesh;
    stages.retrieval.shutdown().await.expect("retrieval stops");

    let mut req = recommend("u5", 10);
    req.context = Some(pb::RequestContext {
        category: "books".into(),
        ..Default::default()
    });
    // Debug: assignment calls the experiments service too (a plain request
    // is assigned in the gateway from the pushed rules, when they have
    // arrived; tests/experiments.rs checks that).
    req.debug = true;
    let r = client
        .recommend(bounded(req))
        .await
        .expect("answer")
        .into_inner();
    assert!(r.degraded);
    let fallbacks: Vec<(&str, &str)> = r
        .stages
        .iter()
        .map(|s| (s.stage.as_str(), s.fallback.as_str()))
        .collect();
    assert_eq!(fallbacks, FALLBACKS.to_vec());
    assert_eq!(r.items.len(), 10);
    assert!(
        r.items
            .iter()
            .all(|i| i.source == "popular" && !i.reasons.is_empty())
    );
    assert!(
        r.items.iter().take(4).all(|i| i.category == "books"),
        "the browsed category first: {:?}",
        r.items
    );
    let stock: std::collections::HashMap<_, _> = data
        .items
        .iter()
        .map(|i| (i.id.clone(), i.in_stock))
        .collect();
    assert!(
        r.items.iter().all(|i| stock[&i.item_id]),
        "gateway rules drop out-of-stock items"
    );

    let t = client
        .trending(bounded(pb::TrendingRequest {
            category: "toys".into(),
            count: 5,
        }))
        .await
        .expect("ok")
        .into_inner();
    assert!(t.degraded);
    assert_eq!(t.items.len(), 5);
    assert!(t.items.iter().all(|i| i.category == "toys"));
    drop(proxies);
    gateway.shutdown().await.expect("gateway stops");
}

async fn expect_invalid<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    field: &str,
) {
    let err = result.expect_err(field);
    assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
    assert!(
        err.message().starts_with(field),
        "message names `{field}`: {}",
        err.message()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_input_is_rejected_naming_the_field() {
    let mesh = TestMesh::start().await;
    let mut c = mesh.client().await;
    expect_invalid(c.recommend(recommend("", 10)).await, "user_id").await;
    expect_invalid(c.recommend(recommend("u1", 0)).await, "count").await;
    expect_invalid(c.recommend(recommend("u1", 101)).await, "count").await;
    let mut req = recommend("u1", 10);
    req.context = Some(pb::RequestContext {
        category: "nope".into(),
        ..Default::default()
    });
    expect_invalid(c.recommend(req).await, "context.category").await;
    let mut req = recommend("u1", 10);
    req.exclude_item_ids = (0..1_001).map(|i| format!("i{i}")).collect();
    expect_invalid(c.recommend(req).await, "exclude_item_ids").await;
    let mut req = recommend("u1", 10);
    req.filters = Some(pb::Filters {
        categories: vec!["books".into(), "nope".into()],
        ..Default::default()
    });
    expect_invalid(c.recommend(req).await, "filters.categories[1]").await;
    let mut req = recommend("u1", 10);
    req.filters = Some(pb::Filters {
        min_price: 50.0,
        max_price: 10.0,
        ..Default::default()
    });
    expect_invalid(c.recommend(req).await, "filters.min_price").await;

    let track = |event_id: &str, item: &str, event_type: pb::EventType| pb::TrackRequest {
        event_id: event_id.into(),
        user_id: "u1".into(),
        item_id: item.into(),
        event_type: event_type as i32,
        timestamp_ms: 0,
    };
    expect_invalid(
        c.track(track("e1", "i1", pb::EventType::Unspecified)).await,
        "event_type",
    )
    .await;
    expect_invalid(
        c.track(track("", "i1", pb::EventType::View)).await,
        "event_id",
    )
    .await;
    expect_invalid(
        c.track(track("e2", "bad\nid", pb::EventType::View)).await,
        "item_id",
    )
    .await;
    // An item the catalog does not know yet is a new item, not an error.
    let new = c
        .track(track("e3", "brand-new-item", pb::EventType::View))
        .await
        .expect("a new item is accepted")
        .into_inner();
    assert!(new.applied && new.new_item, "{new:?}");

    expect_invalid(
        c.similar_items(pb::SimilarItemsRequest {
            count: 5,
            ..Default::default()
        })
        .await,
        "item_id",
    )
    .await;
    expect_invalid(
        c.trending(pb::TrendingRequest {
            category: String::new(),
            count: 0,
        })
        .await,
        "count",
    )
    .await;
    expect_invalid(
        c.trending(pb::TrendingRequest {
            category: "nope".into(),
            count: 5,
        })
        .await,
        "category",
    )
    .await;

    // Nothing stored was lost: the mesh still answers normally.
    let r = c
        .recommend(recommend("u1", 10))
        .await
        .expect("answer")
        .into_inner();
    assert_eq!(r.items.len(), 10);
    assert!(!r.degraded);
}

async fn channel(uri: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(uri.to_owned())
        .expect("uri")
        .connect()
        .await
        .expect("reachable")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_serving_and_metrics_are_exposed() {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let mesh = TestMesh::start().await;
    let mut handles = vec![&mesh.mesh.gateway];
    handles.extend(mesh.mesh.stages.all());
    for h in &handles {
        let mut health = HealthClient::new(channel(&h.grpc_uri()).await);
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health answers")
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{}", h.name);
        let ready = http_get(h.admin_addr, "/readyz").await;
        assert!(ready.starts_with("HTTP/1.1 200"), "{}: {ready}", h.name);
    }
    let mut health = HealthClient::new(channel(&mesh.mesh.gateway.grpc_uri()).await);
    let named = health
        .check(HealthCheckRequest {
            service: "recmesh.v1.Gateway".into(),
        })
        .await
        .expect("named service")
        .into_inner();
    assert_eq!(named.status, ServingStatus::Serving as i32);

    // Reflection lists every service of the gateway's server.
    {
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut reflection =
            ServerReflectionClient::new(channel(&mesh.mesh.gateway.grpc_uri()).await);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = reflection
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .expect("reflection answers")
            .into_inner();
        let answer = answers
            .message()
            .await
            .expect("stream")
            .expect("one answer");
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("unexpected reflection answer: {answer:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for expected in ["recmesh.v1.Gateway", "grpc.health.v1.Health"] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} in {names:?}"
            );
        }
    }

    mesh.client()
        .await
        .recommend(recommend("u1", 10))
        .await
        .expect("answer");
    let metrics = http_get(mesh.mesh.gateway.admin_addr, "/metrics").await;
    for series in [
        "recmesh_grpc_server_requests_total{service=\"gateway\",rpc=\"recmesh.v1.Gateway/Recommend\",code=\"Ok\"}",
        "recmesh_gateway_stage_duration_seconds_bucket{stage=\"retrieval\",outcome=\"ok\"",
        "recmesh_gateway_cache_total{result=\"miss\"}",
    ] {
        assert!(metrics.contains(series), "missing {series} in:\n{metrics}");
    }

    // Graceful shutdown: every server stops cleanly.
    mesh.mesh.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_the_call_in_flight_and_refuses_new_ones() {
    let mesh = TestMesh::start().await;
    let mut client = mesh.client().await;
    // Hold a call inside the gateway: ranking is stalled, so the call waits out
    // ranking's whole budget before falling back.
    mesh.proxy("ranking").set(Fault::Stall);
    let mut req = recommend("u9", 10);
    req.debug = true;
    let in_flight = tokio::spawn(async move { client.recommend(bounded(req)).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !in_flight.is_finished(),
        "the call is still inside the gateway"
    );

    let TestMesh { mesh, proxies, .. } = mesh;
    let gateway_uri = mesh.gateway.grpc_uri();
    let stopping = tokio::spawn(mesh.gateway.shutdown());

    let answer = in_flight
        .await
        .expect("task")
        .expect("the in-flight call is answered while draining")
        .into_inner();
    assert_eq!(answer.items.len(), 10);
    let ranking = answer
        .stages
        .iter()
        .find(|s| s.stage == "ranking")
        .expect("reported");
    assert_eq!(ranking.fallback, "retrieval_order");
    stopping.await.expect("task").expect("clean shutdown");

    let refused = tonic::transport::Endpoint::from_shared(gateway_uri)
        .expect("uri")
        .connect()
        .await;
    assert!(
        refused.is_err(),
        "a stopped gateway accepts no new connections"
    );
    drop(proxies);
    mesh.stages.shutdown().await.expect("stages stop");
}

/// Names of this process's threads (`/proc/self/task/*/comm`).
fn thread_names() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .map(|tasks| {
            tasks
                .filter_map(|t| t.ok())
                .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
                .map(|n| n.trim().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_per_service_serves_the_whole_pipeline_and_stops() {
    let dir = recmesh_e2e::scratch_dir("per-service-runtimes");
    let data = std::sync::Arc::new(recmesh_e2e::test_data());
    let mut stages = recmesh::StageConfigs {
        threads: recmesh::Threads::PerService,
        ..Default::default()
    };
    stages.ranking.features_budget_ms *= recmesh_e2e::BUDGET_SCALE;
    stages.ranking.server.worker_threads = 2;
    stages.features.event_log.path = dir.join("events.tsv");
    stages.features.event_log.exposures_path = dir.join("exposures.jsonl");
    stages.experiments.state_dir = dir.join("experiments").display().to_string();
    let mesh = recmesh::start(data, recmesh::PortPlan::EPHEMERAL, stages, |g| {
        g.budgets = recmesh_e2e::test_budgets();
    })
    .await
    .expect("mesh starts with a runtime per service");

    // Each service's runtime has its own named workers, sized by its config
    // (ranking asked for 2; the rest, on 0, for at least one).
    let names = thread_names();
    for service in [
        "gateway",
        "features",
        "retrieval",
        "ranking",
        "reranker",
        "experiments",
    ] {
        let n = names
            .iter()
            .filter(|t| **t == format!("{service}-rt"))
            .count();
        // (Its blocking pool's threads carry the name too.)
        if service == "ranking" {
            assert!(n >= 2, "{service}: {names:?}");
        } else {
            assert!(n >= 1, "{service} has no runtime thread: {names:?}");
        }
    }

    let mut client = pb::gateway_client::GatewayClient::connect(mesh.gateway.grpc_uri())
        .await
        .expect("gateway reachable");
    let r = client
        .recommend(bounded(recommend("u3", 8)))
        .await
        .expect("recommend")
        .into_inner();
    assert_eq!(r.items.len(), 8, "{r:?}");
    assert!(!r.degraded, "no stage fell back: {:?}", r.stages);
    assert!(
        r.items
            .iter()
            .all(|i| !i.reasons.is_empty() && !i.source.is_empty()),
        "every item explained: {:?}",
        r.items
    );
    let track = client
        .track(pb::TrackRequest {
            event_id: "per-service-1".into(),
            user_id: "u3".into(),
            item_id: r.items[0].item_id.clone(),
            event_type: pb::EventType::Purchase as i32,
            timestamp_ms: 0,
        })
        .await
        .expect("track")
        .into_inner();
    assert!(track.applied, "{track:?}");
    let again = client
        .recommend(bounded(recommend("u3", 8)))
        .await
        .expect("recommend after track")
        .into_inner();
    assert!(
        !ids(&again).contains(&r.items[0].item_id),
        "the purchase is excluded at once: {:?}",
        ids(&again)
    );
    mesh.shutdown().await.expect("every service stops");
    recmesh_e2e::eventually("the services' runtimes are gone", async || {
        !thread_names().iter().any(|t| t.ends_with("-rt"))
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
}

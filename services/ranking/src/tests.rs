use super::*;
use crate::scorer::item_signals;
use pb::ranking_server::Ranking;
use recmesh_algo::ranking::{self, UserSignals};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../libs/algo/fixtures/lightgbm/model.txt"
);

fn candidate(id: &str, score: f64, sources: &[&str]) -> pb::Candidate {
    pb::Candidate {
        item_id: id.into(),
        score,
        source: sources.first().map(|s| s.to_string()).unwrap_or_default(),
        source_scores: sources.iter().map(|s| (s.to_string(), score)).collect(),
        ..Default::default()
    }
}

/// The lean list of whole candidates, as retrieval would send it.
fn listed(candidates: Vec<pb::Candidate>) -> Option<pb::CandidateList> {
    Some(recmesh_mesh::lean::from_candidates(&candidates).expect("known sources"))
}

/// The answer's candidates, whole.
fn whole(r: &pb::RankResponse) -> Vec<pb::Candidate> {
    Candidates::new(r.candidates.clone().unwrap_or_default(), "candidates")
        .expect("the service sends a list that checks")
        .to_candidates()
}

fn item(id: &str, popularity: f64) -> (String, Arc<pb::ItemFeatures>) {
    (
        id.to_owned(),
        Arc::new(pb::ItemFeatures {
            item_id: id.into(),
            popularity,
            views: 10,
            clicks: 2,
            attributes: Some(pb::ItemAttributes {
                category: "books".into(),
                price: 20.0,
                in_stock: true,
                ..Default::default()
            }),
            ..Default::default()
        }),
    )
}

/// A channel to a port nobody listens on: calls are refused at once.
fn nowhere() -> Balanced {
    Balanced::new(
        "features_addr",
        "http://127.0.0.1:1",
        &BalanceConfig::default(),
    )
    .expect("address")
}

#[test]
fn defaults_are_valid() {
    let c: Config = recmesh_server::config::load(None).expect("defaults load");
    assert_eq!(c, Config::default());
}

#[tokio::test]
async fn baseline_lets_popularity_reorder_close_candidates() {
    let svc = RankingService::new(Config::default(), nowhere()).expect("service");
    let features: ItemFeatureMap = [item("a", 0.0), item("b", 1.0)].into_iter().collect();
    let ranked = svc.scorer().score(
        vec![candidate("a", 1.0, &["cf"]), candidate("b", 0.9, &["cf"])],
        &[],
        &features,
        0,
    );
    // a: 0.6·1 + 0 + 0.1 = 0.70 ; b: 0.6·0.9 + 0.3 + 0.1 = 0.94
    assert_eq!(ranked[0].item_id, "b");
    assert!((ranked[0].score - 0.94).abs() < 1e-9);
    assert_eq!(
        ranked[0].attributes.as_ref().map(|a| a.category.as_str()),
        Some("books")
    );
}

#[tokio::test]
async fn the_served_path_ranks_as_the_scorer_and_keeps_every_other_field() {
    let config = Config {
        model_path: FIXTURE.into(),
        ..Config::default()
    };
    let svc = RankingService::new(config, nowhere()).expect("fixture model loads");
    let mut list = vec![
        candidate("a", 0.2, &["cf"]),
        candidate("b", 0.9, &["cf", "ann"]),
        candidate("c", 0.5, &["popular"]),
    ];
    list[1].reasons = vec!["because you viewed a".into()];
    list[1].source = "cf".into();
    list[2].attributes = Some(pb::ItemAttributes {
        category: "toys".into(),
        ..Default::default()
    });
    let served = svc
        .rank(Request::new(pb::RankRequest {
            user_id: "u1".into(),
            candidates: listed(list.clone()),
            ..Default::default()
        }))
        .await
        .expect("ranked")
        .into_inner();
    // No features service: both paths score without item features.
    let direct = svc
        .scorer()
        .score(list, &[], &ItemFeatureMap::default(), now_s());
    assert_eq!(whole(&served), direct);
    assert!(served.degraded);
}

#[tokio::test]
async fn a_broken_list_is_refused_naming_the_field() {
    let svc = RankingService::new(Config::default(), nowhere()).expect("service");
    let mut broken = listed(vec![
        candidate("a", 0.5, &["cf"]),
        candidate("b", 0.4, &["cf"]),
    ]);
    if let Some(l) = broken.as_mut() {
        l.scores.pop();
    }
    let err = svc
        .rank(Request::new(pb::RankRequest {
            user_id: "u1".into(),
            candidates: broken,
            ..Default::default()
        }))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "candidates.scores: 1 entries for 2 candidates"
    );
}

#[tokio::test]
async fn a_lightgbm_model_scores_with_the_feature_row() {
    let config = Config {
        model_path: FIXTURE.into(),
        ..Config::default()
    };
    let svc = RankingService::new(config, nowhere()).expect("fixture model loads");
    assert!(
        svc.scorer().version.starts_with("lightgbm-model-"),
        "{}",
        svc.scorer().version
    );
    let features: ItemFeatureMap = [item("a", 0.1), item("b", 0.9)].into_iter().collect();
    let ranked = svc.scorer().score(
        vec![candidate("a", 0.5, &["cf"]), candidate("b", 0.5, &["cf"])],
        &[],
        &features,
        0,
    );
    // Probabilities from the model, and the more popular item first (the
    // fixture's labels rise with item_popularity).
    assert!(ranked.iter().all(|c| (0.0..=1.0).contains(&c.score)));
    assert_eq!(ranked[0].item_id, "b");
    let scorer = svc.scorer();
    let model = scorer.model.as_ref().expect("model");
    let mut row = ranking::row(
        &candidate("b", 0.5, &["cf"]).signals(),
        item_signals(&features["b"], 0).as_ref(),
        &UserSignals::default(),
    )
    .to_vec();
    row = model.columns.iter().map(|&c| row[c]).collect();
    assert_eq!(ranked[0].score, model.gbdt.predict(&row));
}

#[tokio::test]
async fn a_request_picks_a_named_model() {
    let config = Config {
        model_path: FIXTURE.into(),
        models: [("fixture-b".to_string(), FIXTURE.to_string())].into(),
        ..Config::default()
    };
    let svc = RankingService::new(config, nowhere()).expect("models load");
    let default = svc.scorer().version.to_string();
    assert!(default.starts_with("lightgbm-"));
    assert_eq!(&*svc.scorer_for("").version, default.as_str());
    assert_eq!(&*svc.scorer_for("baseline").version, BASELINE_VERSION);
    assert!(svc.scorer_for("fixture-b").version.starts_with("lightgbm-"));
    assert_eq!(
        &*svc.scorer_for("no-such-model").version,
        default.as_str(),
        "an unknown name is scored by the default"
    );
    let bad = Config {
        models: [("baseline".to_string(), FIXTURE.to_string())].into(),
        ..Config::default()
    };
    assert!(bad.validate().is_err(), "baseline is built in");
    let missing = Config {
        models: [("x".to_string(), "/no/such/model.txt".to_string())].into(),
        ..Config::default()
    };
    let err = missing.validate().expect_err("missing file").to_string();
    assert!(err.contains("models.x"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_model_is_swapped_in_while_requests_keep_succeeding() {
    let dir = std::env::temp_dir().join(format!("recmesh-swap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("model.txt");
    let fixture = std::fs::read_to_string(FIXTURE).expect("fixture");
    std::fs::write(&path, &fixture).expect("write");
    let config = Config {
        model_path: path.display().to_string(),
        ..Config::default()
    };
    let svc = RankingService::new(config, nowhere()).expect("service");
    let first = svc.scorer().version().to_owned();

    // Requests run the whole time (features unreachable: they still rank).
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    // Until `answered` passes `n` (the load task runs beside this one).
    let answered_past = async |n: usize| {
        let passed = async {
            while answered.load(Relaxed) <= n {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), passed)
            .await
            .expect("the load keeps answering (its task stops at a failed request)");
    };
    let load = {
        let (svc, stop, answered) = (svc.clone(), stop.clone(), answered.clone());
        tokio::spawn(async move {
            while !stop.load(Relaxed) {
                let r = svc
                    .rank(Request::new(pb::RankRequest {
                        user_id: "u1".into(),
                        candidates: listed(vec![
                            candidate("a", 0.5, &["cf"]),
                            candidate("b", 0.4, &["cf"]),
                        ]),
                        ..Default::default()
                    }))
                    .await
                    .expect("every request succeeds during swaps");
                assert_eq!(whole(&r.into_inner()).len(), 2);
                answered.fetch_add(1, Relaxed);
                tokio::task::yield_now().await;
            }
        })
    };
    answered_past(0).await;

    // Publish a different model the way a trainer should: write, then rename.
    let tmp = dir.join(".model.txt.tmp");
    std::fs::write(&tmp, fixture.replacen("shrinkage=1", "shrinkage=1 ", 1)).expect("write");
    std::fs::rename(&tmp, &path).expect("rename");
    let swapped = svc.reload_if_changed().expect("loads").expect("swapped");
    assert_ne!(swapped, first);
    assert_eq!(svc.scorer().version(), swapped);

    // A broken model is refused and the last good one keeps serving.
    std::fs::write(&tmp, "tree\nversion=v4\n").expect("write");
    std::fs::rename(&tmp, &path).expect("rename");
    let err = svc.reload_if_changed().expect_err("refused");
    assert!(err.to_string().contains("model_path"), "{err}");
    assert_eq!(svc.scorer().version(), swapped);
    assert_eq!(
        svc.reload_if_changed().expect("unchanged"),
        None,
        "reported once"
    );

    // Requests keep succeeding after the swaps too.
    answered_past(answered.load(Relaxed)).await;
    stop.store(true, Relaxed);
    load.await.expect("every request succeeded");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_model_with_unknown_features_is_a_config_error() {
    let dir = std::env::temp_dir().join(format!("recmesh-rank-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("weather.txt");
    let text = std::fs::read_to_string(FIXTURE).expect("fixture").replacen(
        "feature_names=retrieval_score",
        "feature_names=weather",
        1,
    );
    std::fs::write(&path, text).expect("write");
    let config = Config {
        model_path: path.display().to_string(),
        ..Config::default()
    };
    let err = config.validate().expect_err("unknown feature");
    assert!(
        err.to_string().contains("model_path") && err.to_string().contains("`weather`"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[tokio::test]
async fn without_features_it_still_ranks_and_says_so() {
    let svc = RankingService::new(Config::default(), nowhere()).expect("service");
    let answer = svc
        .rank(Request::new(pb::RankRequest {
            user_id: "u1".into(),
            candidates: listed(vec![
                candidate("a", 0.5, &["cf"]),
                candidate("b", 1.0, &["cf"]),
            ]),
            ..Default::default()
        }))
        .await
        .expect("ranks anyway")
        .into_inner();
    assert!(answer.degraded);
    assert!(
        answer.detail.starts_with("item features unavailable"),
        "{}",
        answer.detail
    );
    assert_eq!(answer.model_version, "baseline-1+no-features");
    assert_eq!(
        whole(&answer)[0].item_id,
        "b",
        "retrieval evidence alone orders them"
    );
}

#[tokio::test]
async fn requests_that_share_a_failed_fetch_are_all_degraded() {
    // Two concurrent requests miss the same items: the second waits for
    // the first one's fetch, which fails (nothing listens). Neither may
    // pass off an answer without item features as a full one.
    let svc = RankingService::new(Config::default(), nowhere()).expect("service");
    let rank = || {
        svc.rank(Request::new(pb::RankRequest {
            user_id: "u1".into(),
            candidates: listed(vec![
                candidate("a", 0.5, &["cf"]),
                candidate("b", 1.0, &["cf"]),
            ]),
            ..Default::default()
        }))
    };
    let (first, second) = tokio::join!(rank(), rank());
    for answer in [first, second] {
        let answer = answer.expect("ranks anyway").into_inner();
        assert!(answer.degraded, "{}", answer.detail);
        assert!(
            answer.detail.contains("item features") && answer.detail.contains("unavailable"),
            "{}",
            answer.detail
        );
        assert_eq!(answer.model_version, "baseline-1+no-features");
    }
}

#[tokio::test]
async fn stale_item_features_are_used_while_the_features_service_is_away() {
    // Features fetched 1.5 TTLs ago, and a features service that does
    // not answer: within `item_cache_max_stale_ms` ranking keeps using
    // them (not degraded) and tries one refresh in the background.
    let stale_for = |max_stale_ms: u64| async move {
        let config = Config {
            item_cache_max_stale_ms: max_stale_ms,
            ..Config::default()
        };
        let ttl = Duration::from_millis(config.item_cache_ttl_ms);
        let svc = RankingService::new(config, nowhere()).expect("service");
        let stored = std::time::Instant::now()
            .checked_sub(ttl.mul_f64(1.5))
            .expect("the monotonic clock goes back seconds");
        for (id, f) in [item("a", 0.9), item("b", 0.1)] {
            svc.cache.insert_stored(id, f, stored);
        }
        svc.rank(Request::new(pb::RankRequest {
            user_id: "u1".into(),
            candidates: listed(vec![
                candidate("a", 0.5, &["cf"]),
                candidate("b", 0.5, &["cf"]),
            ]),
            ..Default::default()
        }))
        .await
        .expect("ranks")
        .into_inner()
    };
    let answer = stale_for(60_000).await;
    assert!(!answer.degraded, "{}", answer.detail);
    assert_eq!(answer.model_version, "baseline-1");
    assert_eq!(whole(&answer)[0].item_id, "a", "the more popular");

    // Without stale use, the same entries are missing and fetched inline,
    // which fails: degraded, as before this cache served stale entries.
    let answer = stale_for(0).await;
    assert!(answer.degraded);
    assert_eq!(answer.model_version, "baseline-1+no-features");
}

#[test]
fn bad_features_address_is_a_config_error() {
    let c = Config {
        features_addr: "127.0.0.1:1".into(),
        ..Config::default()
    };
    let err = c.validate().expect_err("no scheme");
    assert!(err.to_string().contains("features_addr"));
}

#[test]
fn features_by_position_score_as_features_by_id() {
    // The service looks features up once per position (`Fetched`); the
    // trainer hands them over by id. Both must give the same list.
    let scorer = Scorer::new(FIXTURE).expect("fixture model loads");
    let by_id: ItemFeatureMap = [item("a", 0.1), item("b", 0.9), item("r", 0.5)]
        .into_iter()
        .collect();
    let list = Candidates::new(
        listed(vec![
            candidate("a", 0.5, &["cf"]),
            candidate("b", 0.4, &["cf", "popular"]),
            candidate("c", 0.3, &["ann"]),
        ])
        .expect("list"),
        "candidates",
    )
    .expect("checks");
    let recent = vec![pb::Interaction {
        item_id: "r".into(),
        ..Default::default()
    }];
    let at = |id: &str| by_id.get(id).cloned();
    let by_position = Fetched {
        items: vec![at("a"), at("b"), None, at("r")],
        candidates: 3,
    };
    let a = scorer.rank(&list, &recent, &by_id, 0);
    let b = scorer.rank(&list, &recent, &by_position, 0);
    assert_eq!(a, b);
    let ranked = Candidates::new(b, "candidates").expect("checks");
    assert_eq!(ranked.ids().collect::<Vec<_>>(), ["b", "a", "c"]);
    // The fresh attributes went to the right candidates.
    assert!(ranked.attributes(0).is_some_and(|x| x.category == "books"));
    assert!(ranked.attributes(2).is_none());
}

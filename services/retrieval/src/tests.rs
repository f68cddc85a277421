use super::*;

use std::collections::HashMap;

use recmesh_algo::als;
use recmesh_catalog::bundle::BuildParams;
use recmesh_mesh::lean;
use recmesh_vector::Hit;
use recmesh_vector::VectorIndex;
use recmesh_vector::bundle as vector_bundle;

use crate::index::{WORK_DIR_PREFIX, remove_dead_work_dirs};
use crate::sources::ContentJob;

/// `Retrieve`'s lean list, whole.
trait Whole {
    fn whole(self) -> Vec<pb::Candidate>;
}

impl Whole for pb::RetrieveResponse {
    fn whole(self) -> Vec<pb::Candidate> {
        lean::Candidates::new(self.list.unwrap_or_default(), "list")
            .expect("retrieval sends a list that checks")
            .to_candidates()
    }
}

#[test]
fn shard_copies_of_dead_processes_are_removed_and_live_ones_kept() {
    let tmp = std::env::temp_dir().join(format!("rm-sweep-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    // A pid that has just exited.
    let mut child = std::process::Command::new("true")
        .spawn()
        .expect("spawn true");
    let dead = child.id();
    child.wait().expect("wait");
    let dir = |name: String| {
        let d = tmp.join(name).join("v1");
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("segment"), b"x").expect("write");
        d.parent().expect("parent").to_path_buf()
    };
    let gone = dir(format!("{WORK_DIR_PREFIX}{dead}"));
    let mine = dir(format!("{WORK_DIR_PREFIX}{}", std::process::id()));
    let other = dir(format!("{WORK_DIR_PREFIX}swap-1"));
    remove_dead_work_dirs(&tmp);
    assert!(!gone.exists(), "the dead process's copy is removed");
    assert!(mine.exists(), "this process's copy is kept");
    assert!(other.exists(), "names that are not a pid are left alone");
    std::fs::remove_dir_all(&tmp).expect("cleanup");
}
use recmesh_catalog::demo::{DemoSpec, generate};

fn service() -> RetrievalService {
    RetrievalService::new(Config::default(), &demo())
}

fn viewed(item: &str) -> pb::Interaction {
    pb::Interaction {
        item_id: item.into(),
        event_type: pb::EventType::View as i32,
        timestamp_ms: 1,
    }
}

#[test]
fn defaults_are_valid() {
    let c: Config = recmesh_server::config::load(None).expect("defaults load");
    assert_eq!(c, Config::default());
}

#[test]
fn history_brings_cf_candidates_with_reasons() {
    let s = service();
    let seed = s
        .index()
        .catalog
        .item(s.index().popular[0].0)
        .expect("item")
        .id
        .clone();
    let req = pb::RetrieveRequest {
        user_id: "u1".into(),
        recent: vec![viewed(&seed)],
        count: 50,
        ..Default::default()
    };
    let out = s.retrieve_blocking(&req).expect("ok").whole();
    assert_eq!(out.len(), 50);
    assert_eq!(out[0].source, "cf", "personal candidates come first");
    assert!(
        out[0].reasons[0].starts_with("because you viewed"),
        "{:?}",
        out[0].reasons
    );
    assert!(
        out.iter()
            .all(|c| !c.reasons.is_empty() && c.item_id != seed)
    );
    assert!(
        out.iter()
            .all(|c| c.attributes.as_ref().is_some_and(|a| a.in_stock))
    );
    let ids: std::collections::HashSet<_> = out.iter().map(|c| &c.item_id).collect();
    assert_eq!(ids.len(), out.len(), "no duplicates");

    // A variant's source mix: popularity off leaves CF alone; CF off
    // leaves popularity alone.
    let mut only_cf = req.clone();
    only_cf.source_weights = HashMap::from([
        ("trending".into(), 0.0),
        ("popular".into(), 0.0),
        ("category".into(), 0.0),
        ("content".into(), 0.0),
    ]);
    let out = s.retrieve_blocking(&only_cf).expect("ok").whole();
    assert!(!out.is_empty() && out.iter().all(|c| c.source == "cf"));
    let mut no_cf = req;
    no_cf.source_weights = HashMap::from([("cf".into(), 0.0), ("content".into(), 0.0)]);
    let out = s.retrieve_blocking(&no_cf).expect("ok").whole();
    assert!(
        !out.is_empty()
            && out
                .iter()
                .all(|c| c.source == "popular" || c.source == "trending")
    );
}

#[test]
fn new_user_gets_trending_and_popularity_and_filters_hold() {
    let s = service();
    let category = s.index().catalog.categories[0].clone();
    let req = pb::RetrieveRequest {
        user_id: "new".into(),
        count: 20,
        filters: Some(pb::Filters {
            categories: vec![category.clone()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let answer = s.retrieve_blocking(&req).expect("ok");
    let out = answer.clone().whole();
    assert!(!out.is_empty());
    assert!(
        out.iter()
            .all(|c| ["popular", "trending", "content"].contains(&c.source.as_str()))
    );
    assert!(
        out.iter().any(|c| c.source_scores.contains_key("trending")
            && c.reasons.contains(&format!("trending in {category}"))),
        "{out:?}"
    );
    assert!(out.iter().all(|c| {
        c.attributes
            .as_ref()
            .is_some_and(|a| a.category == category)
    }));
    let trending = answer
        .sources
        .iter()
        .find(|r| r.source == "trending")
        .expect("trending reported");
    assert_eq!(trending.outcome, "ok");
    assert!(trending.candidates > 0);
}

fn event(item: &str, kind: pb::EventType, timestamp_ms: i64) -> pb::Event {
    pb::Event {
        event_id: String::new(),
        user_id: "u".into(),
        item_id: item.into(),
        event_type: kind as i32,
        timestamp_ms,
    }
}

#[test]
fn trending_follows_events_after_the_bundle() {
    let s = service();
    let index = s.index();
    let category = index.catalog.categories[0].clone();
    let list = |category: &str| {
        s.trending(&pb::PopularRequest {
            category: category.into(),
            count: 5,
            per_category: 0,
        })
        .expect("ok")
        .candidates
    };
    let popular_ids = || -> Vec<String> {
        s.popular(&pb::PopularRequest {
            category: category.clone(),
            count: 5,
            per_category: 0,
        })
        .expect("ok")
        .candidates
        .into_iter()
        .map(|c| c.item_id)
        .collect()
    };
    let popular_before = popular_ids();
    let before = list(&category);
    assert!(!before.is_empty(), "the bundle's lists serve at once");
    assert!(before.iter().all(|c| c.source == "trending"));
    // An in-stock item of the category the list does not lead with.
    let item = (0..index.catalog.len() as u32)
        .rev()
        .filter_map(|i| index.catalog.item(i))
        .find(|it| it.category == category && it.in_stock && it.id != before[0].item_id)
        .expect("another item")
        .id
        .clone();
    // Events the bundle was trained on, and unknown items, do not count.
    let trained_at_ms = index.trending().reference_s() * 1000;
    assert_eq!(
        index.record_events(&[
            event(&item, pb::EventType::Purchase, trained_at_ms),
            event(
                "no-such-item",
                pb::EventType::Purchase,
                trained_at_ms + 60_000
            ),
        ]),
        0
    );
    // An hour after the bundle, 200 purchases: first in its category and
    // overall, with the reason.
    let burst: Vec<pb::Event> = (0..200)
        .map(|n| {
            event(
                &item,
                pb::EventType::Purchase,
                trained_at_ms + 3_600_000 + n,
            )
        })
        .collect();
    assert_eq!(index.record_events(&burst), 200);
    let after = list(&category);
    assert_eq!(after[0].item_id, item);
    assert_eq!(after[0].reasons, vec![format!("trending in {category}")]);
    assert_eq!(list("")[0].item_id, item);
    assert_eq!(list("")[0].reasons, vec!["trending now".to_owned()]);
    // Popularity is the bundle's and does not move.
    assert_eq!(popular_ids(), popular_before);
}

#[test]
fn invalid_input_names_the_field() {
    let s = service();
    let mut req = pb::RetrieveRequest {
        user_id: "u".into(),
        ..Default::default()
    };
    req.context = Some(pb::RequestContext {
        category: "nope".into(),
        ..Default::default()
    });
    assert_eq!(
        s.retrieve_blocking(&req).expect_err("bad").field,
        "context.category"
    );
    req.context = None;
    req.source_weights = HashMap::from([("vector".into(), 1.0)]);
    assert_eq!(
        s.retrieve_blocking(&req).expect_err("bad").field,
        "source_weights.vector"
    );
    req.source_weights = HashMap::from([("cf".into(), -1.0)]);
    assert_eq!(
        s.retrieve_blocking(&req).expect_err("bad").field,
        "source_weights.cf"
    );
    req.source_weights.clear();
    req.count = 1_000_000;
    assert_eq!(s.retrieve_blocking(&req).expect_err("bad").field, "count");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let err = runtime
        .block_on(s.similar(
            &pb::SimilarRequest {
                item_id: "zzz".into(),
                ..Default::default()
            },
            None,
        ))
        .expect_err("unknown");
    assert_eq!(err.code(), tonic::Code::NotFound);
}

fn demo() -> Dataset {
    generate(&DemoSpec {
        items: 400,
        users: 200,
        interactions: 20_000,
        ..DemoSpec::default()
    })
}

fn trained(data: &Dataset) -> Bundle {
    Bundle::build(
        data,
        &BuildParams {
            als: recmesh_algo::als::AlsParams {
                factors: 16,
                iterations: 5,
                threads: 1,
                ..Default::default()
            },
            ..BuildParams::default()
        },
        |_| {},
    )
}

/// The id of the service's most popular item.
fn most_popular(s: &RetrievalService) -> String {
    let index = s.index();
    index
        .catalog
        .item(index.popular[0].0)
        .expect("item")
        .id
        .clone()
}

fn only(source: &str) -> HashMap<String, f64> {
    [
        "anchor", "cf", "ann", "content", "trending", "category", "popular",
    ]
    .into_iter()
    .filter(|s| *s != source)
    .map(|s| (s.to_owned(), 0.0))
    .collect()
}

#[test]
fn ann_serves_trained_users_and_folds_in_new_ones() {
    let data = demo();
    let s = RetrievalService::from_bundle(Config::default(), trained(&data));
    let known = data.interactions[0].user.clone();
    let req = pb::RetrieveRequest {
        user_id: known,
        count: 30,
        source_weights: only("ann"),
        ..Default::default()
    };
    let out = s.retrieve_blocking(&req).expect("ok").whole();
    assert_eq!(out.len(), 30, "a trained user gets ALS candidates");
    assert!(
        out.iter()
            .all(|c| c.source == "ann" && c.reasons == ["picked for your taste"])
    );

    // A user the bundle never saw: folded in from recent events, and
    // explained by one of them.
    let index = s.index();
    let seed = most_popular(&s);
    let fresh = pb::RetrieveRequest {
        user_id: "never-seen".into(),
        recent: vec![viewed(&seed)],
        ..req.clone()
    };
    let out = s.retrieve_blocking(&fresh).expect("ok").whole();
    assert_eq!(out.len(), 30);
    let title = &index.catalog.item(index.popular[0].0).expect("item").title;
    assert!(
        out.iter()
            .all(|c| c.item_id != seed && c.reasons[0] == format!("because you viewed {title}"))
    );
    // No vector and no history: nothing from ANN, popularity still answers.
    let cold = pb::RetrieveRequest {
        user_id: "never-seen".into(),
        ..req
    };
    assert!(s.retrieve_blocking(&cold).expect("ok").whole().is_empty());
}

#[test]
fn a_cold_item_is_retrieved_through_its_content() {
    let mut data = demo();
    // An item no one has touched, in the category and brand of the seed.
    let seed = data.interactions[0].item.clone();
    let like = data
        .items
        .iter()
        .find(|i| i.id == seed)
        .expect("seed")
        .clone();
    data.items.push(recmesh_catalog::Item {
        id: "brand-new".into(),
        title: format!("{} mark II", like.title),
        ..like
    });
    let s = RetrievalService::new(Config::default(), &data);
    let out = s
        .retrieve_blocking(&pb::RetrieveRequest {
            user_id: "u1".into(),
            recent: vec![viewed(&seed)],
            count: 40,
            source_weights: only("content"),
            ..Default::default()
        })
        .expect("ok")
        .whole();
    let category = &out
        .iter()
        .find(|c| c.item_id == "brand-new")
        .expect("the new item is a candidate")
        .attributes
        .as_ref()
        .expect("attributes")
        .category;
    assert!(out.iter().all(|c| c.source == "content"));
    assert_eq!(out[0].item_id, "brand-new", "it matches best");
    assert_eq!(out[0].reasons, [format!("new in {category}")]);
}

#[test]
fn the_content_scan_keeps_the_best_of_the_newest_cold_items() {
    // A catalog where most items are cold: few interactions.
    let data = generate(&DemoSpec {
        items: 2_000,
        users: 50,
        interactions: 300,
        ..DemoSpec::default()
    });
    let index = Arc::new(Index::build(&data, &Config::default()));
    let cold = &index.cold;
    assert!(cold.len() > 500, "{} cold items", cold.len());
    let created = |i: u32| index.catalog.items[i as usize].created_at;
    assert!(
        cold.windows(2).all(|w| created(w[0]) >= created(w[1])),
        "newest first"
    );
    let profile = index.content_of(cold[7]).to_vec();
    let seen: crate::sources::ItemSet = [cold[7]].into_iter().collect();
    // By hand: score every unseen item of the pool, sort, keep the best.
    let by_hand = |pool: usize, limit: usize| {
        let mut all: Vec<(u32, f32)> = cold[..pool]
            .iter()
            .filter(|i| !seen.contains(i))
            .map(|&i| (i, als::similarity(&profile, index.content_of(i))))
            .filter(|&(_, s)| s > 0.0)
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(limit);
        all
    };
    let job = |pool: usize, limit: usize| ContentJob {
        index: index.clone(),
        profile: profile.clone(),
        seen: seen.clone(),
        limit,
        pool,
    };
    assert_eq!(
        job(0, 25).run(),
        by_hand(cold.len(), 25),
        "0: every cold item"
    );
    assert_eq!(job(200, 25).run(), by_hand(200, 25));
    assert_eq!(
        job(200, 10_000).run(),
        by_hand(200, 10_000),
        "fewer than the limit"
    );
    assert!(job(200, 0).run().is_empty());
    assert!(job(cold.len() * 2, 25).run() == by_hand(cold.len(), 25));
}

#[test]
fn a_published_bundle_is_swapped_in_and_a_broken_one_refused() {
    let root = std::env::temp_dir().join(format!("recmesh-retrieval-swap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let data = demo();
    let config = Config {
        bundle_dir: root.display().to_string(),
        ..Config::default()
    };
    // Nothing published yet: the index is built from the data.
    let s = super::service(config.clone(), || Ok(data.clone())).expect("service");
    assert!(s.index().factors.is_none());
    let mut first = trained(&data);
    first.manifest.version = "v0000000000001-first".into();
    first.publish(&root).expect("publish");
    assert_eq!(
        s.reload_if_changed().expect("first").as_deref(),
        Some("v0000000000001-first")
    );
    let s = super::service(config, || unreachable!("the bundle is used")).expect("service");
    assert_eq!(s.index().version(), "v0000000000001-first");
    assert_eq!(
        s.index().ann_backend(),
        Some("exact"),
        "a bundle without ann/ is scanned"
    );
    assert_eq!(s.reload_if_changed().expect("no change"), None);

    let mut second = trained(&data);
    second.manifest.version = "v0000000000002-second".into();
    // This one with the in-process vector index built in, set to walk its
    // graph at any size (by default a catalog this small is scanned: the
    // test below).
    let dir = second
        .publish_with(&root, |tmp, b| {
            vector_bundle::write(tmp, b, &graph_always(), |_| {})
        })
        .expect("publish");
    let before = s.index();
    assert_eq!(
        s.reload_if_changed().expect("swap").as_deref(),
        Some("v0000000000002-second")
    );
    assert_eq!(
        before.version(),
        "v0000000000001-first",
        "a running request keeps its index"
    );
    assert_eq!(s.index().version(), "v0000000000002-second");
    assert_eq!(s.index().ann_backend(), Some("edge"));
    let out = s
        .retrieve_blocking(&pb::RetrieveRequest {
            user_id: data.interactions[0].user.clone(),
            source_weights: only("ann"),
            ..Default::default()
        })
        .expect("ok")
        .whole();
    assert!(
        out.iter().all(|c| c.source == "ann") && !out.is_empty(),
        "the shard answers for a trained user"
    );

    // A damaged third one is refused and the second keeps serving.
    let mut third = trained(&data);
    third.manifest.version = "v0000000000003-third".into();
    let bad = third.publish(&root).expect("publish");
    std::fs::write(bad.join("lists.tsv"), "list\tcategory\titem_id\tscore\n").expect("damage");
    assert!(s.reload_if_changed().is_err());
    assert_eq!(s.index().version(), "v0000000000002-second");
    assert!(dir.exists());

    // So is one whose vector index shard was damaged.
    let mut fourth = trained(&data);
    fourth.manifest.version = "v0000000000004-fourth".into();
    let bad = fourth
        .publish_with(&root, |tmp, b| {
            vector_bundle::write(tmp, b, &Default::default(), |_| {})
        })
        .expect("publish");
    std::fs::write(bad.join("ann/edge_config.json"), "{}").expect("damage");
    let e = s.reload_if_changed().expect_err("refused");
    assert!(e.to_string().contains("edge_config.json"), "{e}");
    assert_eq!(s.index().version(), "v0000000000002-second");
    let _ = std::fs::remove_dir_all(&root);
}

/// Shard parameters that send every filtered search through the graph.
fn graph_always() -> recmesh_vector::HnswParams {
    recmesh_vector::HnswParams {
        full_scan_kb: 0,
        ..Default::default()
    }
}

/// A catalog whose vectors fit under the shard's `full_scan_kb` (where
/// Qdrant scans every point of a filtered search anyway) is served by the
/// exact scan, with the same answers as the engine's; told not to, or with
/// a shard that walks its graph, by the engine. A damaged shard is refused
/// either way.
#[test]
fn a_catalog_under_the_full_scan_threshold_is_scanned_exactly() {
    let root = std::env::temp_dir().join(format!("recmesh-retrieval-small-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let data = demo();
    let mut b = trained(&data);
    b.manifest.version = "v0000000000001-small".into();
    let dir = b
        .publish_with(&root, |tmp, b| {
            vector_bundle::write(tmp, b, &Default::default(), |_| {})
        })
        .expect("publish");
    let mut ann = config::AnnConfig {
        work_dir: root.join("work").display().to_string(),
        ..Default::default()
    };
    let scanned = Index::open(&dir, &ann).expect("opens");
    assert_eq!(scanned.ann_backend(), Some("exact"));
    ann.exact_under_full_scan = false;
    let engine = Index::open(&dir, &ann).expect("opens");
    assert_eq!(engine.ann_backend(), Some("edge"));
    // The engine scans every point here too: the same items, best first.
    let user = &data.interactions[0].user;
    let request = pb::RetrieveRequest {
        user_id: user.clone(),
        count: 50,
        source_weights: only("ann"),
        ..Default::default()
    };
    let answer = |index: Index| {
        let s = RetrievalService::with_index(Config::default(), index, None);
        let ids: Vec<String> = s
            .retrieve_blocking(&request)
            .expect("ok")
            .whole()
            .into_iter()
            .map(|c| c.item_id)
            .collect();
        ids
    };
    let (a, b) = (answer(scanned), answer(engine));
    assert!(!a.is_empty());
    assert_eq!(a, b, "exact scan and the engine's full scan agree");

    let mut graph = trained(&data);
    graph.manifest.version = "v0000000000002-graph".into();
    let dir = graph
        .publish_with(&root, |tmp, b| {
            vector_bundle::write(tmp, b, &graph_always(), |_| {})
        })
        .expect("publish");
    ann.exact_under_full_scan = true;
    assert_eq!(
        Index::open(&dir, &ann).expect("opens").ann_backend(),
        Some("edge")
    );

    std::fs::write(dir.join("ann/edge_config.json"), "{}").expect("damage");
    let small = root.join("v0000000000001-small");
    std::fs::write(small.join("ann/edge_config.json"), "{}").expect("damage");
    let e = Index::open(&small, &ann).expect_err("a damaged shard is refused");
    assert!(e.to_string().contains("edge_config.json"), "{e}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn popular_per_category_covers_every_category() {
    let s = service();
    let out = s
        .popular(&pb::PopularRequest {
            count: 10,
            per_category: 5,
            ..Default::default()
        })
        .expect("ok")
        .candidates;
    let categories: std::collections::HashSet<_> = out
        .iter()
        .filter_map(|c| c.attributes.as_ref().map(|a| a.category.clone()))
        .collect();
    assert_eq!(categories.len(), s.index().catalog.categories.len());
}

/// A vector index that never answers: the stand-in for a stalled
/// backend (a Qdrant server that stopped responding).
#[derive(Debug)]
struct Stalled(usize);

impl VectorIndex for Stalled {
    fn backend(&self) -> &'static str {
        "stalled"
    }
    fn dim(&self) -> usize {
        self.0
    }
    fn upsert(
        &self,
        _: Vec<recmesh_vector::Point>,
    ) -> recmesh_vector::BoxFuture<'_, Result<(), recmesh_vector::VectorError>> {
        Box::pin(std::future::pending())
    }
    fn count(&self) -> recmesh_vector::BoxFuture<'_, Result<usize, recmesh_vector::VectorError>> {
        Box::pin(std::future::pending())
    }
    fn search(
        &self,
        _: recmesh_vector::Query,
    ) -> recmesh_vector::BoxFuture<'_, Result<Vec<Hit>, recmesh_vector::VectorError>> {
        Box::pin(std::future::pending())
    }
}

#[tokio::test]
async fn a_late_source_is_dropped_and_reported_not_waited_for() {
    let data = demo();
    let mut index = Index::from_bundle(trained(&data));
    let dim = index.factors.as_ref().map_or(0, |f| f.trained.factors);
    index.ann = Some(Arc::new(Stalled(dim)));
    let config = Config {
        ann: AnnConfig {
            budget_ms: 30,
            ..AnnConfig::default()
        },
        ..Config::default()
    };
    let s = RetrievalService::with_index(config, index, None);
    let req = pb::RetrieveRequest {
        user_id: data.interactions[0].user.clone(),
        recent: vec![viewed(&data.interactions[0].item)],
        ..Default::default()
    };
    let out = s.retrieve(&req, None).await.expect("answered");
    let whole = out.clone().whole();
    assert!(!whole.is_empty(), "the other sources still answer");
    assert!(whole.iter().all(|c| c.source != "ann"));
    let ann = out
        .sources
        .iter()
        .find(|r| r.source == "ann")
        .expect("ann reported");
    assert_eq!(ann.outcome, "late");
    assert!(ann.detail.contains("30 ms budget"), "{}", ann.detail);
    let cf = out
        .sources
        .iter()
        .find(|r| r.source == "cf")
        .expect("cf reported");
    assert_eq!(cf.outcome, "ok");
    assert!(cf.candidates > 0);

    // A caller's shorter deadline shortens the budget: 8 ms leaves 6.
    let out = s
        .retrieve(&req, Some(std::time::Duration::from_millis(8)))
        .await
        .expect("answered");
    let ann = out
        .sources
        .iter()
        .find(|r| r.source == "ann")
        .expect("ann reported");
    assert_eq!(ann.outcome, "late");
    assert!(ann.detail.contains("6 ms budget"), "{}", ann.detail);
}

#[test]
fn seen_items_are_dropped_by_every_source_before_the_cut() {
    let data = demo();
    let s = RetrievalService::from_bundle(Config::default(), trained(&data));
    let user = data.interactions[0].user.clone();
    let seed = most_popular(&s);
    let base = pb::RetrieveRequest {
        user_id: user,
        recent: vec![viewed(&seed)],
        count: 60,
        ..Default::default()
    };
    let before = s.retrieve_blocking(&base).expect("ok").whole();
    assert_eq!(before.len(), 60);
    // The user has seen the first 40 of what retrieval offered them, from
    // every source: the next answer holds none of them and is still full.
    let seen: std::collections::HashSet<u64> = before[..40]
        .iter()
        .map(|c| recmesh_catalog::item_key(&c.item_id))
        .collect();
    let req = pb::RetrieveRequest {
        seen_items: seen.iter().copied().collect(),
        ..base.clone()
    };
    let after = s.retrieve_blocking(&req).expect("ok").whole();
    assert_eq!(after.len(), 60, "no slot spent on a seen item");
    assert!(
        after
            .iter()
            .all(|c| !seen.contains(&recmesh_catalog::item_key(&c.item_id)))
    );
    // Each source on its own too, the vector index's filter included.
    for source in ["cf", "ann", "trending", "popular"] {
        let one = pb::RetrieveRequest {
            source_weights: only(source),
            ..req.clone()
        };
        let out = s.retrieve_blocking(&one).expect("ok").whole();
        assert!(
            out.iter()
                .all(|c| !seen.contains(&recmesh_catalog::item_key(&c.item_id))),
            "{source} offered a seen item"
        );
    }
    // Keys of items the catalog does not know are skipped; too many are refused.
    let unknown = pb::RetrieveRequest {
        seen_items: vec![1, 2, 3],
        ..base.clone()
    };
    assert_eq!(s.retrieve_blocking(&unknown).expect("ok").whole().len(), 60);
    let flood = pb::RetrieveRequest {
        seen_items: vec![7; Config::default().max_seen_items + 1],
        ..base
    };
    let err = s.retrieve_blocking(&flood).expect_err("too many");
    assert!(err.to_string().contains("seen_items"), "{err}");
}

/// The merge's by-index filter check gives `HardFilters::check`'s answer
/// for every item, under exclusions, category and price filters, and an
/// out-of-stock share (the demo catalog has some).
#[test]
fn packed_filter_columns_answer_as_the_hard_filters() {
    use recmesh_algo::rules::RuleItem;
    let s = service();
    let snap = s.snapshot();
    let index = snap.index.clone();
    let items = &index.catalog.items;
    assert!(
        items.iter().any(|it| !it.in_stock),
        "the fixture has out-of-stock items"
    );
    let exclude: Vec<String> = items
        .iter()
        .step_by(7)
        .map(|it| it.id.clone())
        .chain(["not-in-the-catalog".to_owned()])
        .collect();
    let prices: Vec<f64> = items.iter().map(|it| it.price).collect();
    let median = {
        let mut p = prices.clone();
        p.sort_by(f64::total_cmp);
        p[p.len() / 2]
    };
    let cases = [
        pb::Filters::default(),
        pb::Filters {
            categories: vec![index.catalog.categories[0].clone()],
            ..Default::default()
        },
        pb::Filters {
            min_price: median,
            ..Default::default()
        },
        pb::Filters {
            categories: index.catalog.categories[..2].to_vec(),
            max_price: median,
            ..Default::default()
        },
    ];
    let mut allowed = 0;
    for filters in &cases {
        for ex in [&[][..], &exclude[..]] {
            let mut c = snap.constraints(ex, Some(filters)).expect("valid filters");
            c.exclude(&items[3].id, 3);
            for (i, it) in items.iter().enumerate() {
                let rule = RuleItem {
                    id: &it.id,
                    category: &it.category,
                    price: it.price,
                    in_stock: it.in_stock,
                };
                let by_id = c.filters.check(&rule).is_none();
                assert_eq!(
                    c.allows(&index, i as u32),
                    by_id,
                    "item {} under {filters:?}, {} excluded",
                    it.id,
                    ex.len()
                );
                allowed += usize::from(by_id);
            }
            assert!(!c.allows(&index, items.len() as u32), "past the catalog");
        }
    }
    assert!(allowed > 0, "some items pass some filters");
}

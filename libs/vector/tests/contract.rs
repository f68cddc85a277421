//! The contract every vector index backend passes: the same points and
//! queries give the exact search's answers (small sets, where HNSW is exact
//! or scanned), filters hold, upserts replace, bad input names its field.
//!
//! The in-process backends always run. The Qdrant server backend runs
//! against `QDRANT_URL` when set (e.g. `http://localhost:6334`), else
//! against the server `tools/build-qdrant.sh` built, started by the test;
//! in a fresh collection it deletes afterwards. With neither it says why it
//! skipped.

use recmesh_vector::edge::EdgeIndex;
use recmesh_vector::exact::ExactIndex;
use recmesh_vector::mips::{Mips, MipsParams};
use recmesh_vector::remote::{QdrantConfig, QdrantIndex};
use recmesh_vector::{Filter, Hit, HnswParams, Point, Query, VectorError, VectorIndex, dot};

const DIM: usize = 8;

/// Deterministic pseudo-random vectors (a 64-bit LCG), so every backend
/// and every run sees the same points.
fn vector(seed: u64) -> Vec<f32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..DIM)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        })
        .collect()
}

fn points(n: u32) -> Vec<Point> {
    (0..n)
        .map(|id| Point {
            id,
            vector: vector(u64::from(id)),
            category: id % 5,
            in_stock: id % 3 != 0,
            price: f64::from(id),
            created_at: i64::from(id) * 100,
        })
        .collect()
}

fn ids(hits: &[Hit]) -> Vec<u32> {
    hits.iter().map(|h| h.id).collect()
}

/// Same ids in the same order; scores equal to float tolerance.
fn assert_same(backend: &str, what: &str, got: &[Hit], want: &[Hit]) {
    assert_eq!(ids(got), ids(want), "{backend}: {what}");
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g.score - w.score).abs() < 1e-3,
            "{backend}: {what}: score of {} is {} (exact: {})",
            g.id,
            g.score,
            w.score
        );
    }
}

fn filters() -> Vec<(&'static str, Filter)> {
    vec![
        ("no filter", Filter::default()),
        (
            "categories 1 and 3",
            Filter {
                categories: vec![1, 3],
                ..Filter::default()
            },
        ),
        (
            "in stock",
            Filter {
                in_stock_only: true,
                ..Filter::default()
            },
        ),
        (
            "price 20..=80",
            Filter {
                min_price: 20.0,
                max_price: 80.0,
                ..Filter::default()
            },
        ),
        (
            "created since 10000",
            Filter {
                created_since: Some(10_000),
                ..Filter::default()
            },
        ),
        (
            "excluded ids",
            Filter {
                exclude: (0..150).collect(),
                ..Filter::default()
            },
        ),
        (
            "everything at once",
            Filter {
                categories: vec![2],
                in_stock_only: true,
                min_price: 10.0,
                max_price: 180.0,
                created_since: Some(3_000),
                exclude: vec![32, 47, 52],
            },
        ),
    ]
}

async fn contract(index: &dyn VectorIndex) {
    let backend = index.backend();
    let reference = ExactIndex::new(DIM);
    let all = points(200);
    reference
        .upsert_now(all.clone())
        .expect("the backend answers");

    assert_eq!(
        index.count().await.expect("the backend answers"),
        0,
        "{backend}: a new index is empty"
    );
    index
        .upsert(all.clone())
        .await
        .expect("the backend answers");
    assert_eq!(
        index.count().await.expect("the backend answers"),
        200,
        "{backend}: count after upsert"
    );

    for seed in [1000u64, 2000, 3000] {
        for (what, filter) in filters() {
            let q = Query {
                vector: vector(seed),
                limit: 10,
                filter,
            };
            let want = reference.search_now(&q).expect("the backend answers");
            assert!(!want.is_empty(), "the reference finds something for {what}");
            let got = index.search(q.clone()).await.expect("the backend answers");
            assert_same(backend, what, &got, &want);
            for h in &got {
                assert!(
                    q.filter.allows(&all[h.id as usize]),
                    "{backend}: {what}: {} passes",
                    h.id
                );
            }
        }
    }

    // A point's own vector finds it first.
    let own = index
        .search(Query {
            vector: all[17].vector.clone(),
            limit: 1,
            filter: Filter::default(),
        })
        .await
        .expect("the backend answers");
    assert_eq!(ids(&own), vec![17], "{backend}: nearest to itself");

    // Nothing passes: an empty answer, not an error.
    let none = index
        .search(Query {
            vector: vector(5),
            limit: 10,
            filter: Filter {
                categories: vec![4],
                max_price: 3.0,
                min_price: 0.5,
                ..Filter::default()
            },
        })
        .await
        .expect("the backend answers");
    assert!(
        none.is_empty(),
        "{backend}: no item of category 4 costs 0.5..=3"
    );

    // Upsert replaces by id: point 5 moves to point 17's place.
    let mut moved = all[5].clone();
    moved.vector = all[17].vector.iter().map(|v| v * 2.0).collect();
    index
        .upsert(vec![moved])
        .await
        .expect("the backend answers");
    assert_eq!(
        index.count().await.expect("the backend answers"),
        200,
        "{backend}: replacing adds nothing"
    );
    let near = index
        .search(Query {
            vector: all[17].vector.clone(),
            limit: 2,
            filter: Filter::default(),
        })
        .await
        .expect("the backend answers");
    let mut got = ids(&near);
    got.sort();
    assert_eq!(
        got,
        vec![5, 17],
        "{backend}: the replaced vector is searched"
    );

    // Bad input names the field and changes nothing.
    match index
        .search(Query {
            vector: vec![0.1; DIM + 1],
            limit: 3,
            filter: Filter::default(),
        })
        .await
    {
        Err(VectorError::Dimension {
            field,
            expected,
            got,
        }) => {
            assert_eq!(
                (field.as_str(), expected, got),
                ("query.vector", DIM, DIM + 1)
            );
        }
        other => panic!("{backend}: a 9-dimension query: {other:?}"),
    }
    let mut bad = all[3].clone();
    bad.vector.pop();
    let e = index
        .upsert(vec![all[4].clone(), bad])
        .await
        .expect_err("a bad point is refused");
    assert!(e.to_string().contains("points[1].vector"), "{backend}: {e}");
    assert_eq!(
        index.count().await.expect("the backend answers"),
        200,
        "{backend}: a refused upsert stores nothing"
    );

    let zero = index
        .search(Query {
            vector: vector(9),
            limit: 0,
            filter: Filter::default(),
        })
        .await
        .expect("the backend answers");
    assert!(zero.is_empty(), "{backend}: limit 0");
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("recmesh-vector-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[tokio::test]
async fn exact_passes_the_contract() {
    contract(&ExactIndex::new(DIM)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_passes_the_contract() {
    let dir = scratch("contract");
    let index =
        EdgeIndex::create(&dir, DIM, &HnswParams::default(), None).expect("the backend answers");
    contract(&index).await;
    drop(index);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Both halves of [`Mips`] alone, each exact on the contract's 200 points:
/// every point in the exactly scanned head; or none, with the index
/// asked for every point (20 × 10) and rescored.
const MIPS_SPLITS: [MipsParams; 2] = [
    MipsParams {
        head: 200,
        fetch: 1,
    },
    MipsParams { head: 0, fetch: 20 },
];

/// Through [`Mips`], a backend answers by dot product: the brute-force
/// dot product's answers, with its scores, under every filter.
async fn mips_contract(index: &dyn VectorIndex) {
    let backend = index.backend();
    assert_eq!(
        index.dim(),
        DIM,
        "{backend}: Mips speaks the model's dimension"
    );
    let all = points(200);
    index
        .upsert(all.clone())
        .await
        .expect("the backend answers");
    for seed in 500..520u64 {
        for (what, filter) in filters() {
            let q = Query {
                vector: vector(seed),
                limit: 10,
                filter: filter.clone(),
            };
            let mut want: Vec<Hit> = all
                .iter()
                .filter(|p| filter.allows(p))
                .map(|p| Hit {
                    id: p.id,
                    score: dot(&q.vector, &p.vector),
                })
                .collect();
            want.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
            want.truncate(10);
            let got = index.search(q).await.expect("the backend answers");
            assert_same(backend, what, &got, &want);
        }
    }
}

#[tokio::test]
async fn exact_through_mips_ranks_by_dot_product() {
    for split in MIPS_SPLITS {
        mips_contract(&Mips::new(ExactIndex::new(DIM), Vec::new(), split)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_through_mips_ranks_by_dot_product() {
    for (n, split) in MIPS_SPLITS.into_iter().enumerate() {
        let dir = scratch(&format!("mips-{n}"));
        let edge = EdgeIndex::create(&dir, DIM, &HnswParams::default(), None)
            .expect("the backend answers");
        let index = Mips::new(edge, Vec::new(), split);
        mips_contract(&index).await;
        drop(index);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Everything in a directory, by relative path, with its bytes.
fn snapshot(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    fn walk(
        root: &std::path::Path,
        dir: &std::path::Path,
        out: &mut std::collections::BTreeMap<String, Vec<u8>>,
    ) {
        for e in std::fs::read_dir(dir).expect("shard dir") {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(root)
                        .expect("under root")
                        .display()
                        .to_string(),
                    std::fs::read(&p).expect("readable"),
                );
            }
        }
    }
    let mut out = Default::default();
    walk(dir, dir, &mut out);
    out
}

/// A built HNSW graph (forced on a small set by a 1 KB indexing
/// threshold) answers like the exact search, and a copy opened for serving
/// leaves the built shard as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_built_edge_graph_is_searched_and_opened_from_a_copy() {
    let built = scratch("built");
    let serving = scratch("serving");
    let all = points(2_000);
    let params = HnswParams::default();
    let (stored, indexed) = EdgeIndex::build(
        &built,
        DIM,
        &params,
        Some(1),
        all.clone().into_iter(),
        |_| {},
    )
    .expect("the backend answers");
    assert_eq!(stored, 2_000);
    assert_eq!(indexed, 2_000, "every vector is in the HNSW graph");
    assert!(
        !built.join("wal").exists(),
        "the built shard ships without its log"
    );
    let before = snapshot(&built);

    let index = EdgeIndex::open_copy(&built, &serving, params.ef).expect("the backend answers");
    let reference = ExactIndex::new(DIM);
    reference.upsert_now(all).expect("the backend answers");
    let (mut found, mut wanted) = (0, 0);
    for seed in 10_000..10_050u64 {
        for (_, filter) in filters() {
            let q = Query {
                vector: vector(seed),
                limit: 10,
                filter,
            };
            let want = ids(&reference.search_now(&q).expect("the backend answers"));
            let got = index.search(q).await.expect("the backend answers");
            wanted += want.len();
            found += want
                .iter()
                .filter(|id| got.iter().any(|h| h.id == **id))
                .count();
        }
    }
    let recall = found as f64 / wanted as f64;
    assert!(
        recall >= 0.95,
        "recall@10 of the graph on 2,000 points: {recall:.3}"
    );
    drop(index);
    assert!(
        before == snapshot(&built),
        "opening a copy changed no file of the built shard"
    );
    let _ = std::fs::remove_dir_all(&built);
    let _ = std::fs::remove_dir_all(&serving);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qdrant_server_passes_the_contract() {
    // QDRANT_URL, else the server tools/build-qdrant.sh built, started
    // here; else say why the test does nothing.
    let Some((url, _server)) = recmesh_vector::testkit::server_for_test(&scratch("qdrant")) else {
        return;
    };
    let collection = format!("recmesh-contract-{}", std::process::id());
    let config = |name: String| {
        let mut config = QdrantConfig::new(&url, name);
        config.api_key = std::env::var("QDRANT_API_KEY").ok();
        config.search_timeout = std::time::Duration::from_secs(2);
        config
    };
    let index = QdrantIndex::connect(config(collection.clone()), DIM, &HnswParams::default())
        .await
        .expect("the backend answers");
    contract(&index).await;
    index
        .delete_collection()
        .await
        .expect("the backend answers");

    // The same server through Mips, as retrieval uses it.
    for (n, split) in MIPS_SPLITS.into_iter().enumerate() {
        let name = format!("{collection}-mips-{n}");
        let remote = QdrantIndex::connect(config(name), DIM, &HnswParams::default())
            .await
            .expect("the backend answers");
        let index = Mips::new(remote, Vec::new(), split);
        mips_contract(&index).await;
        index
            .inner()
            .delete_collection()
            .await
            .expect("the backend answers");
    }
}

//! The index retrieval serves from: one bundle, loaded or built, with its
//! CF neighbours, lists, content rows and vector index.

use std::collections::HashMap;
use std::sync::Arc;

use recmesh_algo::als::{self, FoldIn};
use recmesh_algo::content;
use recmesh_algo::popularity::LiveTrending;
use recmesh_catalog::bundle::{self, BuildParams, Bundle};
use recmesh_catalog::{Catalog, Dataset};
use recmesh_mesh::convert::event_kind;
use recmesh_proto::v1::{self as pb};
use recmesh_vector::VectorIndex;
use recmesh_vector::bundle as vector_bundle;
use recmesh_vector::exact::ExactIndex;
use recmesh_vector::mips::Mips;
use recmesh_vector::remote::{QdrantConfig, QdrantIndex};

use crate::config::{AnnBackend, AnnConfig, Config};

/// Everything retrieval serves from: one bundle, indexed for serving.
#[derive(Debug)]
pub struct Index {
    pub(crate) catalog: Catalog,
    pub(crate) neighbours: Vec<Vec<(u32, f32)>>,
    pub(crate) popular: Vec<(u32, f64)>,
    pub(crate) popular_by_category: HashMap<u32, Vec<(u32, f64)>>,
    /// Content vectors by row: the cold items' first, in `cold` order, so
    /// the `content` scan reads one contiguous block; then the rest.
    pub(crate) content: Vec<f32>,
    /// Item index → its row in `content`.
    pub(crate) content_row: Vec<u32>,
    /// Items with no co-occurrence neighbour, newest first: what the
    /// `content` source offers.
    pub(crate) cold: Vec<u32>,
    pub(crate) factors: Option<Factors>,
    /// The item vectors' index (present when `factors` is).
    pub(crate) ann: Option<Arc<dyn VectorIndex>>,
    /// The bundle's trending lists plus the events since it was trained.
    pub(crate) trending: std::sync::RwLock<LiveTrending>,
    pub(crate) version: String,
    /// What the request filters read of each item, by index, packed: the
    /// merge checks every item every source found, and reading the whole
    /// `Item` for it (ids, names, 120 bytes) was a cache miss each, most
    /// of `Merger::add`'s time (docs/performance.md).
    pub(crate) filter_columns: Vec<FilterColumns>,
}

/// An item's fields the hard filters read.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FilterColumns {
    pub(crate) price: f64,
    pub(crate) category: u32,
    pub(crate) in_stock: bool,
}

/// ALS factors with the user lookup and the fold-in solver.
#[derive(Debug)]
pub(crate) struct Factors {
    pub(crate) trained: bundle::Factors,
    pub(crate) user_row: HashMap<String, u32>,
    pub(crate) fold: FoldIn,
}

/// Name of the per-process shard copy under the temp dir when
/// `ann.work_dir` is empty: `recmesh-retrieval-<pid>`.
pub(crate) const WORK_DIR_PREFIX: &str = "recmesh-retrieval-";

/// Removes shard copies (`recmesh-retrieval-<pid>` in `tmp`) left by
/// processes that are gone: a process killed, or one that exited, does not
/// remove its own, and each is a copy of the vector index (75 MB for the
/// demo catalog). Directories of live processes are left alone. Best effort:
/// a failure is logged and the start goes on.
pub(crate) fn remove_dead_work_dirs(tmp: &std::path::Path) {
    // Whether a process lives is read from /proc: without it (not Linux),
    // nothing is removed.
    if !std::path::Path::new("/proc/self").exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(WORK_DIR_PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => tracing::info!(dir = %entry.path().display(),
                "removed the shard copy of a retrieval process that is gone"),
            Err(e) => tracing::warn!(dir = %entry.path().display(), error = %e,
                "could not remove the shard copy of a retrieval process that is gone"),
        }
    }
}

impl Index {
    /// Builds a bundle from `data` in memory (no ALS) and indexes it.
    pub fn build(data: &Dataset, config: &Config) -> Self {
        let params = BuildParams {
            neighbours_per_item: config.neighbours_per_item,
            max_history_per_user: config.max_history_per_user,
            list_len: config.popular_list_len,
            als: als::AlsParams {
                factors: 0,
                ..Default::default()
            },
            ..BuildParams::default()
        };
        Index::from_bundle(Bundle::build(data, &params, |_| {}))
    }

    /// Indexes a loaded (or built) bundle; its item vectors are searched
    /// by an exact scan.
    pub fn from_bundle(b: Bundle) -> Self {
        let ann = exact_index(&b);
        Index::with_ann(b, ann)
    }

    /// Loads the bundle in `dir` and opens its vector index as `config`
    /// says (blocking: file reads, a shard copy, or a Qdrant upload).
    pub fn open(dir: &std::path::Path, config: &AnnConfig) -> anyhow::Result<Self> {
        let b = Bundle::load(dir)?;
        let ann: Option<Arc<dyn VectorIndex>> = match b.factors.as_ref().map(|f| f.factors) {
            None | Some(0) => None,
            Some(dim) => Some(match config.backend {
                AnnBackend::Exact => return Ok(Index::from_bundle(b)),
                AnnBackend::Edge
                    if config.exact_under_full_scan
                        && vector_bundle::has_shard(&b.manifest)
                        && vector_bundle::scanned_whole(&b.manifest, b.catalog.len(), dim) =>
                {
                    vector_bundle::check(dir, &b.manifest)?;
                    tracing::info!(
                        items = b.catalog.len(),
                        dim,
                        "item vectors under the shard's full_scan_kb: scanned exactly (ann.exact_under_full_scan)"
                    );
                    return Ok(Index::from_bundle(b));
                }
                AnnBackend::Edge if vector_bundle::has_shard(&b.manifest) => {
                    let root = if config.work_dir.is_empty() {
                        let tmp = std::env::temp_dir();
                        remove_dead_work_dirs(&tmp);
                        tmp.join(format!("{WORK_DIR_PREFIX}{}", std::process::id()))
                    } else {
                        std::path::PathBuf::from(&config.work_dir)
                    };
                    let work = root.join(&b.manifest.version);
                    let mut index = vector_bundle::open(dir, &b, &work, config.ef, config.mips())?;
                    index
                        .inner_mut()
                        .set_acorn((config.acorn > 0.0).then_some(config.acorn));
                    Arc::new(index)
                }
                AnnBackend::Edge => {
                    tracing::warn!(
                        bundle = %dir.display(),
                        "the bundle has no vector index (ann/): its item vectors are scanned exactly; publish it again with this trainer for HNSW"
                    );
                    return Ok(Index::from_bundle(b));
                }
                AnnBackend::Qdrant => Arc::new(qdrant_index(&b, dim, config)?),
            }),
        };
        Ok(Index::with_ann(b, ann))
    }

    pub(crate) fn with_ann(b: Bundle, ann: Option<Arc<dyn VectorIndex>>) -> Self {
        let mut cold: Vec<u32> = (0..b.catalog.len() as u32)
            .filter(|&i| b.neighbours[i as usize].is_empty())
            .collect();
        cold.sort_by_key(|&i| (std::cmp::Reverse(b.catalog.items[i as usize].created_at), i));
        let (reference_s, half_life_s) = b.trending_clock();
        let list_len = b
            .trending
            .by_category
            .values()
            .map(Vec::len)
            .chain([b.trending.overall.len(), 1])
            .max()
            .unwrap_or(1);
        let trending = LiveTrending::new(
            &b.trending.overall,
            &b.trending.by_category,
            b.catalog.len(),
            reference_s,
            half_life_s,
            list_len,
        );
        let factors = b.factors.map(|trained| Factors {
            user_row: trained
                .user_ids
                .iter()
                .enumerate()
                .map(|(n, u)| (u.clone(), n as u32))
                .collect(),
            fold: FoldIn::new(
                &trained.items,
                trained.factors,
                trained.regularization,
                trained.alpha,
            ),
            trained,
        });
        let (content, content_row) = cold_rows_first(&b.content, &cold, b.catalog.len());
        let filter_columns = b
            .catalog
            .items
            .iter()
            .zip(&b.catalog.category_of)
            .map(|(it, &category)| FilterColumns {
                price: it.price,
                category,
                in_stock: it.in_stock,
            })
            .collect();
        Index {
            filter_columns,
            catalog: b.catalog,
            neighbours: b.neighbours,
            popular: b.popular.overall,
            popular_by_category: b.popular.by_category,
            content,
            content_row,
            cold,
            factors,
            ann,
            trending: std::sync::RwLock::new(trending),
            version: b.manifest.version,
        }
    }

    /// Counts events from the log into the trending lists (those the bundle
    /// was trained on, and unknown items or event types, are skipped);
    /// returns how many counted.
    pub fn record_events(&self, events: &[pb::Event]) -> usize {
        let mut trending = self.trending.write().unwrap_or_else(|p| p.into_inner());
        let mut counted = 0;
        for e in events {
            let ts = e.timestamp_ms.div_euclid(1000);
            let (Some(i), Some(kind)) =
                (self.catalog.index_of(&e.item_id), event_kind(e.event_type))
            else {
                continue;
            };
            // At or before the lists' reference: in the bundle already.
            if ts <= trending.reference_s() {
                continue;
            }
            trending.record(i, self.catalog.category_of[i as usize], kind.weight(), ts);
            counted += 1;
        }
        counted
    }

    pub(crate) fn trending(&self) -> std::sync::RwLockReadGuard<'_, LiveTrending> {
        self.trending.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The vector index backend serving the item vectors (None: no vectors).
    pub fn ann_backend(&self) -> Option<&'static str> {
        self.ann.as_ref().map(|a| a.backend())
    }

    /// Version of the bundle served (its manifest's `version`).
    pub fn version(&self) -> &str {
        &self.version
    }

    pub(crate) fn title(&self, index: u32) -> &str {
        self.catalog
            .item(index)
            .map_or("an item", |i| i.title.as_str())
    }

    pub(crate) fn content_of(&self, i: u32) -> &[f32] {
        let row = self.content_row[i as usize] as usize;
        &self.content[row * content::DIM..][..content::DIM]
    }

    /// The content vectors of the first `n` cold items, in `cold` order.
    pub(crate) fn cold_content(&self, n: usize) -> std::slice::ChunksExact<'_, f32> {
        self.content[..n * content::DIM].chunks_exact(content::DIM)
    }
}

/// `content` (one `content::DIM` row per item) reordered with the `cold`
/// items' rows first, in that order; and each item's new row.
pub(crate) fn cold_rows_first(content: &[f32], cold: &[u32], items: usize) -> (Vec<f32>, Vec<u32>) {
    let mut is_cold = vec![false; items];
    for &i in cold {
        is_cold[i as usize] = true;
    }
    let order = cold
        .iter()
        .copied()
        .chain((0..items as u32).filter(|&i| !is_cold[i as usize]));
    let mut rows = Vec::with_capacity(content.len());
    let mut row_of = vec![0u32; items];
    for (row, i) in order.enumerate() {
        row_of[i as usize] = row as u32;
        rows.extend_from_slice(&content[i as usize * content::DIM..][..content::DIM]);
    }
    (rows, row_of)
}

/// An exact index over the bundle's item vectors, by dot product (None
/// without vectors).
pub(crate) fn exact_index(b: &Bundle) -> Option<Arc<dyn VectorIndex>> {
    let f = b.factors.as_ref().filter(|f| f.factors > 0)?;
    let index = ExactIndex::by_dot_product(f.factors);
    // Every point comes from the bundle with the bundle's dimension.
    index
        .upsert_now(vector_bundle::points(b).collect())
        .unwrap_or_else(|e| unreachable!("bundle vectors have the bundle's dimension: {e}"));
    Some(Arc::new(index))
}

/// The Qdrant server collection for this bundle version, created and filled
/// when it does not hold every item yet (runs on a blocking thread),
/// searched by dot product.
pub(crate) fn qdrant_index(
    b: &Bundle,
    dim: usize,
    config: &AnnConfig,
) -> anyhow::Result<Mips<QdrantIndex>> {
    let mut q = QdrantConfig::new(
        &config.qdrant_url,
        format!("{}-{}", config.qdrant_collection_prefix, b.manifest.version),
    );
    q.search_timeout = std::time::Duration::from_millis(config.qdrant_timeout_ms);
    if !config.qdrant_api_key_file.is_empty() {
        let key = std::fs::read_to_string(&config.qdrant_api_key_file).map_err(|e| {
            anyhow::anyhow!(
                "ann.qdrant_api_key_file: {}: {e}",
                config.qdrant_api_key_file
            )
        })?;
        q.api_key = Some(key.trim().to_owned());
    }
    let params = recmesh_vector::HnswParams {
        ef: config.ef,
        acorn: config.acorn,
        ..Default::default()
    };
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|_| anyhow::anyhow!("the qdrant backend loads inside the service's runtime"))?;
    handle.block_on(async {
        let index = QdrantIndex::connect(q, dim, &params).await?;
        let stored = index.count().await?;
        let items = b.catalog.len();
        if stored != items {
            tracing::info!(
                collection = index.collection(),
                stored,
                items,
                "uploading item vectors to Qdrant"
            );
            index.upsert(vector_bundle::points(b).collect()).await?;
        }
        Ok::<_, anyhow::Error>(Mips::new(index, vector_bundle::points(b), config.mips()))
    })
}

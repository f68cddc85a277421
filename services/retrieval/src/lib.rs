//! Retrieval service: turns a user (or an anchor item) into a few hundred
//! candidates from several sources, each with the source and a reason.
//!
//! It serves from a model bundle (`recmesh_catalog::bundle`): the trainer's
//! published one when `bundle_dir` is set (swapped for a newer one without
//! a restart), or one built in memory from the dataset at start (CF, lists
//! and content vectors; no ALS factors, which are the trainer's job).
//!
//! Sources, in priority order:
//! - `anchor`: item-item CF neighbours of the item being viewed;
//! - `cf`: CF neighbours of the user's recent items, weighted by event
//!   strength and recency ("because you viewed X");
//! - `ann`: items nearest the user's ALS vector (the trained one, or one
//!   folded in from their recent events for a user the bundle has not
//!   seen), explained by the recent item they are closest to;
//! - `content`: cold items (no co-occurrence yet) whose content vector
//!   matches the user's recent items ("new in Y");
//! - `popular`: popularity in the categories the user is browsing or engages
//!   with ("popular in Y"), then overall ("popular right now").
//!
//! A candidate found by several sources keeps every source's score and its
//! best reason. Candidate score = max over sources of
//! `source weight × score / best score of that source` (weights: anchor, cf
//! and ann 1.0, content 0.5, category popularity 0.6, overall popularity
//! 0.4), so the merged order is personal first, popular last; ranking falls
//! back to this order.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use recmesh_algo::als::{self, FoldIn};
use recmesh_algo::popularity::LiveTrending;
use recmesh_algo::rules::{HardFilters, RuleItem};
use recmesh_algo::{content, cooccurrence};
use recmesh_catalog::bundle::{self, BuildParams, Bundle};
use recmesh_catalog::files::DataSource;
use recmesh_catalog::{Catalog, Dataset, EventKind};
use recmesh_mesh::convert::{FieldError, attributes, check_id, event_kind};
use recmesh_mesh::lean;
use recmesh_proto::v1::{self as pb, retrieval_server::RetrievalServer};
use recmesh_server::GrpcServer;
use recmesh_server::config::{ConfigError, ServerConfig, ServiceConfig, at_least_one};
use recmesh_vector::bundle as vector_bundle;
use recmesh_vector::exact::ExactIndex;
use recmesh_vector::mips::{Mips, MipsParams};
use recmesh_vector::remote::{QdrantConfig, QdrantIndex};
use recmesh_vector::{Hit, VectorIndex};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

/// Default gRPC port of the retrieval service.
pub const DEFAULT_PORT: u16 = 50052;

/// Configuration of the retrieval service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC and admin server.
    pub server: ServerConfig,
    /// Dataset the index is built from at start when `bundle_dir` is empty.
    pub data: DataSource,
    /// Root of the trainer's published bundles (`recmesh-trainer bundle
    /// --out DIR`); served from `DIR/current`. Empty: build from `data`.
    pub bundle_dir: String,
    /// How often `bundle_dir/current` is checked for a newer bundle (0:
    /// never). A newer one is swapped in without a restart; one that does
    /// not load is refused and the current one keeps serving.
    pub bundle_reload_ms: u64,
    /// CF neighbours kept per item.
    pub neighbours_per_item: usize,
    /// Strongest items per user used when counting co-occurrences (bounds
    /// the quadratic pair count of very active users).
    pub max_history_per_user: usize,
    /// Recent interactions used as CF seeds.
    pub max_seeds: usize,
    /// Popular items kept per list (overall and per category).
    pub popular_list_len: usize,
    /// Candidates returned when the request asks for 0.
    pub default_count: u32,
    /// Most candidates one request may ask for.
    pub max_count: u32,
    /// Most excluded ids one request may carry.
    pub max_exclusions: usize,
    /// Budget of the `content` source inside the request, in ms (capped at
    /// three quarters of the caller's deadline); a late answer is dropped
    /// and reported, never waited for.
    pub content_budget_ms: u64,
    /// Most cold items the `content` source scans per request: the newest
    /// by `created_at` (0: every cold item). The scan is exact (64
    /// multiply-adds per item), so it grows with the catalog; at 1M items
    /// the whole cold set took half the mesh's CPU (docs/performance.md).
    pub content_pool: usize,
    /// The vector index behind the `ann` source and `SimilarItems`.
    pub ann: AnnConfig,
    /// The features service whose event log keeps the trending lists fresh
    /// (empty: the bundle's lists as trained).
    pub features_addr: String,
    /// How often the event log is read when it has nothing new, in ms.
    pub trending_poll_ms: u64,
    /// Events read per call.
    pub trending_page: u32,
}

/// Which vector index serves the bundle's item vectors.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AnnBackend {
    /// Qdrant's engine in process: the HNSW shard the trainer built into
    /// the bundle (`ann/`), opened from a private copy.
    Edge,
    /// A scan over every item vector (exact; slow past ~100k items).
    Exact,
    /// A Qdrant server or cluster over gRPC (`qdrant_url`); the collection
    /// `<qdrant_collection_prefix>-<bundle version>` is created and filled
    /// on the first load of a bundle and reused after that.
    Qdrant,
}

/// The vector index settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AnnConfig {
    /// `edge` (default), `exact` or `qdrant`.
    pub backend: AnnBackend,
    /// HNSW search candidate list (`hnsw_ef`; at least the count asked).
    pub ef: usize,
    /// ACORN for filtered searches whose filter keeps at most this share
    /// of the items (0: off); more selective filters are scanned exactly
    /// (the bundle's `ann.full_scan_kb`).
    pub acorn: f64,
    /// Budget of the `ann` source inside the request, in ms (capped at
    /// three quarters of the caller's deadline); a late answer is dropped.
    pub budget_ms: u64,
    /// Where serving copies of bundle shards go (empty: the system's
    /// temporary directory). Each is removed when its bundle is replaced.
    pub work_dir: String,
    /// Longest item vectors scanned exactly by dot product; the rest are
    /// found by cosine in the index and rescored (`recmesh_vector::mips`).
    pub head: usize,
    /// Index hits fetched per candidate wanted, for rescoring.
    pub fetch: usize,
    /// Qdrant gRPC URL, e.g. `http://qdrant:6334` (backend `qdrant`).
    pub qdrant_url: String,
    /// File holding the Qdrant API key (empty: none).
    pub qdrant_api_key_file: String,
    /// Collection name prefix; the bundle version is appended.
    pub qdrant_collection_prefix: String,
    /// Client-side deadline of one Qdrant search, in ms.
    pub qdrant_timeout_ms: u64,
}

impl AnnConfig {
    fn mips(&self) -> MipsParams {
        MipsParams {
            head: self.head,
            fetch: self.fetch,
        }
    }
}

impl Default for AnnConfig {
    fn default() -> Self {
        AnnConfig {
            backend: AnnBackend::Edge,
            // recall@100 ≥ 0.95 on user vectors at 1M items (docs/ann.md).
            ef: 128,
            // Filtered recall@100 0.54 → 0.77 at 1M items under cosine ranking;
            // no change measured under the dot-product split (docs/ann.md).
            acorn: 0.4,
            budget_ms: 25,
            head: MipsParams::default().head,
            fetch: MipsParams::default().fetch,
            work_dir: String::new(),
            qdrant_url: String::new(),
            qdrant_api_key_file: String::new(),
            qdrant_collection_prefix: "recmesh-items".to_owned(),
            qdrant_timeout_ms: 25,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::on_port(DEFAULT_PORT),
            data: DataSource::default(),
            bundle_dir: String::new(),
            // A new bundle shows within seconds; a readlink every 2 s costs nothing.
            bundle_reload_ms: 2_000,
            // 50 neighbours per item cover a 20-seed history several times over.
            neighbours_per_item: 50,
            max_history_per_user: 100,
            max_seeds: 20,
            popular_list_len: 500,
            default_count: 200,
            max_count: 2_000,
            max_exclusions: 1_000,
            content_budget_ms: 15,
            content_pool: 20_000,
            ann: AnnConfig::default(),
            features_addr: "http://127.0.0.1:50056".into(),
            // A trending list a second behind the events.
            trending_poll_ms: 1_000,
            trending_page: 1_000,
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        at_least_one(&[
            ("neighbours_per_item", self.neighbours_per_item as u64),
            ("max_history_per_user", self.max_history_per_user as u64),
            ("max_seeds", self.max_seeds as u64),
            ("popular_list_len", self.popular_list_len as u64),
            ("max_exclusions", self.max_exclusions as u64),
        ])?;
        at_least_one(&[
            ("ann.ef", self.ann.ef as u64),
            ("ann.budget_ms", self.ann.budget_ms),
            ("ann.fetch", self.ann.fetch as u64),
            ("content_budget_ms", self.content_budget_ms),
            ("trending_poll_ms", self.trending_poll_ms),
            ("trending_page", u64::from(self.trending_page)),
        ])?;
        if !self.features_addr.is_empty() {
            recmesh_mesh::check_address("features_addr", &self.features_addr)
                .map_err(|e| ConfigError::invalid("features_addr", e.to_string()))?;
        }
        if !(0.0..=1.0).contains(&self.ann.acorn) {
            return Err(ConfigError::invalid(
                "ann.acorn",
                "a share of the items in 0..=1 (0 turns ACORN off)",
            ));
        }
        if self.ann.backend == AnnBackend::Qdrant {
            if self.ann.qdrant_url.is_empty() {
                return Err(ConfigError::invalid(
                    "ann.qdrant_url",
                    "backend `qdrant` needs the server's gRPC URL, e.g. http://qdrant:6334",
                ));
            }
            at_least_one(&[("ann.qdrant_timeout_ms", self.ann.qdrant_timeout_ms)])?;
            if self.ann.qdrant_collection_prefix.is_empty() {
                return Err(ConfigError::invalid(
                    "ann.qdrant_collection_prefix",
                    "must not be empty",
                ));
            }
        }
        if self.default_count == 0 || self.default_count > self.max_count {
            return Err(ConfigError::invalid(
                "default_count",
                format!("must be in 1..=max_count ({})", self.max_count),
            ));
        }
        Ok(())
    }
}

/// Everything retrieval serves from: one bundle, indexed for serving.
#[derive(Debug)]
pub struct Index {
    catalog: Catalog,
    neighbours: Vec<Vec<(u32, f32)>>,
    popular: Vec<(u32, f64)>,
    popular_by_category: HashMap<u32, Vec<(u32, f64)>>,
    /// Content vectors by row: the cold items' first, in `cold` order, so
    /// the `content` scan reads one contiguous block; then the rest.
    content: Vec<f32>,
    /// Item index → its row in `content`.
    content_row: Vec<u32>,
    /// Items with no co-occurrence neighbour, newest first: what the
    /// `content` source offers.
    cold: Vec<u32>,
    factors: Option<Factors>,
    /// The item vectors' index (present when `factors` is).
    ann: Option<Arc<dyn VectorIndex>>,
    /// The bundle's trending lists plus the events since it was trained.
    trending: std::sync::RwLock<LiveTrending>,
    version: String,
}

/// ALS factors with the user lookup and the fold-in solver.
#[derive(Debug)]
struct Factors {
    trained: bundle::Factors,
    user_row: HashMap<String, u32>,
    fold: FoldIn,
}

/// Name of the per-process shard copy under the temp dir when
/// `ann.work_dir` is empty: `recmesh-retrieval-<pid>`.
const WORK_DIR_PREFIX: &str = "recmesh-retrieval-";

/// Removes shard copies (`recmesh-retrieval-<pid>` in `tmp`) left by
/// processes that are gone: a process killed, or one that exited, does not
/// remove its own, and each is a copy of the vector index (75 MB for the
/// demo catalog). Directories of live processes are left alone. Best effort:
/// a failure is logged and the start goes on.
fn remove_dead_work_dirs(tmp: &std::path::Path) {
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

    fn with_ann(b: Bundle, ann: Option<Arc<dyn VectorIndex>>) -> Self {
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
        Index {
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

    fn trending(&self) -> std::sync::RwLockReadGuard<'_, LiveTrending> {
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

    fn title(&self, index: u32) -> &str {
        self.catalog
            .item(index)
            .map_or("an item", |i| i.title.as_str())
    }

    fn content_of(&self, i: u32) -> &[f32] {
        let row = self.content_row[i as usize] as usize;
        &self.content[row * content::DIM..][..content::DIM]
    }

    /// The content vectors of the first `n` cold items, in `cold` order.
    fn cold_content(&self, n: usize) -> std::slice::ChunksExact<'_, f32> {
        self.content[..n * content::DIM].chunks_exact(content::DIM)
    }
}

/// `content` (one `content::DIM` row per item) reordered with the `cold`
/// items' rows first, in that order; and each item's new row.
fn cold_rows_first(content: &[f32], cold: &[u32], items: usize) -> (Vec<f32>, Vec<u32>) {
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
fn exact_index(b: &Bundle) -> Option<Arc<dyn VectorIndex>> {
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
fn qdrant_index(b: &Bundle, dim: usize, config: &AnnConfig) -> anyhow::Result<Mips<QdrantIndex>> {
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

/// Request filters after validation: the same hard filters the reranker
/// applies (`recmesh_algo::rules`), pushed down so no slot is spent on an
/// item that would be dropped later.
struct Constraints<'a> {
    filters: HardFilters<'a>,
    /// Category ids of `filters.categories`, for picking popularity lists.
    categories: Vec<u32>,
}

impl Constraints<'_> {
    fn allows(&self, index: &Index, item: u32) -> bool {
        index.catalog.item(item).is_some_and(|it| {
            let rule = RuleItem {
                id: &it.id,
                category: &it.category,
                price: it.price,
                in_stock: it.in_stock,
            };
            self.filters.check(&rule).is_none()
        })
    }
}

/// The merge weight of each source (`RetrieveRequest.source_weights`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct SourceWeights {
    anchor: f64,
    cf: f64,
    ann: f64,
    content: f64,
    trending: f64,
    category: f64,
    popular: f64,
}

impl SourceWeights {
    fn from_request(map: &HashMap<String, f64>) -> Result<Self, FieldError> {
        let mut w = SourceWeights {
            anchor: 1.0,
            cf: 1.0,
            ann: 1.0,
            content: 0.5,
            // MovieLens served NDCG@10: 0.1433 without trending, 0.1465 at
            // 0.3, 0.1479 at 0.5 (docs/evaluation.md).
            trending: 0.5,
            category: 0.6,
            popular: 0.4,
        };
        for (name, &value) in map {
            let field = format!("source_weights.{name}");
            if !(0.0..=10.0).contains(&value) {
                return Err(FieldError::new(field, "must be in 0..=10"));
            }
            match name.as_str() {
                "anchor" => w.anchor = value,
                "cf" => w.cf = value,
                "ann" => w.ann = value,
                "content" => w.content = value,
                "trending" => w.trending = value,
                "category" => w.category = value,
                "popular" => w.popular = value,
                _ => {
                    return Err(FieldError::new(
                        field,
                        "unknown source; known: anchor, cf, ann, content, trending, category, popular",
                    ));
                }
            }
        }
        Ok(w)
    }
}

/// Builds the merged candidate list, first source to find an item first.
struct Merger<'a> {
    index: &'a Index,
    constraints: &'a Constraints<'a>,
    /// foldhash: every item every source found passes through here.
    by_item: HashMap<u32, Merged, foldhash::fast::RandomState>,
    /// The recent items that explain an `ann` hit ([`Why::Nearest`]).
    nearest_to: &'a [(u32, f64, EventKind)],
}

/// One item while sources are merged: only the winners of the cut become
/// candidates (ids, attributes and reasons are written for `count` items,
/// not for every item every source found).
struct Merged {
    score: f64,
    /// When a source first found it: equal scores keep that order.
    seq: u32,
    /// Best raw score per source, in the order the sources found it (the
    /// first is the candidate's `source`).
    source_scores: Vec<(&'static str, f64)>,
    reasons: Vec<Why>,
}

/// Reasons kept per item while merging: the three shown, and one more in
/// case a [`Why::Nearest`] turns out to repeat another.
const REASONS_KEPT: usize = 4;

/// Why a source offered an item. Sources hand these over as indexes; only
/// the items that make the cut get their reasons written out as text
/// ([`Why::text`]), so a request formats a few dozen strings, not one per
/// item every source found.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Why {
    /// "similar to {title of the item}"
    SimilarTo(u32),
    /// "because you {verb} {title of the item}"
    Because(&'static str, u32),
    /// An `ann` hit, explained by the recent item nearest to it (resolved
    /// into `Because` or `ForYourTaste` only for the items that make the
    /// cut: a dot product per recent item, per hit).
    Nearest(u32),
    /// "picked for your taste"
    ForYourTaste,
    /// "new in {category}"
    NewIn(u32),
    /// "trending in {category}"
    TrendingIn(u32),
    /// "trending now"
    TrendingNow,
    /// "popular in {category}"
    PopularIn(u32),
    /// "popular right now"
    PopularNow,
}

impl Why {
    fn text(self, index: &Index) -> String {
        let category = |c: u32| {
            index
                .catalog
                .categories
                .get(c as usize)
                .map_or("", String::as_str)
        };
        match self {
            Why::SimilarTo(i) => format!("similar to {}", index.title(i)),
            Why::Because(verb, i) => format!("because you {verb} {}", index.title(i)),
            Why::Nearest(_) | Why::ForYourTaste => "picked for your taste".to_owned(),
            Why::NewIn(c) => format!("new in {}", category(c)),
            Why::TrendingIn(c) => format!("trending in {}", category(c)),
            Why::TrendingNow => "trending now".to_owned(),
            Why::PopularIn(c) => format!("popular in {}", category(c)),
            Why::PopularNow => "popular right now".to_owned(),
        }
    }
}

impl<'a> Merger<'a> {
    fn new(index: &'a Index, constraints: &'a Constraints<'a>) -> Self {
        Merger {
            index,
            constraints,
            by_item: HashMap::with_capacity_and_hasher(1024, Default::default()),
            nearest_to: &[],
        }
    }

    /// Resolves a [`Why::Nearest`]: the recent item (of `nearest_to`)
    /// whose vector is closest to the hit's.
    fn resolve(&self, why: Why) -> Why {
        let Why::Nearest(hit) = why else {
            return why;
        };
        let Some(f) = self.index.factors.as_ref() else {
            return Why::ForYourTaste;
        };
        let item = |i: u32| f.trained.item(i as usize);
        self.nearest_to
            .iter()
            .map(|seed| (als::similarity(item(hit), item(seed.0)), seed))
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map_or(Why::ForYourTaste, |(_, &(seed, _, kind))| {
                Why::Because(kind.verb(), seed)
            })
    }

    /// Adds one source's results (best first) with `weight`.
    fn add(
        &mut self,
        source: &'static str,
        weight: f64,
        results: impl IntoIterator<Item = (u32, f64, Why)>,
    ) {
        // Weight 0: the variant turned this source off.
        if weight <= 0.0 {
            return;
        }
        let results: Vec<(u32, f64, Why)> = results.into_iter().collect();
        let best = results.iter().map(|r| r.1).fold(0.0f64, f64::max);
        for (item, raw, reason) in results {
            if !self.constraints.allows(self.index, item) {
                continue;
            }
            let score = if best > 0.0 { weight * raw / best } else { 0.0 };
            let seq = self.by_item.len() as u32;
            let merged = self.by_item.entry(item).or_insert_with(|| Merged {
                score: 0.0,
                seq,
                source_scores: Vec::with_capacity(2),
                reasons: Vec::with_capacity(1),
            });
            match merged.source_scores.iter_mut().find(|(s, _)| *s == source) {
                Some((_, best_raw)) => *best_raw = best_raw.max(raw),
                None => merged.source_scores.push((source, raw.max(0.0))),
            }
            merged.score = merged.score.max(score);
            if !merged.reasons.contains(&reason) && merged.reasons.len() < REASONS_KEPT {
                merged.reasons.push(reason);
            }
        }
    }

    /// The best `count` merged items, best first (stable: equal scores keep
    /// source order).
    fn best(&mut self, count: usize) -> Vec<(u32, Merged)> {
        let mut out: Vec<(u32, Merged)> = self.by_item.drain().collect();
        let order = |a: &(u32, Merged), b: &(u32, Merged)| {
            b.1.score.total_cmp(&a.1.score).then(a.1.seq.cmp(&b.1.seq))
        };
        // Only the best `count` are sorted: a few hundred of a thousand or more.
        if out.len() > count && count > 0 {
            out.select_nth_unstable_by(count - 1, order);
        }
        out.truncate(count);
        out.sort_unstable_by(order);
        out
    }

    /// An item's reasons to show: resolved, as text (positions in `list`
    /// through `written`), each text once, at most three.
    fn reason_texts(&self, reasons: &[Why], mut text: impl FnMut(Why) -> u32) -> Vec<u32> {
        let mut out = Vec::with_capacity(3);
        for why in reasons {
            let at = text(self.resolve(*why));
            // Two items may share a title: one line each way.
            if !out.contains(&at) && out.len() < 3 {
                out.push(at);
            }
        }
        out
    }

    /// The best `count` items as whole candidates (`Similar`, `Popular`,
    /// `Trending`: short lists the gateway answers with as they are).
    fn finish(mut self, count: usize) -> Vec<pb::Candidate> {
        self.best(count)
            .into_iter()
            .map(|(item, m)| {
                let it = self.index.catalog.item(item);
                pb::Candidate {
                    item_id: it.map(|i| i.id.clone()).unwrap_or_default(),
                    score: m.score,
                    source: m
                        .source_scores
                        .first()
                        .map(|(s, _)| (*s).to_owned())
                        .unwrap_or_default(),
                    reasons: m.reasons.iter().fold(Vec::new(), |mut texts, why| {
                        // Two items may share a title: one line each way.
                        let text = self.resolve(*why).text(self.index);
                        if !texts.contains(&text) && texts.len() < 3 {
                            texts.push(text);
                        }
                        texts
                    }),
                    source_scores: m
                        .source_scores
                        .into_iter()
                        .map(|(s, v)| (s.to_owned(), v))
                        .collect(),
                    attributes: it.map(attributes),
                    exploration: false,
                }
            })
            .collect()
    }

    /// The best `count` items as the lean list `Retrieve` answers with:
    /// each distinct reason is written once for the whole list (many
    /// candidates share "because you viewed X" or "popular in Y").
    fn finish_list(mut self, count: usize) -> pb::CandidateList {
        let best = self.best(count);
        let mut list = lean::ListBuilder::with_capacity(best.len());
        let mut written: Vec<(Why, u32)> = Vec::new();
        let mut scores = Vec::with_capacity(4);
        for (item, m) in best {
            let Some(it) = self.index.catalog.item(item) else {
                continue;
            };
            scores.clear();
            scores.extend(
                m.source_scores
                    .iter()
                    .filter_map(|&(s, v)| Some((lean::source_code(s)?, v))),
            );
            let first_source = scores.first().map_or(0, |s| s.0);
            scores.sort_by_key(|s| s.0);
            let reasons = self.reason_texts(&m.reasons, |why| {
                match written.iter().find(|(w, _)| *w == why) {
                    Some(&(_, at)) => at,
                    None => {
                        let at = list.text(&why.text(self.index));
                        written.push((why, at));
                        at
                    }
                }
            });
            list.push(lean::Entry {
                id: &it.id,
                score: m.score,
                first_source,
                source_scores: &scores,
                reasons: &reasons,
                attributes: Some(lean::Attributes {
                    category: &it.category,
                    brand: &it.brand,
                    price: it.price,
                    in_stock: it.in_stock,
                    promoted: it.promoted,
                    created_at: it.created_at,
                }),
                exploration: false,
            });
        }
        list.finish()
    }
}

/// The retrieval gRPC service.
#[derive(Debug, Clone)]
pub struct RetrievalService {
    /// The index serving now; a request keeps the one it started with.
    current: Arc<std::sync::RwLock<Arc<Index>>>,
    /// Directory of the bundle `current` was loaded from (None: built in memory).
    loaded: Arc<std::sync::Mutex<Option<std::path::PathBuf>>>,
    config: Arc<Config>,
}

/// One request's view: the index at its start and the config.
struct Snapshot {
    index: Arc<Index>,
    config: Arc<Config>,
}

impl RetrievalService {
    /// A service over an index built in memory from `data`.
    pub fn new(config: Config, data: &Dataset) -> Self {
        let index = Index::build(data, &config);
        RetrievalService::with_index(config, index, None)
    }

    /// A service over `bundle`.
    pub fn from_bundle(config: Config, bundle: Bundle) -> Self {
        RetrievalService::with_index(config, Index::from_bundle(bundle), None)
    }

    fn with_index(config: Config, index: Index, dir: Option<std::path::PathBuf>) -> Self {
        RetrievalService {
            current: Arc::new(std::sync::RwLock::new(Arc::new(index))),
            loaded: Arc::new(std::sync::Mutex::new(dir)),
            config: Arc::new(config),
        }
    }

    /// The index serving now.
    pub fn index(&self) -> Arc<Index> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            index: self.index(),
            config: self.config.clone(),
        }
    }

    /// Candidates for a user (see the crate docs for the sources), the
    /// `ann` and `content` sources within their budgets; `deadline` is what
    /// the caller's deadline leaves.
    pub async fn retrieve(
        &self,
        req: &pb::RetrieveRequest,
        deadline: Option<std::time::Duration>,
    ) -> Result<pb::RetrieveResponse, FieldError> {
        self.snapshot().retrieve(req, deadline).await
    }

    /// [`RetrievalService::retrieve`] in the calling thread with every
    /// source run to the end (batch jobs: the trainer's evaluation).
    pub fn retrieve_blocking(
        &self,
        req: &pb::RetrieveRequest,
    ) -> Result<pb::RetrieveResponse, FieldError> {
        self.snapshot().retrieve_blocking(req)
    }

    /// Neighbours of an item (co-occurrence, then nearest item vectors),
    /// topped up with its category's popular items.
    pub async fn similar(
        &self,
        req: &pb::SimilarRequest,
        deadline: Option<std::time::Duration>,
    ) -> Result<pb::RetrieveResponse, Status> {
        self.snapshot().similar(req, deadline).await
    }

    /// Popular lists: overall or one category, optionally every category's too.
    pub fn popular(&self, req: &pb::PopularRequest) -> Result<pb::RetrieveResponse, FieldError> {
        self.snapshot().lists(req, ListKind::Popular)
    }

    /// Trending lists (the bundle's, kept fresh from the event log), as
    /// [`RetrievalService::popular`] reads popularity.
    pub fn trending(&self, req: &pb::PopularRequest) -> Result<pb::RetrieveResponse, FieldError> {
        self.snapshot().lists(req, ListKind::Trending)
    }

    /// Loads the bundle `bundle_dir/current` points at if it is not the one
    /// serving, and swaps it in; requests already running finish on the old
    /// index. Returns the new version when one was swapped in; a bundle that
    /// does not load is an error and changes nothing (it is tried again only
    /// once `current` moves on).
    pub fn reload_if_changed(&self) -> Result<Option<String>, bundle::BundleError> {
        if self.config.bundle_dir.is_empty() {
            return Ok(None);
        }
        let Some(dir) = bundle::current(std::path::Path::new(&self.config.bundle_dir)) else {
            return Ok(None);
        };
        {
            let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
            if loaded.as_ref() == Some(&dir) {
                return Ok(None);
            }
            *loaded = Some(dir.clone());
        }
        let index = Index::open(&dir, &self.config.ann).map_err(|e| {
            match e.downcast::<bundle::BundleError>() {
                Ok(b) => b,
                Err(e) => bundle::BundleError::Corrupt {
                    path: dir.clone(),
                    reason: format!("{e:#}"),
                },
            }
        })?;
        let version = index.version.clone();
        let old = std::mem::replace(
            &mut *self.current.write().unwrap_or_else(|p| p.into_inner()),
            Arc::new(index),
        );
        metrics::gauge!("recmesh_bundle_info", "service" => "retrieval", "version" => old.version.clone()).set(0.0);
        metrics::gauge!("recmesh_bundle_info", "service" => "retrieval", "version" => version.clone()).set(1.0);
        Ok(Some(version))
    }

    /// Polls `bundle_dir` every `bundle_reload_ms` while the service lives;
    /// loading runs on a blocking thread, never on a runtime worker.
    fn spawn_bundle_watch(&self) {
        let every = self.config.bundle_reload_ms;
        if every == 0 || self.config.bundle_dir.is_empty() {
            return;
        }
        let svc = self.clone();
        recmesh_server::spawn_reload_watch(
            "retrieval bundle",
            std::time::Duration::from_millis(every),
            Arc::downgrade(&self.current),
            move || svc.reload_if_changed(),
            |outcome| {
                metrics::counter!("recmesh_bundle_reload_total", "service" => "retrieval", "outcome" => outcome)
                    .increment(1);
            },
        );
    }
}

impl RetrievalService {
    /// Follows the features service's event log while the service lives
    /// and counts each event into the trending lists of the index serving.
    /// A newly swapped-in bundle starts from its own lists, so the log is
    /// read again from its start for it (events it was trained on are
    /// skipped). An unreachable log is retried; the lists stay as they are.
    fn spawn_trending_feed(&self) {
        if self.config.features_addr.is_empty() {
            return;
        }
        // Validated with the config.
        let Ok(channel) = recmesh_mesh::lazy_channel("features_addr", &self.config.features_addr)
        else {
            return;
        };
        let mut client = pb::features_client::FeaturesClient::new(channel);
        let current = Arc::downgrade(&self.current);
        let poll = std::time::Duration::from_millis(self.config.trending_poll_ms);
        let page = self.config.trending_page;
        let addr = self.config.features_addr.clone();
        tokio::spawn(async move {
            let (mut cursor, mut feeding, mut failing) = (String::new(), String::new(), false);
            loop {
                let Some(current) = current.upgrade() else {
                    return;
                };
                let index = current.read().unwrap_or_else(|p| p.into_inner()).clone();
                drop(current);
                if index.version != feeding {
                    cursor.clear();
                    feeding.clone_from(&index.version);
                }
                let read = client
                    .read_log(pb::ReadLogRequest {
                        log: pb::LogName::Events as i32,
                        cursor: cursor.clone(),
                        max: page,
                    })
                    .await;
                match read {
                    Ok(r) => {
                        let r = r.into_inner();
                        if failing {
                            tracing::info!(features_addr = %addr, "trending: event log readable again");
                            failing = false;
                        }
                        let counted = index.record_events(&r.events);
                        metrics::counter!("recmesh_retrieval_trending_events_total")
                            .increment(counted as u64);
                        let full = r.events.len() >= page as usize;
                        cursor = r.next_cursor;
                        if full {
                            continue;
                        }
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(features_addr = %addr, error = %e.message(), code = ?e.code(),
                                "trending: cannot read the event log; the lists stay as they are until it can be read (check the features service and its event_log.path)");
                            failing = true;
                        }
                    }
                }
                drop(index);
                tokio::time::sleep(poll).await;
            }
        });
    }
}

/// One source's results, best first: item, raw score, reason.
type Found = Vec<(u32, f64, Why)>;

/// One request's sources: the in-memory ones already run, the `ann` and
/// `content` ones as jobs.
struct Plan<'a> {
    count: usize,
    weights: SourceWeights,
    constraints: Constraints<'a>,
    /// Anchor and CF results, in merge order, with their weights.
    ready: Vec<(&'static str, f64, Found)>,
    /// Trending, then popularity lists (category ones first), with their
    /// source and weight.
    lists: Vec<(&'static str, f64, Found)>,
    ann: Option<AnnJob>,
    content: Option<ContentJob>,
    reports: Vec<pb::SourceReport>,
}

impl Plan<'_> {
    fn ready(
        &mut self,
        source: &'static str,
        weight: f64,
        started: std::time::Instant,
        found: Found,
    ) {
        self.reports.push(source_report(
            source,
            "ok",
            found.len(),
            started.elapsed(),
            String::new(),
        ));
        self.ready.push((source, weight, found));
    }

    /// Ranked lists of one source (trending, popular), with their weights.
    fn lists_ready(
        &mut self,
        source: &'static str,
        started: std::time::Instant,
        lists: Vec<(f64, Found)>,
    ) {
        let offered = lists.iter().map(|(_, l)| l.len()).sum();
        self.reports.push(source_report(
            source,
            "ok",
            offered,
            started.elapsed(),
            String::new(),
        ));
        self.lists
            .extend(lists.into_iter().map(|(w, l)| (source, w, l)));
    }

    fn off(&mut self, source: &'static str, why: &str) {
        self.reports.push(source_report(
            source,
            "off",
            0,
            std::time::Duration::ZERO,
            why.to_owned(),
        ));
    }
}

/// The vector index query of one request and the seeds that explain hits.
struct AnnJob {
    query: recmesh_vector::Query,
    strongest: Vec<(u32, f64, EventKind)>,
}

/// The content scan of one request: cold items like the recent ones.
struct ContentJob {
    index: Arc<Index>,
    profile: Vec<f32>,
    seen: std::collections::HashSet<u32>,
    limit: usize,
    /// How many of the newest cold items are scanned.
    pool: usize,
}

impl ContentJob {
    /// The `limit` best-matching unseen items of the pool, best first (ties
    /// by index), kept in a bounded heap rather than sorting every match.
    fn run(&self) -> Vec<(u32, f32)> {
        /// Ordered so the heap's top is the weakest match kept.
        struct Weakest(f32, u32);
        impl PartialEq for Weakest {
            fn eq(&self, o: &Self) -> bool {
                self.cmp(o).is_eq()
            }
        }
        impl Eq for Weakest {}
        impl PartialOrd for Weakest {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Weakest {
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                o.0.total_cmp(&self.0).then(self.1.cmp(&o.1))
            }
        }
        if self.limit == 0 {
            return Vec::new();
        }
        let cold = &self.index.cold;
        let pool = if self.pool == 0 {
            cold.len()
        } else {
            self.pool.min(cold.len())
        };
        let mut best = std::collections::BinaryHeap::with_capacity(self.limit + 1);
        for (&i, vector) in cold[..pool].iter().zip(self.index.cold_content(pool)) {
            let s = als::similarity(&self.profile, vector);
            if s <= 0.0 || self.seen.contains(&i) {
                continue;
            }
            let candidate = Weakest(s, i);
            if best.len() < self.limit {
                best.push(candidate);
            } else if best.peek().is_some_and(|w| candidate < *w) {
                best.pop();
                best.push(candidate);
            }
        }
        best.into_sorted_vec()
            .into_iter()
            .map(|Weakest(s, i)| (i, s))
            .collect()
    }
}

/// How a budgeted source ended.
enum Ran<T> {
    Done(T, std::time::Duration),
    Late(std::time::Duration),
    Failed(String, std::time::Duration),
}

impl<T> Ran<T> {
    fn from_result(r: Result<T, impl std::fmt::Display>, took: std::time::Duration) -> Self {
        match r {
            Ok(v) => Ran::Done(v, took),
            Err(e) => Ran::Failed(e.to_string(), took),
        }
    }

    /// Records the outcome in `reports`; the result when there is one.
    fn report(
        self,
        source: &str,
        reports: &mut Vec<pb::SourceReport>,
        len: impl Fn(&T) -> usize,
    ) -> Option<T> {
        let (outcome, n, took, detail, value) = match self {
            Ran::Done(v, took) => ("ok", len(&v), took, String::new(), Some(v)),
            Ran::Late(budget) => (
                "late",
                0,
                budget,
                format!("no answer within its {} ms budget", budget.as_millis()),
                None,
            ),
            Ran::Failed(e, took) => ("error", 0, took, e, None),
        };
        if outcome != "ok" {
            tracing::warn!(source, outcome, %detail, "retrieval source dropped");
        }
        reports.push(source_report(source, outcome, n, took, detail));
        value
    }
}

/// A source's budget: `ms`, capped at three quarters of what the caller's
/// deadline leaves (the rest is for merging and the answer's way back).
fn source_budget(ms: u64, deadline: Option<std::time::Duration>) -> std::time::Duration {
    let budget = std::time::Duration::from_millis(ms);
    deadline.map_or(budget, |d| budget.min(d.mul_f64(0.75)))
}

/// Awaits `work` for at most `budget`.
async fn budgeted<T, E: std::fmt::Display>(
    budget: std::time::Duration,
    work: impl Future<Output = Result<T, E>>,
) -> Ran<T> {
    let started = std::time::Instant::now();
    match recmesh_mesh::timer::timeout(budget, work).await {
        Ok(r) => Ran::from_result(r, started.elapsed()),
        Err(_) => Ran::Late(budget),
    }
}

fn source_report(
    source: &str,
    outcome: &str,
    candidates: usize,
    took: std::time::Duration,
    detail: String,
) -> pb::SourceReport {
    pb::SourceReport {
        source: source.to_owned(),
        outcome: outcome.to_owned(),
        candidates: candidates.min(u32::MAX as usize) as u32,
        latency_us: took.as_micros().min(u128::from(u32::MAX)) as u32,
        detail,
    }
}

impl Snapshot {
    fn count(&self, field: &str, count: u32) -> Result<usize, FieldError> {
        match count {
            0 => Ok(self.config.default_count as usize),
            n if n > self.config.max_count => Err(FieldError::new(
                field,
                format!("must be at most {}", self.config.max_count),
            )),
            n => Ok(n as usize),
        }
    }

    fn category(&self, field: &str, name: &str) -> Result<u32, FieldError> {
        self.index
            .catalog
            .category_id(name)
            .ok_or_else(|| FieldError::new(field, format!("unknown category `{name}`")))
    }

    fn constraints<'a>(
        &'a self,
        exclude: &'a [String],
        filters: Option<&pb::Filters>,
    ) -> Result<Constraints<'a>, FieldError> {
        if exclude.len() > self.config.max_exclusions {
            return Err(FieldError::new(
                "exclude_item_ids",
                format!("at most {} ids", self.config.max_exclusions),
            ));
        }
        let f = filters.cloned().unwrap_or_default();
        let categories: Vec<u32> = f
            .categories
            .iter()
            .enumerate()
            .map(|(n, c)| self.category(&format!("filters.categories[{n}]"), c))
            .collect::<Result<_, _>>()?;
        if f.min_price < 0.0
            || f.max_price < 0.0
            || (f.max_price > 0.0 && f.min_price > f.max_price)
        {
            return Err(FieldError::new(
                "filters.min_price",
                "prices must be ≥ 0 and min_price ≤ max_price",
            ));
        }
        Ok(Constraints {
            filters: HardFilters {
                excluded: exclude.iter().map(String::as_str).collect(),
                categories: categories
                    .iter()
                    .map(|&c| self.index.catalog.categories[c as usize].as_str())
                    .collect(),
                min_price: f.min_price,
                max_price: f.max_price,
                ..HardFilters::default()
            },
            categories,
        })
    }

    fn popular_in(&self, category: u32) -> impl Iterator<Item = (u32, f64, Why)> + '_ {
        self.index
            .popular_by_category
            .get(&category)
            .into_iter()
            .flatten()
            .map(move |&(i, s)| (i, s, Why::PopularIn(category)))
    }

    fn popular_overall(&self) -> impl Iterator<Item = (u32, f64, Why)> + '_ {
        self.index
            .popular
            .iter()
            .map(|&(i, s)| (i, s, Why::PopularNow))
    }

    fn trending_in(&self, category: u32) -> Found {
        let list = self.index.trending().in_category(category);
        list.into_iter()
            .map(|(i, s)| (i, s, Why::TrendingIn(category)))
            .collect()
    }

    fn trending_overall(&self) -> Found {
        let list = self.index.trending().overall();
        list.into_iter()
            .map(|(i, s)| (i, s, Why::TrendingNow))
            .collect()
    }

    /// Validates `req` and runs the in-memory sources (anchor, CF,
    /// popularity); the `ann` and `content` sources come back as jobs, run
    /// under budgets by [`Snapshot::retrieve`] or inline by
    /// [`Snapshot::retrieve_blocking`].
    fn plan<'a>(&'a self, req: &'a pb::RetrieveRequest) -> Result<Plan<'a>, FieldError> {
        check_id("user_id", &req.user_id)?;
        let count = self.count("count", req.count)?;
        let constraints = self.constraints(&req.exclude_item_ids, req.filters.as_ref())?;
        let ctx = req.context.clone().unwrap_or_default();
        let weights = SourceWeights::from_request(&req.source_weights)?;
        let index = &self.index;
        let mut plan = Plan {
            count,
            weights,
            ready: Vec::new(),
            lists: Vec::new(),
            ann: None,
            content: None,
            reports: Vec::new(),
            constraints,
        };

        // An anchor the index does not know yet (a brand-new item) adds no
        // candidates rather than failing the request.
        let started = std::time::Instant::now();
        if let Some(anchor) = index.catalog.index_of(&ctx.anchor_item_id) {
            let found: Vec<_> = index.neighbours[anchor as usize]
                .iter()
                .map(|&(i, s)| (i, f64::from(s), Why::SimilarTo(anchor)))
                .collect();
            plan.ready("anchor", weights.anchor, started, found);
        } else {
            plan.off("anchor", "no anchor item in the index");
        }

        // Seeds: newest first, weight = event strength × 0.9^position, so the
        // latest signals count most; an item seen twice keeps its strongest.
        let mut seeds: HashMap<u32, (f64, EventKind)> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        let mut engaged_categories: HashMap<u32, f64> = HashMap::new();
        for (position, r) in req.recent.iter().take(self.config.max_seeds).enumerate() {
            let (Some(i), Some(kind)) =
                (index.catalog.index_of(&r.item_id), event_kind(r.event_type))
            else {
                continue;
            };
            let w = kind.weight() * 0.9f64.powi(position as i32);
            let seed = seeds.entry(i).or_insert((0.0, kind));
            if w > seed.0 {
                *seed = (w, kind.max(seed.1));
            }
            // Items the user just interacted with are not recommended back to
            // them by any source (issue #5 makes viewed items a configurable window).
            seen.insert(i);
            *engaged_categories
                .entry(index.catalog.category_of[i as usize])
                .or_default() += w;
        }
        let started = std::time::Instant::now();
        let seed_list: Vec<(u32, f64)> = seeds.iter().map(|(&i, &(w, _))| (i, w)).collect();
        let cf: Vec<_> = cooccurrence::score_from_seeds(&index.neighbours, &seed_list, count * 2)
            .into_iter()
            .filter(|c| !seen.contains(&c.item))
            .map(|c| {
                let verb = seeds.get(&c.because_of).map_or("viewed", |s| s.1.verb());
                (c.item, c.score, Why::Because(verb, c.because_of))
            })
            .collect();
        if seeds.is_empty() {
            plan.off("cf", "no recent items");
        } else {
            plan.ready("cf", weights.cf, started, cf);
        }

        // ANN: the user's trained vector, or one folded in from their recent
        // events when the bundle has not seen them.
        match (index.factors.as_ref(), index.ann.as_ref()) {
            _ if weights.ann <= 0.0 => plan.off("ann", "weight 0"),
            (Some(f), Some(_)) => {
                let user = match f.user_row.get(&req.user_id) {
                    Some(&row) => Some(f.trained.user(row as usize).to_vec()),
                    None if !seeds.is_empty() => {
                        let history: Vec<(u32, f32)> = seeds
                            .iter()
                            .map(|(&i, &(_, kind))| (i, kind.weight() as f32))
                            .collect();
                        Some(f.fold.user(&f.trained.items, &history))
                    }
                    None => None,
                };
                match user {
                    Some(vector) => {
                        // Explained by the strongest recent items it is closest to.
                        let mut strongest: Vec<(u32, f64, EventKind)> =
                            seeds.iter().map(|(&i, &(w, k))| (i, w, k)).collect();
                        strongest.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                        strongest.truncate(5);
                        plan.ann = Some(AnnJob {
                            query: recmesh_vector::Query {
                                vector,
                                limit: count,
                                // Filters are pushed into the index, so every slot is usable.
                                filter: self.vector_filter(&plan.constraints, &seen),
                            },
                            strongest,
                        });
                    }
                    None => plan.off("ann", "a new user with no recent items"),
                }
            }
            _ => plan.off("ann", "the bundle has no item vectors"),
        }

        // The categories the visitor states (browsed, filtered on), else
        // the two they engaged with most.
        let mut categories: Vec<u32> = Vec::new();
        if !ctx.category.is_empty() {
            categories.push(self.category("context.category", &ctx.category)?);
        }
        categories.extend(plan.constraints.categories.iter().copied());
        let stated = categories.len();
        if categories.is_empty() {
            let mut engaged: Vec<(u32, f64)> = engaged_categories.into_iter().collect();
            engaged.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            categories.extend(engaged.into_iter().take(2).map(|(c, _)| c));
        }

        // Content: cold items (no co-occurrence yet) like the recent ones,
        // or, for a visitor with no history, in the categories they state.
        if weights.content <= 0.0 {
            plan.off("content", "weight 0");
        } else if index.cold.is_empty() {
            plan.off("content", "no cold items");
        } else if seeds.is_empty() && stated == 0 {
            plan.off("content", "no recent items and no stated category");
        } else {
            let profile = if seeds.is_empty() {
                let names: Vec<[f32; content::DIM]> = categories
                    .iter()
                    .map(|&c| content::category_vector(&index.catalog.categories[c as usize]))
                    .collect();
                content::profile(names.iter().map(|v| (v.as_slice(), 1.0)))
            } else {
                content::profile(
                    seeds
                        .iter()
                        .map(|(&i, &(w, _))| (index.content_of(i), w as f32)),
                )
            };
            plan.content = Some(ContentJob {
                index: index.clone(),
                profile,
                seen: seen.clone(),
                limit: (count / 4).max(1),
                pool: self.config.content_pool,
            });
        }

        // Trending and popularity lists: in those categories, then overall.
        let unseen = |list: Found| -> Found {
            list.into_iter()
                .filter(|(i, _, _)| !seen.contains(i))
                .collect()
        };
        if weights.trending <= 0.0 {
            plan.off("trending", "weight 0");
        } else {
            let started = std::time::Instant::now();
            let mut lists: Vec<(f64, Found)> = categories
                .iter()
                .map(|&c| (weights.trending, unseen(self.trending_in(c))))
                .collect();
            // Overall trending is for a visitor with no history (cold
            // start); one with history gets their categories' trends.
            if seeds.is_empty() {
                lists.push((weights.trending, unseen(self.trending_overall())));
            }
            plan.lists_ready("trending", started, lists);
        }
        let started = std::time::Instant::now();
        let mut lists: Vec<(f64, Found)> = categories
            .iter()
            .map(|&c| (weights.category, unseen(self.popular_in(c).collect())))
            .collect();
        lists.push((weights.popular, unseen(self.popular_overall().collect())));
        plan.lists_ready("popular", started, lists);
        Ok(plan)
    }

    /// The request's filters and the user's recent items, for the index.
    fn vector_filter(
        &self,
        c: &Constraints<'_>,
        seen: &std::collections::HashSet<u32>,
    ) -> recmesh_vector::Filter {
        let mut exclude: Vec<u32> = c
            .filters
            .excluded
            .iter()
            .filter_map(|id| self.index.catalog.index_of(id))
            .collect();
        exclude.extend(seen.iter().copied());
        recmesh_vector::Filter {
            categories: c.categories.clone(),
            in_stock_only: true,
            min_price: c.filters.min_price,
            max_price: c.filters.max_price,
            created_since: None,
            exclude,
        }
    }

    /// Merges a plan with what its `ann` and `content` jobs returned.
    fn finish(
        &self,
        mut plan: Plan<'_>,
        ann: Option<Ran<Vec<Hit>>>,
        content: Option<Ran<Vec<(u32, f32)>>>,
    ) -> pb::RetrieveResponse {
        let index = &self.index;
        let mut merger = Merger::new(index, &plan.constraints);
        let mut reports = Vec::new();
        for (source, weight, found) in plan.ready.drain(..) {
            merger.add(source, weight, found);
        }
        if let (Some(ran), Some(job)) = (ann, plan.ann.as_ref()) {
            let hits = ran.report("ann", &mut reports, Vec::len);
            if let (Some(hits), Some(_)) = (hits, index.factors.as_ref()) {
                merger.nearest_to = &job.strongest;
                merger.add(
                    "ann",
                    plan.weights.ann,
                    hits.into_iter()
                        .map(|h| (h.id, f64::from(h.score), Why::Nearest(h.id))),
                );
            }
        }
        if let Some(matches) = content.and_then(|ran| ran.report("content", &mut reports, Vec::len))
        {
            merger.add(
                "content",
                plan.weights.content,
                matches.into_iter().map(|(i, s)| {
                    (
                        i,
                        f64::from(s),
                        Why::NewIn(index.catalog.category_of[i as usize]),
                    )
                }),
            );
        }
        for (source, weight, list) in plan.lists.drain(..) {
            merger.add(source, weight, list);
        }
        // Merge order: anchor, cf, ann, content, trending, popular.
        let mut sources = std::mem::take(&mut plan.reports);
        sources.extend(reports);
        let order = |s: &pb::SourceReport| {
            ["anchor", "cf", "ann", "content", "trending", "popular"]
                .iter()
                .position(|n| *n == s.source)
        };
        sources.sort_by_key(order);
        for r in &sources {
            metrics::counter!("recmesh_retrieval_source_total", "source" => r.source.clone(), "outcome" => r.outcome.clone()).increment(1);
            if r.outcome != "off" {
                metrics::histogram!("recmesh_retrieval_source_duration_seconds", "source" => r.source.clone())
                    .record(f64::from(r.latency_us) / 1e6);
            }
        }
        pb::RetrieveResponse {
            candidates: Vec::new(),
            data_version: index.version.clone(),
            sources,
            list: Some(merger.finish_list(plan.count)),
        }
    }

    /// Every source inline, without budgets (the trainer's evaluation).
    fn retrieve_blocking(
        &self,
        req: &pb::RetrieveRequest,
    ) -> Result<pb::RetrieveResponse, FieldError> {
        let plan = self.plan(req)?;
        let ann = match (plan.ann.as_ref(), self.index.ann.as_ref()) {
            (Some(job), Some(index)) => {
                let started = std::time::Instant::now();
                Some(Ran::from_result(
                    index.search_blocking(&job.query),
                    started.elapsed(),
                ))
            }
            _ => None,
        };
        let content = plan.content.as_ref().map(|job| {
            let started = std::time::Instant::now();
            let found = job.run();
            Ran::Done(found, started.elapsed())
        });
        Ok(self.finish(plan, ann, content))
    }

    /// Candidates for a user: the `ann` and `content` sources run side by
    /// side, each within its budget (capped at three quarters of what the
    /// caller's deadline leaves); a late one is dropped and reported.
    async fn retrieve(
        &self,
        req: &pb::RetrieveRequest,
        deadline: Option<std::time::Duration>,
    ) -> Result<pb::RetrieveResponse, FieldError> {
        let mut plan = self.plan(req)?;
        let ann_budget = source_budget(self.config.ann.budget_ms, deadline);
        let content_budget = source_budget(self.config.content_budget_ms, deadline);
        let content_job = plan.content.take();
        let ann = async {
            let (job, index) = (plan.ann.as_ref()?, self.index.ann.as_ref()?);
            Some(budgeted(ann_budget, index.search(job.query.clone())).await)
        };
        let content = async {
            let job = content_job?;
            let run = async move {
                tokio::task::spawn_blocking(move || job.run())
                    .await
                    .map_err(|e| format!("content scan failed: {e}"))
            };
            Some(budgeted(content_budget, run).await)
        };
        let (ann, content) = tokio::join!(ann, content);
        Ok(self.finish(plan, ann, content))
    }

    async fn similar(
        &self,
        req: &pb::SimilarRequest,
        deadline: Option<std::time::Duration>,
    ) -> Result<pb::RetrieveResponse, Status> {
        check_id("item_id", &req.item_id)?;
        let count = self.count("count", req.count)?;
        let mut constraints = self.constraints(&req.exclude_item_ids, req.filters.as_ref())?;
        let index = &self.index;
        let anchor = index
            .catalog
            .index_of(&req.item_id)
            .ok_or_else(|| Status::not_found(format!("item_id: unknown item `{}`", req.item_id)))?;
        constraints.filters.excluded.insert(req.item_id.as_str());
        let mut reports = Vec::new();
        // Item → items through the vector index: the anchor's own vector.
        let ann = match (index.factors.as_ref(), index.ann.as_ref()) {
            (Some(f), Some(ann)) => {
                let query = recmesh_vector::Query {
                    vector: f.trained.item(anchor as usize).to_vec(),
                    limit: count,
                    filter: self.vector_filter(&constraints, &[anchor].into_iter().collect()),
                };
                let budget = source_budget(self.config.ann.budget_ms, deadline);
                budgeted(budget, ann.search(query))
                    .await
                    .report("ann", &mut reports, Vec::len)
            }
            _ => None,
        };
        let mut merger = Merger::new(index, &constraints);
        merger.add(
            "cf",
            1.0,
            index.neighbours[anchor as usize]
                .iter()
                .map(|&(i, s)| (i, f64::from(s), Why::SimilarTo(anchor))),
        );
        if let Some(hits) = ann {
            merger.add(
                "ann",
                0.8,
                hits.into_iter()
                    .map(|h| (h.id, f64::from(h.score), Why::SimilarTo(anchor))),
            );
        }
        merger.add(
            "popular",
            0.5,
            self.popular_in(index.catalog.category_of[anchor as usize]),
        );
        Ok(pb::RetrieveResponse {
            candidates: merger.finish(count),
            data_version: index.version.clone(),
            sources: reports,
            list: None,
        })
    }

    /// Popularity (or trending) lists: overall or one category, optionally
    /// every category's too.
    fn lists(
        &self,
        req: &pb::PopularRequest,
        kind: ListKind,
    ) -> Result<pb::RetrieveResponse, FieldError> {
        let count = self.count("count", req.count)?;
        let constraints = self.constraints(&[], None)?;
        let index = &self.index;
        let list = |category: Option<u32>| -> Found {
            match (kind, category) {
                (ListKind::Popular, Some(c)) => self.popular_in(c).collect(),
                (ListKind::Popular, None) => self.popular_overall().collect(),
                (ListKind::Trending, Some(c)) => self.trending_in(c),
                (ListKind::Trending, None) => self.trending_overall(),
            }
        };
        let source = match kind {
            ListKind::Popular => "popular",
            ListKind::Trending => "trending",
        };
        let mut out = Vec::new();
        let mut ranked = |list: Found, n: usize| {
            let mut merger = Merger::new(index, &constraints);
            merger.add(source, 1.0, list);
            out.extend(merger.finish(n));
        };
        if req.category.is_empty() {
            ranked(list(None), count);
            if req.per_category > 0 {
                let n = (req.per_category as usize).min(self.config.max_count as usize);
                for c in 0..index.catalog.categories.len() as u32 {
                    ranked(list(Some(c)), n);
                }
            }
        } else {
            let c = self.category("category", &req.category)?;
            ranked(list(Some(c)), count);
        }
        Ok(pb::RetrieveResponse {
            candidates: out,
            data_version: index.version.clone(),
            sources: Vec::new(),
            list: None,
        })
    }
}

/// Which ranked lists a `Popular` or `Trending` call reads.
#[derive(Debug, Clone, Copy)]
enum ListKind {
    Popular,
    Trending,
}

/// What the caller's `grpc-timeout` allows, if it sent one.
fn caller_deadline<T>(request: &Request<T>) -> Option<std::time::Duration> {
    request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(recmesh_server::layers::parse_grpc_timeout)
}

#[tonic::async_trait]
impl pb::retrieval_server::Retrieval for RetrievalService {
    async fn retrieve(
        &self,
        request: Request<pb::RetrieveRequest>,
    ) -> Result<Response<pb::RetrieveResponse>, Status> {
        let deadline = caller_deadline(&request);
        Ok(Response::new(
            RetrievalService::retrieve(self, request.get_ref(), deadline).await?,
        ))
    }

    async fn similar(
        &self,
        request: Request<pb::SimilarRequest>,
    ) -> Result<Response<pb::RetrieveResponse>, Status> {
        let deadline = caller_deadline(&request);
        Ok(Response::new(
            RetrievalService::similar(self, request.get_ref(), deadline).await?,
        ))
    }

    async fn popular(
        &self,
        request: Request<pb::PopularRequest>,
    ) -> Result<Response<pb::RetrieveResponse>, Status> {
        Ok(Response::new(RetrievalService::popular(
            self,
            request.get_ref(),
        )?))
    }

    async fn trending(
        &self,
        request: Request<pb::PopularRequest>,
    ) -> Result<Response<pb::RetrieveResponse>, Status> {
        Ok(Response::new(RetrievalService::trending(
            self,
            request.get_ref(),
        )?))
    }
}

/// The retrieval server over `service`, ready to start or run; it watches
/// `bundle_dir` for newer bundles while it runs.
pub fn server_for(service: RetrievalService) -> GrpcServer {
    let index = service.index();
    tracing::info!(
        items = index.catalog.len(),
        categories = index.catalog.categories.len(),
        als = index.factors.as_ref().map_or(0, |f| f.trained.factors),
        version = %index.version,
        "retrieval index ready"
    );
    metrics::gauge!("recmesh_bundle_info", "service" => "retrieval", "version" => index.version.clone()).set(1.0);
    service.spawn_bundle_watch();
    service.spawn_trending_feed();
    GrpcServer::new("retrieval", service.config.server.clone())
        .add_service(RetrievalServer::new(service))
}

/// The retrieval server over `data`, ready to start or run.
pub fn server(config: Config, data: &Dataset) -> GrpcServer {
    server_for(RetrievalService::new(config, data))
}

/// The service for `config`: from `bundle_dir/current` when set, else
/// built from `data` (loaded only then).
pub fn service(
    config: Config,
    data: impl FnOnce() -> anyhow::Result<Dataset>,
) -> anyhow::Result<RetrievalService> {
    if config.bundle_dir.is_empty() {
        return Ok(RetrievalService::new(config, &data()?));
    }
    let Some(dir) = bundle::current(std::path::Path::new(&config.bundle_dir)) else {
        // Before the trainer's first run (a new deployment): serve what the
        // data gives and swap in the first bundle when it is published.
        tracing::warn!(
            bundle_dir = %config.bundle_dir,
            "no bundle published yet; serving an index built from `data` (no ALS) until `recmesh-trainer bundle --out {}` publishes one",
            config.bundle_dir
        );
        return Ok(RetrievalService::new(config, &data()?));
    };
    let index = Index::open(&dir, &config.ann)?;
    Ok(RetrievalService::with_index(config, index, Some(dir)))
}

/// Loads the bundle (or the data), serves until `shutdown`, then drains.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let svc = tokio::task::spawn_blocking(move || {
        let source = config.data.clone();
        service(config, || Ok(source.load()?))
    })
    .await??;
    server_for(svc).run(shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let seed = index
            .catalog
            .item(index.popular[0].0)
            .expect("item")
            .id
            .clone();
        let fresh = pb::RetrieveRequest {
            user_id: "never-seen".into(),
            recent: vec![viewed(&seed)],
            ..req.clone()
        };
        let out = s.retrieve_blocking(&fresh).expect("ok").whole();
        assert_eq!(out.len(), 30);
        let title = &index.catalog.item(index.popular[0].0).expect("item").title;
        assert!(out.iter().all(|c| c.item_id != seed
            && c.reasons[0] == format!("because you viewed {title}")));
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
        let seen: std::collections::HashSet<u32> = [cold[7]].into();
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
        let root =
            std::env::temp_dir().join(format!("recmesh-retrieval-swap-{}", std::process::id()));
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
        // This one with the in-process vector index built in.
        let dir = second
            .publish_with(&root, |tmp, b| {
                vector_bundle::write(tmp, b, &Default::default(), |_| {})
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
        fn count(
            &self,
        ) -> recmesh_vector::BoxFuture<'_, Result<usize, recmesh_vector::VectorError>> {
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
}

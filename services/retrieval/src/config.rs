//! Retrieval's configuration: ports, sources, budgets and the ANN backend.

use recmesh_catalog::files::DataSource;
use recmesh_server::config::{ConfigError, ServerConfig, ServiceConfig, at_least_one};
use recmesh_vector::mips::MipsParams;
use serde::{Deserialize, Serialize};

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
    /// Most seen-item keys one request may carry (`seen_items`): the
    /// features service's `max_seen_per_user` with room to spare.
    pub max_seen_items: usize,
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
    /// With `backend = "edge"`: when the item vectors fit under the
    /// shard's `full_scan_kb`, where Qdrant's planner scans every point
    /// of a filtered search rather than walk the graph, serve them from
    /// retrieval's own exact scan instead (the same answers, a SIMD loop
    /// and a top-k select instead of a per-point priority queue: 0.4–0.7
    /// ms less CPU a request on the demo catalog, docs/performance.md). Off:
    /// Qdrant's engine serves every catalog.
    pub exact_under_full_scan: bool,
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
    pub(crate) fn mips(&self) -> MipsParams {
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
            exact_under_full_scan: true,
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
            max_seen_items: 20_000,
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
            ("max_seen_items", self.max_seen_items as u64),
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

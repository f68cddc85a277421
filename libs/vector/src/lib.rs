//! The vector index behind retrieval's ANN source: item vectors with the
//! payload retrieval filters on (category, stock, price, creation time),
//! searched by cosine similarity; [`mips::Mips`] serves the dot product ALS
//! is trained for through any of them.
//!
//! One trait, [`VectorIndex`], three backends that pass the same contract
//! tests (`tests/contract.rs`):
//! - [`exact::ExactIndex`]: a plain scan in memory; the baseline the others
//!   are measured against, and what serves when no index was built;
//! - [`edge::EdgeIndex`]: Qdrant's engine in process (crate `qdrant-edge`),
//!   the default. Its HNSW graph is built offline (the trainer's bundle)
//!   and loaded finished; every call runs on a blocking thread;
//! - [`remote::QdrantIndex`]: a Qdrant server or cluster over gRPC
//!   (`qdrant-client`), for production.
//!
//! Point ids are the item's index in the bundle's catalog, so a bundle and
//! its index always agree on what id 7 is.

#![forbid(unsafe_code)]

pub mod bundle;
pub mod edge;
pub mod exact;
pub mod mips;
pub mod remote;
pub mod testkit;

use std::fmt;
use std::future::Future;
use std::pin::Pin;

/// A boxed future, so [`VectorIndex`] can be used as `dyn`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Payload field names, the same in every backend.
pub mod field {
    /// Category id (integer).
    pub const CATEGORY: &str = "category";
    /// Can be bought now (bool).
    pub const IN_STOCK: &str = "in_stock";
    /// Price (float).
    pub const PRICE: &str = "price";
    /// When the item entered the catalog, Unix seconds (integer).
    pub const CREATED_AT: &str = "created_at";
}

/// One item: its vector and the payload filters look at.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// The item's index in the catalog.
    pub id: u32,
    /// The vector (the index's dimension).
    pub vector: Vec<f32>,
    /// Category id.
    pub category: u32,
    /// Can be bought now.
    pub in_stock: bool,
    /// Price.
    pub price: f64,
    /// Unix seconds.
    pub created_at: i64,
}

/// What a search may return; the default lets everything through.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// Only these category ids (empty: all).
    pub categories: Vec<u32>,
    /// Only items in stock.
    pub in_stock_only: bool,
    /// Minimum price, inclusive (0: none).
    pub min_price: f64,
    /// Maximum price, inclusive (0: none).
    pub max_price: f64,
    /// Only items created at or after this Unix second (None: all).
    pub created_since: Option<i64>,
    /// Never these ids.
    pub exclude: Vec<u32>,
}

impl Filter {
    /// True when `p` passes (the reference semantics every backend follows).
    pub fn allows(&self, p: &Point) -> bool {
        self.allows_payload(p) && !self.exclude.contains(&p.id)
    }

    /// True when `p`'s payload passes, exclusions aside: a scan checks
    /// those in a set, since they run to thousands of ids (a history).
    pub fn allows_payload(&self, p: &Point) -> bool {
        (self.categories.is_empty() || self.categories.contains(&p.category))
            && (!self.in_stock_only || p.in_stock)
            && (self.min_price <= 0.0 || p.price >= self.min_price)
            && (self.max_price <= 0.0 || p.price <= self.max_price)
            && self.created_since.is_none_or(|t| p.created_at >= t)
    }

    /// True when nothing is filtered.
    pub fn is_empty(&self) -> bool {
        *self == Filter::default()
    }
}

/// One search.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// The query vector (a user's, or an item's for item-to-item).
    pub vector: Vec<f32>,
    /// Most hits returned.
    pub limit: usize,
    /// What may be returned.
    pub filter: Filter,
}

/// One result: item index and score, best first.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// The item's index in the catalog.
    pub id: u32,
    /// Cosine similarity (the dot product through [`mips::Mips`]).
    pub score: f32,
}

/// What went wrong; each names what to look at.
#[derive(Debug, thiserror::Error)]
pub enum VectorError {
    /// A vector of the wrong length.
    #[error("{field}: {got} dimensions, the index has {expected}")]
    Dimension {
        /// Which input.
        field: String,
        /// The index's dimension.
        expected: usize,
        /// What was given.
        got: usize,
    },
    /// The backend refused or failed the call.
    #[error("{backend}: {message}")]
    Backend {
        /// `edge` or `qdrant`.
        backend: &'static str,
        /// What it said, with what to do about it.
        message: String,
    },
    /// The call did not finish in time (client-side deadline).
    #[error("{backend}: no answer within {ms} ms")]
    Timeout {
        /// `edge` or `qdrant`.
        backend: &'static str,
        /// The deadline.
        ms: u64,
    },
}

impl VectorError {
    pub(crate) fn backend(backend: &'static str, message: impl fmt::Display) -> Self {
        VectorError::Backend {
            backend,
            message: message.to_string(),
        }
    }
}

/// A vector index over item vectors. Every call may be awaited from the
/// async runtime: a backend that blocks moves its work off the workers.
pub trait VectorIndex: Send + Sync + fmt::Debug {
    /// `exact`, `edge` or `qdrant`.
    fn backend(&self) -> &'static str;
    /// Vector dimension.
    fn dim(&self) -> usize;
    /// Inserts or replaces points (by id).
    fn upsert(&self, points: Vec<Point>) -> BoxFuture<'_, Result<(), VectorError>>;
    /// Points stored.
    fn count(&self) -> BoxFuture<'_, Result<usize, VectorError>>;
    /// The `query.limit` points most similar to `query.vector` that pass the
    /// filter, best first.
    fn search(&self, query: Query) -> BoxFuture<'_, Result<Vec<Hit>, VectorError>>;
    /// The same search in the calling thread, for batch jobs (the trainer's
    /// offline evaluation); a backend that only talks over the network
    /// says so.
    fn search_blocking(&self, query: &Query) -> Result<Vec<Hit>, VectorError> {
        let _ = query;
        Err(VectorError::backend(
            self.backend(),
            "no blocking search: this backend is only called from the async runtime",
        ))
    }
}

/// Checks a vector's length against the index's.
pub fn check_dim(field: &str, expected: usize, v: &[f32]) -> Result<(), VectorError> {
    if v.len() == expected {
        Ok(())
    } else {
        Err(VectorError::Dimension {
            field: field.to_owned(),
            expected,
            got: v.len(),
        })
    }
}

/// HNSW settings shared by the in-process and server backends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HnswParams {
    /// Links per node.
    pub m: usize,
    /// Candidate list while building.
    pub ef_construct: usize,
    /// Candidate list while searching (at least the limit is used).
    pub ef: usize,
    /// Keep int8-quantized vectors in RAM, full vectors on disk (rescored).
    pub quantize: bool,
    /// Keep full vectors on disk (memory-mapped) rather than in RAM.
    pub on_disk: bool,
    /// A filtered query whose filter matches at most this many KB of
    /// vectors scans the matching points exactly instead of walking the
    /// graph (Qdrant's `full_scan_threshold`, fixed when the index is
    /// built): exact and fast for selective filters, where a graph walk
    /// without filter-aware links loses recall.
    pub full_scan_kb: usize,
    /// ACORN for filtered searches above that threshold whose filter keeps
    /// at most this share of the points (0: off; search-time).
    pub acorn: f64,
}

impl Default for HnswParams {
    fn default() -> Self {
        // Measured on user vectors of a trained model (docs/ann.md).
        HnswParams {
            m: 16,
            ef_construct: 100,
            ef: 128,
            quantize: false,
            on_disk: false,
            // The engine's default (40k points of 64 dims). Raised to 40 MB,
            // an 8% filter at 1M items is scanned: recall 0.96 but p50 16 ms,
            // p99 33 ms, over the ann budget (docs/ann.md).
            full_scan_kb: 10_000,
            acorn: 0.4,
        }
    }
}

/// Cosine similarity (0 when either vector is zero).
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut na, mut nb) = (0.0f32, 0.0f32, 0.0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na <= 0.0 || nb <= 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

/// Inner product: ALS's own, so the index scores exactly as the model.
pub use recmesh_algo::als::similarity as dot;

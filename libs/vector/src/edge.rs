//! Qdrant's engine in process (crate `qdrant-edge`, pinned to 0.7.2: 0.8
//! and 0.9 do not compile on Rust 1.95).
//!
//! The engine's API is synchronous and `optimize()` (the HNSW build) takes
//! minutes at a million items, so:
//! - [`EdgeIndex::build`] creates a shard, loads the points, builds the
//!   payload indexes and the HNSW graph, all in the calling thread: the
//!   trainer runs it while writing a bundle, never a server;
//! - [`EdgeIndex::open`] loads a finished shard (under a second at 1M);
//! - the [`VectorIndex`] calls run on tokio's blocking pool, never on a
//!   runtime worker.
//!
//! Opening a shard writes to its directory (config, write-ahead log, an
//! empty appendable segment), so a server opens a private copy of the one
//! in the bundle ([`EdgeIndex::open_copy`]); the bundle stays as published.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use qdrant_edge::external::ordered_float::OrderedFloat;
use qdrant_edge::external::serde_json::{Map, Value, json};
use qdrant_edge::{
    AcornSearchParams, AnyVariants, BoolIndexParams, Condition, DEFAULT_VECTOR_NAME, Distance,
    EdgeConfig, EdgeOptimizersConfig, EdgeShard, EdgeVectorParams, FieldCondition,
    Filter as EdgeFilter, HasIdCondition, HnswIndexConfig, IntegerIndexParams, JsonPath, Match,
    MatchAny, MatchValue, NamedQuery, Payload, PayloadFieldSchema, PayloadSchemaParams, PointId,
    PointInsertOperations, PointOperations, PointStructPersisted, QuantizationConfig,
    QuantizationSearchParams, QueryEnum, Range, SearchParams, SearchRequest, UpdateOperation,
    ValueVariants, VectorInternal, VectorStructPersisted,
};
use qdrant_edge::{CreateIndex, FieldIndexOperations, FloatIndexParams, WalOptions};

use crate::{
    BoxFuture, Filter, Hit, HnswParams, Point, Query, VectorError, VectorIndex, check_dim, field,
};

const BACKEND: &str = "edge";
/// The engine's write-ahead log directory inside a shard.
const WAL_DIR: &str = "wal";
/// Points per update call (the engine takes ~80k points/s in batches of 10k).
const BATCH: usize = 10_000;

fn err(e: impl std::fmt::Display) -> VectorError {
    VectorError::backend(BACKEND, e)
}

/// An `EdgeShard` with its dimension and search settings. Clones share
/// the shard (a search on the blocking pool holds one).
#[derive(Debug, Clone)]
pub struct EdgeIndex {
    // Declared before `_owned`: a clone drops (and so flushes) the shard
    // before it lets go of the directory.
    shard: Arc<EdgeShard>,
    /// The private copy this index serves from, removed when the last clone
    /// is dropped ([`EdgeIndex::open_copy`]).
    _owned: Option<Arc<RemoveOnDrop>>,
    dim: usize,
    ef: usize,
    /// ACORN's filter-selectivity cut-off (`None`: plain filtered HNSW).
    acorn: Option<f64>,
    quantized: bool,
    path: PathBuf,
}

/// Removes a directory when dropped.
#[derive(Debug)]
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), error = %e, "serving copy of a vector index not removed");
        }
    }
}

/// Write-ahead log segments of a serving copy: it takes no updates, so
/// 1 MiB instead of the engine's 32 MiB.
const SERVING_WAL_BYTES: usize = 1 << 20;

impl EdgeIndex {
    /// Creates an empty shard in `path` (which must not hold one).
    /// `index_threshold_kb`: segments above this size get an HNSW graph on
    /// [`EdgeIndex::optimize`] (`None`: the engine's default, 10 MB; below
    /// it a segment is scanned, which is exact and fast enough).
    pub fn create(
        path: &Path,
        dim: usize,
        params: &HnswParams,
        index_threshold_kb: Option<usize>,
    ) -> Result<Self, VectorError> {
        std::fs::create_dir_all(path)
            .map_err(|e| err(format!("cannot create {}: {e}", path.display())))?;
        let mut vector = EdgeVectorParams::builder(dim, Distance::Cosine).on_disk(params.on_disk);
        if params.quantize {
            // The scalar variant's type is not re-exported; its JSON form is
            // the documented one.
            let scalar: QuantizationConfig = qdrant_edge::external::serde_json::from_value(json!({
                "scalar": {"type": "int8", "quantile": 0.99, "always_ram": true}
            }))
            .map_err(|e| err(format!("quantization config: {e}")))?;
            vector = vector.quantization_config(scalar);
        }
        let config = EdgeConfig::builder()
            .vector(DEFAULT_VECTOR_NAME, vector.build())
            .hnsw_config(HnswIndexConfig {
                m: params.m,
                ef_construct: params.ef_construct,
                // Below this many KB of matching vectors a filtered query
                // scans instead of walking the graph.
                full_scan_threshold: params.full_scan_kb,
                max_indexing_threads: 0,
                on_disk: Some(false),
                payload_m: None,
                inline_storage: None,
            })
            .optimizers(EdgeOptimizersConfig {
                indexing_threshold: index_threshold_kb,
                ..EdgeOptimizersConfig::default()
            })
            .build();
        let shard = EdgeShard::new(path, config).map_err(|e| {
            err(format!(
                "cannot create a shard in {}: {e} (remove the directory to start over)",
                path.display()
            ))
        })?;
        let index = EdgeIndex {
            shard: Arc::new(shard),
            _owned: None,
            dim,
            ef: params.ef,
            acorn: (params.acorn > 0.0).then_some(params.acorn),
            quantized: params.quantize,
            path: path.to_owned(),
        };
        index.create_payload_indexes()?;
        Ok(index)
    }

    /// Indexes for the filtered fields, without payload-aware HNSW links
    /// (those make the build 2–3× longer for filters that select a large
    /// share of the catalog, where the plain graph does well).
    fn create_payload_indexes(&self) -> Result<(), VectorError> {
        let schemas = [
            (
                field::CATEGORY,
                PayloadSchemaParams::Integer(IntegerIndexParams {
                    lookup: Some(true),
                    range: Some(false),
                    enable_hnsw: Some(false),
                    ..IntegerIndexParams::default()
                }),
            ),
            (
                field::IN_STOCK,
                PayloadSchemaParams::Bool(BoolIndexParams {
                    enable_hnsw: Some(false),
                    ..BoolIndexParams::default()
                }),
            ),
            (
                field::PRICE,
                PayloadSchemaParams::Float(FloatIndexParams {
                    enable_hnsw: Some(false),
                    ..FloatIndexParams::default()
                }),
            ),
            (
                field::CREATED_AT,
                PayloadSchemaParams::Integer(IntegerIndexParams {
                    lookup: Some(false),
                    range: Some(true),
                    enable_hnsw: Some(false),
                    ..IntegerIndexParams::default()
                }),
            ),
        ];
        for (name, schema) in schemas {
            self.shard
                .update(UpdateOperation::FieldIndexOperation(
                    FieldIndexOperations::CreateIndex(CreateIndex {
                        field_name: path(name),
                        field_schema: Some(PayloadFieldSchema::FieldParams(schema)),
                    }),
                ))
                .map_err(|e| err(format!("payload index `{name}`: {e}")))?;
        }
        Ok(())
    }

    /// Opens the shard in `path` as it is (it writes to the directory).
    pub fn open(path: &Path, ef: usize) -> Result<Self, VectorError> {
        let config = match EdgeConfig::load(path) {
            Some(Ok(mut c)) => {
                c.wal_options = Some(WalOptions {
                    segment_capacity: SERVING_WAL_BYTES,
                    ..WalOptions::default()
                });
                Some(c)
            }
            Some(Err(e)) => {
                return Err(err(format!(
                    "the shard config in {} does not read: {e}",
                    path.display()
                )));
            }
            None => None,
        };
        let shard = EdgeShard::load(path, config)
            .map_err(|e| err(format!("cannot open the shard in {}: {e}", path.display())))?;
        let (dim, quantized) = {
            let config = shard.config();
            let v = config.vectors.get(DEFAULT_VECTOR_NAME).ok_or_else(|| {
                err(format!(
                    "the shard in {} has no default vector",
                    path.display()
                ))
            })?;
            (v.size, v.quantization_config.is_some())
        };
        Ok(EdgeIndex {
            shard: Arc::new(shard),
            _owned: None,
            dim,
            ef,
            acorn: None,
            quantized,
            path: path.to_owned(),
        })
    }

    /// Copies the shard in `from` into `to` (replacing what is there) and
    /// opens the copy, leaving `from` untouched.
    pub fn open_copy(from: &Path, to: &Path, ef: usize) -> Result<Self, VectorError> {
        if to.exists() {
            std::fs::remove_dir_all(to)
                .map_err(|e| err(format!("cannot clear {}: {e}", to.display())))?;
        }
        copy_dir(from, to).map_err(|e| {
            err(format!(
                "cannot copy {} to {}: {e}",
                from.display(),
                to.display()
            ))
        })?;
        EdgeIndex::open(to, ef)
    }

    /// Creates a shard in `path` holding `points`, builds its HNSW graph
    /// (minutes at a million items, on every core), flushes it and drops
    /// its write-ahead log, whose updates are all in the segments by then:
    /// what is left is the finished shard to ship and [`EdgeIndex::open`].
    /// `progress` gets the points loaded so far, then `None` when the graph
    /// build starts. Returns the points stored and the points in a graph.
    pub fn build(
        path: &Path,
        dim: usize,
        params: &HnswParams,
        index_threshold_kb: Option<usize>,
        points: impl Iterator<Item = Point>,
        mut progress: impl FnMut(Option<usize>),
    ) -> Result<(usize, usize), VectorError> {
        let index = EdgeIndex::create(path, dim, params, index_threshold_kb)?;
        let mut batch = Vec::with_capacity(BATCH);
        let mut done = 0;
        for p in points {
            batch.push(p);
            if batch.len() == BATCH {
                done += batch.len();
                index.upsert_now(std::mem::take(&mut batch))?;
                progress(Some(done));
            }
        }
        if !batch.is_empty() {
            done += batch.len();
            index.upsert_now(batch)?;
            progress(Some(done));
        }
        progress(None);
        index.optimize()?;
        let counts = index.counts();
        // The last handle: dropping it flushes the segments.
        drop(index);
        let wal = path.join(WAL_DIR);
        std::fs::remove_dir_all(&wal)
            .map_err(|e| err(format!("cannot remove {}: {e}", wal.display())))?;
        Ok(counts)
    }

    /// Builds the HNSW graph of segments above the indexing threshold
    /// (blocking, on every core).
    pub fn optimize(&self) -> Result<(), VectorError> {
        self.shard
            .optimize()
            .map_err(|e| err(format!("HNSW build: {e}")))?;
        Ok(())
    }

    /// Where the shard lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Search-time candidate list (`hnsw_ef`).
    pub fn set_ef(&mut self, ef: usize) {
        self.ef = ef;
    }

    /// ACORN for filtered searches whose filter keeps at most this share of
    /// the points (`None`: off). The graph walk then also looks at
    /// neighbours' neighbours, so a selective filter does not cut it short
    /// (the payload indexes carry no filter-aware links).
    pub fn set_acorn(&mut self, max_selectivity: Option<f64>) {
        self.acorn = max_selectivity.map(|s| s.clamp(0.0, 1.0));
    }

    /// Points stored and points covered by an HNSW graph.
    pub fn counts(&self) -> (usize, usize) {
        let info = self.shard.info();
        (info.points_count, info.indexed_vectors_count)
    }

    /// Inserts or replaces points, in the calling thread.
    pub fn upsert_now(&self, points: Vec<Point>) -> Result<(), VectorError> {
        for (n, p) in points.iter().enumerate() {
            check_dim(&format!("points[{n}].vector"), self.dim, &p.vector)?;
        }
        for chunk in points.chunks(BATCH) {
            let list = chunk
                .iter()
                .map(|p| PointStructPersisted {
                    id: PointId::NumId(u64::from(p.id)),
                    vector: VectorStructPersisted::Single(p.vector.clone()),
                    payload: Some(payload(p)),
                })
                .collect();
            self.shard
                .update(UpdateOperation::PointOperation(
                    PointOperations::UpsertPoints(PointInsertOperations::PointsList(list)),
                ))
                .map_err(|e| err(format!("upsert: {e}")))?;
        }
        Ok(())
    }

    /// The search, in the calling thread.
    pub fn search_now(&self, query: &Query) -> Result<Vec<Hit>, VectorError> {
        self.search_with(query, false)
    }

    /// The search with `exact: true`: the engine's own full scan, the
    /// baseline HNSW recall is measured against.
    pub fn search_exact(&self, query: &Query) -> Result<Vec<Hit>, VectorError> {
        self.search_with(query, true)
    }

    fn search_with(&self, query: &Query, exact: bool) -> Result<Vec<Hit>, VectorError> {
        check_dim("query.vector", self.dim, &query.vector)?;
        if query.limit == 0 {
            return Ok(Vec::new());
        }
        let request = SearchRequest {
            query: QueryEnum::Nearest(NamedQuery {
                query: VectorInternal::from(query.vector.clone()),
                using: None,
            }),
            filter: edge_filter(&query.filter),
            params: Some(SearchParams {
                hnsw_ef: Some(self.ef.max(query.limit)),
                exact,
                quantization: self.quantized.then_some(QuantizationSearchParams {
                    ignore: false,
                    rescore: Some(true),
                    oversampling: Some(2.0),
                }),
                indexed_only: false,
                acorn: self.acorn.map(|s| AcornSearchParams {
                    enable: true,
                    max_selectivity: Some(OrderedFloat(s)),
                }),
            }),
            limit: query.limit,
            offset: 0,
            with_payload: None,
            with_vector: None,
            score_threshold: None,
        };
        let points = self
            .shard
            .search(request)
            .map_err(|e| err(format!("search: {e}")))?;
        Ok(points
            .into_iter()
            .filter_map(|p| match p.id {
                PointId::NumId(id) => u32::try_from(id).ok().map(|id| Hit { id, score: p.score }),
                PointId::Uuid(_) => None,
            })
            .collect())
    }
}

/// A top-level payload key as the engine's path type.
fn path(key: &str) -> JsonPath {
    JsonPath::try_from(key).unwrap_or_else(|_| unreachable!("`{key}` is a plain key"))
}

fn payload(p: &Point) -> Payload {
    let mut map = Map::new();
    map.insert(field::CATEGORY.into(), json!(p.category));
    map.insert(field::IN_STOCK.into(), Value::Bool(p.in_stock));
    map.insert(field::PRICE.into(), json!(p.price));
    map.insert(field::CREATED_AT.into(), json!(p.created_at));
    Payload(map)
}

/// Our filter as the engine's.
fn edge_filter(f: &Filter) -> Option<EdgeFilter> {
    if f.is_empty() {
        return None;
    }
    let mut must = Vec::new();
    if !f.categories.is_empty() {
        must.push(Condition::Field(FieldCondition::new_match(
            path(field::CATEGORY),
            Match::Any(MatchAny {
                any: AnyVariants::Integers(f.categories.iter().map(|&c| i64::from(c)).collect()),
            }),
        )));
    }
    if f.in_stock_only {
        must.push(Condition::Field(FieldCondition::new_match(
            path(field::IN_STOCK),
            Match::Value(MatchValue {
                value: ValueVariants::Bool(true),
            }),
        )));
    }
    if f.min_price > 0.0 || f.max_price > 0.0 {
        must.push(Condition::Field(FieldCondition::new_range(
            path(field::PRICE),
            Range {
                gte: (f.min_price > 0.0).then_some(OrderedFloat(f.min_price)),
                lte: (f.max_price > 0.0).then_some(OrderedFloat(f.max_price)),
                lt: None,
                gt: None,
            },
        )));
    }
    if let Some(t) = f.created_since {
        // An integer payload takes the numeric (float) range.
        must.push(Condition::Field(FieldCondition::new_range(
            path(field::CREATED_AT),
            Range {
                gte: Some(OrderedFloat(t as f64)),
                lte: None,
                lt: None,
                gt: None,
            },
        )));
    }
    let must_not = (!f.exclude.is_empty()).then(|| {
        vec![Condition::HasId(
            f.exclude
                .iter()
                .map(|&id| PointId::NumId(u64::from(id)))
                .collect::<HasIdCondition>(),
        )]
    });
    Some(EdgeFilter {
        should: None,
        min_should: None,
        must: (!must.is_empty()).then_some(must),
        must_not,
    })
}

impl VectorIndex for EdgeIndex {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn upsert(&self, points: Vec<Point>) -> BoxFuture<'_, Result<(), VectorError>> {
        let this = self.clone();
        Box::pin(async move { blocking(move || this.upsert_now(points)).await })
    }

    fn count(&self) -> BoxFuture<'_, Result<usize, VectorError>> {
        let this = self.clone();
        Box::pin(async move { blocking(move || Ok(this.counts().0)).await })
    }

    fn search(&self, query: Query) -> BoxFuture<'_, Result<Vec<Hit>, VectorError>> {
        let this = self.clone();
        Box::pin(async move { blocking(move || this.search_now(&query)).await })
    }

    fn search_blocking(&self, query: &Query) -> Result<Vec<Hit>, VectorError> {
        self.search_now(query)
    }
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, VectorError> + Send + 'static,
) -> Result<T, VectorError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| err(format!("the blocking task failed: {e}")))?
}

fn copy_dir(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

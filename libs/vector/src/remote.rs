//! A Qdrant server or cluster over gRPC (`qdrant-client`).
//!
//! [`QdrantIndex::connect`] creates the collection (dimension, cosine,
//! HNSW `m`/`ef_construct`, on-disk vectors, int8 quantization) with
//! payload indexes for category, stock, price and creation time, or checks
//! that an existing one has the same dimension and distance. Upserts go in
//! batches with retries; every search has a client-side deadline, since
//! Qdrant's own timeout counts whole seconds.
//!
//! Verified against the client's documented API only: no Qdrant server
//! can be installed on the machines recmesh is built on. The contract tests
//! run against a real server when `QDRANT_URL` is set (see the README).

use std::sync::Arc;
use std::time::Duration;

use qdrant_client::Qdrant;
use qdrant_client::qdrant::point_id::PointIdOptions;
use qdrant_client::qdrant::vectors_config::Config as VectorsConfigKind;
use qdrant_client::qdrant::{
    AcornSearchParamsBuilder, Condition, CountPointsBuilder, CreateCollectionBuilder,
    CreateFieldIndexCollectionBuilder, Distance, FieldType, Filter as QFilter,
    HnswConfigDiffBuilder, PointStruct, QueryPointsBuilder, Range, ScalarQuantizationBuilder,
    SearchParamsBuilder, UpsertPointsBuilder, Value, VectorParamsBuilder,
};

use crate::{
    BoxFuture, Filter, Hit, HnswParams, Point, Query, VectorError, VectorIndex, check_dim, field,
};

const BACKEND: &str = "qdrant";

fn err(e: impl std::fmt::Display) -> VectorError {
    VectorError::backend(BACKEND, e)
}

/// Where the server is and how to talk to it.
#[derive(Debug, Clone, PartialEq)]
pub struct QdrantConfig {
    /// gRPC URL, e.g. `http://qdrant:6334`.
    pub url: String,
    /// API key, if the server wants one.
    pub api_key: Option<String>,
    /// Collection name.
    pub collection: String,
    /// Client-side deadline of a search.
    pub search_timeout: Duration,
    /// Deadline of any other call (create, upsert batch, count).
    pub call_timeout: Duration,
    /// Points per upsert call.
    pub upsert_batch: usize,
    /// Attempts per upsert batch beyond the first.
    pub upsert_retries: u32,
}

impl QdrantConfig {
    /// Defaults for `url` and `collection`.
    pub fn new(url: impl Into<String>, collection: impl Into<String>) -> Self {
        QdrantConfig {
            url: url.into(),
            api_key: None,
            collection: collection.into(),
            search_timeout: Duration::from_millis(50),
            call_timeout: Duration::from_secs(30),
            upsert_batch: 1_000,
            upsert_retries: 3,
        }
    }
}

/// One collection of a Qdrant server.
#[derive(Clone)]
pub struct QdrantIndex {
    client: Arc<Qdrant>,
    config: QdrantConfig,
    dim: usize,
    ef: usize,
    acorn: f64,
}

impl QdrantIndex {
    /// The search-time settings: ef (at least the limit) and ACORN.
    fn search_params(&self, limit: usize) -> SearchParamsBuilder {
        let params = SearchParamsBuilder::default().hnsw_ef(self.ef.max(limit) as u64);
        if self.acorn > 0.0 {
            params.acorn(AcornSearchParamsBuilder::new(true).max_selectivity(self.acorn))
        } else {
            params
        }
    }

    /// Connects, then creates the collection or checks the existing one.
    pub async fn connect(
        config: QdrantConfig,
        dim: usize,
        params: &HnswParams,
    ) -> Result<Self, VectorError> {
        let mut builder = Qdrant::from_url(&config.url)
            .timeout(config.call_timeout)
            .connect_timeout(Duration::from_secs(5))
            .skip_compatibility_check();
        if let Some(key) = &config.api_key {
            builder = builder.api_key(key.clone());
        }
        let client = builder
            .build()
            .map_err(|e| err(format!("cannot reach {}: {e}", config.url)))?;
        let index = QdrantIndex {
            client: Arc::new(client),
            config,
            dim,
            ef: params.ef,
            acorn: params.acorn,
        };
        index.ensure_collection(params).await?;
        Ok(index)
    }

    /// Search-time ef (at least the limit of each query).
    pub fn set_ef(&mut self, ef: usize) {
        self.ef = ef;
    }

    /// ACORN's selectivity cut-off (0: off).
    pub fn set_acorn(&mut self, acorn: f64) {
        self.acorn = acorn;
    }

    /// Waits until the server has indexed the collection (status green:
    /// no optimisation pending or running), polling every half second, for
    /// at most `timeout`. Returns the indexed vectors the server reports.
    pub async fn wait_indexed(&self, timeout: Duration) -> Result<u64, VectorError> {
        use qdrant_client::qdrant::CollectionStatus;
        let started = std::time::Instant::now();
        loop {
            let info = self
                .call(
                    "collection_info",
                    self.client.collection_info(&self.config.collection),
                )
                .await?
                .result
                .ok_or_else(|| err("collection_info: no result"))?;
            if info.status == CollectionStatus::Green as i32 {
                return Ok(info.indexed_vectors_count.unwrap_or(0));
            }
            if started.elapsed() > timeout {
                return Err(err(format!(
                    "collection `{}` not indexed after {timeout:?} (status {})",
                    self.config.collection, info.status
                )));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The collection name.
    pub fn collection(&self) -> &str {
        &self.config.collection
    }

    /// Deletes the collection (for tests and for cleaning up old bundles).
    pub async fn delete_collection(&self) -> Result<(), VectorError> {
        self.call(
            "delete_collection",
            self.client.delete_collection(&self.config.collection),
        )
        .await?;
        Ok(())
    }

    async fn call<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = Result<T, qdrant_client::QdrantError>>,
    ) -> Result<T, VectorError> {
        match tokio::time::timeout(self.config.call_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(err(format!(
                "{what} on collection `{}` at {}: {e}",
                self.config.collection, self.config.url
            ))),
            Err(_) => Err(VectorError::Timeout {
                backend: BACKEND,
                ms: self.config.call_timeout.as_millis() as u64,
            }),
        }
    }

    async fn ensure_collection(&self, params: &HnswParams) -> Result<(), VectorError> {
        let name = &self.config.collection;
        let exists = self
            .call("collection_exists", self.client.collection_exists(name))
            .await?;
        if exists {
            let info = self
                .call("collection_info", self.client.collection_info(name))
                .await?;
            let vectors = info
                .result
                .and_then(|i| i.config)
                .and_then(|c| c.params)
                .and_then(|p| p.vectors_config)
                .and_then(|v| v.config);
            return match vectors {
                Some(VectorsConfigKind::Params(v))
                    if v.size as usize == self.dim && v.distance == Distance::Cosine as i32 =>
                {
                    Ok(())
                }
                Some(VectorsConfigKind::Params(v)) => Err(err(format!(
                    "collection `{name}` holds {}-dimension vectors with distance {}; this index needs {} dimensions and cosine: point retrieval at another collection or delete this one",
                    v.size,
                    Distance::try_from(v.distance).map_or("unknown", |d| d.as_str_name()),
                    self.dim
                ))),
                _ => Err(err(format!(
                    "collection `{name}` has named vectors; recmesh uses one unnamed vector: point retrieval at another collection"
                ))),
            };
        }
        let mut vectors =
            VectorParamsBuilder::new(self.dim as u64, Distance::Cosine).on_disk(params.on_disk);
        if params.quantize {
            vectors = vectors.quantization_config(
                ScalarQuantizationBuilder::default()
                    .quantile(0.99)
                    .always_ram(true),
            );
        }
        let create = CreateCollectionBuilder::new(name)
            .vectors_config(vectors)
            .hnsw_config(
                HnswConfigDiffBuilder::default()
                    .m(params.m as u64)
                    .ef_construct(params.ef_construct as u64)
                    .full_scan_threshold(params.full_scan_kb as u64),
            );
        if let Err(e) = self
            .call("create_collection", self.client.create_collection(create))
            .await
        {
            // Another replica may have created it since the check.
            let exists = self
                .call("collection_exists", self.client.collection_exists(name))
                .await?;
            if !exists {
                return Err(e);
            }
        }
        for (field_name, kind) in [
            (field::CATEGORY, FieldType::Integer),
            (field::IN_STOCK, FieldType::Bool),
            (field::PRICE, FieldType::Float),
            (field::CREATED_AT, FieldType::Integer),
        ] {
            self.call(
                "create_field_index",
                self.client.create_field_index(
                    CreateFieldIndexCollectionBuilder::new(name, field_name, kind).wait(true),
                ),
            )
            .await?;
        }
        Ok(())
    }

    async fn upsert_batch(&self, points: Vec<PointStruct>) -> Result<(), VectorError> {
        let mut attempt = 0;
        loop {
            let request =
                UpsertPointsBuilder::new(&self.config.collection, points.clone()).wait(true);
            match self
                .call("upsert", self.client.upsert_points(request))
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if attempt >= self.config.upsert_retries => return Err(e),
                Err(e) => {
                    attempt += 1;
                    let backoff = Duration::from_millis(100 << attempt.min(6));
                    tracing::warn!(error = %e, attempt, ?backoff, "qdrant upsert failed; retrying");
                    tokio::time::sleep(backoff).await;
                }
            }
        }
    }
}

impl std::fmt::Debug for QdrantIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QdrantIndex")
            .field("url", &self.config.url)
            .field("collection", &self.config.collection)
            .field("dim", &self.dim)
            .finish_non_exhaustive()
    }
}

fn point_struct(p: &Point) -> PointStruct {
    PointStruct::new(
        u64::from(p.id),
        p.vector.clone(),
        [
            (field::CATEGORY, Value::from(i64::from(p.category))),
            (field::IN_STOCK, Value::from(p.in_stock)),
            (field::PRICE, Value::from(p.price)),
            (field::CREATED_AT, Value::from(p.created_at)),
        ],
    )
}

/// Our filter as the server's.
fn server_filter(f: &Filter) -> Option<QFilter> {
    if f.is_empty() {
        return None;
    }
    let mut must = Vec::new();
    if !f.categories.is_empty() {
        must.push(Condition::matches(
            field::CATEGORY,
            f.categories
                .iter()
                .map(|&c| i64::from(c))
                .collect::<Vec<_>>(),
        ));
    }
    if f.in_stock_only {
        must.push(Condition::matches(field::IN_STOCK, true));
    }
    if f.min_price > 0.0 || f.max_price > 0.0 {
        must.push(Condition::range(
            field::PRICE,
            Range {
                gte: (f.min_price > 0.0).then_some(f.min_price),
                lte: (f.max_price > 0.0).then_some(f.max_price),
                ..Range::default()
            },
        ));
    }
    if let Some(t) = f.created_since {
        must.push(Condition::range(
            field::CREATED_AT,
            Range {
                gte: Some(t as f64),
                ..Range::default()
            },
        ));
    }
    let mut filter = QFilter::must(must);
    if !f.exclude.is_empty() {
        filter.must_not = vec![Condition::has_id(f.exclude.iter().map(|&id| u64::from(id)))];
    }
    Some(filter)
}

impl VectorIndex for QdrantIndex {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn upsert(&self, points: Vec<Point>) -> BoxFuture<'_, Result<(), VectorError>> {
        Box::pin(async move {
            for (n, p) in points.iter().enumerate() {
                check_dim(&format!("points[{n}].vector"), self.dim, &p.vector)?;
            }
            for chunk in points.chunks(self.config.upsert_batch.max(1)) {
                self.upsert_batch(chunk.iter().map(point_struct).collect())
                    .await?;
            }
            Ok(())
        })
    }

    fn count(&self) -> BoxFuture<'_, Result<usize, VectorError>> {
        Box::pin(async move {
            let r = self
                .call(
                    "count",
                    self.client
                        .count(CountPointsBuilder::new(&self.config.collection).exact(true)),
                )
                .await?;
            Ok(r.result.map_or(0, |c| c.count as usize))
        })
    }

    fn search(&self, query: Query) -> BoxFuture<'_, Result<Vec<Hit>, VectorError>> {
        Box::pin(async move {
            check_dim("query.vector", self.dim, &query.vector)?;
            if query.limit == 0 {
                return Ok(Vec::new());
            }
            let mut request = QueryPointsBuilder::new(&self.config.collection)
                .query(qdrant_client::qdrant::Query::new_nearest(query.vector))
                .limit(query.limit as u64)
                .params(self.search_params(query.limit))
                // The server's own timeout, in whole seconds, as a backstop.
                .timeout(self.config.search_timeout.as_secs().max(1));
            if let Some(f) = server_filter(&query.filter) {
                request = request.filter(f);
            }
            let deadline = self.config.search_timeout;
            let answer = tokio::time::timeout(deadline, self.client.query(request))
                .await
                .map_err(|_| VectorError::Timeout {
                    backend: BACKEND,
                    ms: deadline.as_millis() as u64,
                })?
                .map_err(|e| err(format!("query on `{}`: {e}", self.config.collection)))?;
            Ok(answer
                .result
                .into_iter()
                .filter_map(|p| {
                    let id = match p.id?.point_id_options? {
                        PointIdOptions::Num(n) => u32::try_from(n).ok()?,
                        PointIdOptions::Uuid(_) => return None,
                    };
                    Some(Hit { id, score: p.score })
                })
                .collect())
        })
    }
}

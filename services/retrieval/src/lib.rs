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

use std::future::Future;
use std::sync::Arc;

use recmesh_catalog::Dataset;
use recmesh_catalog::bundle::{self, Bundle};
use recmesh_mesh::convert::{FieldError, check_id};
use recmesh_proto::v1::{self as pb, retrieval_server::RetrievalServer};
use recmesh_server::GrpcServer;
use tonic::{Request, Response, Status};

mod config;
mod index;
mod merge;
mod sources;
#[cfg(test)]
mod tests;

pub use config::{AnnBackend, AnnConfig, Config, DEFAULT_PORT};
pub use index::Index;
use merge::{Merger, Why};
use sources::{Found, Ran, budgeted, source_budget};

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

impl Snapshot {
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
        constraints.exclude(&req.item_id, anchor);
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

//! Experiments service: deterministic variant assignment, the admin API the
//! A/B platform pushes experiment configs through, results with
//! significance from the event log, and guardrails that stop a losing
//! variant.
//!
//! - [`model`]: experiments, validation, assignment (layers, holdout,
//!   schedule, sticky users, stopped variants);
//! - [`store`]: the embedded durable state (atomic JSON file, sticky TSV);
//! - [`results`]: the event-log consumer, the statistics, the guardrail;
//! - [`consul`]: experiment configs from Consul KV.

#![forbid(unsafe_code)]

pub mod consul;
mod consumer;
pub mod model;
pub mod results;
pub mod simulation;
pub mod store;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::Stream;
use recmesh_mesh::convert::{FieldError, check_id};
use recmesh_proto::v1::{
    self as pb, experiments_admin_server::ExperimentsAdminServer,
    experiments_server::ExperimentsServer,
};
use recmesh_server::GrpcServer;
use recmesh_server::config::{ConfigError, ServerConfig, ServiceConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

pub use model::{ExperimentDef, ExperimentSet, GuardrailDef, Refused, VariantDef};

/// Default gRPC port of the experiments service.
pub const DEFAULT_PORT: u16 = 50055;

/// Configuration of the experiments service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC and admin server.
    pub server: ServerConfig,
    /// TOML file of experiments loaded at the first start (when the state
    /// directory holds none yet); empty: the built-in demo set.
    pub experiments_file: String,
    /// Directory of the durable state (pushed experiments, sticky
    /// assignments); empty: pushes live in memory only. Not used with
    /// `redis_url`.
    pub state_dir: String,
    /// Keep the state in this Redis instead (`redis://host:port`), shared
    /// by every replica: production.
    pub redis_url: String,
    /// Key prefix in Redis.
    pub redis_prefix: String,
    /// How often a replica checks Redis for another replica's change, ms.
    pub redis_poll_ms: u64,
    /// Bearer token the admin API requires. Empty (and no token file): the
    /// admin API is open (for local demos only; a warning is logged).
    pub admin_token: String,
    /// File holding the token instead (a mounted Kubernetes secret); wins
    /// over `admin_token`.
    pub admin_token_file: String,
    /// Share of all users kept out of every experiment, 0..=0.5.
    pub holdout: f64,
    /// Features service whose exposure and event logs the results read;
    /// empty: no results, no guardrails.
    pub features_addr: String,
    /// Results consumer.
    pub results: ResultsConfig,
    /// Experiment configs from Consul KV.
    pub consul: consul::ConsulConfig,
}

/// The results consumer's settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ResultsConfig {
    /// Pause between reads once the logs are drained, ms.
    pub poll_ms: u64,
    /// Events are attributed this long after their time, ms, so their
    /// exposure (sent by the gateway in batches) is read first.
    pub attribution_delay_ms: u64,
    /// A click or purchase counts for a list only this long after the
    /// list's exposure, ms; lists are dropped after it (bounds memory).
    pub attribution_window_ms: u64,
    /// Entries per `ReadLog` call.
    pub page: u32,
}

impl Default for ResultsConfig {
    fn default() -> Self {
        ResultsConfig {
            poll_ms: 500,
            attribution_delay_ms: 2_000,
            attribution_window_ms: 3_600_000,
            // Each page is decoded on an async worker: a small page keeps
            // that short (docs/faults.md, run 14).
            page: 1_000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::on_port(DEFAULT_PORT),
            experiments_file: String::new(),
            state_dir: "var/experiments".into(),
            redis_url: String::new(),
            redis_prefix: "rm".into(),
            redis_poll_ms: 500,
            admin_token: String::new(),
            admin_token_file: String::new(),
            holdout: 0.0,
            features_addr: "http://127.0.0.1:50056".into(),
            results: ResultsConfig::default(),
            consul: consul::ConsulConfig::default(),
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.experiments_file.is_empty() {
            let text = std::fs::read_to_string(&self.experiments_file).map_err(|e| {
                ConfigError::invalid(
                    "experiments_file",
                    format!("{}: {e}", self.experiments_file),
                )
            })?;
            parse_file(&text).map_err(|e| {
                ConfigError::invalid(format!("experiments_file: {}", e.field), e.reason)
            })?;
        }
        if !(0.0..=0.5).contains(&self.holdout) {
            return Err(ConfigError::invalid("holdout", "must be in 0.0..=0.5"));
        }
        if !self.features_addr.is_empty() {
            recmesh_mesh::check_address("features_addr", &self.features_addr)
                .map_err(|e| ConfigError::invalid("features_addr", e.to_string()))?;
        }
        recmesh_server::config::at_least_one(&[
            ("redis_poll_ms", self.redis_poll_ms),
            ("results.poll_ms", self.results.poll_ms),
            ("results.page", u64::from(self.results.page)),
            (
                "results.attribution_window_ms",
                self.results.attribution_window_ms,
            ),
        ])?;
        self.consul.validate()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExperimentsFile {
    #[serde(default)]
    experiments: Vec<ExperimentDef>,
}

/// The experiments served when no file is configured: one experiment on the
/// candidate count, so a demo shows assignments in every response.
pub const DEMO_EXPERIMENTS: &str = r#"
[[experiments]]
id = "candidate-count"
layer = "retrieval"
traffic = 1.0
status = "running"

[[experiments.variants]]
name = "control"
weight = 50

[[experiments.variants]]
name = "wide-retrieval"
weight = 50
params = { "retrieval.candidates" = "400", "rerank.category_cap" = "3" }
"#;

/// Parses and validates an experiments file into the set it describes.
pub fn parse_file(text: &str) -> Result<ExperimentSet, FieldError> {
    let file: ExperimentsFile =
        toml::from_str(text).map_err(|e| FieldError::new("toml", e.to_string()))?;
    let mut set = ExperimentSet::default();
    for (n, e) in file.experiments.into_iter().enumerate() {
        set.put(e, None).map_err(|err| match err {
            Refused::Invalid(err) => {
                FieldError::new(format!("experiments[{n}].{}", err.field), err.reason)
            }
            other => FieldError::new(format!("experiments[{n}]"), format!("{other:?}")),
        })?;
    }
    Ok(set)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// How a refused change reads to the caller.
fn refused(err: Refused, prefix: &str) -> Status {
    match err {
        Refused::Invalid(f) => {
            metrics::counter!("recmesh_experiments_rejected_total", "reason" => "invalid")
                .increment(1);
            FieldError::new(format!("{prefix}{}", f.field), f.reason).into()
        }
        Refused::Stale { expected, current } => {
            metrics::counter!("recmesh_experiments_rejected_total", "reason" => "stale")
                .increment(1);
            Status::failed_precondition(format!(
                "version: the experiment is at version {current}, not {expected}; read it again and retry"
            ))
        }
        Refused::NotFound(id) => Status::not_found(format!("id: no experiment `{id}`")),
    }
}

/// What `WatchVersion` sends for `set`.
fn config_version(set: &ExperimentSet, holdout: f64) -> pb::ConfigVersion {
    pb::ConfigVersion {
        version: set.version,
        rules: Some(set.rules(holdout)),
    }
}

/// Shared state of both gRPC services and the background tasks.
#[derive(Debug)]
struct Inner {
    set: RwLock<Arc<ExperimentSet>>,
    /// Serialises changes (validate, persist, swap).
    changing: tokio::sync::Mutex<()>,
    sticky: RwLock<store::Sticky>,
    store: Option<store::Store>,
    /// The set's version and the rules `Assign` follows at it.
    version: watch::Sender<Arc<pb::ConfigVersion>>,
    closing: watch::Sender<bool>,
    results: Mutex<results::Results>,
    holdout: f64,
    token: String,
}

/// The experiments service state.
#[derive(Debug, Clone)]
pub struct Experiments(Arc<Inner>);

impl Experiments {
    /// State from `config`: the saved state when there is one (Redis, or
    /// the state directory), else the experiments file, else the demo set.
    pub async fn open(config: &Config) -> Result<Self, ConfigError> {
        let (store, saved, sticky) = if !config.redis_url.is_empty() {
            let (s, saved, sticky) =
                store::RedisStore::open(&config.redis_url, &config.redis_prefix)
                    .await
                    .map_err(|e| ConfigError::invalid("redis_url", format!("{e:#}")))?;
            (Some(store::Store::Redis(s)), saved, sticky)
        } else if config.state_dir.is_empty() {
            (None, None, store::Sticky::new())
        } else {
            let (s, saved, sticky) =
                store::FileStore::open(std::path::Path::new(&config.state_dir))
                    .map_err(|e| ConfigError::invalid("state_dir", format!("{e:#}")))?;
            (Some(store::Store::File(s)), saved, sticky)
        };
        let set = match saved {
            Some(set) => {
                tracing::info!(
                    experiments = set.experiments.len(),
                    version = set.version,
                    "experiments restored from the saved state"
                );
                set
            }
            None => {
                let text = if config.experiments_file.is_empty() {
                    DEMO_EXPERIMENTS.to_owned()
                } else {
                    std::fs::read_to_string(&config.experiments_file)
                        .map_err(|e| ConfigError::invalid("experiments_file", e.to_string()))?
                };
                let set = parse_file(&text).map_err(|e| {
                    ConfigError::invalid(format!("experiments_file: {}", e.field), e.reason)
                })?;
                // The first replica to start seeds Redis; a lost race is
                // fine (another replica seeded it).
                if let Some(store::Store::Redis(r)) = &store {
                    r.save(&set, 0)
                        .await
                        .map_err(|e| ConfigError::invalid("redis_url", format!("{e:#}")))?;
                }
                set
            }
        };
        let token = if config.admin_token_file.is_empty() {
            config.admin_token.clone()
        } else {
            std::fs::read_to_string(&config.admin_token_file)
                .map_err(|e| {
                    ConfigError::invalid(
                        "admin_token_file",
                        format!("{}: {e}", config.admin_token_file),
                    )
                })?
                .trim()
                .to_owned()
        };
        if token.is_empty() {
            tracing::warn!(
                "experiments admin API is open: set admin_token_file or admin_token (RECMESH_ADMIN_TOKEN) outside local demos"
            );
        }
        let (version, _) = watch::channel(Arc::new(config_version(&set, config.holdout)));
        let (closing, _) = watch::channel(false);
        Ok(Experiments(Arc::new(Inner {
            set: RwLock::new(Arc::new(set)),
            changing: tokio::sync::Mutex::new(()),
            sticky: RwLock::new(sticky),
            store,
            version,
            closing,
            results: Mutex::new(results::Results::new(
                config.results.attribution_window_ms,
                config.results.attribution_delay_ms,
            )),
            holdout: config.holdout,
            token,
        })))
    }

    /// The current set.
    pub fn current(&self) -> Arc<ExperimentSet> {
        self.0.set.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Applies a change to a copy of the set, saves it, then serves it. A
    /// refused change, or one that cannot be saved, changes nothing. With
    /// Redis the change starts from the saved state and is saved only if no
    /// other replica changed it meanwhile (else it is applied again to the
    /// newer state, up to three times).
    pub async fn change(
        &self,
        f: impl Fn(&mut ExperimentSet) -> Result<u64, Refused>,
    ) -> Result<Result<u64, Refused>, anyhow::Error> {
        let _turn = self.0.changing.lock().await;
        for _ in 0..3 {
            let base = match &self.0.store {
                Some(store::Store::Redis(r)) => {
                    if let Some(saved) = r.load().await?
                        && saved.version > self.current().version
                    {
                        self.swap(saved);
                    }
                    self.current()
                }
                _ => self.current(),
            };
            let mut next = (*base).clone();
            let version = match f(&mut next) {
                Ok(v) => v,
                Err(e) => return Ok(Err(e)),
            };
            let saved = match &self.0.store {
                Some(store::Store::File(file)) => file.save(&next).map(|()| true)?,
                // False: another replica changed it first; start over.
                Some(store::Store::Redis(r)) => r.save(&next, base.version).await?,
                None => true,
            };
            if !saved {
                continue;
            }
            self.swap(next);
            return Ok(Ok(version));
        }
        anyhow::bail!("other replicas kept changing the experiments; try again")
    }

    /// Serves `set` and tells the version watchers.
    fn swap(&self, set: ExperimentSet) {
        let version = set.version;
        let rules = Arc::new(config_version(&set, self.0.holdout));
        *self.0.set.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        self.0.version.send_replace(rules);
        metrics::gauge!("recmesh_experiments_config_version").set(version as f64);
    }

    /// Follows another replica's changes in Redis (what [`server`] starts
    /// with `redis_url`).
    pub fn spawn_redis_poll(&self, every: Duration) {
        let state = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(store::Store::Redis(r)) = &state.0.store else {
                    return;
                };
                match r.version().await {
                    Ok(v) if v > state.current().version => match r.load().await {
                        Ok(Some(set)) => {
                            match r.load_sticky(&set).await {
                                Ok(sticky) => {
                                    *state.0.sticky.write().unwrap_or_else(|p| p.into_inner()) =
                                        sticky;
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "sticky assignments not reloaded")
                                }
                            }
                            tracing::info!(version = v, "experiments changed by another replica");
                            state.swap(set);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::warn!(error = %format!("{e:#}"), "experiments not reloaded")
                        }
                    },
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(error = %format!("{e:#}"), "redis unreachable; keeping the current experiments")
                    }
                }
            }
        });
    }

    async fn apply(
        &self,
        f: impl Fn(&mut ExperimentSet) -> Result<u64, Refused>,
        prefix: &str,
    ) -> Result<u64, Status> {
        match self.change(f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(refused(e, prefix)),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "experiment change not saved; the previous config keeps serving");
                Err(Status::unavailable(format!(
                    "the change could not be saved ({e:#}); the previous config keeps serving"
                )))
            }
        }
    }

    /// The assignments of `user` now.
    pub fn assign(&self, user: &str) -> pb::AssignResponse {
        let current = self.0.version.borrow().clone();
        let mut new_sticky = Vec::new();
        let (assignments, holdout) = {
            let sticky = self.0.sticky.read().unwrap_or_else(|p| p.into_inner());
            recmesh_mesh::assign::assign(
                current
                    .rules
                    .as_ref()
                    .unwrap_or(&pb::AssignmentRules::default()),
                user,
                now_ms(),
                |exp| sticky.get(&(exp.to_owned(), user.to_owned())).cloned(),
                |exp, variant| new_sticky.push((exp.to_owned(), variant.to_owned())),
            )
        };
        if !new_sticky.is_empty() {
            let mut sticky = self.0.sticky.write().unwrap_or_else(|p| p.into_inner());
            for (exp, variant) in new_sticky {
                match &self.0.store {
                    Some(store::Store::File(f)) => f.record_sticky(&exp, user, &variant),
                    Some(store::Store::Redis(r)) => r.record_sticky(&exp, user, &variant),
                    None => {}
                }
                sticky.insert((exp, user.to_owned()), variant);
            }
        }
        pb::AssignResponse {
            assignments,
            config_version: current.version,
            holdout,
        }
    }

    /// Results of one experiment.
    pub fn results(&self, id: &str) -> Option<pb::ExperimentResults> {
        let set = self.current();
        self.0
            .results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .report(&set, id)
    }

    /// Ends the version streams (the server is draining).
    pub fn close(&self) {
        self.0.closing.send_replace(true);
    }

    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if self.0.token.is_empty() {
            return Ok(());
        }
        let Some(value) = req.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "admin API needs `authorization: Bearer <token>`",
            ));
        };
        let presented = value
            .to_str()
            .unwrap_or_default()
            .strip_prefix("Bearer ")
            .unwrap_or_default();
        if constant_time_eq(presented.as_bytes(), self.0.token.as_bytes()) {
            Ok(())
        } else {
            Err(Status::permission_denied("admin token not accepted"))
        }
    }
}

/// Compares secrets in time independent of where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

type VersionStream = Pin<Box<dyn Stream<Item = Result<pb::ConfigVersion, Status>> + Send>>;

#[tonic::async_trait]
impl pb::experiments_server::Experiments for Experiments {
    async fn assign(
        &self,
        request: Request<pb::AssignRequest>,
    ) -> Result<Response<pb::AssignResponse>, Status> {
        let req = request.into_inner();
        check_id("user_id", &req.user_id)?;
        Ok(Response::new(Experiments::assign(self, &req.user_id)))
    }

    type WatchVersionStream = VersionStream;

    async fn watch_version(
        &self,
        _request: Request<pb::WatchVersionRequest>,
    ) -> Result<Response<VersionStream>, Status> {
        let version = self.0.version.subscribe();
        let closing = self.0.closing.subscribe();
        let stream = futures::stream::unfold(
            (version, closing, true),
            |(mut version, mut closing, first)| async move {
                if !first {
                    tokio::select! {
                        changed = version.changed() => changed.ok()?,
                        _ = closing.wait_for(|c| *c) => return None,
                    }
                }
                if *closing.borrow() {
                    return None;
                }
                let v = (**version.borrow_and_update()).clone();
                Some((Ok(v), (version, closing, false)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl pb::experiments_admin_server::ExperimentsAdmin for Experiments {
    async fn put_experiment(
        &self,
        request: Request<pb::PutExperimentRequest>,
    ) -> Result<Response<pb::PutExperimentResponse>, Status> {
        self.authorize(&request)?;
        let e = request
            .into_inner()
            .experiment
            .ok_or_else(|| FieldError::new("experiment", "is required"))?;
        let expected = (e.version > 0).then_some(e.version);
        let def = model::from_proto(e);
        let id = def.id.clone();
        let version = self
            .apply(|set| set.put(def.clone(), expected), "experiment.")
            .await?;
        tracing::info!(experiment = %id, version, "experiment accepted");
        Ok(Response::new(pb::PutExperimentResponse { version }))
    }

    async fn get_experiment(
        &self,
        request: Request<pb::GetExperimentRequest>,
    ) -> Result<Response<pb::Experiment>, Status> {
        self.authorize(&request)?;
        let id = request.into_inner().id;
        self.current()
            .get(&id)
            .map(|s| Response::new(model::to_proto(s)))
            .ok_or_else(|| Status::not_found(format!("id: no experiment `{id}`")))
    }

    async fn list_experiments(
        &self,
        request: Request<pb::ListExperimentsRequest>,
    ) -> Result<Response<pb::ListExperimentsResponse>, Status> {
        self.authorize(&request)?;
        Ok(Response::new(pb::ListExperimentsResponse {
            experiments: self
                .current()
                .experiments
                .iter()
                .map(model::to_proto)
                .collect(),
        }))
    }

    async fn set_status(
        &self,
        request: Request<pb::SetStatusRequest>,
    ) -> Result<Response<pb::Experiment>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let expected = (req.expected_version > 0).then_some(req.expected_version);
        self.apply(|set| set.set_status(&req.id, &req.status, expected), "")
            .await?;
        tracing::info!(experiment = %req.id, status = %req.status, "experiment status set");
        self.current()
            .get(&req.id)
            .map(|s| Response::new(model::to_proto(s)))
            .ok_or_else(|| Status::not_found(format!("id: no experiment `{}`", req.id)))
    }

    async fn delete_experiment(
        &self,
        request: Request<pb::DeleteExperimentRequest>,
    ) -> Result<Response<pb::DeleteExperimentResponse>, Status> {
        self.authorize(&request)?;
        let req = request.into_inner();
        let expected = (req.expected_version > 0).then_some(req.expected_version);
        self.apply(|set| set.delete(&req.id, expected), "").await?;
        tracing::info!(experiment = %req.id, "experiment deleted");
        Ok(Response::new(pb::DeleteExperimentResponse {}))
    }

    async fn get_results(
        &self,
        request: Request<pb::GetResultsRequest>,
    ) -> Result<Response<pb::ExperimentResults>, Status> {
        self.authorize(&request)?;
        let id = request.into_inner().id;
        self.results(&id)
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("id: no experiment `{id}`")))
    }
}

/// The experiments server, ready to start or run; starts the results
/// consumer, the Redis poll and the Consul watch when configured.
pub async fn server(config: Config) -> Result<GrpcServer, ConfigError> {
    let state = Experiments::open(&config).await?;
    if !config.redis_url.is_empty() {
        state.spawn_redis_poll(Duration::from_millis(config.redis_poll_ms));
    }
    if !config.features_addr.is_empty() {
        state.spawn_results(&config.features_addr, config.results.clone())?;
    }
    if config.consul.enabled() {
        consul::spawn_watch(config.consul.clone(), state.clone());
    }
    let closer = state.clone();
    Ok(GrpcServer::new("experiments", config.server.clone())
        .add_service(ExperimentsServer::new(state.clone()))
        .add_service(ExperimentsAdminServer::new(state))
        .on_drain(move || closer.close()))
}

/// Serves until `shutdown`, then drains.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    server(config).await?.run(shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests;

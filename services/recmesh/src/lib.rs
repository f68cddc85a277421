//! `recmesh`: the whole mesh in one command, and a client for it.
//!
//! [`start`] runs all six services in this process, each its own gRPC server
//! on its own loopback port, talking to each other over real gRPC exactly as
//! separate processes would. Tests use the same function on ephemeral ports.

#![forbid(unsafe_code)]

pub mod ab;
pub mod bench;
pub mod client;

use std::net::SocketAddr;
use std::sync::Arc;

use recmesh_catalog::Dataset;
use recmesh_server::{ServeError, ServerConfig, ServerHandle};

/// Ports of a mesh: `base` for the gateway and the next five for the stages
/// (retrieval, ranking, reranker, experiments, features); admin ports are
/// 1000 above each. `base = 0` puts everything on ephemeral ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortPlan {
    /// Gateway port; 0 for ephemeral ports everywhere.
    pub base: u16,
}

impl PortPlan {
    /// The default layout (gateway on 50051).
    pub const DEFAULT: PortPlan = PortPlan { base: 50051 };
    /// Ephemeral ports (tests).
    pub const EPHEMERAL: PortPlan = PortPlan { base: 0 };

    fn server(&self, offset: u16) -> ServerConfig {
        if self.base == 0 {
            ServerConfig::ephemeral()
        } else {
            ServerConfig::on_port(self.base + offset)
        }
    }

    /// Puts `server` on this plan's addresses; its other settings stay.
    fn place(&self, offset: u16, server: &mut ServerConfig) {
        let placed = self.server(offset);
        server.grpc_addr = placed.grpc_addr;
        server.admin_addr = placed.admin_addr;
    }
}

/// The five stage services, running.
#[derive(Debug)]
pub struct Stages {
    /// Retrieval.
    pub retrieval: ServerHandle,
    /// Ranking.
    pub ranking: ServerHandle,
    /// Reranker.
    pub reranker: ServerHandle,
    /// Experiments.
    pub experiments: ServerHandle,
    /// Features.
    pub features: ServerHandle,
    /// The runtimes of [`Threads::PerService`] (the gateway's too), stopped
    /// after the stages.
    runtimes: Vec<OwnRuntime>,
}

impl Stages {
    /// Gateway upstreams pointing at these stages.
    pub fn upstreams(&self) -> recmesh_gateway::config::Upstreams {
        recmesh_gateway::config::Upstreams {
            experiments: self.experiments.grpc_uri(),
            features: self.features.grpc_uri(),
            retrieval: self.retrieval.grpc_uri(),
            ranking: self.ranking.grpc_uri(),
            reranker: self.reranker.grpc_uri(),
        }
    }

    /// Every stage handle with its name.
    pub fn all(&self) -> [&ServerHandle; 5] {
        [
            &self.retrieval,
            &self.ranking,
            &self.reranker,
            &self.experiments,
            &self.features,
        ]
    }

    /// Graceful stop of every stage.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        for h in [
            self.retrieval,
            self.ranking,
            self.reranker,
            self.experiments,
            self.features,
        ] {
            h.shutdown().await?;
        }
        drop(self.runtimes);
        Ok(())
    }
}

/// How the six services of one process share its threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Threads {
    /// Every service on the runtime that starts them (tests).
    #[default]
    Shared,
    /// Each service on a runtime of its own, with its config's
    /// `server.worker_threads` workers (0: the process's CPUs shared among
    /// the six, at least one each), as six processes would run. A call's
    /// frames then go out and come back on the thread that made it instead
    /// of waking another worker; `recmesh up` runs this way.
    PerService,
}

/// A service's own runtime ([`Threads::PerService`]); dropped without
/// waiting for its tasks (the service has been shut down, or the mesh is
/// being dropped), which is allowed from inside another runtime.
#[derive(Debug)]
struct OwnRuntime(Option<tokio::runtime::Runtime>);

impl Drop for OwnRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

impl Threads {
    /// A runtime for a service whose config asks for `workers` threads, or
    /// `None` to run it on the caller's runtime.
    fn runtime(self, name: &str, workers: usize) -> Result<Option<OwnRuntime>, UpError> {
        if self == Threads::Shared {
            return Ok(None);
        }
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let workers = if workers == 0 {
            (cpus / 6).max(1)
        } else {
            workers
        };
        recmesh_server::runtime_with(Some(workers), Some(&format!("{name}-rt")))
            .map(|rt| Some(OwnRuntime(Some(rt))))
            .map_err(|e| {
                UpError::Runtime(format!(
                    "{name}: could not start its runtime ({workers} worker threads): {e}"
                ))
            })
    }

    /// Runs `start` for the service `name` on a runtime of its own (kept in
    /// `runtimes`, so it lives as long as the mesh) or, [`Threads::Shared`],
    /// here: the service's tasks are spawned where `start` runs.
    async fn start<T: Send + 'static>(
        self,
        name: &str,
        workers: usize,
        runtimes: &mut Vec<OwnRuntime>,
        start: impl Future<Output = Result<T, UpError>> + Send + 'static,
    ) -> Result<T, UpError> {
        let rt = self.runtime(name, workers)?;
        let started = match rt.as_ref().and_then(|r| r.0.as_ref()) {
            None => start.await,
            Some(rt) => rt
                .spawn(start)
                .await
                .map_err(|e| UpError::Runtime(format!("{name}: its start did not finish: {e}")))?,
        }?;
        runtimes.extend(rt);
        Ok(started)
    }
}

/// Why the mesh did not start.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// A server could not bind or serve.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// An upstream address is malformed.
    #[error(transparent)]
    Address(#[from] recmesh_mesh::AddressError),
    /// The experiments config is invalid.
    #[error(transparent)]
    Config(#[from] recmesh_server::ConfigError),
    /// Retrieval could not load its bundle.
    #[error("retrieval: {0:#}")]
    Retrieval(anyhow::Error),
    /// The feature store could not open (its event log, or Redis).
    #[error("features: {0:#}")]
    Features(anyhow::Error),
    /// A service's own runtime could not start ([`Threads::PerService`]).
    #[error("{0}")]
    Runtime(String),
}

/// Configs of the five stage services; their server addresses (and
/// ranking's features address) are set by [`start_stages`].
#[derive(Debug, Clone, Default)]
pub struct StageConfigs {
    /// Retrieval.
    pub retrieval: recmesh_retrieval::Config,
    /// Ranking.
    pub ranking: recmesh_ranking::Config,
    /// Reranker.
    pub reranker: recmesh_reranker::Config,
    /// Experiments.
    pub experiments: recmesh_experiments::Config,
    /// Features.
    pub features: recmesh_features::Config,
    /// How the services share the process's threads (the gateway too).
    pub threads: Threads,
}

impl StageConfigs {
    /// Validates every config, so a bad one stops `up` before anything starts.
    pub fn validate(&self) -> Result<(), recmesh_server::ConfigError> {
        use recmesh_server::ServiceConfig;
        self.retrieval.validate()?;
        self.ranking.validate()?;
        self.reranker.validate()?;
        self.experiments.validate()?;
        self.features.validate()
    }
}

/// Starts the five stage services over `data`, after validating every config.
pub async fn start_stages(
    data: &Arc<Dataset>,
    ports: PortPlan,
    configs: StageConfigs,
) -> Result<Stages, UpError> {
    configs.validate()?;
    let StageConfigs {
        mut retrieval,
        mut ranking,
        mut reranker,
        mut experiments,
        mut features,
        threads,
    } = configs;
    let mut runtimes = Vec::new();
    ports.place(5, &mut features.server);
    let features = {
        let data = Arc::clone(data);
        let workers = features.server.worker_threads;
        threads
            .start("features", workers, &mut runtimes, async move {
                Ok(recmesh_features::server(features, &data)
                    .await
                    .map_err(UpError::Features)?
                    .start()
                    .await?)
            })
            .await?
    };
    ports.place(1, &mut retrieval.server);
    retrieval.features_addr = features.grpc_uri();
    // From `bundle_dir` when set, else built from `data`; off the runtime's
    // workers (file reads, a shard copy, or a Qdrant upload that blocks on
    // the runtime).
    let retrieval = {
        let data = Arc::clone(data);
        let workers = retrieval.server.worker_threads;
        threads
            .start("retrieval", workers, &mut runtimes, async move {
                let service = tokio::task::spawn_blocking(move || {
                    recmesh_retrieval::service(retrieval, || Ok(Dataset::clone(&data)))
                })
                .await
                .map_err(|e| UpError::Retrieval(anyhow::anyhow!("loading the index: {e}")))?
                .map_err(UpError::Retrieval)?;
                Ok(recmesh_retrieval::server_for(service).start().await?)
            })
            .await?
    };
    ports.place(2, &mut ranking.server);
    ranking.features_addr = features.grpc_uri();
    let workers = ranking.server.worker_threads;
    let ranking = threads
        .start("ranking", workers, &mut runtimes, async move {
            Ok(recmesh_ranking::server(ranking)?.start().await?)
        })
        .await?;
    ports.place(3, &mut reranker.server);
    let workers = reranker.server.worker_threads;
    let reranker = threads
        .start("reranker", workers, &mut runtimes, async move {
            Ok(recmesh_reranker::server(reranker).start().await?)
        })
        .await?;
    ports.place(4, &mut experiments.server);
    experiments.features_addr = features.grpc_uri();
    let workers = experiments.server.worker_threads;
    let experiments = threads
        .start("experiments", workers, &mut runtimes, async move {
            Ok(recmesh_experiments::server(experiments)
                .await?
                .start()
                .await?)
        })
        .await?;
    Ok(Stages {
        retrieval,
        ranking,
        reranker,
        experiments,
        features,
        runtimes,
    })
}

/// A running mesh.
#[derive(Debug)]
pub struct Mesh {
    /// The gateway.
    pub gateway: ServerHandle,
    /// The stages behind it.
    pub stages: Stages,
    /// The data every service was started with.
    pub data: Arc<Dataset>,
}

impl Mesh {
    /// The gateway's gRPC address.
    pub fn gateway_addr(&self) -> SocketAddr {
        self.gateway.grpc_addr
    }

    /// Stops the gateway first (so no new work reaches the stages), then the stages.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        self.gateway.shutdown().await?;
        self.stages.shutdown().await
    }
}

/// Starts all six services over `data` with the `stages` configs; `gateway`
/// adjusts the gateway's config (its server address and upstreams are set here).
pub async fn start(
    data: Arc<Dataset>,
    ports: PortPlan,
    stages: StageConfigs,
    gateway: impl FnOnce(&mut recmesh_gateway::Config),
) -> Result<Mesh, UpError> {
    let threads = stages.threads;
    let mut stages = start_stages(&data, ports, stages).await?;
    let mut config = recmesh_gateway::Config {
        server: ports.server(0),
        upstreams: stages.upstreams(),
        ..Default::default()
    };
    gateway(&mut config);
    // Its runtime is stopped with the stages', after the gateway.
    let workers = config.server.worker_threads;
    let gateway = {
        let data = Arc::clone(&data);
        threads
            .start("gateway", workers, &mut stages.runtimes, async move {
                Ok(recmesh_gateway::server(config, &data)?.start().await?)
            })
            .await?
    };
    Ok(Mesh {
        gateway,
        stages,
        data,
    })
}

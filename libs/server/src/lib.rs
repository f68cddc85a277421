//! The one bootstrap every recmesh server runs.
//!
//! [`GrpcServer::serve`] does, in order: bind (done before, by [`Listeners`], so
//! callers learn ephemeral ports), register `grpc.health.v1` and reflection,
//! start the admin HTTP port (`/metrics`, `/healthz`, `/readyz`), serve gRPC
//! through the layer stack of [`layers`], and on shutdown flip health to
//! `NOT_SERVING` before draining in-flight calls for a bounded time.
//!
//! Config loading ([`config`]) and tracing ([`telemetry`]) happen earlier, in
//! each binary's `main`, so a bad config stops the process before it binds.

#![forbid(unsafe_code)]

pub mod config;
pub mod consul;
pub mod lag;
pub mod layers;
pub mod telemetry;
pub mod thp;

/// mimalloc for every binary built on this crate: under load the mesh is
/// allocation-heavy (protobuf messages per hop), and glibc malloc spent about
/// a quarter of its CPU (docs/performance.md, "Allocator").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic_health::ServingStatus;
use tower::ServiceBuilder;

pub use config::{ConfigError, ServerConfig, ServiceConfig};

/// HTTP/2 stream window. A few hundred candidates are 50–100 KB on the wire,
/// more than h2's 64 KiB default, which would cost a WINDOW_UPDATE round trip
/// in the middle of the message (measured: docs/performance.md).
pub const HTTP2_STREAM_WINDOW: u32 = 1 << 20;

/// Streams a client may reset before this server accepted them, per
/// connection, before h2 closes the connection (its guard against "rapid
/// reset" floods; h2's default is 20). Inside the mesh the callers cancel
/// at their deadlines: when a stage stalls for a moment (a slow fsync, a
/// busy core), the gateway cancels dozens of calls at once, and at 20 the
/// stage closed the connection (`recv_reset; remotely-reset pending-accept
/// streams reached limit (20)`), failing every other call in flight on it
/// (`Track`s included) and making the gateway reconnect (docs/faults.md,
/// run 12). Still bounded, so a flood still closes the connection.
pub const HTTP2_MAX_PENDING_ACCEPT_RESETS: usize = 1_000;
/// HTTP/2 connection window: room for several large messages in flight.
pub const HTTP2_CONNECTION_WINDOW: u32 = 4 << 20;

/// Why a server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A listen address was taken or not ours to bind.
    #[error("cannot listen on {addr} (config key `{key}`): {source}")]
    Bind {
        /// Config key holding the address.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The gRPC transport failed.
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection descriptor set did not decode (a build problem).
    #[error("reflection setup failed: {0}")]
    Reflection(String),
    /// The server task panicked or was aborted.
    #[error("server task ended abnormally: {0}")]
    Task(String),
}

/// The two sockets of a server, bound before serving so that port 0 resolves
/// to a real port the caller can print or hand to clients.
#[derive(Debug)]
pub struct Listeners {
    grpc: TcpListener,
    admin: TcpListener,
}

impl Listeners {
    /// Binds the gRPC and admin addresses of `config`.
    pub async fn bind(config: &ServerConfig) -> Result<Self, ServeError> {
        let grpc = TcpListener::bind(config.grpc_addr)
            .await
            .map_err(|source| ServeError::Bind {
                key: "server.grpc_addr",
                addr: config.grpc_addr,
                source,
            })?;
        let admin = TcpListener::bind(config.admin_addr)
            .await
            .map_err(|source| ServeError::Bind {
                key: "server.admin_addr",
                addr: config.admin_addr,
                source,
            })?;
        Ok(Listeners { grpc, admin })
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The bound admin HTTP address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}

/// A gRPC server under construction: its services plus the shared bootstrap.
pub struct GrpcServer {
    name: &'static str,
    config: ServerConfig,
    routes: RoutesBuilder,
    service_names: Vec<&'static str>,
    on_drain: Vec<Box<dyn FnOnce() + Send>>,
}

impl GrpcServer {
    /// A server called `name` (used in logs, metrics and health).
    pub fn new(name: &'static str, config: ServerConfig) -> Self {
        GrpcServer {
            name,
            config,
            routes: RoutesBuilder::default(),
            service_names: Vec::new(),
            on_drain: Vec::new(),
        }
    }

    /// Runs `f` when draining starts (after health turns `NOT_SERVING`):
    /// how a service ends its long-lived streams, which graceful shutdown
    /// would otherwise wait for until the drain timeout.
    pub fn on_drain(mut self, f: impl FnOnce() + Send + 'static) -> Self {
        self.on_drain.push(Box::new(f));
        self
    }

    /// Adds a tonic service; its name is reported by the health service.
    pub fn add_service<S>(mut self, svc: S) -> Self
    where
        S: tower::Service<http::Request<tonic::body::Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.routes.add_service(svc);
        self.service_names.push(S::NAME);
        self
    }

    /// Serves until `shutdown` completes, then drains (see the crate docs).
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        let GrpcServer {
            name,
            config,
            mut routes,
            service_names,
            on_drain,
        } = self;
        let grpc_addr = listeners.grpc_addr();
        let admin_addr = listeners.admin_addr();
        // Install the recorder before the first request, or early samples
        // would go to the no-op recorder and be lost.
        telemetry::prometheus();
        if !config.transparent_huge_pages {
            thp::disable();
        }
        // Stops with the server (any return below).
        let _lag = lag::spawn(name);

        let (health, health_service) = tonic_health::server::health_reporter();
        for svc in &service_names {
            health
                .set_service_status(*svc, ServingStatus::Serving)
                .await;
        }
        health.set_service_status("", ServingStatus::Serving).await;
        routes.add_service(health_service);
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(recmesh_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| ServeError::Reflection(e.to_string()))?;
        routes.add_service(reflection);

        let ready = Arc::new(AtomicBool::new(true));
        let admin = tokio::spawn(serve_admin(listeners.admin, ready.clone()));

        // Layer order and the reason for it: see the `layers` module docs.
        let stack = ServiceBuilder::new()
            .layer(layers::RequestIdLayer::new(name))
            .layer(layers::MetricsLayer::new(name))
            .layer(layers::DeadlineLayer::new(config.request_timeout()))
            .layer(layers::ShedLayer::new(name, config.max_concurrency));

        let (drain_tx, drain_rx) = oneshot::channel::<()>();
        let incoming = tcp_incoming(listeners.grpc);
        let server = tonic::transport::Server::builder()
            .initial_stream_window_size(HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(HTTP2_CONNECTION_WINDOW)
            .http2_max_pending_accept_reset_streams(Some(HTTP2_MAX_PENDING_ACCEPT_RESETS))
            .layer(stack)
            .add_routes(routes.routes())
            .serve_with_incoming_shutdown(incoming, async {
                drain_rx.await.ok();
            });
        tracing::info!(service = name, %grpc_addr, %admin_addr, "serving");
        let registration = consul_registration(name, &config.consul, grpc_addr);
        let registering = registration
            .clone()
            .map(|(consul, r)| tokio::spawn(register(consul, r)));

        tokio::pin!(server);
        let result = tokio::select! {
            result = &mut server => result.map_err(ServeError::from),
            () = shutdown => {
                // Tell load balancers first, then stop accepting and let
                // in-flight calls finish, for at most the drain timeout.
                ready.store(false, Ordering::SeqCst);
                for svc in &service_names {
                    health.set_service_status(*svc, ServingStatus::NotServing).await;
                }
                health.set_service_status("", ServingStatus::NotServing).await;
                // Leave discovery before draining, so clients stop picking
                // this instance while its in-flight calls finish.
                if let Some(task) = registering {
                    task.abort();
                }
                if let Some((consul, r)) = &registration {
                    match consul.deregister(&r.id).await {
                        Ok(()) => tracing::info!(service = name, id = %r.id, "deregistered from consul"),
                        Err(e) => tracing::warn!(service = name, id = %r.id, error = %e,
                            "consul deregistration failed; consul removes the instance once its check fails"),
                    }
                }
                // Keep serving while callers and load balancers notice (the
                // health flip, the readiness probe, Consul): a call sent
                // now still gets its answer rather than a closed connection.
                if config.shutdown_delay_ms > 0 {
                    tracing::info!(service = name, delay_ms = config.shutdown_delay_ms,
                        "not serving; still answering until the shutdown delay ends");
                    if let Ok(result) = tokio::time::timeout(config.shutdown_delay(), &mut server).await {
                        admin.abort();
                        return result.map_err(ServeError::from);
                    }
                }
                tracing::info!(service = name, drain_ms = config.drain_timeout_ms, "draining");
                for f in on_drain {
                    f();
                }
                drain_tx.send(()).ok();
                match tokio::time::timeout(config.drain_timeout(), &mut server).await {
                    Ok(result) => result.map_err(ServeError::from),
                    Err(_) => {
                        tracing::warn!(
                            service = name,
                            "drain timeout reached; closing remaining connections"
                        );
                        Ok(())
                    }
                }
            }
        };
        admin.abort();
        tracing::info!(service = name, "stopped");
        result
    }

    /// Binds the configured addresses and serves in a background task.
    pub async fn start(self) -> Result<ServerHandle, ServeError> {
        let listeners = Listeners::bind(&self.config).await?;
        Ok(self.spawn(listeners))
    }

    /// Binds the configured addresses and serves until `shutdown`, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServeError> {
        let listeners = Listeners::bind(&self.config).await?;
        self.serve(listeners, shutdown).await
    }

    /// Serves on already bound `listeners` in a background task and returns
    /// a handle that stops it.
    pub fn spawn(self, listeners: Listeners) -> ServerHandle {
        let name = self.name;
        let grpc_addr = listeners.grpc_addr();
        let admin_addr = listeners.admin_addr();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(self.serve(listeners, async {
            stop_rx.await.ok();
        }));
        ServerHandle {
            name,
            grpc_addr,
            admin_addr,
            stop: Some(stop_tx),
            task,
        }
    }
}

fn tcp_incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| {
            // Small unary messages: send them now rather than wait for more.
            stream.set_nodelay(true).ok();
            stream
        });
        Some((accepted, listener))
    })
}

/// A server running in a background task.
#[derive(Debug)]
pub struct ServerHandle {
    /// Server name, as in logs and metrics.
    pub name: &'static str,
    /// Bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// Bound admin HTTP address.
    pub admin_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl ServerHandle {
    /// Graceful stop: health to `NOT_SERVING`, drain, close.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            stop.send(()).ok();
        }
        (&mut self.task)
            .await
            .map_err(|e| ServeError::Task(e.to_string()))?
    }

    /// Hard stop, like a crashed process: connections drop mid-call.
    pub fn kill(self) {
        self.task.abort();
    }

    /// Waits for the server to end on its own (e.g. a transport error).
    pub async fn wait(mut self) -> Result<(), ServeError> {
        (&mut self.task)
            .await
            .map_err(|e| ServeError::Task(e.to_string()))?
    }

    /// `http://` URI of the gRPC address, for clients.
    pub fn grpc_uri(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }
}

async fn serve_admin(listener: TcpListener, ready: Arc<AtomicBool>) {
    let app = axum::Router::new()
        .route(
            "/metrics",
            get(|| async {
                (
                    [(http::header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    telemetry::prometheus().render(),
                )
            }),
        )
        // Liveness: the process answers at all.
        .route("/healthz", get(|| async { "ok\n" }))
        // Readiness: false from the moment draining starts.
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::SeqCst);
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                    }
                }
            }),
        );
    if let Err(e) = axum::serve(listener, app).await {
        tracing::warn!(error = %e, "admin server stopped");
    }
}

/// The exit code of a binary's `main`: success, or the error on one line of
/// stderr (with its causes, no backtrace) and failure.
/// Watches for a newer model while a service lives: every `every`, runs
/// `reload` on a blocking thread (loading never holds a runtime worker),
/// logs what happened to `what`, and calls `count` with the outcome
/// (`swapped` or `refused`). `reload` returns the new version when it
/// swapped one in. The watch ends when `alive` has no owner left but the
/// one `reload` holds (the server has stopped).
pub fn spawn_reload_watch<T, E>(
    what: &'static str,
    every: std::time::Duration,
    alive: std::sync::Weak<T>,
    reload: impl Fn() -> Result<Option<String>, E> + Send + Sync + 'static,
    count: impl Fn(&'static str) + Send + 'static,
) where
    T: Send + Sync + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let reload = std::sync::Arc::new(reload);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if alive.strong_count() <= 1 {
                return;
            }
            let attempt = reload.clone();
            match tokio::task::spawn_blocking(move || attempt()).await {
                Ok(Ok(Some(version))) => {
                    count("swapped");
                    tracing::info!(%version, "{what} swapped in");
                }
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    count("refused");
                    tracing::error!(error = %e, "new {what} refused; the current one keeps serving");
                }
                Err(e) => tracing::error!(error = %e, "{what} reload task failed"),
            }
        }
    });
}

pub fn exit_code<E: std::fmt::Display>(result: Result<(), E>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The agent and the registration of this instance, when registration is on.
fn consul_registration(
    name: &str,
    config: &config::ConsulRegistration,
    grpc_addr: SocketAddr,
) -> Option<(consul::Consul, consul::Registration)> {
    if config.agent.is_empty() {
        return None;
    }
    let agent = match consul::Consul::new(&config.agent, &config.token) {
        Ok(agent) => agent,
        Err(e) => {
            tracing::error!(service = name, error = %e, "server.consul.agent: not registering");
            return None;
        }
    };
    let advertise = if !config.advertise.is_empty() {
        config.advertise.clone()
    } else if !grpc_addr.ip().is_unspecified() {
        grpc_addr.to_string()
    } else {
        let host = std::env::var("POD_IP")
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "127.0.0.1".to_owned());
        consul::join_host_port(&host, grpc_addr.port())
    };
    let Some((host, Ok(port))) = advertise
        .rsplit_once(':')
        .map(|(host, port)| (host, port.parse::<u16>()))
    else {
        tracing::error!(service = name, %advertise,
            "server.consul.advertise: not host:port; not registering");
        return None;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let service = if config.service.is_empty() {
        format!("recmesh-{name}")
    } else {
        config.service.clone()
    };
    Some((
        agent,
        consul::Registration {
            id: format!("{service}-{host}-{port}"),
            name: service,
            address: host.to_owned(),
            port,
            check: consul::Check {
                grpc: advertise.clone(),
                grpc_use_tls: false,
                interval: format!("{}s", config.check_interval_s),
                timeout: "2s".to_owned(),
                deregister_critical_service_after: format!("{}s", config.deregister_after_s),
            },
        },
    ))
}

/// Registers until the agent accepts (it may start after us), every 2 s.
async fn register(consul: consul::Consul, r: consul::Registration) {
    loop {
        match consul.register(&r).await {
            Ok(()) => {
                tracing::info!(id = %r.id, service = %r.name, agent = consul.agent(), "registered with consul");
                return;
            }
            Err(e) => {
                tracing::warn!(id = %r.id, error = %e, "consul registration failed; retrying in 2 s");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    }
}

/// The shutdown future [`service_main`] hands to a service's `run`.
pub type Shutdown = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// The whole `main` of a service binary: tracing, the config from the
/// command line (`--config`, `--print-config`, `--help`), the runtime it
/// sizes (`server.worker_threads`), then `run` on it until SIGTERM or
/// SIGINT, and the exit code.
pub fn service_main<C, F, Fut, E>(binary: &str, run: F) -> std::process::ExitCode
where
    C: config::ServiceConfig,
    F: FnOnce(C, Shutdown) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    telemetry::init_tracing();
    let config = match config::from_args::<C>(binary) {
        Ok(Some(config)) => config,
        Ok(None) => return std::process::ExitCode::SUCCESS,
        Err(e) => return exit_code(Err(e)),
    };
    let runtime = match runtime(config.server()) {
        Ok(rt) => rt,
        Err(e) => {
            return exit_code(Err(format!(
                "could not start the runtime ({} worker threads asked by server.worker_threads, 0 = one per CPU): {e}",
                config.server().worker_threads
            )));
        }
    };
    exit_code(runtime.block_on(run(config, Box::pin(shutdown_signal()))))
}

/// A service's runtime: multi-threaded, with `server.worker_threads`
/// workers; when 0, `TOKIO_WORKER_THREADS` or one per CPU the process may
/// use. A `TOKIO_WORKER_THREADS` that is not a count is an error naming it
/// (tokio itself would panic on it).
pub fn runtime(server: &ServerConfig) -> std::io::Result<tokio::runtime::Runtime> {
    let workers = match server.worker_threads {
        0 => worker_threads_from_env(std::env::var_os("TOKIO_WORKER_THREADS").as_deref())?,
        n => Some(n),
    };
    runtime_with(workers, None)
}

/// A multi-threaded runtime with `workers` workers (`None`: one per CPU),
/// its threads named `name` when given (`recmesh up` runs each service on
/// one of these, so a profile tells them apart).
pub fn runtime_with(
    workers: Option<usize>,
    name: Option<&str>,
) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = workers {
        builder.worker_threads(n);
    }
    if let Some(name) = name {
        builder.thread_name(name);
    }
    builder.build()
}

/// `TOKIO_WORKER_THREADS`, read: `None` when unset.
fn worker_threads_from_env(var: Option<&std::ffi::OsStr>) -> std::io::Result<Option<usize>> {
    let Some(var) = var else { return Ok(None) };
    match var.to_str().and_then(|s| s.trim().parse::<usize>().ok()) {
        Some(n) if (1..=config::MAX_WORKER_THREADS).contains(&n) => Ok(Some(n)),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "TOKIO_WORKER_THREADS={var:?} is not a thread count from 1 to {}; unset it or set server.worker_threads",
                config::MAX_WORKER_THREADS
            ),
        )),
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C): the signal a binary passes to
/// `run` as its shutdown future.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        tokio::signal::ctrl_c().await.ok();
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = term => tracing::info!("SIGTERM received, shutting down"),
    }
}

/// How long a service's start waits for a Redis that is still loading its
/// dataset (it answers `LOADING` until the whole file is read back).
pub const REDIS_LOADING_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Runs `connect` until it succeeds, fails with anything but Redis's
/// `LOADING` reply, or `wait` has passed. A Redis restarted with a large
/// dataset refuses commands with `LOADING` for a while: a service started
/// beside it (a pod restart, the fault suite's Redis restart) waits for it
/// instead of exiting. Every other error returns at once, so a wrong address
/// still fails the start with its own message.
pub async fn wait_while_redis_loads<T, E, F, Fut>(
    url: &str,
    wait: std::time::Duration,
    mut connect: F,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let started = tokio::time::Instant::now();
    let mut logged = false;
    loop {
        match connect().await {
            // Redis's reply, whatever the caller's error puts around it (so a
            // host name containing "LOADING" does not match).
            Err(e)
                if e.to_string().contains("LOADING Redis is loading")
                    && started.elapsed() < wait =>
            {
                if !logged {
                    tracing::warn!(
                        url,
                        wait_s = wait.as_secs(),
                        "Redis is loading its dataset; waiting for it before serving"
                    );
                    logged = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            done => return done,
        }
    }
}

#[cfg(test)]
mod redis_loading_tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_loading_redis_is_waited_for_and_other_errors_are_not() {
        let mut calls = 0;
        let r: Result<u32, String> =
            wait_while_redis_loads("redis://x", Duration::from_secs(10), || {
                calls += 1;
                let n = calls;
                async move {
                    if n < 3 {
                        Err("LOADING Redis is loading the dataset in memory".to_owned())
                    } else {
                        Ok(n)
                    }
                }
            })
            .await;
        assert_eq!(r, Ok(3));

        let mut calls = 0;
        let r: Result<u32, String> =
            wait_while_redis_loads("redis://x", Duration::from_secs(10), || {
                calls += 1;
                async { Err("Connection refused".to_owned()) }
            })
            .await;
        assert_eq!((r, calls), (Err("Connection refused".to_owned()), 1));

        // A host name that happens to contain LOADING is not a loading Redis.
        let mut calls = 0;
        let r: Result<u32, String> =
            wait_while_redis_loads("redis://LOADING-1", Duration::from_secs(10), || {
                calls += 1;
                async { Err("redis://LOADING-1: Connection refused".to_owned()) }
            })
            .await;
        assert_eq!(calls, 1, "{r:?}");

        // Still loading after the wait: the last error is returned.
        let mut calls = 0;
        let still = "redis://x: LOADING Redis is loading the dataset in memory";
        let r: Result<u32, String> =
            wait_while_redis_loads("redis://x", Duration::from_millis(300), || {
                calls += 1;
                async { Err(still.to_owned()) }
            })
            .await;
        assert_eq!(r, Err(still.to_owned()));
        assert!(calls > 1, "it waited before giving up: {calls} calls");
    }
}

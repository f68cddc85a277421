//! Layered configuration: defaults → TOML file → `RECMESH_*` environment.
//!
//! Every service describes its config as one serde struct with a `Default`;
//! [`load`] merges the layers with figment and then runs the service's own
//! [`ServiceConfig::validate`], so a bad value stops the process at start with
//! an error that names the key, never later in a request.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Prefix of every environment variable recmesh reads; nested keys are joined
/// with `__`, e.g. `RECMESH_SERVER__GRPC_ADDR=0.0.0.0:50051`.
pub const ENV_PREFIX: &str = "RECMESH_";

/// A configuration error, always naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file, an environment variable or a value did not parse.
    #[error("configuration could not be read: {0}")]
    Parse(String),
    /// A value parsed but is out of range or inconsistent.
    #[error("invalid configuration: `{key}` {reason}")]
    Invalid {
        /// Dotted path of the key, e.g. `budgets.retrieval_ms`.
        key: String,
        /// What is wrong and what would be accepted.
        reason: String,
    },
}

impl ConfigError {
    /// Shorthand for [`ConfigError::Invalid`].
    pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

impl From<figment::Error> for ConfigError {
    fn from(e: figment::Error) -> Self {
        // figment's messages already name the key ("for key `server.grpc_addr`")
        // and the source (file path or environment variable); keep them whole.
        // Its profile name ("default.") before every key would only confuse.
        let msgs: Vec<String> = e
            .into_iter()
            .map(|e| e.to_string().replace("for key \"default.", "for key \""))
            .collect();
        ConfigError::Parse(msgs.join("; "))
    }
}

/// What every service's config provides to the shared bootstrap.
pub trait ServiceConfig: Serialize + DeserializeOwned + Default {
    /// The gRPC and admin server settings.
    fn server(&self) -> &ServerConfig;
    /// Checks the values the type system cannot; the error names the key.
    fn validate(&self) -> Result<(), ConfigError>;
}

/// Loads `T` from its defaults, then `file` (when given), then `RECMESH_*`
/// environment variables, and validates the result.
pub fn load<T: ServiceConfig>(file: Option<&Path>) -> Result<T, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError::Parse(format!(
                "config file {} does not exist",
                path.display()
            )));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment.merge(Env::prefixed(ENV_PREFIX).split("__").ignore(ENV_NOT_CONFIG));
    finish(figment)
}

/// `RECMESH_*` variables that are not config keys.
const ENV_NOT_CONFIG: &[&str] = &["log", "log_format", "config"];

fn finish<T: ServiceConfig>(figment: Figment) -> Result<T, ConfigError> {
    let config: T = figment.extract()?;
    config.server().validate()?;
    config.validate()?;
    Ok(config)
}

/// Loads `T` from its defaults and the `RECMESH_*` variables among `vars`
/// (name, value), read exactly as the process environment would be; for
/// checking deployment manifests against what a binary accepts.
pub fn load_with_env<T: ServiceConfig>(vars: &[(String, String)]) -> Result<T, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(T::default()));
    for (name, value) in vars {
        let Some(key) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        if ENV_NOT_CONFIG.contains(&key.as_str()) {
            continue;
        }
        let value: figment::value::Value = value.parse().unwrap_or_else(|e| match e {});
        figment = figment.merge(Serialized::default(&key.replace("__", "."), value));
    }
    finish(figment)
}

/// Reads a service binary's command line: `--config FILE` (or `RECMESH_CONFIG`),
/// `--print-config` (print the effective config as TOML and exit) and `--help`.
/// Returns `None` when the process should exit without serving.
pub fn from_args<T: ServiceConfig>(binary: &str) -> Result<Option<T>, ConfigError> {
    let mut args = std::env::args().skip(1);
    let mut file = std::env::var_os("RECMESH_CONFIG").map(std::path::PathBuf::from);
    let mut print = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => {
                file = Some(
                    args.next()
                        .map(Into::into)
                        .ok_or_else(|| ConfigError::invalid("--config", "needs a file path"))?,
                );
            }
            "--print-config" => print = true,
            "--help" | "-h" => {
                println!(
                    "{binary}: a recmesh service\n\n\
                     usage: {binary} [--config FILE] [--print-config]\n\n\
                     Config layers: built-in defaults, then FILE (TOML; also RECMESH_CONFIG),\n\
                     then RECMESH_* environment variables with `__` between nested keys,\n\
                     e.g. RECMESH_SERVER__GRPC_ADDR=0.0.0.0:50051. Logs: RECMESH_LOG (filter),\n\
                     RECMESH_LOG_FORMAT=json. --print-config shows every key and its value."
                );
                return Ok(None);
            }
            other => {
                return Err(ConfigError::invalid(other, "is not an option (try --help)"));
            }
        }
    }
    let config: T = load(file.as_deref())?;
    if print {
        let text =
            toml::to_string_pretty(&config).map_err(|e| ConfigError::Parse(e.to_string()))?;
        println!("{text}");
        return Ok(None);
    }
    Ok(Some(config))
}

/// Most worker threads a service's runtime may be given.
pub const MAX_WORKER_THREADS: usize = 1_024;

/// Settings of the gRPC server and its admin HTTP port, shared by every service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the gRPC server listens on; port 0 picks a free port.
    pub grpc_addr: SocketAddr,
    /// Address of the admin HTTP server (`/metrics`, `/healthz`, `/readyz`);
    /// port 0 picks a free port.
    pub admin_addr: SocketAddr,
    /// Longest a request may run when the client sends no `grpc-timeout`; a
    /// client's shorter `grpc-timeout` always wins.
    pub request_timeout_ms: u64,
    /// In-flight requests above which new ones are refused at once with
    /// `RESOURCE_EXHAUSTED` instead of queueing behind a backlog they would
    /// only make later.
    pub max_concurrency: usize,
    /// How long in-flight calls may take to finish after SIGTERM before the
    /// server closes their connections anyway.
    pub drain_timeout_ms: u64,
    /// After SIGTERM, how long the server keeps accepting and answering
    /// calls with health already `NOT_SERVING` (and deregistered from
    /// Consul) before it closes connections and drains: time for load
    /// balancers and clients to stop sending to it. 0 (the default) drains
    /// at once; in Kubernetes set it to a few seconds, below
    /// `terminationGracePeriodSeconds` minus the drain timeout.
    pub shutdown_delay_ms: u64,
    /// Let the kernel back this process's memory with transparent huge
    /// pages. Off by default: compacting and collapsing memory for them
    /// stalls a core for milliseconds, past stage budgets of a few (see
    /// the `thp` module).
    pub transparent_huge_pages: bool,
    /// Worker threads of the service's runtime. 0 (the default): tokio's
    /// choice, one per CPU this process may use (a cgroup CPU limit counts,
    /// so a pod limited to one CPU gets one), or `TOKIO_WORKER_THREADS` when
    /// set. Services sharing a machine each sized to their share of its
    /// cores spend less CPU per call: a call's frames then go out and come
    /// back on the thread that made it instead of waking a second one.
    /// `recmesh up` runs each of its six services on a runtime of its own,
    /// with one worker per six CPUs (at least one).
    pub worker_threads: usize,
    /// Registration with a Consul agent (off unless `agent` is set).
    pub consul: ConsulRegistration,
}

/// Registration of this instance with a Consul agent: registered with a
/// gRPC health check once serving, deregistered when draining starts (a
/// process killed with -9 is removed by Consul after `deregister_after_s`
/// of failing checks).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConsulRegistration {
    /// Agent address, `http://host:port`; empty: do not register.
    pub agent: String,
    /// Service name to register under; empty: `recmesh-<service>`, e.g.
    /// `recmesh-retrieval` (what the gateway's `consul://` upstreams name).
    pub service: String,
    /// `host:port` peers and the health check dial; empty: `server.grpc_addr`,
    /// or when that listens on every interface, `$POD_IP` (else
    /// `$HOSTNAME`) with its port.
    pub advertise: String,
    /// ACL token (`X-Consul-Token`); empty: none.
    pub token: String,
    /// Interval of the gRPC health check, seconds.
    pub check_interval_s: u64,
    /// Consul deregisters an instance whose check has failed this long, seconds.
    pub deregister_after_s: u64,
}

impl Default for ConsulRegistration {
    fn default() -> Self {
        ConsulRegistration {
            agent: String::new(),
            service: String::new(),
            advertise: String::new(),
            token: String::new(),
            check_interval_s: 5,
            deregister_after_s: 60,
        }
    }
}

impl ConsulRegistration {
    /// Checks the settings (nothing to check when off).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.agent.is_empty() {
            return Ok(());
        }
        crate::consul::Consul::new(&self.agent, &self.token)
            .map_err(|e| ConfigError::invalid("server.consul.agent", e.to_string()))?;
        let port_ok = |a: &str| {
            a.rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        };
        if !self.advertise.is_empty() && !port_ok(&self.advertise) {
            return Err(ConfigError::invalid(
                "server.consul.advertise",
                format!("`{}` must be host:port", self.advertise),
            ));
        }
        if self.check_interval_s == 0 {
            return Err(ConfigError::invalid(
                "server.consul.check_interval_s",
                "must be at least 1",
            ));
        }
        if self.deregister_after_s < 60 {
            // Consul's own minimum for DeregisterCriticalServiceAfter.
            return Err(ConfigError::invalid(
                "server.consul.deregister_after_s",
                "must be at least 60 (Consul's minimum)",
            ));
        }
        Ok(())
    }
}

impl ServerConfig {
    /// Defaults for a service whose gRPC port is `grpc_port`; its admin port
    /// is `grpc_port + 1000` so the two never collide in a default layout
    /// (port 0: both ephemeral).
    pub fn on_port(grpc_port: u16) -> Self {
        let admin_port = if grpc_port == 0 {
            0
        } else {
            grpc_port.saturating_add(1000)
        };
        ServerConfig {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], grpc_port)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            ..ServerConfig::default()
        }
    }

    /// An in-process layout on ephemeral loopback ports (tests, `recmesh up`).
    pub fn ephemeral() -> Self {
        ServerConfig::on_port(0)
    }

    /// [`ServerConfig::request_timeout_ms`] as a `Duration`.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// [`ServerConfig::shutdown_delay_ms`] as a `Duration`.
    pub fn shutdown_delay(&self) -> Duration {
        Duration::from_millis(self.shutdown_delay_ms)
    }

    /// [`ServerConfig::drain_timeout_ms`] as a `Duration`.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.request_timeout_ms == 0 {
            return Err(ConfigError::invalid(
                "server.request_timeout_ms",
                "must be at least 1",
            ));
        }
        if self.max_concurrency == 0 {
            return Err(ConfigError::invalid(
                "server.max_concurrency",
                "must be at least 1 (it is the number of requests served at once)",
            ));
        }
        if self.worker_threads > MAX_WORKER_THREADS {
            return Err(ConfigError::invalid(
                "server.worker_threads",
                format!(
                    "{} is more than {MAX_WORKER_THREADS}; set it to the CPUs the service may use, or 0 for one per CPU",
                    self.worker_threads
                ),
            ));
        }
        if self.grpc_addr.port() != 0 && self.grpc_addr == self.admin_addr {
            return Err(ConfigError::invalid(
                "server.admin_addr",
                format!("must differ from server.grpc_addr ({})", self.grpc_addr),
            ));
        }
        self.consul.validate()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            // Far above any stage budget: it only bounds calls from clients
            // that send no deadline at all.
            request_timeout_ms: 1_000,
            // About what two cores serve at a few ms per call before queueing
            // would push latency past the 200 ms SLO.
            max_concurrency: 1_024,
            drain_timeout_ms: 5_000,
            shutdown_delay_ms: 0,
            transparent_huge_pages: false,
            worker_threads: 0,
            consul: ConsulRegistration::default(),
        }
    }
}

/// Checks that every `(key, value)` is at least 1: sizes and counts of zero
/// would make a service refuse everything.
pub fn at_least_one(values: &[(&str, u64)]) -> Result<(), ConfigError> {
    match values.iter().find(|(_, v)| *v == 0) {
        Some((key, _)) => Err(ConfigError::invalid(*key, "must be at least 1")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Probe {
        server: ServerConfig,
        limit: u32,
    }

    impl ServiceConfig for Probe {
        fn server(&self) -> &ServerConfig {
            &self.server
        }
        fn validate(&self) -> Result<(), ConfigError> {
            Ok(())
        }
    }

    #[test]
    fn env_pairs_load_like_the_environment() {
        let vars = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let c: Probe = load_with_env(&vars(&[
            ("RECMESH_LIMIT", "9"),
            ("RECMESH_SERVER__MAX_CONCURRENCY", "12"),
            ("RECMESH_LOG_FORMAT", "json"),
            ("PATH", "/bin"),
        ]))
        .expect("valid");
        assert_eq!((c.limit, c.server.max_concurrency), (9, 12));
        let err = load_with_env::<Probe>(&vars(&[("RECMESH_LIMMIT", "9")])).expect_err("typo");
        assert!(err.to_string().contains("limmit"), "{err}");
    }

    #[test]
    fn worker_threads_size_the_runtime_and_out_of_range_is_refused_by_name() {
        let vars = |v: &str| vec![("RECMESH_SERVER__WORKER_THREADS".to_string(), v.to_string())];
        for n in [1, 3] {
            let c: Probe = load_with_env(&vars(&n.to_string())).expect("valid");
            let rt = crate::runtime(&c.server).expect("runtime starts");
            assert_eq!(rt.metrics().num_workers(), n);
        }
        // 0: tokio's own choice, at least one worker.
        let c: Probe = load_with_env(&vars("0")).expect("valid");
        assert!(
            crate::runtime(&c.server)
                .expect("runtime")
                .metrics()
                .num_workers()
                >= 1
        );
        let err = load_with_env::<Probe>(&vars("100000")).expect_err("too many");
        assert!(err.to_string().contains("server.worker_threads"), "{err}");
        let err = load_with_env::<Probe>(&vars("-1")).expect_err("negative");
        assert!(err.to_string().contains("worker_threads"), "{err}");
        // With 0, tokio's own variable is read; one that is not a count is an
        // error naming it, not tokio's panic.
        let env = |v: &str| crate::worker_threads_from_env(Some(std::ffi::OsStr::new(v)));
        assert_eq!(env("2").expect("a count"), Some(2));
        assert_eq!(crate::worker_threads_from_env(None).expect("unset"), None);
        for bad in ["0", "two", "-3", ""] {
            let err = env(bad).expect_err(bad);
            assert!(err.to_string().contains("TOKIO_WORKER_THREADS"), "{err}");
        }
    }

    #[test]
    fn defaults_load_and_validate() {
        let c: Probe = load(None).expect("defaults are valid");
        assert_eq!(c.server, ServerConfig::default());
    }

    #[test]
    fn file_overrides_defaults_and_names_bad_keys() {
        let dir = std::env::temp_dir().join(format!("recmesh-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let good = dir.join("good.toml");
        std::fs::write(&good, "limit = 7\n[server]\nmax_concurrency = 3\n").expect("write");
        let c: Probe = load(Some(&good)).expect("file loads");
        assert_eq!((c.limit, c.server.max_concurrency), (7, 3));

        let bad = dir.join("bad.toml");
        std::fs::write(&bad, "[server]\nmax_concurrency = \"many\"\n").expect("write");
        let err = load::<Probe>(Some(&bad)).expect_err("string is not a number");
        assert!(err.to_string().contains("server.max_concurrency"), "{err}");

        let zero = dir.join("zero.toml");
        std::fs::write(&zero, "[server]\nmax_concurrency = 0\n").expect("write");
        let err = load::<Probe>(Some(&zero)).expect_err("zero is refused");
        assert!(err.to_string().contains("server.max_concurrency"), "{err}");

        let unknown = dir.join("unknown.toml");
        std::fs::write(&unknown, "[server]\nmax_concurency = 5\n").expect("write");
        let err = load::<Probe>(Some(&unknown)).expect_err("typo is refused");
        assert!(err.to_string().contains("max_concurency"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn ephemeral_means_both_ports_ephemeral() {
        let c = ServerConfig::ephemeral();
        assert_eq!((c.grpc_addr.port(), c.admin_addr.port()), (0, 0));
        let c = ServerConfig::on_port(50051);
        assert_eq!((c.grpc_addr.port(), c.admin_addr.port()), (50051, 51051));
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = load::<Probe>(Some(Path::new("/nonexistent/recmesh.toml"))).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/recmesh.toml"));
    }
}

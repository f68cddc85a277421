//! Tracing and the process-wide Prometheus recorder.
//!
//! Logs go to stderr, human-readable by default and JSON with
//! `RECMESH_LOG_FORMAT=json` (what log shippers want); the filter comes from
//! `RECMESH_LOG` in `tracing_subscriber::EnvFilter` syntax (default `info`).

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tracing_subscriber::EnvFilter;

/// Installs the tracing subscriber once; later calls are no-ops, so tests and
/// the all-in-one `recmesh up` can call it freely.
pub fn init_tracing() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = EnvFilter::try_from_env("RECMESH_LOG")
            .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,hyper=warn,tower=warn"));
        let json =
            std::env::var("RECMESH_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        // A second subscriber (e.g. a test harness that set its own) is fine.
        let _ = if json {
            builder.json().try_init()
        } else {
            builder.try_init()
        };
    });
}

/// Latency buckets in seconds: fine-grained below the stage budgets
/// (5–50 ms) and up to the 200 ms SLO and beyond, so p99 can be read off.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.5, 1.0, 2.5,
];

/// The process-wide Prometheus recorder, installed on first use.
///
/// One recorder per process: in `recmesh up` all services share it and their
/// series are told apart by the `service` label.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        let handle = match builder.install_recorder() {
            Ok(handle) => handle,
            // Another recorder is installed (an embedding application's): keep
            // a private one so /metrics still renders our own registrations.
            Err(_) => PrometheusBuilder::new().build_recorder().handle(),
        };
        // Histograms buffer samples until upkeep runs; without it memory grows
        // when nobody scrapes. Every 5 s bounds that buffer cheaply.
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            })
            .ok();
        handle
    })
}

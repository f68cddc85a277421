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
        describe();
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

/// A metric's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution (latency buckets for `_seconds`).
    Histogram,
}

/// Every metric recmesh exports, with its help text: the one list the
/// `/metrics` HELP lines, the README and the dashboards agree on. A test
/// (`tests/metrics.rs`) checks that every `recmesh_*` name in the code is
/// here, and `promtool check metrics` that the exposition is clean.
pub const METRICS: &[(&str, Kind, &str)] = &[
    (
        "recmesh_grpc_server_requests_total",
        Kind::Counter,
        "gRPC calls handled, by service, rpc and status code",
    ),
    (
        "recmesh_grpc_server_duration_seconds",
        Kind::Histogram,
        "gRPC call latency inside the server, by service, rpc and status code",
    ),
    (
        "recmesh_grpc_server_shed_total",
        Kind::Counter,
        "calls refused at once with RESOURCE_EXHAUSTED by the concurrency limit, by service",
    ),
    (
        "recmesh_gateway_assign_local_total",
        Kind::Counter,
        "Recommend assignments made in the gateway from the rules pushed with the experiment config version, with no Assign call",
    ),
    (
        "recmesh_gateway_assign_cache_total",
        Kind::Counter,
        "Recommend assignments taken from the gateway's assignment cache (hit) or answered by the experiments service (miss; debug requests are not counted)",
    ),
    (
        "recmesh_gateway_stage_duration_seconds",
        Kind::Histogram,
        "latency of each pipeline stage as the gateway saw it, by stage and outcome (ok, timeout, error, skipped)",
    ),
    (
        "recmesh_gateway_fallback_total",
        Kind::Counter,
        "answers where a stage fell back, by stage and fallback",
    ),
    (
        "recmesh_gateway_recommend_total",
        Kind::Counter,
        "Recommend answers, by degraded",
    ),
    (
        "recmesh_gateway_cache_total",
        Kind::Counter,
        "response cache lookups, by result (hit, miss)",
    ),
    (
        "recmesh_gateway_adaptive_total",
        Kind::Counter,
        "Recommends answered with fewer candidates because of load (adaptive degradation)",
    ),
    (
        "recmesh_gateway_popularity_refresh_total",
        Kind::Counter,
        "refreshes of the fallback popularity lists, by outcome",
    ),
    (
        "recmesh_gateway_exposures_total",
        Kind::Counter,
        "exposures sent to the exposure log, by outcome (logged, failed, dropped)",
    ),
    (
        "recmesh_gateway_config_version",
        Kind::Gauge,
        "experiment config version the gateway follows",
    ),
    (
        "recmesh_gateway_config_changes_total",
        Kind::Counter,
        "experiment config changes seen (each drops the response cache)",
    ),
    (
        "recmesh_ranking_features_fallback_total",
        Kind::Counter,
        "rankings without (all) item features, by outcome (timeout, error, skipped; shared: a concurrent request's fetch of them failed or was late)",
    ),
    (
        "recmesh_ranking_scored_total",
        Kind::Counter,
        "candidates lists scored, by model version",
    ),
    (
        "recmesh_gateway_hedges_total",
        Kind::Counter,
        "hedged stage calls (a second call after hedge.retrieval_after_ms), by stage and which answered first",
    ),
    (
        "recmesh_upstream_instances",
        Kind::Gauge,
        "instances of an upstream known to discovery, by upstream (config key)",
    ),
    (
        "recmesh_upstream_ejections_total",
        Kind::Counter,
        "instances ejected from balancing after consecutive failures, by upstream",
    ),
    (
        "recmesh_upstream_discovery_errors_total",
        Kind::Counter,
        "failed DNS resolutions or Consul queries (the last instance set is kept), by upstream",
    ),
    (
        "recmesh_paused_timeouts_total",
        Kind::Counter,
        "bounded calls whose timer fired 2 ms or more past its deadline (this process was not running), by outcome: answered (the answer had come meanwhile) or timed_out",
    ),
    (
        "recmesh_runtime_lag_seconds",
        Kind::Histogram,
        "how late a task that asks to wake every 10 ms was woken, by service: time every task of the process's runtime may have waited too (a worker blocked or busy, the process not scheduled, the machine paused)",
    ),
    (
        "recmesh_self_connects_total",
        Kind::Counter,
        "upstream connections refused because the kernel connected the socket to itself (nothing listened on the port yet); retried like a refused connection",
    ),
    (
        "recmesh_gateway_retries_total",
        Kind::Counter,
        "retries of idempotent stage reads after a transport failure, by stage and final outcome",
    ),
    (
        "recmesh_retrieval_source_total",
        Kind::Counter,
        "retrieval source runs, by source and outcome (ok, late, error, off)",
    ),
    (
        "recmesh_retrieval_source_duration_seconds",
        Kind::Histogram,
        "latency of each retrieval source that ran, by source",
    ),
    (
        "recmesh_retrieval_trending_events_total",
        Kind::Counter,
        "events from the features service's log counted into the trending lists",
    ),
    (
        "recmesh_bundle_info",
        Kind::Gauge,
        "1 for the model bundle version a service serves, 0 for replaced ones",
    ),
    (
        "recmesh_bundle_reload_total",
        Kind::Counter,
        "bundle reloads, by service and outcome (swapped, refused)",
    ),
    (
        "recmesh_ranking_model_info",
        Kind::Gauge,
        "1 for the ranking model version serving, 0 for replaced ones",
    ),
    (
        "recmesh_ranking_model_reload_total",
        Kind::Counter,
        "model file reloads, by outcome (swapped, refused)",
    ),
    (
        "recmesh_ranking_item_cache_total",
        Kind::Counter,
        "item feature cache lookups, by result (hit; stale: used while refreshed; miss: not usable, fetched inline; shared: those misses another request was already fetching, waited for instead)",
    ),
    (
        "recmesh_ranking_item_refresh_total",
        Kind::Counter,
        "background refreshes of stale item features, by outcome (ok, timeout, error, skipped)",
    ),
    (
        "recmesh_ranking_unknown_model_total",
        Kind::Counter,
        "requests naming a model this ranking service does not have (scored by the default)",
    ),
    (
        "recmesh_reranker_removed_total",
        Kind::Counter,
        "candidates removed by the re-ranking rules, by rule",
    ),
    (
        "recmesh_reranker_exploration_total",
        Kind::Counter,
        "exploration picks placed",
    ),
    (
        "recmesh_experiments_config_version",
        Kind::Gauge,
        "version of the experiment set serving",
    ),
    (
        "recmesh_experiments_rejected_total",
        Kind::Counter,
        "experiment changes refused, by reason (invalid, stale)",
    ),
    (
        "recmesh_experiments_guardrail_stops_total",
        Kind::Counter,
        "variants stopped by a guardrail, by experiment and variant",
    ),
    (
        "recmesh_experiments_results_users",
        Kind::Gauge,
        "users whose exposed lists the results consumer keeps for attribution",
    ),
    (
        "recmesh_experiments_results_tracked_users",
        Kind::Gauge,
        "per-user counts the results hold, over every experiment and variant",
    ),
    (
        "recmesh_experiments_srm_flagged",
        Kind::Gauge,
        "1 while a running experiment's users per variant mismatch its weights (chi-square p < 0.001), by experiment",
    ),
    (
        "recmesh_experiments_consul_rejected_total",
        Kind::Counter,
        "Consul KV keys refused (the previous version keeps serving)",
    ),
    (
        "recmesh_features_events_applied_total",
        Kind::Counter,
        "events appended to the event log and applied, by backend",
    ),
    (
        "recmesh_features_dedupe_hits_total",
        Kind::Counter,
        "events whose id was seen before, by backend",
    ),
    (
        "recmesh_features_rejected_total",
        Kind::Counter,
        "Ingest calls refused, by reason (invalid_argument, buffer_full, not_recorded)",
    ),
    (
        "recmesh_features_exposures_logged_total",
        Kind::Counter,
        "exposures appended to the exposure log",
    ),
    (
        "recmesh_features_buffered",
        Kind::Gauge,
        "events waiting in the outage buffer for Redis",
    ),
    (
        "recmesh_features_buffered_total",
        Kind::Counter,
        "events written to the outage buffer while Redis was unreachable",
    ),
    (
        "recmesh_features_buffer_writes_total",
        Kind::Counter,
        "writes (each with one fsync) of the outage buffer; batches staged during a write share the next",
    ),
    (
        "recmesh_features_replayed_total",
        Kind::Counter,
        "buffered events replayed into Redis",
    ),
    (
        "recmesh_features_stale_reads_total",
        Kind::Counter,
        "reads answered from the snapshot or the catalog while Redis was unreachable, by kind",
    ),
    (
        "recmesh_features_l1_total",
        Kind::Counter,
        "L1 cache lookups in front of Redis, by kind and result",
    ),
    (
        "recmesh_features_stream_length",
        Kind::Gauge,
        "entries in the Redis event stream",
    ),
    (
        "recmesh_features_stream_lag",
        Kind::Gauge,
        "entries of the event stream not yet delivered to a consumer group, by group",
    ),
];

/// Registers the help text of every metric with the installed recorder.
fn describe() {
    for &(name, kind, help) in METRICS {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

//! Gateway configuration: upstream addresses, stage budgets, limits, cache
//! and popularity fallback.

use std::time::Duration;

use recmesh_catalog::files::DataSource;
use recmesh_mesh::balance::{BalanceConfig, Source};
use recmesh_server::config::{ConfigError, ServerConfig, ServiceConfig};
use serde::{Deserialize, Serialize};

/// Default gRPC port of the gateway.
pub const DEFAULT_PORT: u16 = 50051;

/// Configuration of the gateway.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC and admin server.
    pub server: ServerConfig,
    /// Where the stages are.
    pub upstreams: Upstreams,
    /// Latency budget of the request and of each stage.
    pub budgets: Budgets,
    /// Request size limits.
    pub limits: Limits,
    /// The L1 response cache.
    pub cache: CacheConfig,
    /// Assign users in the gateway from the rules the experiments service
    /// pushes with each config version (`WatchVersion`), with no `Assign`
    /// call on the request path. The service is still called while the
    /// set has a running sticky experiment (it records first variants),
    /// before the first rules arrive, and for `debug` requests.
    pub assign_locally: bool,
    /// Users' experiment assignments from `Assign`, reused while the
    /// experiment config's version is unchanged.
    pub assign_cache: AssignCacheConfig,
    /// Exposure logging (what each user was shown under which variants).
    pub exposures: ExposureConfig,
    /// Adaptive degradation under load.
    pub adaptive: AdaptiveConfig,
    /// Retries of the idempotent reads (assign, features, retrieval) after
    /// a transport failure (`UNAVAILABLE`, a dropped connection), inside
    /// each stage's budget. Ranking and re-ranking are
    /// not retried: their requests carry every candidate, and their
    /// fallbacks cost nothing.
    pub retry: recmesh_mesh::RetryPolicy,
    /// Hedged retrieval calls.
    pub hedge: HedgeConfig,
    /// Discovery of the upstreams' instances, balancing and ejection.
    pub balance: BalanceConfig,
    /// The popularity lists the gateway answers from when retrieval fails.
    pub popularity: PopularityConfig,
    /// Dataset the popularity lists are seeded from at start, so the gateway
    /// can answer before retrieval has ever been reached.
    pub data: DataSource,
    /// The seen-items policy: which of a user's items are never recommended
    /// back to them (variants override it with `seen.kinds`/`seen.window_s`).
    pub seen: SeenConfig,
}

/// `[seen]`: the seen-items policy when no experiment overrides it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SeenConfig {
    /// Event kinds that make an item seen: `all` (the default), `none`, or a
    /// comma-separated list of `view`, `click`, `add_to_cart`, `purchase`.
    /// Purchases are excluded by their own rule whatever this says.
    pub kinds: String,
    /// Seconds an item stays seen after the user's newest such event on it
    /// (0: forever, the default).
    pub window_s: u64,
}

impl Default for SeenConfig {
    fn default() -> Self {
        SeenConfig {
            kinds: "all".into(),
            window_s: 0,
        }
    }
}

impl SeenConfig {
    /// The policy, or the config error naming the key.
    pub fn policy(&self) -> Result<recmesh_algo::seen::SeenPolicy, ConfigError> {
        use recmesh_algo::seen::SeenPolicy;
        let bad = |e: recmesh_algo::params::ParamError| ConfigError::invalid(e.key, e.reason);
        Ok(SeenPolicy {
            kinds: SeenPolicy::parse_kinds("seen.kinds", &self.kinds).map_err(bad)?,
            window_s: SeenPolicy::parse_window("seen.window_s", &self.window_s.to_string())
                .map_err(bad)?,
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::on_port(DEFAULT_PORT),
            upstreams: Upstreams::default(),
            budgets: Budgets::default(),
            limits: Limits::default(),
            cache: CacheConfig::default(),
            assign_locally: true,
            assign_cache: AssignCacheConfig::default(),
            exposures: ExposureConfig::default(),
            adaptive: AdaptiveConfig::default(),
            retry: recmesh_mesh::RetryPolicy::default(),
            hedge: HedgeConfig::default(),
            balance: BalanceConfig::default(),
            popularity: PopularityConfig::default(),
            data: DataSource::default(),
            seen: SeenConfig::default(),
        }
    }
}

/// Hedging: when retrieval has not answered `retrieval_after_ms` into its
/// call, a second call is sent (to another instance when there is one,
/// see [`BalanceConfig`]) and the first answer wins; the other is
/// cancelled. It trades a little load for the tail of a slow instance.
///
/// Off by default: with one instance per stage a hedge only doubles the
/// work of an overloaded retrieval. Set it near retrieval's p95 when it runs
/// more than one instance.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HedgeConfig {
    /// Delay before the hedge, ms; 0: no hedging.
    pub retrieval_after_ms: u64,
}

/// Addresses of the stage services: `http://host:port` (a comma-separated
/// list for several instances), `dns://host:port` (every address the name
/// resolves to, re-resolved; a Kubernetes headless service) or
/// `consul://service` (the passing instances Consul knows).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Upstreams {
    /// Experiments service.
    pub experiments: String,
    /// Features service.
    pub features: String,
    /// Retrieval service.
    pub retrieval: String,
    /// Ranking service.
    pub ranking: String,
    /// Reranker service.
    pub reranker: String,
}

impl Default for Upstreams {
    fn default() -> Self {
        // The services' default ports on loopback.
        Upstreams {
            retrieval: "http://127.0.0.1:50052".into(),
            ranking: "http://127.0.0.1:50053".into(),
            reranker: "http://127.0.0.1:50054".into(),
            experiments: "http://127.0.0.1:50055".into(),
            features: "http://127.0.0.1:50056".into(),
        }
    }
}

/// Latency budgets in milliseconds. A stage gets the smaller of its budget
/// and what is left of the request's deadline.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Budgets {
    /// The whole `Recommend`, inside the 200 ms p99 SLO with room for the
    /// network and the client.
    pub request_ms: u64,
    /// Experiment assignment (in parallel with user features).
    pub assign_ms: u64,
    /// User features (in parallel with assignment).
    pub features_ms: u64,
    /// Candidate retrieval.
    pub retrieval_ms: u64,
    /// Ranking.
    pub ranking_ms: u64,
    /// Re-ranking.
    pub rerank_ms: u64,
    /// Kept back from the request deadline to build a fallback answer and
    /// send it, so a late stage never makes the whole request late.
    pub reserve_ms: u64,
    /// `Track`: ingesting one event.
    pub track_ms: u64,
}

impl Default for Budgets {
    fn default() -> Self {
        Budgets {
            request_ms: 150,
            assign_ms: 5,
            features_ms: 10,
            retrieval_ms: 40,
            ranking_ms: 50,
            rerank_ms: 20,
            reserve_ms: 5,
            // A write the client waits for; generous, since it is not on the
            // Recommend path.
            track_ms: 200,
        }
    }
}

impl Budgets {
    /// `ms` as a duration.
    pub fn ms(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }
}

/// Request size limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most items one request may ask for.
    pub max_count: u32,
    /// Most excluded item ids one request may carry.
    pub max_exclusions: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_count: 100,
            max_exclusions: 1_000,
        }
    }
}

/// Exposure logging: every `Recommend` answer with experiment assignments is
/// queued and sent to the features service's exposure log in batches, off
/// the request path. A full queue drops (and counts) rather than slow
/// requests down.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExposureConfig {
    /// Log exposures at all.
    pub enabled: bool,
    /// Exposures waiting to be sent at most.
    pub queue: usize,
    /// Exposures per `LogExposures` call at most.
    pub batch: usize,
    /// Longest wait before a partial batch is sent, ms.
    pub flush_ms: u64,
}

impl Default for ExposureConfig {
    fn default() -> Self {
        ExposureConfig {
            enabled: true,
            queue: 10_000,
            batch: 500,
            flush_ms: 100,
        }
    }
}

/// Adaptive degradation: above `soft_inflight` Recommends in flight the
/// gateway asks retrieval for fewer candidates, in proportion
/// (`candidates × soft_inflight / in_flight`, at least `min_candidates`),
/// and skips the category-popularity source; every stage then does less
/// work, before any stage misses its budget and falls back wholesale. The
/// retrieval stage report says so (`detail`), and
/// `recmesh_gateway_adaptive_total` counts it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveConfig {
    /// Degrade at all.
    pub enabled: bool,
    /// Recommends in flight (in this gateway) before it starts.
    pub soft_inflight: usize,
    /// Fewest candidates asked for.
    pub min_candidates: u32,
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig {
            enabled: true,
            // On 2 cores a healthy mesh has a handful in flight; dozens
            // means queues are forming (docs/performance.md).
            soft_inflight: 32,
            min_candidates: 50,
        }
    }
}

/// The L1 response cache.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// How long a response is served from the cache (less up to a fifth,
    /// by user, so users cached together expire apart); 0 disables the cache.
    pub ttl_ms: u64,
    /// Users whose responses are cached at most (least recently used leave first).
    pub max_users: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            // Short enough that trending changes show within a minute; a
            // Track for the user drops their entries at once anyway.
            ttl_ms: 30_000,
            max_users: 100_000,
        }
    }
}

/// The assignment cache: a user's assignments (from the experiments
/// service's `Assign`) reused for later requests, for as long as the
/// experiment config's version the gateway follows is the one they were
/// made under, and at most `ttl_ms` (time-scheduled experiments start and
/// end without a version change). Requests with `debug` skip it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AssignCacheConfig {
    /// How long an assignment is reused (less up to a fifth, by user); 0
    /// disables the cache.
    pub ttl_ms: u64,
    /// Users whose assignments are kept at most.
    pub max_users: u64,
}

impl Default for AssignCacheConfig {
    fn default() -> Self {
        AssignCacheConfig {
            // As long as a cached answer, which carries the same assignments.
            ttl_ms: 30_000,
            max_users: 100_000,
        }
    }
}

/// Popularity fallback lists.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PopularityConfig {
    /// How often the lists are refreshed from retrieval.
    pub refresh_ms: u64,
    /// Items kept in the overall list.
    pub overall: u32,
    /// Items kept per category.
    pub per_category: u32,
    /// Per-category cap the gateway applies itself when the reranker is down.
    pub fallback_category_cap: u32,
}

impl Default for PopularityConfig {
    fn default() -> Self {
        PopularityConfig {
            refresh_ms: 10_000,
            overall: 500,
            per_category: 200,
            fallback_category_cap: 4,
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let u = &self.upstreams;
        for (key, addr) in [
            ("upstreams.experiments", &u.experiments),
            ("upstreams.features", &u.features),
            ("upstreams.retrieval", &u.retrieval),
            ("upstreams.ranking", &u.ranking),
            ("upstreams.reranker", &u.reranker),
        ] {
            Source::parse(key, addr)?;
        }
        self.balance.validate("balance")?;
        self.seen.policy()?;
        if self.hedge.retrieval_after_ms >= self.budgets.retrieval_ms
            && self.hedge.retrieval_after_ms > 0
        {
            return Err(ConfigError::invalid(
                "hedge.retrieval_after_ms",
                format!(
                    "must be below budgets.retrieval_ms ({}), or the hedge is never sent",
                    self.budgets.retrieval_ms
                ),
            ));
        }
        if self.adaptive.enabled {
            recmesh_server::config::at_least_one(&[
                ("adaptive.soft_inflight", self.adaptive.soft_inflight as u64),
                (
                    "adaptive.min_candidates",
                    u64::from(self.adaptive.min_candidates),
                ),
            ])?;
        }
        if self.exposures.enabled {
            recmesh_server::config::at_least_one(&[
                ("exposures.queue", self.exposures.queue as u64),
                ("exposures.batch", self.exposures.batch as u64),
                ("exposures.flush_ms", self.exposures.flush_ms),
            ])?;
        }
        let b = &self.budgets;
        for (key, ms) in [
            ("budgets.request_ms", b.request_ms),
            ("budgets.assign_ms", b.assign_ms),
            ("budgets.features_ms", b.features_ms),
            ("budgets.retrieval_ms", b.retrieval_ms),
            ("budgets.ranking_ms", b.ranking_ms),
            ("budgets.rerank_ms", b.rerank_ms),
            ("budgets.track_ms", b.track_ms),
        ] {
            if ms == 0 {
                return Err(ConfigError::invalid(key, "must be at least 1 ms"));
            }
            if key != "budgets.track_ms" && ms > b.request_ms {
                return Err(ConfigError::invalid(
                    key,
                    format!("must not exceed budgets.request_ms ({})", b.request_ms),
                ));
            }
        }
        if b.reserve_ms >= b.request_ms {
            return Err(ConfigError::invalid(
                "budgets.reserve_ms",
                "must be below budgets.request_ms",
            ));
        }
        if self.limits.max_count == 0 {
            return Err(ConfigError::invalid(
                "limits.max_count",
                "must be at least 1",
            ));
        }
        if self.popularity.refresh_ms == 0 {
            return Err(ConfigError::invalid(
                "popularity.refresh_ms",
                "must be at least 1 ms",
            ));
        }
        if self.popularity.overall < self.limits.max_count {
            return Err(ConfigError::invalid(
                "popularity.overall",
                format!(
                    "must be at least limits.max_count ({}) so a fallback can fill any request",
                    self.limits.max_count
                ),
            ));
        }
        Ok(())
    }
}

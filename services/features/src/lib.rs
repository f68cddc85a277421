//! Features service: online user and item features, and event ingestion.
//!
//! Two backends behind [`FeatureStore`], chosen by `backend`:
//! - `memory` (the embedded default): features in memory, computed from the
//!   dataset at start; events appended to a local file before they are
//!   applied, and replayed from it at the next start;
//! - `redis`: features in Redis through `fred`, the event log a Redis
//!   Stream, a moka L1 in front and a local outage buffer behind
//!   ([`redis`] says how).
//!
//! Either way an `Ingest` is acknowledged only once its events are durable,
//! and events are idempotent by id within the dedupe window.

#![forbid(unsafe_code)]

pub mod log;
pub mod memory;
pub mod redis;
pub mod store;
pub mod testkit;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use recmesh_catalog::Dataset;
use recmesh_catalog::files::DataSource;
use recmesh_mesh::Deadline;
use recmesh_mesh::convert::{FieldError, check_id, event_kind};
use recmesh_proto::v1::{self as pb, features_server::FeaturesServer};
use recmesh_server::GrpcServer;
use recmesh_server::config::{ConfigError, ServerConfig, ServiceConfig, at_least_one};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

pub use store::{FeatureStore, Ingested, LogKind, LogPage, StoreError, ValidEvent};

/// Default gRPC port of the features service.
pub const DEFAULT_PORT: u16 = 50056;

/// Where features and events live.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// In process, with the event log in a local file.
    #[default]
    Memory,
    /// Redis (`[redis]`), with the event log a Redis Stream.
    Redis,
}

/// The embedded event log (`[event_log]`, memory backend).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EventLogConfig {
    /// Append-only event file; empty: events are not logged (lost on restart).
    pub path: PathBuf,
    /// `fdatasync` each batch before acknowledging it. Off trades the last
    /// events before a machine crash for latency.
    pub fsync: bool,
    /// Exposure log (JSON lines), kept with the event file.
    pub exposures_path: PathBuf,
}

impl Default for EventLogConfig {
    fn default() -> Self {
        EventLogConfig {
            path: PathBuf::from("var/events.tsv"),
            fsync: true,
            exposures_path: PathBuf::from("var/exposures.jsonl"),
        }
    }
}

/// Configuration of the features service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC and admin server.
    pub server: ServerConfig,
    /// Dataset the features are computed from at start.
    pub data: DataSource,
    /// `memory` or `redis`.
    pub backend: Backend,
    /// The embedded event log (memory backend).
    pub event_log: EventLogConfig,
    /// The Redis backend.
    pub redis: redis::RedisConfig,
    /// Recent interactions kept per user; older ones drop off.
    pub max_recent_per_user: usize,
    /// Items kept in a user's seen set (`UserFeatures.seen_items`): the
    /// whole history up to this many items; past it the item whose newest
    /// event is oldest drops out, so a heavy user's oldest items can be
    /// recommended again.
    pub max_seen_per_user: usize,
    /// Recent interactions returned by `GetUser` when the request asks for 0.
    pub default_recent: u32,
    /// Half-life of a user's category affinity, hours.
    pub affinity_half_life_hours: f64,
    /// Event ids remembered for deduplication by the memory backend; a
    /// replay older than this many events is applied again. (Redis
    /// remembers ids for `redis.dedupe_ttl_s`.)
    pub dedupe_window: usize,
    /// Most events one `Ingest` call may carry.
    pub max_events_per_call: usize,
    /// Most ids one `GetItems` call may ask for.
    pub max_items_per_call: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::on_port(DEFAULT_PORT),
            data: DataSource::default(),
            backend: Backend::Memory,
            event_log: EventLogConfig::default(),
            redis: redis::RedisConfig::default(),
            // Enough history for CF seeds and category affinity; bounded so a
            // bot hammering one user cannot grow memory.
            max_recent_per_user: 50,
            // 24 bytes an item: 240 KB for a user at the bound.
            max_seen_per_user: 10_000,
            default_recent: 20,
            affinity_half_life_hours: 7.0 * 24.0,
            // About a minute of events at 2k events/s: covers client retries.
            dedupe_window: 100_000,
            max_events_per_call: 1_000,
            max_items_per_call: 2_000,
        }
    }
}

impl Config {
    /// The memory backend's limits.
    pub fn limits(&self) -> memory::Limits {
        memory::Limits {
            max_recent: self.max_recent_per_user,
            max_seen: self.max_seen_per_user,
            dedupe_window: self.dedupe_window,
            half_life_hours: self.affinity_half_life_hours,
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        at_least_one(&[
            ("max_recent_per_user", self.max_recent_per_user as u64),
            ("max_seen_per_user", self.max_seen_per_user as u64),
            ("dedupe_window", self.dedupe_window as u64),
            ("max_events_per_call", self.max_events_per_call as u64),
            ("max_items_per_call", self.max_items_per_call as u64),
            ("redis.pool_size", self.redis.pool_size as u64),
            ("redis.command_timeout_ms", self.redis.command_timeout_ms),
            ("redis.dedupe_ttl_s", self.redis.dedupe_ttl_s),
            ("redis.max_buffered", self.redis.max_buffered as u64),
            ("redis.batch", self.redis.batch as u64),
        ])?;
        let share = self.redis.slow_read_wait_share;
        if !(share > 0.0 && share <= 1.0) {
            return Err(ConfigError::invalid(
                "redis.slow_read_wait_share",
                format!("must be in (0, 1], got {share}"),
            ));
        }
        if !(self.affinity_half_life_hours.is_finite() && self.affinity_half_life_hours >= 1.0) {
            return Err(ConfigError::invalid(
                "affinity_half_life_hours",
                "must be at least 1 hour",
            ));
        }
        if self.backend == Backend::Redis {
            if self.redis.key_prefix.is_empty()
                || self.redis.key_prefix.contains(char::is_whitespace)
            {
                return Err(ConfigError::invalid(
                    "redis.key_prefix",
                    "must be non-empty without spaces",
                ));
            }
            if self.redis.buffer_path.as_os_str().is_empty() {
                return Err(ConfigError::invalid(
                    "redis.buffer_path",
                    "must name a file: events acknowledged during a Redis outage live there",
                ));
            }
        }
        Ok(())
    }
}

/// The one mapping of a refused call to gRPC, counted by reason.
fn reject(e: FieldError) -> Status {
    metrics::counter!("recmesh_features_rejected_total", "reason" => "invalid_argument")
        .increment(1);
    e.into()
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::Unavailable(m) => Status::unavailable(m),
        StoreError::BadCursor(m) => Status::invalid_argument(format!("cursor: {m}")),
        StoreError::NoLog(m) => Status::failed_precondition(m),
        StoreError::NotRecorded(m) => {
            metrics::counter!("recmesh_features_rejected_total", "reason" => "not_recorded")
                .increment(1);
            Status::unavailable(format!("{m}; retry with the same event ids"))
        }
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Earliest accepted event time (2000-01-01): older is a unit mistake
/// (seconds sent as milliseconds).
const MIN_EVENT_MS: i64 = 946_684_800_000;
/// Accepted clock skew of a client's timestamp into the future.
const MAX_SKEW_MS: i64 = 5 * 60 * 1000;

/// Opens the configured backend over `data`.
pub async fn open_store(config: &Config, data: &Dataset) -> anyhow::Result<Arc<dyn FeatureStore>> {
    let limits = config.limits();
    Ok(match config.backend {
        Backend::Memory => {
            let log = (!config.event_log.path.as_os_str().is_empty()).then_some(&config.event_log);
            Arc::new(memory::MemoryStore::open(data, limits, log)?)
        }
        Backend::Redis => {
            redis::RedisStore::open(config.redis.clone(), data, config.limits()).await?
        }
    })
}

/// The gRPC face of the store.
#[derive(Debug, Clone)]
pub struct FeaturesService {
    store: Arc<dyn FeatureStore>,
    config: Arc<Config>,
}

impl FeaturesService {
    /// A service over `store`.
    pub fn new(config: Config, store: Arc<dyn FeatureStore>) -> Self {
        FeaturesService {
            store,
            config: Arc::new(config),
        }
    }

    fn validate(&self, req: &pb::IngestRequest) -> Result<Vec<ValidEvent>, FieldError> {
        if req.events.is_empty() {
            return Err(FieldError::new("events", "must not be empty"));
        }
        if req.events.len() > self.config.max_events_per_call {
            return Err(FieldError::new(
                "events",
                format!(
                    "at most {} events per call",
                    self.config.max_events_per_call
                ),
            ));
        }
        let now = now_ms();
        req.events
            .iter()
            .enumerate()
            .map(|(n, e)| {
                let f = |name: &str| format!("events[{n}].{name}");
                check_id(&f("event_id"), &e.event_id)?;
                check_id(&f("user_id"), &e.user_id)?;
                check_id(&f("item_id"), &e.item_id)?;
                let kind = event_kind(e.event_type).ok_or_else(|| {
                    FieldError::new(f("event_type"), "must be VIEW, CLICK, ADD_TO_CART or PURCHASE")
                })?;
                let ts = if e.timestamp_ms == 0 { now } else { e.timestamp_ms };
                if !(MIN_EVENT_MS..=now + MAX_SKEW_MS).contains(&ts) {
                    return Err(FieldError::new(
                        f("timestamp_ms"),
                        "must be Unix milliseconds between 2000-01-01 and now (+5 min skew), or 0 for now",
                    ));
                }
                Ok(ValidEvent {
                    event_id: e.event_id.clone(),
                    user: e.user_id.clone(),
                    item: e.item_id.clone(),
                    kind,
                    timestamp_ms: ts,
                })
            })
            .collect()
    }
}

#[tonic::async_trait]
impl pb::features_server::Features for FeaturesService {
    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::UserFeatures>, Status> {
        // Leave part of what the caller has left (half by default) for
        // answering from the last read features when the store is slow:
        // the caller's clock started before this one (sending, queueing),
        // and the answer must still travel back and be scheduled there.
        let left =
            Deadline::from_metadata(request.metadata(), self.config.server.request_timeout())
                .remaining();
        let wait = left.mul_f64(self.config.redis.slow_read_wait_share);
        let req = request.into_inner();
        check_id("user_id", &req.user_id).map_err(reject)?;
        let max = if req.max_recent == 0 {
            self.config.default_recent
        } else {
            req.max_recent
        };
        let max = max.min(self.config.max_recent_per_user as u32) as usize;
        let user = self.store.user_within(&req.user_id, max, wait).await;
        Ok(Response::new(user.map_err(store_status)?))
    }

    async fn get_items(
        &self,
        request: Request<pb::GetItemsRequest>,
    ) -> Result<Response<pb::GetItemsResponse>, Status> {
        let req = request.into_inner();
        if req.item_ids.len() > self.config.max_items_per_call {
            return Err(reject(FieldError::new(
                "item_ids",
                format!("at most {} ids per call", self.config.max_items_per_call),
            )));
        }
        let items = self.store.items(&req.item_ids).await;
        Ok(Response::new(items.map_err(store_status)?))
    }

    async fn ingest(
        &self,
        request: Request<pb::IngestRequest>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        // Validate the whole batch before applying any of it: a bad event
        // never leaves half a batch applied.
        let events = self.validate(request.get_ref()).map_err(reject)?;
        let done = self.store.ingest(&events).await.map_err(store_status)?;
        let backend = self.store.backend();
        metrics::counter!("recmesh_features_events_applied_total", "backend" => backend)
            .increment(u64::from(done.applied));
        metrics::counter!("recmesh_features_dedupe_hits_total", "backend" => backend)
            .increment(u64::from(done.duplicates));
        if !done.new_items.is_empty() {
            tracing::info!(items = ?done.new_items, "events on items the catalog does not know yet");
        }
        Ok(Response::new(pb::IngestResponse {
            applied: done.applied,
            duplicates: done.duplicates,
            buffered: done.buffered,
            new_items: done.new_items,
        }))
    }

    async fn log_exposures(
        &self,
        request: Request<pb::LogExposuresRequest>,
    ) -> Result<Response<pb::LogExposuresResponse>, Status> {
        let req = request.into_inner();
        if req.exposures.len() > self.config.max_events_per_call {
            return Err(reject(FieldError::new(
                "exposures",
                format!(
                    "at most {} exposures per call",
                    self.config.max_events_per_call
                ),
            )));
        }
        for (n, e) in req.exposures.iter().enumerate() {
            check_id(&format!("exposures[{n}].user_id"), &e.user_id).map_err(reject)?;
            for (k, a) in e.assignments.iter().enumerate() {
                check_id(
                    &format!("exposures[{n}].assignments[{k}].experiment_id"),
                    &a.experiment_id,
                )
                .map_err(reject)?;
                check_id(
                    &format!("exposures[{n}].assignments[{k}].variant"),
                    &a.variant,
                )
                .map_err(reject)?;
            }
        }
        let logged = self
            .store
            .log_exposures(&req.exposures)
            .await
            .map_err(store_status)?;
        metrics::counter!("recmesh_features_exposures_logged_total").increment(u64::from(logged));
        Ok(Response::new(pb::LogExposuresResponse { logged }))
    }

    async fn read_log(
        &self,
        request: Request<pb::ReadLogRequest>,
    ) -> Result<Response<pb::ReadLogResponse>, Status> {
        let req = request.into_inner();
        let log = match pb::LogName::try_from(req.log) {
            Ok(pb::LogName::Events) => store::LogKind::Events,
            Ok(pb::LogName::Exposures) => store::LogKind::Exposures,
            _ => {
                return Err(reject(FieldError::new(
                    "log",
                    "must be LOG_NAME_EVENTS or LOG_NAME_EXPOSURES",
                )));
            }
        };
        let max = (req.max as usize).clamp(1, MAX_LOG_PAGE);
        let page = self
            .store
            .read_log(log, &req.cursor, max)
            .await
            .map_err(store_status)?;
        Ok(Response::new(pb::ReadLogResponse {
            events: page
                .events
                .into_iter()
                .map(|e| pb::Event {
                    event_id: e.event_id,
                    user_id: e.user,
                    item_id: e.item,
                    event_type: recmesh_mesh::convert::event_type(e.kind) as i32,
                    timestamp_ms: e.timestamp_ms,
                })
                .collect(),
            exposures: page.exposures,
            next_cursor: page.next_cursor,
        }))
    }
}

/// Most entries one `ReadLog` returns.
const MAX_LOG_PAGE: usize = 10_000;

/// The features server over `data`, ready to start or run: opens the
/// configured backend (for Redis: connects and bulk-loads).
pub async fn server(config: Config, data: &Dataset) -> anyhow::Result<GrpcServer> {
    let store = open_store(&config, data).await?;
    tracing::info!(backend = store.backend(), "feature store open");
    Ok(GrpcServer::new("features", config.server.clone())
        .add_service(FeaturesServer::new(FeaturesService::new(config, store))))
}

/// Loads the data, serves until `shutdown`, then drains.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let data = config.data.load()?;
    server(config, &data).await?.run(shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::features_server::Features;

    fn service() -> FeaturesService {
        let data = Dataset {
            items: recmesh_catalog::demo::generate(&recmesh_catalog::demo::DemoSpec {
                items: 20,
                users: 1,
                interactions: 0,
                ..Default::default()
            })
            .items,
            interactions: vec![],
        };
        let config = Config {
            event_log: EventLogConfig {
                path: PathBuf::new(),
                fsync: false,
                exposures_path: PathBuf::new(),
            },
            ..Config::default()
        };
        let store = memory::MemoryStore::open(&data, config.limits(), None).expect("store");
        FeaturesService::new(config, Arc::new(store))
    }

    #[test]
    fn a_wait_share_outside_0_to_1_is_a_config_error_naming_it() {
        for share in [0.0, -0.5, 1.5, f64::NAN] {
            let mut config = Config::default();
            config.redis.slow_read_wait_share = share;
            let e = config.validate().expect_err("refused").to_string();
            assert!(e.contains("redis.slow_read_wait_share"), "{share}: {e}");
        }
        let mut config = Config::default();
        config.redis.slow_read_wait_share = 1.0;
        config.validate().expect("1 is allowed");
    }

    fn event(id: &str, kind: pb::EventType) -> pb::Event {
        pb::Event {
            event_id: id.into(),
            user_id: "u1".into(),
            item_id: "i3".into(),
            event_type: kind as i32,
            timestamp_ms: 0,
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c: Config = recmesh_server::config::load(None).expect("defaults load");
        assert_eq!(c, Config::default());
    }

    #[tokio::test]
    async fn ingest_is_idempotent_and_updates_the_user() {
        let s = service();
        let req = pb::IngestRequest {
            events: vec![
                event("e1", pb::EventType::View),
                event("e2", pb::EventType::Purchase),
            ],
        };
        let r = s
            .ingest(Request::new(req.clone()))
            .await
            .expect("ok")
            .into_inner();
        assert_eq!((r.applied, r.duplicates), (2, 0));
        let r = s.ingest(Request::new(req)).await.expect("ok").into_inner();
        assert_eq!((r.applied, r.duplicates), (0, 2), "replay applies nothing");
        let u = s
            .get_user(Request::new(pb::GetUserRequest {
                user_id: "u1".into(),
                max_recent: 0,
            }))
            .await
            .expect("ok")
            .into_inner();
        assert!(u.known);
        assert_eq!(u.recent.len(), 2);
        assert_eq!(u.purchased_item_ids, vec!["i3".to_string()]);
        let items = s
            .get_items(Request::new(pb::GetItemsRequest {
                item_ids: vec!["i3".into(), "nope".into()],
            }))
            .await
            .expect("ok")
            .into_inner();
        assert_eq!(items.items[0].views, 1);
        assert_eq!(items.items[0].purchases, 1);
        assert_eq!(items.unknown, vec!["nope".to_string()]);
    }

    #[tokio::test]
    async fn a_bad_event_rejects_the_whole_batch_naming_the_field() {
        let s = service();
        let mut bad = event("e2", pb::EventType::Unspecified);
        bad.event_type = 0;
        let err = s
            .ingest(Request::new(pb::IngestRequest {
                events: vec![event("e1", pb::EventType::View), bad],
            }))
            .await
            .expect_err("invalid");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().starts_with("events[1].event_type"),
            "{}",
            err.message()
        );
        let u = s
            .get_user(Request::new(pb::GetUserRequest {
                user_id: "u1".into(),
                max_recent: 0,
            }))
            .await
            .expect("ok")
            .into_inner();
        assert!(!u.known, "nothing of the rejected batch was applied");

        let mut seconds = event("e4", pb::EventType::View);
        seconds.timestamp_ms = 1_700_000_000; // seconds, not ms
        let err = s
            .ingest(Request::new(pb::IngestRequest {
                events: vec![seconds],
            }))
            .await
            .expect_err("unit mistake");
        assert!(
            err.message().starts_with("events[0].timestamp_ms"),
            "{}",
            err.message()
        );
    }
}

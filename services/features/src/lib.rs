//! Features service: online user and item features, and event ingestion.
//!
//! The embedded default keeps everything in memory, loaded from the dataset
//! at start and updated by `Ingest`. Events are idempotent by id within a
//! bounded dedupe window. (Redis, the event log and spill-to-disk belong to
//! the production backend; see the README.)

#![forbid(unsafe_code)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use recmesh_catalog::files::DataSource;
use recmesh_catalog::{Dataset, EventKind, Item};
use recmesh_mesh::convert::{FieldError, attributes, check_id, event_kind, event_type};
use recmesh_proto::v1::{self as pb, features_server::FeaturesServer};
use recmesh_server::GrpcServer;
use recmesh_server::config::{ConfigError, ServerConfig, ServiceConfig, at_least_one};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

/// Default gRPC port of the features service.
pub const DEFAULT_PORT: u16 = 50056;

/// Configuration of the features service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC and admin server.
    pub server: ServerConfig,
    /// Dataset the features are computed from at start.
    pub data: DataSource,
    /// Recent interactions kept per user; older ones drop off.
    pub max_recent_per_user: usize,
    /// Recent interactions returned by `GetUser` when the request asks for 0.
    pub default_recent: u32,
    /// Event ids remembered for deduplication; a replay older than this many
    /// events is applied again.
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
            // Enough history for CF seeds and category affinity; bounded so a
            // bot hammering one user cannot grow memory.
            max_recent_per_user: 50,
            default_recent: 20,
            // About a minute of events at 2k events/s: covers client retries.
            dedupe_window: 100_000,
            max_events_per_call: 1_000,
            max_items_per_call: 2_000,
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
            ("dedupe_window", self.dedupe_window as u64),
            ("max_events_per_call", self.max_events_per_call as u64),
            ("max_items_per_call", self.max_items_per_call as u64),
        ])
    }
}

/// The one mapping of a refused call to gRPC, counted by reason.
fn reject(e: FieldError) -> Status {
    metrics::counter!("recmesh_features_rejected_total", "reason" => "invalid_argument")
        .increment(1);
    e.into()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// An event after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidEvent {
    /// Client-chosen unique id.
    pub event_id: String,
    /// User.
    pub user: String,
    /// Item (known to the catalog).
    pub item: String,
    /// What happened.
    pub kind: EventKind,
    /// When, Unix ms.
    pub timestamp_ms: i64,
}

/// Earliest accepted event time (2000-01-01): older is a unit mistake
/// (seconds sent as milliseconds).
const MIN_EVENT_MS: i64 = 946_684_800_000;
/// Accepted clock skew of a client's timestamp into the future.
const MAX_SKEW_MS: i64 = 5 * 60 * 1000;

#[derive(Debug, Clone)]
struct ItemState {
    item: Item,
    counts: [u64; 4],
    score: f64,
}

#[derive(Debug, Default)]
struct UserState {
    /// Oldest first.
    recent: VecDeque<(String, EventKind, i64)>,
    purchased: HashSet<String>,
    categories: HashMap<String, f64>,
}

/// The in-memory feature store.
#[derive(Debug)]
pub struct Store {
    items: HashMap<String, ItemState>,
    users: HashMap<String, UserState>,
    max_score: f64,
    seen: HashSet<String>,
    seen_order: VecDeque<String>,
    max_recent: usize,
    dedupe_window: usize,
}

fn kind_index(kind: EventKind) -> usize {
    match kind {
        EventKind::View => 0,
        EventKind::Click => 1,
        EventKind::AddToCart => 2,
        EventKind::Purchase => 3,
    }
}

impl Store {
    /// Builds the store from a dataset.
    pub fn new(data: &Dataset, config: &Config) -> Self {
        let mut store = Store {
            items: data
                .items
                .iter()
                .map(|i| {
                    (
                        i.id.clone(),
                        ItemState {
                            item: i.clone(),
                            counts: [0; 4],
                            score: 0.0,
                        },
                    )
                })
                .collect(),
            users: HashMap::new(),
            max_score: 0.0,
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            max_recent: config.max_recent_per_user,
            dedupe_window: config.dedupe_window,
        };
        for e in &data.interactions {
            store.apply(&e.user, &e.item, e.kind, e.timestamp_ms);
        }
        store
    }

    fn apply(&mut self, user: &str, item: &str, kind: EventKind, ts: i64) {
        let Some(state) = self.items.get_mut(item) else {
            return;
        };
        state.counts[kind_index(kind)] += 1;
        state.score += kind.weight();
        self.max_score = self.max_score.max(state.score);
        let category = state.item.category.clone();
        let u = self.users.entry(user.to_owned()).or_default();
        u.recent.push_back((item.to_owned(), kind, ts));
        while u.recent.len() > self.max_recent {
            u.recent.pop_front();
        }
        if kind == EventKind::Purchase {
            u.purchased.insert(item.to_owned());
        }
        *u.categories.entry(category).or_default() += kind.weight();
    }

    /// Applies validated events; returns (applied, duplicates).
    pub fn ingest(&mut self, events: &[ValidEvent]) -> (u32, u32) {
        let (mut applied, mut duplicates) = (0, 0);
        for e in events {
            if self.seen.contains(&e.event_id) {
                duplicates += 1;
                continue;
            }
            self.seen.insert(e.event_id.clone());
            self.seen_order.push_back(e.event_id.clone());
            while self.seen_order.len() > self.dedupe_window {
                if let Some(old) = self.seen_order.pop_front() {
                    self.seen.remove(&old);
                }
            }
            self.apply(&e.user, &e.item, e.kind, e.timestamp_ms);
            applied += 1;
        }
        (applied, duplicates)
    }

    /// True when the catalog has `item`.
    pub fn knows_item(&self, item: &str) -> bool {
        self.items.contains_key(item)
    }

    /// The features of one user (empty and `known = false` for a new user).
    pub fn user(&self, user_id: &str, max_recent: usize) -> pb::UserFeatures {
        let Some(u) = self.users.get(user_id) else {
            return pb::UserFeatures {
                user_id: user_id.to_owned(),
                ..Default::default()
            };
        };
        let mut recent: Vec<&(String, EventKind, i64)> = u.recent.iter().collect();
        // Newest first; events can arrive out of order.
        recent.sort_by_key(|e| std::cmp::Reverse(e.2));
        let mut categories: Vec<(&String, &f64)> = u.categories.iter().collect();
        categories.sort_by(|a, b| b.1.total_cmp(a.1).then(a.0.cmp(b.0)));
        let mut purchased: Vec<String> = u.purchased.iter().cloned().collect();
        purchased.sort();
        pb::UserFeatures {
            user_id: user_id.to_owned(),
            known: true,
            recent: recent
                .into_iter()
                .take(max_recent)
                .map(|(item, kind, ts)| pb::Interaction {
                    item_id: item.clone(),
                    event_type: event_type(*kind) as i32,
                    timestamp_ms: *ts,
                })
                .collect(),
            purchased_item_ids: purchased,
            top_categories: categories
                .into_iter()
                .take(3)
                .map(|(c, _)| c.clone())
                .collect(),
        }
    }

    /// Features of the known items among `ids`, and the unknown ids.
    pub fn items(&self, ids: &[String]) -> pb::GetItemsResponse {
        let mut out = pb::GetItemsResponse::default();
        for id in ids {
            match self.items.get(id) {
                Some(s) => out.items.push(pb::ItemFeatures {
                    item_id: id.clone(),
                    attributes: Some(attributes(&s.item)),
                    views: s.counts[0],
                    clicks: s.counts[1],
                    carts: s.counts[2],
                    purchases: s.counts[3],
                    popularity: if self.max_score > 0.0 {
                        s.score / self.max_score
                    } else {
                        0.0
                    },
                }),
                None => out.unknown.push(id.clone()),
            }
        }
        out
    }
}

/// The gRPC face of the store.
#[derive(Debug, Clone)]
pub struct FeaturesService {
    store: Arc<RwLock<Store>>,
    config: Arc<Config>,
}

impl FeaturesService {
    /// A service over a store built from `data`.
    pub fn new(config: Config, data: &Dataset) -> Self {
        FeaturesService {
            store: Arc::new(RwLock::new(Store::new(data, &config))),
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
        let store = self.store.read().unwrap_or_else(|p| p.into_inner());
        req.events
            .iter()
            .enumerate()
            .map(|(n, e)| {
                let f = |name: &str| format!("events[{n}].{name}");
                check_id(&f("event_id"), &e.event_id)?;
                check_id(&f("user_id"), &e.user_id)?;
                check_id(&f("item_id"), &e.item_id)?;
                if !store.knows_item(&e.item_id) {
                    return Err(FieldError::new(f("item_id"), format!("unknown item `{}`", e.item_id)));
                }
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
        let req = request.into_inner();
        check_id("user_id", &req.user_id).map_err(reject)?;
        let max = if req.max_recent == 0 {
            self.config.default_recent
        } else {
            req.max_recent
        };
        let max = max.min(self.config.max_recent_per_user as u32) as usize;
        let store = self.store.read().unwrap_or_else(|p| p.into_inner());
        Ok(Response::new(store.user(&req.user_id, max)))
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
        let store = self.store.read().unwrap_or_else(|p| p.into_inner());
        Ok(Response::new(store.items(&req.item_ids)))
    }

    async fn ingest(
        &self,
        request: Request<pb::IngestRequest>,
    ) -> Result<Response<pb::IngestResponse>, Status> {
        // Validate the whole batch before applying any of it: a bad event
        // never leaves half a batch applied.
        let events = self.validate(request.get_ref()).map_err(reject)?;
        let (applied, duplicates) = self
            .store
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .ingest(&events);
        metrics::counter!("recmesh_features_events_applied_total").increment(u64::from(applied));
        metrics::counter!("recmesh_features_dedupe_hits_total").increment(u64::from(duplicates));
        Ok(Response::new(pb::IngestResponse {
            applied,
            duplicates,
        }))
    }
}

/// The features server over `data`, ready to start or run.
pub fn server(config: Config, data: &Dataset) -> GrpcServer {
    GrpcServer::new("features", config.server.clone())
        .add_service(FeaturesServer::new(FeaturesService::new(config, data)))
}

/// Loads the data, serves until `shutdown`, then drains.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let data = config.data.load()?;
    server(config, &data).run(shutdown).await?;
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
        FeaturesService::new(Config::default(), &data)
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

        let mut unknown = event("e3", pb::EventType::View);
        unknown.item_id = "i999999".into();
        let err = s
            .ingest(Request::new(pb::IngestRequest {
                events: vec![unknown],
            }))
            .await
            .expect_err("unknown item");
        assert!(
            err.message().starts_with("events[0].item_id"),
            "{}",
            err.message()
        );

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

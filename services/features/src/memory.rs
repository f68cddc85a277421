//! The embedded backend: features in memory, events in an append-only file.
//!
//! At start the features are computed from the dataset, then every event in
//! the event file is applied again (deduplicated by id), so a restart loses
//! nothing that was acknowledged.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, RwLock};

use recmesh_algo::seen::SeenTimes;
use recmesh_catalog::{Dataset, EventKind, Item};
use recmesh_proto::v1 as pb;
use tokio::sync::Mutex;

use crate::EventLogConfig;
use crate::log::{EventFile, JsonLines, LogError, read_events_after, read_lines_after};
use crate::now_ms;
use crate::store::{
    Counts, FeatureStore, HOURS_KEPT, Ingested, LogKind, LogPage, StoreError, UserRaw, ValidEvent,
    decay_factor, exposure_from_json, exposure_json, hour_of, item_features, kind_index, mark_seen,
    user_features,
};

#[derive(Debug)]
struct ItemState {
    /// `None` for an item the catalog does not know (yet).
    item: Option<Item>,
    counts: Counts,
    score: f64,
}

#[derive(Debug, Default)]
struct UserState {
    /// Oldest first.
    recent: VecDeque<(String, EventKind, i64)>,
    purchased: HashSet<String>,
    affinity: HashMap<String, f64>,
    hours: HashMap<i64, u64>,
    /// Item key → newest event of each kind (the seen set).
    seen: HashMap<u64, SeenTimes>,
}

/// Limits and tuning shared with the service config.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Recent interactions kept per user.
    pub max_recent: usize,
    /// Items kept in a user's seen set.
    pub max_seen: usize,
    /// Event ids remembered for deduplication.
    pub dedupe_window: usize,
    /// Half-life of category affinity, hours.
    pub half_life_hours: f64,
}

#[derive(Debug)]
struct State {
    items: HashMap<String, ItemState>,
    users: HashMap<String, UserState>,
    max_score: f64,
    seen: HashSet<String>,
    seen_order: VecDeque<String>,
    limits: Limits,
}

impl State {
    fn apply(&mut self, user: &str, item: &str, kind: EventKind, ts: i64) {
        let limits = self.limits;
        let state = self.items.entry(item.to_owned()).or_insert(ItemState {
            item: None,
            counts: [0; 4],
            score: 0.0,
        });
        state.counts[kind_index(kind)] += 1;
        state.score += kind.weight();
        self.max_score = self.max_score.max(state.score);
        let category = state.item.as_ref().map(|i| i.category.clone());
        let u = self.users.entry(user.to_owned()).or_default();
        u.recent.push_back((item.to_owned(), kind, ts));
        while u.recent.len() > limits.max_recent {
            u.recent.pop_front();
        }
        if kind == EventKind::Purchase {
            u.purchased.insert(item.to_owned());
        }
        mark_seen(&mut u.seen, item, kind, ts, limits.max_seen);
        if let Some(category) = category {
            *u.affinity.entry(category).or_default() +=
                kind.weight() * decay_factor(ts, limits.half_life_hours);
        }
        let hour = hour_of(ts);
        *u.hours.entry(hour).or_default() += 1;
        u.hours.retain(|h, _| hour - h < HOURS_KEPT);
    }

    /// True (and remembered) when `id` was not seen within the window.
    fn first_sighting(&mut self, id: &str) -> bool {
        if !self.seen.insert(id.to_owned()) {
            return false;
        }
        self.seen_order.push_back(id.to_owned());
        while self.seen_order.len() > self.limits.dedupe_window {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

/// The in-memory feature store.
#[derive(Debug)]
pub struct MemoryStore {
    state: RwLock<State>,
    /// Serialises ingestion, so the file's order is the order events were
    /// applied in.
    turn: Mutex<()>,
    /// The event file (`None`: not logged).
    log: Option<Arc<std::sync::Mutex<EventFile>>>,
    /// The exposure file (`None` with the event file).
    exposures: Option<Arc<std::sync::Mutex<JsonLines>>>,
}

impl MemoryStore {
    /// Builds the store from a dataset, then replays the event file of
    /// `log` (created when missing; `None`: events are not logged).
    pub fn open(
        data: &Dataset,
        limits: Limits,
        log: Option<&EventLogConfig>,
    ) -> Result<Self, LogError> {
        let mut state = State {
            items: data
                .items
                .iter()
                .map(|i| {
                    (
                        i.id.clone(),
                        ItemState {
                            item: Some(i.clone()),
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
            limits,
        };
        for e in &data.interactions {
            state.apply(&e.user, &e.item, e.kind, e.timestamp_ms);
        }
        let exposures = match log {
            Some(c) => Some(Arc::new(std::sync::Mutex::new(JsonLines::open(
                &c.exposures_path,
            )?))),
            None => None,
        };
        let log = match log {
            Some(c) => {
                let path = c.path.as_path();
                let (file, events) = EventFile::open(path, c.fsync)?;
                let mut replayed = 0usize;
                for e in &events {
                    if state.first_sighting(&e.event_id) {
                        state.apply(&e.user, &e.item, e.kind, e.timestamp_ms);
                        replayed += 1;
                    }
                }
                tracing::info!(path = %path.display(), events = events.len(), replayed,
                    "event log replayed");
                Some(Arc::new(std::sync::Mutex::new(file)))
            }
            None => None,
        };
        Ok(MemoryStore {
            state: RwLock::new(state),
            turn: Mutex::new(()),
            log,
            exposures,
        })
    }

    /// The features of one user, synchronously (the trainer's offline
    /// pipeline calls this; the service goes through [`FeatureStore`]).
    pub fn user_features(&self, user_id: &str, max_recent: usize) -> pb::UserFeatures {
        let state = self.read();
        let raw = state.users.get(user_id).map(|u| UserRaw {
            recent: u.recent.iter().cloned().collect(),
            purchased: u.purchased.iter().cloned().collect(),
            affinity: u.affinity.clone(),
            hours: u.hours.iter().map(|(h, n)| (*h, *n)).collect(),
            seen: u.seen.iter().map(|(k, t)| (*k, *t)).collect(),
        });
        user_features(user_id, raw, max_recent, now_ms())
    }

    /// The features of the catalog items among `ids`, synchronously.
    pub fn item_features(&self, ids: &[String]) -> pb::GetItemsResponse {
        let state = self.read();
        let mut out = pb::GetItemsResponse::default();
        for id in ids {
            match state.items.get(id) {
                Some(ItemState {
                    item: Some(item),
                    counts,
                    score,
                }) => out
                    .items
                    .push(item_features(item, *counts, *score, state.max_score)),
                _ => out.unknown.push(id.clone()),
            }
        }
        out
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }
}

#[tonic::async_trait]
impl FeatureStore for MemoryStore {
    async fn user(&self, user_id: &str, max_recent: usize) -> Result<pb::UserFeatures, StoreError> {
        Ok(self.user_features(user_id, max_recent))
    }

    async fn items(&self, ids: &[String]) -> Result<pb::GetItemsResponse, StoreError> {
        Ok(self.item_features(ids))
    }

    async fn ingest(&self, events: &[ValidEvent]) -> Result<Ingested, StoreError> {
        let _turn = self.turn.lock().await;
        let mut batch_ids = HashSet::new();
        let fresh: Vec<ValidEvent> = {
            let state = self.read();
            events
                .iter()
                .filter(|e| !state.seen.contains(&e.event_id) && batch_ids.insert(&e.event_id))
                .cloned()
                .collect()
        };
        let fresh = match &self.log {
            Some(log) => {
                let log = Arc::clone(log);
                // Off the async workers: fdatasync takes milliseconds.
                tokio::task::spawn_blocking(move || {
                    let mut file = log.lock().unwrap_or_else(|p| p.into_inner());
                    file.append(&fresh).map(|()| fresh)
                })
                .await
                .map_err(|e| StoreError::NotRecorded(e.to_string()))?
                .map_err(|e| StoreError::NotRecorded(e.to_string()))?
            }
            None => fresh,
        };
        Ok(self.apply(events.len(), &fresh))
    }

    async fn log_exposures(&self, exposures: &[pb::Exposure]) -> Result<u32, StoreError> {
        let Some(file) = &self.exposures else {
            return Err(StoreError::NoLog(
                "no exposure log: the memory backend runs without `event_log.path`".into(),
            ));
        };
        let lines: Vec<String> = exposures.iter().map(exposure_json).collect();
        let file = Arc::clone(file);
        tokio::task::spawn_blocking(move || {
            file.lock()
                .unwrap_or_else(|p| p.into_inner())
                .append(&lines)
        })
        .await
        .map_err(|e| StoreError::NotRecorded(e.to_string()))?
        .map_err(|e| StoreError::NotRecorded(e.to_string()))?;
        Ok(exposures.len() as u32)
    }

    async fn read_log(
        &self,
        log: LogKind,
        cursor: &str,
        max: usize,
    ) -> Result<LogPage, StoreError> {
        let offset: u64 = if cursor.is_empty() {
            0
        } else {
            cursor.parse().map_err(|_| {
                StoreError::BadCursor(format!("`{cursor}` is not a cursor of this log"))
            })?
        };
        let (Some(events), Some(exposures)) = (&self.log, &self.exposures) else {
            return Err(StoreError::NoLog(
                "no event log: the memory backend runs without `event_log.path`".into(),
            ));
        };
        let path = match log {
            LogKind::Events => events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .path()
                .to_owned(),
            LogKind::Exposures => exposures
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .path()
                .to_owned(),
        };
        let read = tokio::task::spawn_blocking(move || -> Result<LogPage, LogError> {
            Ok(match log {
                LogKind::Events => {
                    let (events, next) = read_events_after(&path, offset, max)?;
                    LogPage {
                        events,
                        next_cursor: next.to_string(),
                        ..Default::default()
                    }
                }
                LogKind::Exposures => {
                    let (lines, next) = read_lines_after(&path, offset, max, false)?;
                    LogPage {
                        exposures: lines
                            .iter()
                            .filter_map(|l| exposure_from_json(l).ok())
                            .collect(),
                        next_cursor: next.to_string(),
                        ..Default::default()
                    }
                }
            })
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        read.map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    fn backend(&self) -> &'static str {
        "memory"
    }
}

impl MemoryStore {
    fn apply(&self, total: usize, fresh: &[ValidEvent]) -> Ingested {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        let mut out = Ingested {
            duplicates: (total - fresh.len()) as u32,
            ..Default::default()
        };
        for e in fresh {
            state.first_sighting(&e.event_id);
            if state.items.get(&e.item).is_none_or(|s| s.item.is_none())
                && !out.new_items.contains(&e.item)
            {
                out.new_items.push(e.item.clone());
            }
            state.apply(&e.user, &e.item, e.kind, e.timestamp_ms);
            out.applied += 1;
        }
        out
    }
}

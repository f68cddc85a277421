//! The feature-store contract both backends keep, and the pieces they share:
//! the validated event, the decay of category affinity, the hour buckets
//! behind the 24 h / 7 d counts, and the assembly of the user and item
//! features from raw state.

use std::collections::HashMap;

use recmesh_algo::seen::{SeenTimes, newest};
use recmesh_catalog::{EventKind, Item, item_key};
use recmesh_mesh::convert::{attributes, event_type};
use recmesh_proto::v1 as pb;

/// An event after validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidEvent {
    /// Client-chosen unique id.
    pub event_id: String,
    /// User.
    pub user: String,
    /// Item (possibly not in the catalog yet: a new item).
    pub item: String,
    /// What happened.
    pub kind: EventKind,
    /// When, Unix ms.
    pub timestamp_ms: i64,
}

/// What an `Ingest` did with a batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Ingested {
    /// Appended to the event log and applied now.
    pub applied: u32,
    /// Seen before (by event id, within the dedupe window): nothing done.
    pub duplicates: u32,
    /// Written to the local outage buffer; applied on reconnect.
    pub buffered: u32,
    /// Items of applied events the catalog does not know.
    pub new_items: Vec<String>,
}

/// Which log a consumer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogKind {
    /// The event log (`Ingest`).
    Events,
    /// The exposure log (`LogExposures`).
    Exposures,
}

/// One page of a log.
#[derive(Debug, Default, PartialEq)]
pub struct LogPage {
    /// Events (for [`LogKind::Events`]).
    pub events: Vec<ValidEvent>,
    /// Exposures (for [`LogKind::Exposures`]).
    pub exposures: Vec<pb::Exposure>,
    /// Where the next read starts.
    pub next_cursor: String,
}

/// An exposure as one JSON line (memory backend) or stream field (Redis).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ExposureRecord {
    r: String,
    u: String,
    t: i64,
    a: Vec<(String, String)>,
    i: Vec<String>,
    /// `user_events_7d`; absent in records written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    c: Option<u32>,
}

/// An exposure's JSON form.
pub fn exposure_json(e: &pb::Exposure) -> String {
    let record = ExposureRecord {
        r: e.request_id.clone(),
        u: e.user_id.clone(),
        t: e.timestamp_ms,
        a: e.assignments
            .iter()
            .map(|a| (a.experiment_id.clone(), a.variant.clone()))
            .collect(),
        i: e.item_ids.clone(),
        c: e.user_events_7d,
    };
    serde_json::to_string(&record).unwrap_or_default()
}

/// An exposure from its JSON form.
pub fn exposure_from_json(text: &str) -> Result<pb::Exposure, String> {
    let r: ExposureRecord = serde_json::from_str(text).map_err(|e| e.to_string())?;
    Ok(pb::Exposure {
        request_id: r.r,
        user_id: r.u,
        timestamp_ms: r.t,
        assignments: r
            .a
            .into_iter()
            .map(|(experiment_id, variant)| pb::Assignment {
                experiment_id,
                variant,
                params: Default::default(),
            })
            .collect(),
        item_ids: r.i,
        user_events_7d: r.c,
    })
}

/// The store could not serve a call.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A log cursor that this backend did not hand out.
    #[error("cursor: {0}")]
    BadCursor(String),
    /// The log asked for is not kept (memory backend without an event file).
    #[error("{0}")]
    NoLog(String),
    /// The backend is unreachable and nothing local can answer; retry.
    #[error("feature store unavailable: {0}")]
    Unavailable(String),
    /// Neither the event log nor the outage buffer could take the events.
    #[error("events not recorded: {0}")]
    NotRecorded(String),
}

/// One backend of the features service. Both backends pass the same contract
/// tests (`tests/contract.rs`).
#[tonic::async_trait]
pub trait FeatureStore: Send + Sync + std::fmt::Debug + 'static {
    /// The features of one user (`known = false` for a user without events).
    async fn user(&self, user_id: &str, max_recent: usize) -> Result<pb::UserFeatures, StoreError>;

    /// [`FeatureStore::user`] for a caller that can wait only `wait`: a
    /// backend with a remote store answers from what it last read when the
    /// store is slower than that. The default waits as `user` does.
    async fn user_within(
        &self,
        user_id: &str,
        max_recent: usize,
        wait: std::time::Duration,
    ) -> Result<pb::UserFeatures, StoreError> {
        let _ = wait;
        self.user(user_id, max_recent).await
    }

    /// The features of the catalog items among `ids`; the others in `unknown`.
    async fn items(&self, ids: &[String]) -> Result<pb::GetItemsResponse, StoreError>;

    /// Appends the events not seen before to the event log, then applies
    /// them. Returns only once every event is durable.
    async fn ingest(&self, events: &[ValidEvent]) -> Result<Ingested, StoreError>;

    /// Appends exposures to the exposure log; returns how many.
    async fn log_exposures(&self, exposures: &[pb::Exposure]) -> Result<u32, StoreError>;

    /// Up to `max` entries of a log after `cursor` ("" = the beginning).
    async fn read_log(&self, log: LogKind, cursor: &str, max: usize)
    -> Result<LogPage, StoreError>;

    /// `memory` or `redis`, for logs and metrics.
    fn backend(&self) -> &'static str;
}

/// Landmark of the forward decay of category affinity (2020-01-01 UTC).
///
/// An event of weight `w` at time `t` adds `w * 2^((t - LANDMARK) / half_life)`:
/// the sums then rank categories exactly as weights decayed to "now" would,
/// without ever rewriting stored values (Cormode et al., "Forward Decay").
/// The exponent is clamped to ±1000 so no value overflows; with the default
/// 7-day half-life that holds until 2039, with 30 days for 80 years.
const LANDMARK_MS: i64 = 1_577_836_800_000;

/// The forward-decay multiplier of an event at `ts_ms`.
pub fn decay_factor(ts_ms: i64, half_life_hours: f64) -> f64 {
    let half_lives = (ts_ms - LANDMARK_MS) as f64 / (half_life_hours * 3_600_000.0);
    half_lives.clamp(-1000.0, 1000.0).exp2()
}

/// Hour buckets kept per user: 7 days.
pub const HOURS_KEPT: i64 = 7 * 24;

/// The hour bucket of a time (Unix ms).
pub fn hour_of(ts_ms: i64) -> i64 {
    ts_ms.div_euclid(3_600_000)
}

/// Events in the last 24 hours and 7 days at `now_ms`, from hour buckets.
pub fn recent_counts(hours: impl IntoIterator<Item = (i64, u64)>, now_ms: i64) -> (u32, u32) {
    let now = hour_of(now_ms);
    let (mut day, mut week) = (0u64, 0u64);
    for (hour, n) in hours {
        let age = now - hour;
        if (0..24).contains(&age) {
            day += n;
        }
        if (0..HOURS_KEPT).contains(&age) {
            week += n;
        }
    }
    (
        u32::try_from(day).unwrap_or(u32::MAX),
        u32::try_from(week).unwrap_or(u32::MAX),
    )
}

/// A user's raw state, as either backend holds it.
#[derive(Debug, Default)]
pub struct UserRaw {
    /// (item, kind, Unix ms), any order.
    pub recent: Vec<(String, EventKind, i64)>,
    /// Items bought.
    pub purchased: Vec<String>,
    /// Category → forward-decayed affinity.
    pub affinity: HashMap<String, f64>,
    /// Hour bucket → events.
    pub hours: Vec<(i64, u64)>,
    /// Seen set: item key → newest event of each kind, Unix s.
    pub seen: Vec<(u64, SeenTimes)>,
}

/// Records an event in a seen set, then drops the items whose newest event
/// is oldest until at most `max` remain.
pub fn mark_seen(
    seen: &mut HashMap<u64, SeenTimes>,
    item: &str,
    kind: EventKind,
    ts_ms: i64,
    max: usize,
) {
    let t = seen_time(ts_ms);
    let slot = &mut seen.entry(item_key(item)).or_insert([0; 4])[kind_index(kind)];
    *slot = (*slot).max(t);
    while seen.len() > max {
        let Some(oldest) = seen
            .iter()
            .min_by_key(|(k, t)| (newest(t), **k))
            .map(|(k, _)| *k)
        else {
            break;
        };
        seen.remove(&oldest);
    }
}

/// An event time as a seen-set time: Unix seconds, at least 1 (0 is "none").
pub fn seen_time(ts_ms: i64) -> u32 {
    u32::try_from(ts_ms.div_euclid(1000))
        .unwrap_or(if ts_ms < 0 { 1 } else { u32::MAX })
        .max(1)
}

/// Top categories returned in `UserFeatures.top_categories`.
const TOP_CATEGORIES: usize = 3;

/// Assembles `UserFeatures` from raw state (`None`: a user never seen).
pub fn user_features(
    user_id: &str,
    raw: Option<UserRaw>,
    max_recent: usize,
    now_ms: i64,
) -> pb::UserFeatures {
    let Some(mut raw) = raw else {
        return pb::UserFeatures {
            user_id: user_id.to_owned(),
            ..Default::default()
        };
    };
    // Newest first; events can arrive out of order.
    raw.recent.sort_by_key(|e| std::cmp::Reverse(e.2));
    raw.purchased.sort();
    let mut categories: Vec<(&String, &f64)> = raw.affinity.iter().collect();
    categories.sort_by(|a, b| b.1.total_cmp(a.1).then(a.0.cmp(b.0)));
    let top_categories = categories
        .iter()
        .take(TOP_CATEGORIES)
        .map(|(c, _)| (*c).clone())
        .collect();
    // Ratios to the strongest, so the numbers are readable whatever the
    // forward-decay scale.
    let max = categories
        .first()
        .map_or(1.0, |c| c.1.max(f64::MIN_POSITIVE));
    let category_affinity = raw
        .affinity
        .iter()
        .map(|(c, a)| (c.clone(), a / max))
        .collect();
    let (events_24h, events_7d) = recent_counts(raw.hours, now_ms);
    // Newest first, so a reader that stops early keeps the freshest.
    raw.seen
        .sort_by_key(|(k, t)| (std::cmp::Reverse(newest(t)), *k));
    let seen_at_s = raw.seen.iter().flat_map(|(_, t)| *t).collect();
    pb::UserFeatures {
        user_id: user_id.to_owned(),
        known: true,
        recent: raw
            .recent
            .into_iter()
            .take(max_recent)
            .map(|(item, kind, ts)| pb::Interaction {
                item_id: item,
                event_type: event_type(kind) as i32,
                timestamp_ms: ts,
            })
            .collect(),
        purchased_item_ids: raw.purchased,
        top_categories,
        category_affinity,
        events_24h,
        events_7d,
        seen_items: raw.seen.iter().map(|(k, _)| *k).collect(),
        seen_at_s,
    }
}

/// Event counters of one item, indexed by [`kind_index`].
pub type Counts = [u64; 4];

/// The slot of an event kind in [`Counts`].
pub fn kind_index(kind: EventKind) -> usize {
    match kind {
        EventKind::View => 0,
        EventKind::Click => 1,
        EventKind::AddToCart => 2,
        EventKind::Purchase => 3,
    }
}

/// Assembles `ItemFeatures`.
pub fn item_features(item: &Item, counts: Counts, score: f64, max_score: f64) -> pb::ItemFeatures {
    let [views, clicks, carts, purchases] = counts;
    pb::ItemFeatures {
        item_id: item.id.clone(),
        attributes: Some(attributes(item)),
        views,
        clicks,
        carts,
        purchases,
        popularity: if max_score > 0.0 {
            score / max_score
        } else {
            0.0
        },
        ctr: if views > 0 {
            clicks as f64 / views as f64
        } else {
            0.0
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seen_set_keeps_the_newest_of_each_kind_and_drops_the_oldest_item() {
        let mut seen = HashMap::new();
        mark_seen(&mut seen, "a", EventKind::View, 5_000, 2);
        mark_seen(&mut seen, "a", EventKind::View, 2_000, 2);
        mark_seen(&mut seen, "a", EventKind::Purchase, 9_000, 2);
        mark_seen(&mut seen, "b", EventKind::Click, 3_000, 2);
        assert_eq!(seen[&item_key("a")], [5, 0, 0, 9]);
        // "b" (newest 3 s) is older than "a" (9 s): it goes when "c" comes.
        mark_seen(&mut seen, "c", EventKind::View, 4_000, 2);
        assert_eq!(seen.len(), 2);
        assert!(!seen.contains_key(&item_key("b")));
        assert_eq!(seen_time(-5), 1);
        assert_eq!(seen_time(999), 1);
        assert_eq!(seen_time(i64::MAX), u32::MAX);
    }

    #[test]
    fn forward_decay_halves_per_half_life_and_never_overflows() {
        let t = LANDMARK_MS + 10 * 3_600_000;
        let a = decay_factor(t, 24.0);
        let b = decay_factor(t + 24 * 3_600_000, 24.0);
        assert!(
            (b / a - 2.0).abs() < 1e-12,
            "one half-life later weighs double"
        );
        assert!(decay_factor(i64::MAX / 2, 1.0).is_finite());
        assert!(decay_factor(0, 1.0) > 0.0);
    }

    #[test]
    fn counts_use_the_last_24_and_168_hours() {
        let now = 1_000 * 3_600_000 + 5;
        let hours = vec![
            (1_000, 2),
            (977, 1),
            (976, 4),
            (833, 8),
            (832, 16),
            (1_001, 32),
        ];
        // 1000 and 977 are inside 24 h; 976 only in 7 d; 833 is 167 h old
        // (inside), 832 is 168 h (outside); a future bucket counts nowhere.
        assert_eq!(recent_counts(hours, now), (3, 15));
    }

    #[test]
    fn user_features_order_recent_and_categories() {
        let raw = UserRaw {
            recent: vec![
                ("a".into(), EventKind::View, 1),
                ("b".into(), EventKind::Purchase, 3),
                ("c".into(), EventKind::Click, 2),
            ],
            purchased: vec!["b".into()],
            affinity: HashMap::from([("x".into(), 1.0), ("y".into(), 4.0)]),
            hours: vec![],
            seen: vec![(5, [1, 0, 0, 0]), (6, [0, 0, 0, 9])],
        };
        let u = user_features("u", Some(raw), 2, 0);
        let items: Vec<&str> = u.recent.iter().map(|r| r.item_id.as_str()).collect();
        assert_eq!(items, ["b", "c"]);
        assert_eq!(u.top_categories, ["y", "x"]);
        assert_eq!(u.category_affinity["x"], 0.25);
        assert_eq!(u.seen_items, [6, 5], "newest first");
        assert_eq!(u.seen_at_s, [0, 0, 0, 9, 1, 0, 0, 0]);
        assert!(!user_features("u", None, 2, 0).known);
    }
}

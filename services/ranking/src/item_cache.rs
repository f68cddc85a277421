//! Ranking's item-feature cache: features fetched from the features service,
//! fresh for a TTL, then served stale while one background fetch refreshes
//! them, at most a given number of items.
//!
//! Every `Rank` looks up each of its ~200 candidates, so a lookup must be
//! cheap. moka did this first, and its per-read bookkeeping (recording the
//! read for its eviction policy, running pending housekeeping inline) was
//! 23% of ranking's CPU under load (docs/performance.md, "What each change
//! bought"). Here a lookup is one shared lock and one hash probe, against
//! one clock reading for the whole call.
//!
//! Why stale entries are served: items fetched together expire together.
//! After the features service or ranking restarts, every item is fetched
//! in the same second, and 5 s later every request in flight missed all of
//! its candidates at once and asked the features service for them again,
//! which made it late for the gateway as well (docs/faults.md, run 7). Now
//! an expired entry is still used, and the first request that sees it
//! claims its refresh (at most one claim per entry per TTL); the refresh
//! runs after the answer, off the request path. Only an entry older than
//! TTL + `max_stale` is treated as missing and fetched inline.
//!
//! When a shard is full, an insert first drops entries past their usable
//! age (a sweep of the shard, at most once per quarter of that age), then
//! any one entry: there is no recency order to keep, because the entries
//! are all refreshed or dropped within that age anyway.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use recmesh_proto::v1 as pb;
use tokio::sync::watch;

const SHARDS: usize = 16;

/// The largest share of the TTL an item's freshness is shortened by.
const JITTER: f64 = 0.2;

#[derive(Debug)]
struct Entry {
    /// The item's id: the shard is keyed by its hash, and a lookup whose
    /// hash matches another item's (about 2^-64 a pair) is a miss.
    id: Box<str>,
    features: Arc<pb::ItemFeatures>,
    stored: Instant,
    /// The TTL less up to [`JITTER`] of it, by item: items stored in the
    /// same second go stale spread over a fifth of the TTL, not at once.
    fresh_for: Duration,
    /// When a request last claimed this entry's refresh, in ms since the
    /// cache's epoch plus one (0: never).
    claimed: AtomicU64,
}

/// Entries by the hash of their item id ([`ItemCache::key`]): a probe
/// compares integers, and the id itself is compared once, on a hit.
type Shard = HashMap<u64, Entry, RandomState>;

/// What the cache has for an item.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// Younger than its TTL (the TTL less up to a fifth, by item).
    Fresh(Arc<pb::ItemFeatures>),
    /// Past the TTL but usable; `refresh` is true for the one caller (per
    /// TTL) that should fetch it again.
    Stale {
        features: Arc<pb::ItemFeatures>,
        refresh: bool,
    },
    /// Absent, or too old to use.
    Miss,
}

/// Item features by item id.
#[derive(Debug)]
pub struct ItemCache {
    shards: Vec<RwLock<Shard>>,
    /// When each shard was last swept of unusable entries, as milliseconds
    /// since `epoch` plus one (0: never).
    swept: Vec<AtomicU64>,
    hasher: RandomState,
    ttl: Duration,
    max_stale: Duration,
    per_shard: usize,
    epoch: Instant,
}

impl ItemCache {
    /// A cache of at most about `capacity` items (at least one per shard):
    /// fresh for `ttl`, then usable while refreshed for `max_stale` more.
    pub fn new(capacity: u64, ttl: Duration, max_stale: Duration) -> Self {
        let per_shard = (capacity as usize).div_ceil(SHARDS).max(1);
        ItemCache {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(Shard::with_hasher(RandomState::default())))
                .collect(),
            swept: (0..SHARDS).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::default(),
            ttl,
            max_stale,
            per_shard,
            epoch: Instant::now(),
        }
    }

    /// The key of `id` in its shard, hashed once per lookup.
    fn key(&self, id: &str) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, id)
    }

    /// The shard of `key`, chosen by its middle bits (the shard's table
    /// indexes by the low bits and tags by the top ones).
    fn shard(&self, key: u64) -> &RwLock<Shard> {
        &self.shards[Self::shard_index(key)]
    }

    fn shard_index(key: u64) -> usize {
        ((key >> 32) as usize) % SHARDS
    }

    /// What the cache has for `id` now.
    pub fn get(&self, id: &str) -> Lookup {
        self.get_at(id, Instant::now())
    }

    /// What the cache has for `id` at `now`: a `Rank` reads the clock once
    /// for all of its candidates, not once per lookup.
    pub fn get_at(&self, id: &str, now: Instant) -> Lookup {
        let key = self.key(id);
        let shard = self.shard(key).read().unwrap_or_else(|p| p.into_inner());
        let Some(entry) = shard.get(&key).filter(|e| *e.id == *id) else {
            return Lookup::Miss;
        };
        let age = now.saturating_duration_since(entry.stored);
        if age < entry.fresh_for {
            return Lookup::Fresh(entry.features.clone());
        }
        if age >= self.ttl + self.max_stale {
            return Lookup::Miss;
        }
        Lookup::Stale {
            features: entry.features.clone(),
            refresh: self.claim(entry),
        }
    }

    /// Whether this caller gets the entry's refresh: the first since the
    /// entry was stored, or the first a TTL after the last claim (a refresh
    /// that failed is tried again, at most once per TTL).
    fn claim(&self, entry: &Entry) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        let last = entry.claimed.load(Ordering::Acquire);
        if last != 0 && now.saturating_sub(last) < self.ttl.as_millis() as u64 {
            return false;
        }
        entry
            .claimed
            .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Stores the features of `id` (replacing what was there), fresh again.
    pub fn insert(&self, id: String, features: Arc<pb::ItemFeatures>) {
        self.insert_stored(id, features, Instant::now());
    }

    /// [`insert`](Self::insert) as if stored at `stored` (tests backdate
    /// entries instead of waiting out a TTL).
    pub(crate) fn insert_stored(
        &self,
        id: String,
        features: Arc<pb::ItemFeatures>,
        stored: Instant,
    ) {
        let now = Instant::now();
        let usable = self.ttl + self.max_stale;
        // The same item always gets the same share (a fixed hash, not the
        // per-process one), so its freshness does not wander between stores.
        let fresh_for = recmesh_algo::assign::jittered(self.ttl, &id, JITTER);
        let key = self.key(&id);
        let entry = Entry {
            id: id.into_boxed_str(),
            features,
            stored,
            fresh_for,
            claimed: AtomicU64::new(0),
        };
        let mut shard = self.shard(key).write().unwrap_or_else(|p| p.into_inner());
        if shard.len() >= self.per_shard && !shard.contains_key(&key) {
            // A sweep reads the whole shard, so a full one is swept of its
            // unusable entries at most once per quarter of their usable life;
            // in between, a new item pushes out any one entry. (Sweeping at
            // every insert cost ranking half its CPU on the 1M-item catalog,
            // which never fits: every miss scanned a full shard.)
            let swept = &self.swept[Self::shard_index(key)];
            let now_ms = now.duration_since(self.epoch).as_millis() as u64 + 1;
            let last = swept.load(Ordering::Relaxed);
            let every = (usable / 4).max(Duration::from_millis(100)).as_millis() as u64;
            if last == 0 || now_ms.saturating_sub(last) >= every {
                swept.store(now_ms, Ordering::Relaxed);
                shard.retain(|_, e| now.duration_since(e.stored) < usable);
            }
            if shard.len() >= self.per_shard
                && let Some(any) = shard.keys().next().cloned()
            {
                shard.remove(&any);
            }
        }
        shard.insert(key, entry);
    }

    /// Items held (unusable ones included until an insert drops them).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

/// Where a fetch's waiters learn how it ended: `Some(reason)` if it failed.
type Outcome = watch::Receiver<Option<String>>;

/// Item fetches in flight, by item id. A request that misses an item which
/// another request is already fetching waits for that fetch instead of
/// asking the features service again. Without it, a cold cache (a mesh just
/// started, ranking just restarted) sent every request's ~200 candidates to
/// the features service: the first half second of a fresh mesh at 500/s
/// kept the features service busy on one core and left some of its `Track`s
/// unanswered within 200 ms (docs/faults.md, run 13).
#[derive(Debug, Default)]
pub struct Fetches {
    /// Item → (fetch number, that fetch's outcome channel).
    by_item: Mutex<HashMap<String, (u64, Outcome), RandomState>>,
    next: AtomicU64,
}

/// A fetch this request owns: its items leave [`Fetches`] when it is
/// dropped (answered, failed or cancelled), and that wakes its waiters.
#[derive(Debug)]
pub struct Owned<'a> {
    fetches: &'a Fetches,
    number: u64,
    /// The items this request fetches.
    pub ids: Vec<String>,
    /// Set to why the fetch failed before it is dropped; its waiters read it.
    outcome: watch::Sender<Option<String>>,
    /// The features service answered (and the answer is in the cache).
    answered: bool,
}

/// Another request's fetch to wait for.
#[derive(Debug)]
pub struct Awaited(Outcome);

impl Awaited {
    /// Waits for the fetch to end; `Some(reason)` when it failed.
    pub async fn ended(mut self) -> Option<String> {
        // Never sent to before the end; closed (an error) at the end.
        let _ = self.0.changed().await;
        self.0.borrow().clone()
    }
}

impl Fetches {
    /// Splits `missing` (distinct ids) into the fetch this caller owns and
    /// the other fetches to wait for, with the ids they cover.
    pub fn split(&self, missing: Vec<String>) -> (Owned<'_>, Vec<Awaited>, Vec<String>) {
        let (outcome, rx) = watch::channel(None);
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        let (mut ids, mut awaited, mut theirs) =
            (Vec::new(), Vec::<(u64, Awaited)>::new(), Vec::new());
        let mut by_item = self.by_item.lock().unwrap_or_else(|p| p.into_inner());
        for id in missing {
            match by_item.get(&id) {
                Some((other, r)) => {
                    if !awaited.iter().any(|(n, _)| n == other) {
                        awaited.push((*other, Awaited(r.clone())));
                    }
                    theirs.push(id);
                }
                None => {
                    by_item.insert(id.clone(), (number, rx.clone()));
                    ids.push(id);
                }
            }
        }
        let owned = Owned {
            fetches: self,
            number,
            ids,
            outcome,
            answered: false,
        };
        (owned, awaited.into_iter().map(|(_, a)| a).collect(), theirs)
    }

    /// Items being fetched now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_item.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Owned<'_> {
    /// The fetch failed: its waiters learn why when it is dropped.
    pub fn failed(&self, reason: String) {
        self.outcome.send_replace(Some(reason));
    }

    /// The fetch was answered and stored in the cache.
    pub fn answered(&mut self) {
        self.answered = true;
    }
}

impl Drop for Owned<'_> {
    fn drop(&mut self) {
        if !self.answered && self.outcome.borrow().is_none() {
            // Dropped mid-call: the request that owned it was cancelled.
            self.outcome
                .send_replace(Some("the request fetching them was cancelled".into()));
        }
        let mut by_item = self
            .fetches
            .by_item
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for id in &self.ids {
            if by_item.get(id).is_some_and(|(n, _)| *n == self.number) {
                by_item.remove(id);
            }
        }
        // `outcome` is dropped after this, which wakes the waiters.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(popularity: f64) -> Arc<pb::ItemFeatures> {
        Arc::new(pb::ItemFeatures {
            popularity,
            ..Default::default()
        })
    }

    fn popularity(l: &Lookup) -> Option<f64> {
        match l {
            Lookup::Fresh(f) | Lookup::Stale { features: f, .. } => Some(f.popularity),
            Lookup::Miss => None,
        }
    }

    #[test]
    fn an_entry_is_fresh_until_its_ttl_and_replaced_by_a_newer_one() {
        let cache = ItemCache::new(100, TTL, Duration::ZERO);
        assert!(matches!(cache.get("a"), Lookup::Miss));
        cache.insert("a".into(), item(1.0));
        assert!(matches!(cache.get("a"), Lookup::Fresh(_)));
        cache.insert("a".into(), item(2.0));
        assert_eq!(popularity(&cache.get("a")), Some(2.0));
        assert_eq!(cache.len(), 1);

        // No stale use allowed: past the TTL it is a miss.
        cache.insert_stored("old".into(), item(1.0), ago(1.5));
        assert!(matches!(cache.get("old"), Lookup::Miss));
    }

    /// The TTL of these tests (the usable age past it is the same again).
    const TTL: Duration = Duration::from_secs(60);

    /// `ttls` TTLs ago: entries are backdated instead of waiting out a TTL.
    fn ago(ttls: f64) -> Instant {
        Instant::now()
            .checked_sub(TTL.mul_f64(ttls))
            .expect("the monotonic clock goes back a few minutes")
    }

    #[test]
    fn a_stale_entry_is_served_and_one_caller_per_ttl_refreshes_it() {
        // Fresh for a TTL, then usable for another.
        let cache = ItemCache::new(100, TTL, TTL);
        cache.insert_stored("a".into(), item(1.0), ago(1.5));
        let lookups: Vec<Lookup> = (0..10).map(|_| cache.get("a")).collect();
        let refreshes = lookups
            .iter()
            .filter(|l| matches!(l, Lookup::Stale { refresh: true, .. }))
            .count();
        assert_eq!(refreshes, 1, "one refresh per TTL: {lookups:?}");
        assert!(lookups.iter().all(|l| popularity(l) == Some(1.0)));

        // The refresh's answer makes it fresh again.
        cache.insert("a".into(), item(2.0));
        assert!(matches!(cache.get("a"), Lookup::Fresh(f) if f.popularity == 2.0));

        // A new entry that is stale at once gives its first caller the refresh.
        cache.insert_stored("b".into(), item(3.0), ago(1.5));
        assert!(matches!(
            cache.get("b"),
            Lookup::Stale { refresh: true, .. }
        ));
    }

    #[test]
    fn items_stored_together_go_stale_spread_over_a_fifth_of_the_ttl() {
        let cache = ItemCache::new(1_000, TTL, TTL);
        let kinds = |ttls: f64| {
            let stored = ago(ttls);
            let (mut fresh, mut stale) = (0, 0);
            for n in 0..200 {
                let id = format!("i{n}");
                cache.insert_stored(id.clone(), item(0.0), stored);
                match cache.get(&id) {
                    Lookup::Fresh(_) => fresh += 1,
                    Lookup::Stale { .. } => stale += 1,
                    Lookup::Miss => panic!("usable"),
                }
            }
            (fresh, stale)
        };
        assert_eq!(kinds(0.75), (200, 0), "none before 0.8 TTL");
        let (fresh, stale) = kinds(0.9);
        assert!(
            fresh > 50 && stale > 50,
            "spread: {fresh} fresh, {stale} stale"
        );
        assert_eq!(kinds(1.01), (0, 200), "all after a TTL");
    }

    #[test]
    fn an_entry_past_its_usable_age_is_a_miss() {
        let cache = ItemCache::new(100, TTL, TTL);
        cache.insert_stored("a".into(), item(1.0), ago(2.5));
        assert!(matches!(cache.get("a"), Lookup::Miss));
    }

    #[test]
    fn the_size_stays_bounded() {
        // 16 shards of one entry each.
        let cache = ItemCache::new(16, TTL, TTL);
        for n in 0..1_000 {
            cache.insert(format!("i{n}"), item(n as f64));
        }
        assert!(cache.len() <= 16, "{} items held", cache.len());
        // The newest insert is always kept.
        assert_eq!(popularity(&cache.get("i999")), Some(999.0));
    }

    #[test]
    fn a_full_shard_drops_unusable_entries_first_but_is_swept_at_most_once_per_interval() {
        // 16 shards of 8; usable for two TTLs, so a sweep is due every 30 s.
        let mut cache = ItemCache::new(16 * 8, TTL, TTL);
        // As if made a minute ago, so "the last sweep was long ago" can be set.
        cache.epoch = ago(1.0);
        let shard = ItemCache::shard_index(cache.key("x"));
        let mut ids = (0..)
            .map(|n| format!("i{n}"))
            .filter(|id| ItemCache::shard_index(cache.key(id)) == shard);
        let mut next = || ids.next().expect("ids without end");
        let held = |cache: &ItemCache| cache.shards[shard].read().expect("lock").len();
        let unusable = ago(2.5);

        // A full shard, half of it past its usable age.
        let fresh: Vec<String> = (0..4).map(|_| next()).collect();
        for id in &fresh {
            cache.insert(id.clone(), item(1.0));
        }
        for _ in 0..4 {
            cache.insert_stored(next(), item(0.0), unusable);
        }
        assert_eq!(held(&cache), 8);
        // The first insert into the full shard sweeps it: the unusable
        // entries go, every usable one stays.
        cache.insert(next(), item(1.0));
        assert_eq!(held(&cache), 5, "the four unusable entries dropped");
        for id in &fresh {
            assert!(matches!(cache.get(id), Lookup::Fresh(_)), "{id} kept");
        }

        // Full again with unusable entries: within the interval an insert
        // pushes out one entry and does not read the whole shard.
        for _ in 0..3 {
            cache.insert_stored(next(), item(0.0), unusable);
        }
        assert_eq!(held(&cache), 8);
        cache.insert(next(), item(1.0));
        assert_eq!(held(&cache), 8, "one entry out, one in: no sweep yet");

        // Once the interval has passed (the last sweep set a minute back),
        // the next insert sweeps again.
        cache.swept[shard].store(1, Ordering::Relaxed);
        cache.insert(next(), item(1.0));
        let kept = held(&cache);
        assert!(kept < 8, "swept: {kept} held");
        let shard_now = cache.shards[shard].read().expect("lock");
        assert!(
            shard_now
                .values()
                .all(|e| Instant::now().duration_since(e.stored) < TTL * 2),
            "only usable entries left"
        );
    }

    #[tokio::test]
    async fn a_missed_item_being_fetched_is_waited_for_not_fetched_again() {
        let fetches = Fetches::default();
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (first, awaited, theirs) = fetches.split(ids(&["a", "b"]));
        assert_eq!(first.ids, ids(&["a", "b"]));
        assert!(awaited.is_empty() && theirs.is_empty());
        // A second request missing b and c fetches only c, and waits for b.
        let (second, awaited, theirs) = fetches.split(ids(&["b", "c"]));
        assert_eq!(second.ids, ids(&["c"]));
        assert_eq!(theirs, ids(&["b"]));
        assert_eq!(awaited.len(), 1);
        let waiter = tokio::spawn(async move {
            let mut reasons = Vec::new();
            for a in awaited {
                reasons.push(a.ended().await);
            }
            reasons
        });
        first.failed("features: no answer within 20 ms".into());
        drop(first);
        assert_eq!(
            waiter.await.expect("waiter"),
            vec![Some("features: no answer within 20 ms".to_owned())]
        );
        // The first fetch's items left; the second's stay until it ends.
        assert_eq!(fetches.len(), 1);
        drop(second);
        assert_eq!(fetches.len(), 0);
        // A fetch that was answered tells its waiters nothing wrong...
        let (mut third, _, _) = fetches.split(ids(&["d"]));
        let (_, awaited, _) = fetches.split(ids(&["d"]));
        third.answered();
        drop(third);
        assert_eq!(awaited.into_iter().next().expect("one").ended().await, None);
        // ...and one dropped before its answer (its request was cancelled)
        // tells them so.
        let (fourth, _, _) = fetches.split(ids(&["e"]));
        let (_, awaited, _) = fetches.split(ids(&["e"]));
        drop(fourth);
        assert_eq!(
            awaited.into_iter().next().expect("one").ended().await,
            Some("the request fetching them was cancelled".to_owned())
        );
    }
}

//! Ranking's item-feature cache: features fetched from the features service,
//! kept for a TTL, at most a given number of items.
//!
//! Every `Rank` looks up each of its ~200 candidates, so a lookup must be
//! cheap. moka did this first, and its per-read bookkeeping (recording the
//! read for its eviction policy, running pending housekeeping inline) was
//! 23% of ranking's CPU under load (docs/performance.md, "Ranking's item
//! cache"). This cache keeps what ranking needs, a TTL and a size bound, in
//! sharded read-mostly maps: a lookup is one shared lock and one hash probe.
//! When a shard is full, an insert first drops its expired entries, then
//! any one entry: there is no recency order to keep, because the entries
//! all expire within the TTL anyway.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use foldhash::fast::RandomState;
use recmesh_proto::v1 as pb;

const SHARDS: usize = 16;

type Shard = HashMap<String, (Arc<pb::ItemFeatures>, Instant), RandomState>;

/// Item features by item id, each served for `ttl` after it was stored.
#[derive(Debug)]
pub struct ItemCache {
    shards: Vec<RwLock<Shard>>,
    hasher: RandomState,
    ttl: Duration,
    per_shard: usize,
}

impl ItemCache {
    /// A cache of at most about `capacity` items (at least one per shard),
    /// each kept for `ttl`.
    pub fn new(capacity: u64, ttl: Duration) -> Self {
        let per_shard = (capacity as usize).div_ceil(SHARDS).max(1);
        ItemCache {
            shards: (0..SHARDS)
                .map(|_| RwLock::new(Shard::with_hasher(RandomState::default())))
                .collect(),
            hasher: RandomState::default(),
            ttl,
            per_shard,
        }
    }

    fn shard(&self, id: &str) -> &RwLock<Shard> {
        let h = std::hash::BuildHasher::hash_one(&self.hasher, id);
        &self.shards[(h as usize) % SHARDS]
    }

    /// The features of `id`, unless absent or older than the TTL.
    pub fn get(&self, id: &str) -> Option<Arc<pb::ItemFeatures>> {
        let shard = self.shard(id).read().unwrap_or_else(|p| p.into_inner());
        let (features, stored) = shard.get(id)?;
        (stored.elapsed() < self.ttl).then(|| features.clone())
    }

    /// Stores the features of `id` (replacing what was there).
    pub fn insert(&self, id: String, features: Arc<pb::ItemFeatures>) {
        let now = Instant::now();
        let mut shard = self.shard(&id).write().unwrap_or_else(|p| p.into_inner());
        if shard.len() >= self.per_shard && !shard.contains_key(&id) {
            shard.retain(|_, (_, stored)| now.duration_since(*stored) < self.ttl);
            if shard.len() >= self.per_shard
                && let Some(any) = shard.keys().next().cloned()
            {
                shard.remove(&any);
            }
        }
        shard.insert(id, (features, now));
    }

    /// Items held (expired ones included until an insert drops them).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, popularity: f64) -> Arc<pb::ItemFeatures> {
        Arc::new(pb::ItemFeatures {
            item_id: id.into(),
            popularity,
            ..Default::default()
        })
    }

    #[test]
    fn an_entry_is_served_until_its_ttl_and_replaced_by_a_newer_one() {
        let cache = ItemCache::new(100, Duration::from_secs(60));
        assert!(cache.get("a").is_none());
        cache.insert("a".into(), item("a", 1.0));
        assert_eq!(cache.get("a").expect("stored").popularity, 1.0);
        cache.insert("a".into(), item("a", 2.0));
        assert_eq!(cache.get("a").expect("replaced").popularity, 2.0);
        assert_eq!(cache.len(), 1);

        let expired = ItemCache::new(100, Duration::ZERO);
        expired.insert("a".into(), item("a", 1.0));
        assert!(expired.get("a").is_none(), "a TTL of 0 has passed at once");
    }

    #[test]
    fn the_size_stays_bounded_and_expired_entries_leave_first() {
        // 16 shards of one entry each.
        let cache = ItemCache::new(16, Duration::from_secs(60));
        for n in 0..1_000 {
            cache.insert(format!("i{n}"), item("x", n as f64));
        }
        assert!(cache.len() <= 16, "{} items held", cache.len());
        // The newest insert is always kept.
        assert_eq!(cache.get("i999").expect("newest").popularity, 999.0);

        let expiring = ItemCache::new(16, Duration::ZERO);
        for n in 0..100 {
            expiring.insert(format!("i{n}"), item("x", 0.0));
        }
        assert!(expiring.len() <= 16);
    }
}

//! The L1 response cache: recent `Recommend` answers per user.
//!
//! Keyed by user, so a `Track` drops everything cached for that user in one
//! step. A request takes its user's entry before running the pipeline and
//! stores into that same entry; if a `Track` invalidated the user meanwhile,
//! the entry is no longer in the cache and the stale answer is dropped with it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use moka::future::Cache;
use prost::Message;
use recmesh_proto::v1 as pb;

use crate::config::{AssignCacheConfig, CacheConfig};

/// Different queries cached per user: page, category and count variations
/// of one visit fit; more would only hold stale answers.
const QUERIES_PER_USER: usize = 8;

/// One cached answer.
#[derive(Debug)]
struct Answer {
    key: u64,
    response: Arc<pb::RecommendResponse>,
    /// Until when it may be served (a variant's `cache.ttl_ms` can make it
    /// shorter than the cache's own TTL).
    until: Option<Instant>,
}

/// One user's cached answers, by query key.
#[derive(Debug, Default)]
pub struct UserEntry {
    answers: Mutex<Vec<Answer>>,
}

impl UserEntry {
    /// The cached answer to `key`, unless its own TTL has passed.
    pub fn get(&self, key: u64) -> Option<Arc<pb::RecommendResponse>> {
        let answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        answers
            .iter()
            .find(|a| a.key == key && a.until.is_none_or(|t| Instant::now() < t))
            .map(|a| a.response.clone())
    }

    /// Stores an answer, evicting the oldest beyond [`QUERIES_PER_USER`];
    /// `ttl` (a variant's) bounds how long it is served.
    pub fn put(&self, key: u64, response: Arc<pb::RecommendResponse>, ttl: Option<Duration>) {
        let mut answers = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        answers.retain(|a| a.key != key);
        answers.push(Answer {
            key,
            response,
            until: ttl.map(|t| Instant::now() + t),
        });
        if answers.len() > QUERIES_PER_USER {
            answers.remove(0);
        }
    }
}

/// The largest share of the TTL an entry's life is shortened by.
const JITTER: f64 = 0.2;

/// Each user's entries live the TTL less up to [`JITTER`] of it, by a hash
/// of the user id. Entries created together (a gateway's first minute,
/// every user after a config change) would otherwise expire together,
/// every TTL, and send all those users through the whole pipeline in the
/// same second: in the fault suite, whose rows replay one request
/// sequence, every third row ran about twice the pipelines of the others
/// (38% of answers from the cache, against 66–74%; docs/faults.md, run 13).
/// Ranking's item cache spreads its refreshes the same way.
#[derive(Debug, Clone, Copy)]
struct Jittered {
    ttl: Duration,
}

impl Jittered {
    fn life(&self, user: &str) -> Duration {
        recmesh_algo::assign::jittered(self.ttl, user, JITTER)
    }
}

impl<V> moka::Expiry<String, V> for Jittered {
    fn expire_after_create(&self, user: &String, _: &V, _: Instant) -> Option<Duration> {
        Some(self.life(user))
    }

    /// A replaced entry lives a full life again, as with `time_to_live`.
    fn expire_after_update(
        &self,
        user: &String,
        _: &V,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.life(user))
    }
}

/// A cache by user id of at most `max_users` entries, each kept `ttl_ms`
/// less up to a fifth ([`Jittered`]); `None` (disabled) when the TTL is 0.
fn per_user<V>(ttl_ms: u64, max_users: u64) -> Option<Cache<String, V>>
where
    V: Clone + Send + Sync + 'static,
{
    (ttl_ms > 0).then(|| {
        Cache::builder()
            .max_capacity(max_users)
            .expire_after(Jittered {
                ttl: Duration::from_millis(ttl_ms),
            })
            .build()
    })
}

/// The cache; disabled when the TTL is 0.
#[derive(Debug, Clone)]
pub struct ResponseCache {
    users: Option<Cache<String, Arc<UserEntry>>>,
}

impl ResponseCache {
    /// A cache sized and timed by `config`.
    pub fn new(config: &CacheConfig) -> Self {
        ResponseCache {
            users: per_user(config.ttl_ms, config.max_users),
        }
    }

    /// The user's entry (created empty when absent); `None` when disabled.
    pub async fn entry(&self, user: &str) -> Option<Arc<UserEntry>> {
        let users = self.users.as_ref()?;
        Some(
            users
                .get_with_by_ref(user, async { Arc::new(UserEntry::default()) })
                .await,
        )
    }

    /// Drops every cached answer (the experiment config changed).
    pub fn invalidate_all(&self) {
        if let Some(users) = &self.users {
            users.invalidate_all();
        }
    }

    /// Drops everything cached for `user`.
    pub async fn invalidate(&self, user: &str) {
        if let Some(users) = &self.users {
            users.invalidate(user).await;
        }
    }
}

/// Users' assignments, valid only under the experiment config version they
/// were made from (the gateway follows the version with `WatchVersion`).
/// Disabled when its TTL is 0.
#[derive(Debug, Clone)]
pub struct AssignmentCache {
    users: Option<Cache<String, Arc<pb::AssignResponse>>>,
    /// The version the gateway last heard of; [`UNKNOWN`] until the first.
    version: Arc<AtomicU64>,
}

/// No config version heard of yet.
pub const UNKNOWN: u64 = u64::MAX;

impl AssignmentCache {
    /// A cache sized and timed by `config`.
    pub fn new(config: &AssignCacheConfig) -> Self {
        AssignmentCache {
            users: per_user(config.ttl_ms, config.max_users),
            version: Arc::new(AtomicU64::new(UNKNOWN)),
        }
    }

    /// The experiment config is at `version` now: assignments made under
    /// another one are never served again.
    pub fn set_version(&self, version: u64) {
        if self.version.swap(version, Ordering::AcqRel) != version
            && let Some(users) = &self.users
        {
            users.invalidate_all();
        }
    }

    /// `user`'s assignments, if made under the current version.
    pub async fn get(&self, user: &str) -> Option<Arc<pb::AssignResponse>> {
        let users = self.users.as_ref()?;
        let current = self.version.load(Ordering::Acquire);
        let hit = users.get(user).await?;
        (current != UNKNOWN && hit.config_version == current).then_some(hit)
    }

    /// Keeps `user`'s assignments (only those made under the current
    /// version: one made just before a change is not kept after it).
    pub async fn put(&self, user: &str, assigned: &pb::AssignResponse) {
        let Some(users) = &self.users else { return };
        if assigned.config_version == self.version.load(Ordering::Acquire) {
            users
                .insert(user.to_owned(), Arc::new(assigned.clone()))
                .await;
        }
    }
}

/// The request metadata a client sends for an answer computed afresh: the
/// HTTP header; its `no-cache` directive is honoured as an HTTP cache does
/// (the stored answer is not used; the fresh one is stored).
pub const CACHE_CONTROL: &str = "cache-control";

/// Whether the caller asked for an answer not taken from the response cache
/// (`cache-control: no-cache`). Unlike `debug`, the request otherwise runs as
/// any other: assigned from the pushed rules, its answer stored for the next
/// request. This is what a load test sends to measure what a user the cache
/// has not seen costs.
pub fn wants_fresh(metadata: &tonic::metadata::MetadataMap) -> bool {
    metadata
        .get_all(CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-cache"))
}

/// The cache key of a query: a hash of everything but the user id (the
/// user selects the entry) and the debug flag (debug requests skip the cache).
pub fn query_key(
    context: &pb::RequestContext,
    count: u32,
    exclude: &[String],
    filters: &pb::Filters,
) -> u64 {
    let mut bytes = context.encode_to_vec();
    bytes.extend_from_slice(&count.to_le_bytes());
    for id in exclude {
        bytes.extend_from_slice(id.as_bytes());
        bytes.push(0);
    }
    bytes.extend_from_slice(&filters.encode_to_vec());
    recmesh_algo::assign::fnv1a64(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_control_no_cache_asks_for_a_fresh_answer() {
        let with = |values: &[&str]| {
            let mut md = tonic::metadata::MetadataMap::new();
            for v in values {
                md.append(CACHE_CONTROL, v.parse().expect("ascii"));
            }
            wants_fresh(&md)
        };
        assert!(with(&["no-cache"]));
        assert!(with(&["max-age=0, No-Cache"]));
        assert!(with(&["max-age=10", "no-cache"]));
        assert!(!with(&[]));
        assert!(!with(&["max-age=10"]));
        assert!(!with(&["no-cache-please"]));
    }

    #[test]
    fn users_expire_spread_over_the_last_fifth_of_the_ttl() {
        let j = Jittered {
            ttl: Duration::from_secs(30),
        };
        let lives: Vec<Duration> = (0..10_000).map(|u| j.life(&format!("u{u}"))).collect();
        assert!(
            lives
                .iter()
                .all(|&l| l > Duration::from_secs(24) && l <= j.ttl)
        );
        // Spread, not bunched: every second of the last six holds some.
        for second in 24..30 {
            let n = lives.iter().filter(|l| l.as_secs() == second).count();
            assert!(
                (1_000..2_400).contains(&n),
                "{n} users expire in second {second}"
            );
        }
        assert_eq!(j.life("u7"), j.life("u7"), "one user, one life");
    }

    #[tokio::test]
    async fn invalidation_orphans_in_flight_entries() {
        let cache = ResponseCache::new(&CacheConfig::default());
        let entry = cache.entry("u1").await.expect("enabled");
        cache.invalidate("u1").await;
        // A request that started before the Track stores into the old entry...
        entry.put(1, Arc::new(pb::RecommendResponse::default()), None);
        // ...which the next request does not see.
        let fresh = cache.entry("u1").await.expect("enabled");
        assert!(fresh.get(1).is_none());
    }

    #[tokio::test]
    async fn a_variant_ttl_expires_its_answer_and_invalidate_all_drops_everything() {
        let cache = ResponseCache::new(&CacheConfig::default());
        let entry = cache.entry("u1").await.expect("enabled");
        entry.put(
            1,
            Arc::new(pb::RecommendResponse::default()),
            Some(Duration::ZERO),
        );
        entry.put(2, Arc::new(pb::RecommendResponse::default()), None);
        assert!(entry.get(1).is_none(), "its variant's TTL of 0 has passed");
        assert!(entry.get(2).is_some());
        cache.invalidate_all();
        let fresh = cache.entry("u1").await.expect("enabled");
        assert!(fresh.get(2).is_none());
    }

    #[tokio::test]
    async fn assignments_are_served_only_under_the_version_they_were_made_from() {
        let cache = AssignmentCache::new(&AssignCacheConfig::default());
        let made = |version| pb::AssignResponse {
            config_version: version,
            ..Default::default()
        };
        // No version heard of yet: nothing is kept or served.
        cache.put("u1", &made(3)).await;
        assert!(cache.get("u1").await.is_none());

        cache.set_version(3);
        cache.put("u1", &made(3)).await;
        assert_eq!(cache.get("u1").await.expect("hit").config_version, 3);
        // Made under an older version (a call that raced the change): not kept.
        cache.put("u2", &made(2)).await;
        assert!(cache.get("u2").await.is_none());

        // A new version: the old assignments are gone.
        cache.set_version(4);
        assert!(cache.get("u1").await.is_none());
        cache.put("u1", &made(4)).await;
        assert!(cache.get("u1").await.is_some());

        let off = AssignmentCache::new(&AssignCacheConfig {
            ttl_ms: 0,
            ..Default::default()
        });
        off.set_version(4);
        off.put("u1", &made(4)).await;
        assert!(off.get("u1").await.is_none(), "a TTL of 0 disables it");
    }

    #[test]
    fn keys_differ_by_query() {
        let ctx = pb::RequestContext::default();
        let f = pb::Filters::default();
        assert_ne!(query_key(&ctx, 10, &[], &f), query_key(&ctx, 11, &[], &f));
        assert_ne!(
            query_key(&ctx, 10, &["a".into()], &f),
            query_key(&ctx, 10, &[], &f)
        );
        assert_eq!(query_key(&ctx, 10, &[], &f), query_key(&ctx, 10, &[], &f));
    }
}

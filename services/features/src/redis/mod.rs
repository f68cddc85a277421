//! The production backend: features and the event log in Redis (`fred`),
//! a moka L1 in front, a local file buffer behind.
//!
//! # Keys (prefix `rm` by default)
//! | key | type | holds |
//! |---|---|---|
//! | `rm:events` | stream | the event log (fields `id user item event ts`), trimmed to about `stream_max_len` |
//! | `rm:seen:<event id>` | string, TTL `dedupe_ttl_s` | dedupe marker |
//! | `rm:i:<item>` | hash | attributes (`cat brand price stock promo created`), counters `0`–`3` (view, click, cart, purchase), score `s` |
//! | `rm:pop` | sorted set | item → event-weight sum (popularity; its top is the normaliser) |
//! | `rm:trend:<category>` | sorted set | item → forward-decayed weight (trending per category) |
//! | `rm:u:<user>:r` | list | recent `item\tevent\tts`, newest pushed first, trimmed |
//! | `rm:u:<user>:p` | set | items bought |
//! | `rm:u:<user>:c` | hash | category → forward-decayed affinity |
//! | `rm:u:<user>:h` | hash | hour bucket → events (last 7 days) |
//! | `rm:u:<user>:s` | hash | seen set: item key (16 hex digits) → newest `view,click,cart,purchase`, Unix s (0: none) |
//! | `rm:u:<user>:so` | sorted set | seen set order: item key → its newest event, Unix s (the oldest go first past `max_seen_per_user`) |
//! | `rm:meta` | hash | `dataset`: fingerprint of the bulk-loaded dataset |
//!
//! One Lua script checks the dedupe marker, appends to the stream and
//! applies the event, atomically: an acknowledged event is in the stream
//! and in the features exactly once, whatever retries happen. The script
//! touches keys of one user and one item, so it needs a single Redis (or a
//! primary with replicas/Sentinel), not Redis Cluster.
//!
//! # Outage
//! Commands fail fast while the connection is down. Reads then answer from
//! the L1, then from the last value read (the snapshot), then (items) from
//! the catalog with zero counters. Writes go to the local buffer file,
//! fsynced before the acknowledgement, and a background task replays it in
//! order once Redis answers; past `max_buffered` events `Ingest` returns
//! `UNAVAILABLE`.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use fred::prelude::*;
use fred::types::{ClusterHash, CustomCommand};
use moka::future::Cache;
use recmesh_algo::seen::SeenTimes;
use recmesh_catalog::{Dataset, EventKind, Item, item_key};
use recmesh_proto::v1 as pb;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::log::{EventFile, LogError};
use crate::memory::Limits;
use crate::now_ms;
use crate::store::{
    Counts, FeatureStore, HOURS_KEPT, Ingested, LogKind, LogPage, StoreError, UserRaw, ValidEvent,
    decay_factor, exposure_from_json, exposure_json, hour_of, item_features, kind_index, seen_time,
    user_features,
};

/// The Redis backend's settings (`[redis]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`.
    pub url: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Prefix of every key, so several meshes can share one Redis.
    pub key_prefix: String,
    /// Timeout of one Redis round trip, ms; past it the call falls back.
    pub command_timeout_ms: u64,
    /// Share of what a `GetUser`'s caller has left (its `grpc-timeout`)
    /// that the read waits on Redis before answering from the user's last
    /// read features; the rest is for the answer to travel back and be
    /// scheduled in the caller. 0 < share ≤ 1.
    pub slow_read_wait_share: f64,
    /// How long an event id is remembered for deduplication, seconds.
    pub dedupe_ttl_s: u64,
    /// Approximate bound of the event stream (`XADD MAXLEN ~`).
    pub stream_max_len: u64,
    /// L1 lifetime of a user's features, ms (this instance's own writes
    /// invalidate at once; other instances' after this long).
    pub l1_user_ttl_ms: u64,
    /// L1 lifetime of an item's features, ms.
    pub l1_item_ttl_ms: u64,
    /// Entries in each L1 cache, and in each snapshot cache.
    pub l1_capacity: u64,
    /// Local buffer file for events while Redis is unreachable.
    pub buffer_path: PathBuf,
    /// Most events the buffer holds; past it `Ingest` is refused.
    pub max_buffered: usize,
    /// How often the buffer tries to replay while Redis is away, ms.
    pub replay_interval_ms: u64,
    /// Commands per pipeline in the bulk load and the replay.
    pub batch: usize,
    /// Users the known-users filter is sized for (about 10 bits each); 0
    /// turns it off. While Redis is slow, a `GetUser` for a user the filter
    /// has never seen answers with the empty profile Redis would give
    /// instead of `UNAVAILABLE` (see [`KnownUsers`]).
    pub known_users: u64,
    /// At start, the users of the event stream's latest this-many events
    /// are read into the snapshot (at most `l1_capacity`), so a restarted
    /// instance answers them from it while Redis is slow, as the instance
    /// before it would have; 0 turns it off.
    pub warm_from_events: usize,
    /// Then up to this many more users with history, in the order a `SCAN`
    /// of the user keys finds them (bulk-loaded users have no events in
    /// the stream), still at most `l1_capacity` in all; 0 turns it off.
    pub warm_from_scan: usize,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            pool_size: 4,
            key_prefix: "rm".into(),
            command_timeout_ms: 50,
            slow_read_wait_share: 0.5,
            dedupe_ttl_s: 24 * 3600,
            stream_max_len: 10_000_000,
            l1_user_ttl_ms: 100,
            l1_item_ttl_ms: 1_000,
            l1_capacity: 100_000,
            buffer_path: PathBuf::from("var/features-buffer.tsv"),
            max_buffered: 100_000,
            replay_interval_ms: 200,
            batch: 1_000,
            known_users: 1_000_000,
            warm_from_events: 10_000,
            warm_from_scan: 100_000,
        }
    }
}

/// The Redis feature store.
#[derive(Debug)]
pub struct RedisStore {
    pool: Pool,
    config: RedisConfig,
    max_recent: usize,
    max_seen: usize,
    half_life_hours: f64,
    script_sha: String,
    catalog: Arc<HashMap<String, Item>>,
    l1_users: Cache<String, Arc<pb::UserFeatures>>,
    l1_items: Cache<String, pb::ItemFeatures>,
    snapshot_users: Cache<String, Arc<pb::UserFeatures>>,
    snapshot_items: Cache<String, pb::ItemFeatures>,
    buffer: Mutex<Buffer>,
    /// Batches waiting for the buffer's next write: every batch staged
    /// while one write is on the disk goes to the file in the next one,
    /// with one fsync for all of them (group commit).
    staged: std::sync::Mutex<Vec<Staged>>,
    /// Writes of the buffer file so far (one fsync each).
    buffer_writes: AtomicU64,
    /// Events in the buffer, read without the lock on the fast path.
    buffered: AtomicUsize,
    /// Users with history; `None` when `known_users` is 0.
    known: Option<KnownUsers>,
    /// The start's snapshot warm-up is over (done, stopped or off).
    warmed: AtomicBool,
    /// The store itself, for background reads it starts.
    me: Weak<RedisStore>,
}

fn unavailable(e: Error) -> StoreError {
    StoreError::Unavailable(format!("redis: {e}"))
}

/// Bounds a Redis call by `limit` on our side too, so no reconnect or
/// `LOADING` phase of a restarting Redis can hold a caller past its budget,
/// whatever fred does with commands caught by a dying connection. A command abandoned here may
/// still run after the reconnect; the apply script's dedupe makes that
/// harmless.
async fn within<T>(
    limit: Option<Duration>,
    call: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match limit {
        Some(limit) => recmesh_mesh::timer::timeout(limit, call)
            .await
            .unwrap_or_else(|_| {
                Err(Error::new(
                    ErrorKind::Timeout,
                    format!("no answer within {} ms", limit.as_millis()),
                ))
            }),
        None => call.await,
    }
}

impl RedisStore {
    /// Connects, bulk-loads the dataset unless Redis already holds it,
    /// reopens the outage buffer, and starts its replay task.
    pub async fn open(
        config: RedisConfig,
        data: &Dataset,
        limits: Limits,
    ) -> anyhow::Result<Arc<Self>> {
        let (max_recent, max_seen, half_life_hours) =
            (limits.max_recent, limits.max_seen, limits.half_life_hours);
        let redis_config = Config::from_url(&config.url)
            .map_err(|e| anyhow::anyhow!("config: `redis.url` {:?}: {e}", config.url))?;
        let timeout = Duration::from_millis(config.command_timeout_ms);
        let build = || {
            Builder::from_config(redis_config.clone())
                .with_connection_config(|c| {
                    c.connection_timeout = Duration::from_secs(2);
                    c.internal_command_timeout = Duration::from_secs(2);
                    c.max_command_attempts = 1;
                })
                // Serving calls carry their own short timeout (`options`); bulk
                // calls a long one (`bulk_options`).
                .with_performance_config(|p| p.default_command_timeout = timeout * 100)
                .set_policy(ReconnectPolicy::new_constant(0, 100))
                .build_pool(config.pool_size.max(1))
                .map_err(|e| anyhow::anyhow!("redis client: {e}"))
        };
        let pool = recmesh_server::wait_while_redis_loads(
            &config.url,
            recmesh_server::REDIS_LOADING_WAIT,
            || async {
                let pool = build()?;
                pool.init().await.map_err(|e| {
                    anyhow::anyhow!(
                        "cannot reach Redis at {} (`redis.url`): {e}; start it or fix the address",
                        config.url
                    )
                })?;
                Ok::<_, anyhow::Error>(pool)
            },
        )
        .await?;
        let script_sha: String = pool
            .next()
            .script_load(APPLY_LUA)
            .await
            .map_err(|e| anyhow::anyhow!("redis: loading the apply script: {e}"))?;
        let (file, pending) = EventFile::open(&config.buffer_path, true)?;
        if !pending.is_empty() {
            tracing::warn!(events = pending.len(), path = %file.path().display(),
                "outage buffer holds events from a previous run; replaying them");
        }
        let capacity = config.l1_capacity;
        let store = Arc::new_cyclic(|me| RedisStore {
            me: me.clone(),
            l1_users: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(Duration::from_millis(config.l1_user_ttl_ms.max(1)))
                .build(),
            l1_items: Cache::builder()
                .max_capacity(capacity)
                .time_to_live(Duration::from_millis(config.l1_item_ttl_ms.max(1)))
                .build(),
            snapshot_users: Cache::new(capacity),
            snapshot_items: Cache::new(capacity),
            buffered: AtomicUsize::new(pending.len()),
            staged: std::sync::Mutex::new(Vec::new()),
            buffer_writes: AtomicU64::new(0),
            known: (config.known_users > 0).then(|| KnownUsers::new(config.known_users)),
            warmed: AtomicBool::new(config.warm_from_events == 0 && config.warm_from_scan == 0),
            buffer: Mutex::new(Buffer {
                path: file.path().to_owned(),
                file: Arc::new(std::sync::Mutex::new(file)),
                queue: pending.into(),
            }),
            catalog: Arc::new(
                data.items
                    .iter()
                    .map(|i| (i.id.clone(), i.clone()))
                    .collect(),
            ),
            pool,
            config,
            max_recent,
            max_seen,
            half_life_hours,
            script_sha,
        });
        store.bulk_load(data).await?;
        watch_stream(&store, Duration::from_secs(5));
        if store.known.is_some() {
            tokio::spawn(follow_known_users(Arc::downgrade(&store)));
        }
        if store.config.warm_from_events > 0 || store.config.warm_from_scan > 0 {
            tokio::spawn(warm_snapshot(Arc::downgrade(&store)));
        }
        let weak = Arc::downgrade(&store);
        tokio::spawn(async move {
            loop {
                let Some(store) = weak.upgrade() else { return };
                let pause = Duration::from_millis(store.config.replay_interval_ms.max(1));
                if store.buffered.load(Ordering::Acquire) > 0 {
                    store.replay().await;
                }
                drop(store);
                tokio::time::sleep(pause).await;
            }
        });
        Ok(store)
    }

    fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.config.key_prefix)
    }

    fn options(&self) -> Options {
        Options {
            fail_fast: true,
            max_attempts: Some(1),
            timeout: Some(Duration::from_millis(self.config.command_timeout_ms)),
            ..Default::default()
        }
    }

    /// Options of the bulk load and the replay: pipelines of `batch`
    /// scripts, each fsynced by an `appendfsync always` Redis.
    fn bulk_options(&self) -> Options {
        Options {
            timeout: Some(Duration::from_secs(30)),
            ..self.options()
        }
    }

    async fn read_items(&self, ids: &[String]) -> Result<Vec<Option<pb::ItemFeatures>>, Error> {
        let pipeline = self
            .pool
            .next_connected()
            .pipeline()
            .with_options(&self.options());
        let _: () = pipeline
            .zrange(self.key("pop"), 0, 0, None, true, None, true)
            .await?;
        for id in ids {
            let _: () = pipeline
                .hmget(self.key(&format!("i:{id}")), vec!["0", "1", "2", "3", "s"])
                .await?;
        }
        let mut values: Vec<Value> = within(self.options().timeout, pipeline.all()).await?;
        // [member, score] of the most popular item.
        let top: Vec<String> = values.remove(0).convert().unwrap_or_default();
        let max = top.get(1).and_then(|s| s.parse().ok()).unwrap_or(0.0);
        Ok(ids
            .iter()
            .zip(values)
            .map(|(id, v)| {
                let item = self.catalog.get(id)?;
                let f: Vec<Option<String>> = v.convert().unwrap_or_default();
                let num = |n: usize| {
                    f.get(n)
                        .and_then(|x| x.as_deref())
                        .and_then(|x| x.parse().ok())
                };
                let counts: Counts = [0, 1, 2, 3].map(|n| num(n).unwrap_or(0));
                let score = f
                    .get(4)
                    .and_then(|x| x.as_deref())
                    .and_then(|x| x.parse().ok());
                Some(item_features(item, counts, score.unwrap_or(0.0), max))
            })
            .collect())
    }
}

fn progress(what: &str, done: usize, total: usize) {
    let done = done.min(total);
    let step = (total / 10).max(1);
    if done == total || done % step < (done.saturating_sub(1) % step) {
        tracing::info!(what, done, total, "bulk load");
    }
}

#[tonic::async_trait]
impl FeatureStore for RedisStore {
    async fn user(&self, user_id: &str, max_recent: usize) -> Result<pb::UserFeatures, StoreError> {
        let wait = Duration::from_millis(self.config.command_timeout_ms);
        self.user_within(user_id, max_recent, wait).await
    }

    /// A Redis that is slow (an `appendfsync always` write stuck behind a
    /// slow disk holds every read queued after it) is treated as one that
    /// is away for this read: past `wait`, the user's last read features
    /// answer, and `recmesh_features_stale_reads_total` counts it.
    async fn user_within(
        &self,
        user_id: &str,
        max_recent: usize,
        wait: Duration,
    ) -> Result<pb::UserFeatures, StoreError> {
        let shorten = |u: &pb::UserFeatures| {
            let mut u = u.clone();
            u.recent.truncate(max_recent);
            u
        };
        if let Some(u) = self.l1_users.get(user_id).await {
            metrics::counter!("recmesh_features_l1_total", "kind" => "user", "result" => "hit")
                .increment(1);
            return Ok(shorten(&u));
        }
        metrics::counter!("recmesh_features_l1_total", "kind" => "user", "result" => "miss")
            .increment(1);
        match within(Some(wait), self.read_user(user_id)).await {
            Ok(raw) => {
                let full = Arc::new(user_features(user_id, raw, self.max_recent, now_ms()));
                self.l1_users
                    .insert(user_id.to_owned(), Arc::clone(&full))
                    .await;
                self.snapshot_users
                    .insert(user_id.to_owned(), Arc::clone(&full))
                    .await;
                Ok(shorten(&full))
            }
            Err(e) => {
                metrics::counter!("recmesh_features_stale_reads_total", "kind" => "user")
                    .increment(1);
                match self.snapshot_users.get(user_id).await {
                    Some(u) => Ok(shorten(&u)),
                    None if self.has_no_history(user_id) => {
                        // What Redis would answer for a user without history.
                        Ok(user_features(user_id, None, max_recent, now_ms()))
                    }
                    None => {
                        tracing::debug!(user = user_id, error = %e,
                            "GetUser unavailable: redis did not answer in time and this instance has not read the user");
                        Err(unavailable(e))
                    }
                }
            }
        }
    }

    async fn items(&self, ids: &[String]) -> Result<pb::GetItemsResponse, StoreError> {
        let mut found: Vec<Option<pb::ItemFeatures>> = Vec::with_capacity(ids.len());
        let mut missing = Vec::new();
        for (n, id) in ids.iter().enumerate() {
            let hit = self.l1_items.get(id).await;
            if hit.is_none() && self.catalog.contains_key(id) {
                missing.push(n);
            }
            found.push(hit);
        }
        metrics::counter!("recmesh_features_l1_total", "kind" => "item", "result" => "miss")
            .increment(missing.len() as u64);
        if !missing.is_empty() {
            let wanted: Vec<String> = missing.iter().map(|&n| ids[n].clone()).collect();
            match self.read_items(&wanted).await {
                Ok(read) => {
                    for (&n, f) in missing.iter().zip(read) {
                        if let Some(f) = &f {
                            self.l1_items.insert(ids[n].clone(), f.clone()).await;
                            self.snapshot_items.insert(ids[n].clone(), f.clone()).await;
                        }
                        found[n] = f;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "item read failed; answering from the snapshot and the catalog");
                    metrics::counter!("recmesh_features_stale_reads_total", "kind" => "item")
                        .increment(missing.len() as u64);
                    for &n in &missing {
                        found[n] = match self.snapshot_items.get(&ids[n]).await {
                            Some(f) => Some(f),
                            None => self
                                .catalog
                                .get(&ids[n])
                                .map(|i| item_features(i, [0; 4], 0.0, 0.0)),
                        };
                    }
                }
            }
        }
        let mut out = pb::GetItemsResponse::default();
        for (id, f) in ids.iter().zip(found) {
            match f {
                Some(f) => out.items.push(f),
                None => out.unknown.push(id.clone()),
            }
        }
        Ok(out)
    }

    async fn ingest(&self, events: &[ValidEvent]) -> Result<Ingested, StoreError> {
        if let Some(known) = &self.known {
            for e in events {
                known.insert(&e.user);
            }
        }
        // While older events wait in the buffer, newer ones queue behind
        // them: the stream keeps the order events were acknowledged in.
        if self.buffered.load(Ordering::Acquire) > 0 {
            return self.buffer(events, "buffer still replaying").await;
        }
        let results = match self.run_script("event", events, &self.options()).await {
            Ok(r) => r,
            Err(e) => return self.buffer(events, &e.to_string()).await,
        };
        let mut out = Ingested::default();
        for (e, r) in events.iter().zip(&results) {
            match r {
                0 => out.duplicates += 1,
                2 => {
                    out.applied += 1;
                    if !out.new_items.contains(&e.item) {
                        out.new_items.push(e.item.clone());
                    }
                }
                _ => out.applied += 1,
            }
        }
        let mut unread = std::collections::BTreeSet::new();
        for e in events {
            self.l1_users.invalidate(&e.user).await;
            self.l1_items.invalidate(&e.item).await;
            if !self.snapshot_users.contains_key(&e.user) {
                unread.insert(e.user.clone());
            }
        }
        // A user with an event here but never read here would be refused
        // while Redis is slow: read them now, in the background, after
        // their event has landed.
        if !unread.is_empty()
            && let Some(store) = self.me.upgrade()
        {
            let unread: Vec<String> = unread.into_iter().collect();
            tokio::spawn(async move { warm_users(&store, &unread).await });
        }
        Ok(out)
    }

    async fn log_exposures(&self, exposures: &[pb::Exposure]) -> Result<u32, StoreError> {
        let key = self.key("exposures");
        let pipeline = self
            .pool
            .next_connected()
            .pipeline()
            .with_options(&self.options());
        let maxlen = self.config.stream_max_len.to_string();
        let xadd = CustomCommand::new_static("XADD", ClusterHash::FirstKey, false);
        for e in exposures {
            let args = vec![
                key.clone(),
                "MAXLEN".into(),
                "~".into(),
                maxlen.clone(),
                "*".into(),
                "e".into(),
                exposure_json(e),
            ];
            let _: () = pipeline
                .custom(xadd.clone(), args)
                .await
                .map_err(unavailable)?;
        }
        let _: Vec<Value> = within(self.options().timeout, pipeline.all())
            .await
            .map_err(unavailable)?;
        Ok(exposures.len() as u32)
    }

    async fn read_log(
        &self,
        log: LogKind,
        cursor: &str,
        max: usize,
    ) -> Result<LogPage, StoreError> {
        let key = match log {
            LogKind::Events => self.key("events"),
            LogKind::Exposures => self.key("exposures"),
        };
        let valid = cursor
            .split_once('-')
            .is_some_and(|(a, b)| a.parse::<u64>().is_ok() && b.parse::<u64>().is_ok());
        if !cursor.is_empty() && !valid {
            return Err(StoreError::BadCursor(format!(
                "`{cursor}` is not a stream id"
            )));
        }
        // "(" makes the start exclusive (Redis 6.2+).
        let start = if cursor.is_empty() {
            "-".to_owned()
        } else {
            format!("({cursor}")
        };
        let xrange = CustomCommand::new_static("XRANGE", ClusterHash::FirstKey, false);
        let reply: Value = within(
            self.options().timeout,
            self.pool
                .next_connected()
                .with_options(&self.options())
                .custom(
                    xrange,
                    vec![key, start, "+".into(), "COUNT".into(), max.to_string()],
                ),
        )
        .await
        .map_err(unavailable)?;
        // XRANGE's reply has the shape of one stream's part of XREADGROUP's.
        let entries = stream_entries(Value::Array(vec![Value::Array(vec![Value::Null, reply])]));
        let mut page = LogPage {
            next_cursor: entries
                .last()
                .map_or_else(|| cursor.to_owned(), |(id, _)| id.clone()),
            ..Default::default()
        };
        for (id, fields) in entries {
            match log {
                LogKind::Events => match stream_event(&fields) {
                    Ok(e) => page.events.push(e),
                    Err(reason) => {
                        tracing::warn!(%id, reason, "stream entry is not an event; skipped")
                    }
                },
                LogKind::Exposures => match fields.get("e").map(|e| exposure_from_json(e)) {
                    Some(Ok(e)) => page.exposures.push(e),
                    _ => tracing::warn!(%id, "stream entry is not an exposure; skipped"),
                },
            }
        }
        Ok(page)
    }

    fn backend(&self) -> &'static str {
        "redis"
    }
}

mod apply;
mod export;
mod follow;
mod outage;
#[cfg(test)]
mod tests;

use apply::APPLY_LUA;
pub use export::{Export, export_stream};
use export::{stream_entries, stream_event};
pub use follow::{FOLLOW_EVERY, KnownUsers, watch_stream};
use follow::{follow_known_users, warm_snapshot, warm_users};
use outage::{Buffer, Staged};

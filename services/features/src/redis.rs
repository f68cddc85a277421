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

/// The apply script. ARGV: mode (`event` logs and deduplicates, `load` only
/// applies), prefix, event id, user, item, event name, counter slot, weight,
/// timestamp, max recent, dedupe TTL, stream bound, decay factor, hour,
/// oldest hour kept, item key, timestamp in seconds, max seen. Returns 0 for a duplicate, 1 applied, 2 applied to an
/// item the catalog does not know.
const APPLY_LUA: &str = r#"
local mode, p, id, user, item, ev, slot, w, ts, maxr, ttl, maxlen, decay, hour, oldest =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[9],
  tonumber(ARGV[10]), ARGV[11], ARGV[12], tonumber(ARGV[13]), ARGV[14], tonumber(ARGV[15])
local ikey, tsec, maxs = ARGV[16], tonumber(ARGV[17]), tonumber(ARGV[18])
if mode == 'event' then
  if not redis.call('SET', p .. ':seen:' .. id, '1', 'NX', 'EX', ttl) then return 0 end
  redis.call('XADD', p .. ':events', 'MAXLEN', '~', maxlen, '*',
    'id', id, 'user', user, 'item', item, 'event', ev, 'ts', ts)
end
local ik = p .. ':i:' .. item
local cat = redis.call('HGET', ik, 'cat')
redis.call('HINCRBY', ik, slot, 1)
redis.call('HINCRBYFLOAT', ik, 's', w)
redis.call('ZINCRBY', p .. ':pop', w, item)
local uk = p .. ':u:' .. user
redis.call('LPUSH', uk .. ':r', item .. '\t' .. ev .. '\t' .. ts)
redis.call('LTRIM', uk .. ':r', 0, maxr - 1)
if ev == 'purchase' then redis.call('SADD', uk .. ':p', item) end
redis.call('HINCRBY', uk .. ':h', hour, 1)
for _, h in ipairs(redis.call('HKEYS', uk .. ':h')) do
  if tonumber(h) < oldest then redis.call('HDEL', uk .. ':h', h) end
end
local times = {0, 0, 0, 0}
local had = redis.call('HGET', uk .. ':s', ikey)
if had then
  local n = 1
  for v in string.gmatch(had, '[^,]+') do times[n] = tonumber(v); n = n + 1 end
end
local s = tonumber(slot) + 1
if tsec > times[s] then times[s] = tsec end
redis.call('HSET', uk .. ':s', ikey, table.concat(times, ','))
redis.call('ZADD', uk .. ':so', math.max(times[1], times[2], times[3], times[4]), ikey)
local over = redis.call('ZCARD', uk .. ':so') - maxs
if over > 0 then
  local gone = redis.call('ZPOPMIN', uk .. ':so', over)
  for n = 1, #gone, 2 do redis.call('HDEL', uk .. ':s', gone[n]) end
end
if cat then
  redis.call('HINCRBYFLOAT', uk .. ':c', cat, w * decay)
  redis.call('ZINCRBY', p .. ':trend:' .. cat, w * decay, item)
  return 1
end
return 2
"#;

/// A batch waiting for the outage buffer's next write.
#[derive(Debug)]
struct Staged {
    events: Vec<ValidEvent>,
    reason: String,
    done: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
}

/// The outage buffer: the file and its events in order.
#[derive(Debug)]
struct Buffer {
    /// Written on the blocking pool only ([`Buffer::on_file`]).
    file: Arc<std::sync::Mutex<EventFile>>,
    path: PathBuf,
    queue: VecDeque<ValidEvent>,
}

impl Buffer {
    /// Runs `f` on the file off the async workers. Its fdatasync waits on
    /// the disk, which is slow exactly when an `appendfsync always` Redis
    /// on it is; a worker blocked on it would hold every call queued on
    /// that worker (`GetUser`, `GetItems`) as long.
    async fn on_file(
        &self,
        f: impl FnOnce(&mut EventFile) -> Result<(), LogError> + Send + 'static,
    ) -> Result<(), String> {
        let file = Arc::clone(&self.file);
        tokio::task::spawn_blocking(move || f(&mut file.lock().unwrap_or_else(|p| p.into_inner())))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())
    }
}

/// Users with any history in Redis, as far as this instance can tell: a
/// Bloom filter filled by a scan of the user keys at start, by this
/// instance's own events, and by following the event stream (the events of
/// every other instance). It is used only once the scan is done, and only
/// for its "no": a user it has not seen has no history (up to the stream
/// follower's lag of about [`FOLLOW_EVERY`]), so a read that Redis is too
/// slow for can answer the empty profile Redis would give. A false "maybe"
/// (about 1% at `known_users` users, more past it) keeps the old answer,
/// `UNAVAILABLE`.
#[derive(Debug)]
pub struct KnownUsers {
    bits: Vec<AtomicU64>,
    complete: AtomicBool,
}

/// Bits set per user.
const KNOWN_HASHES: u64 = 7;
/// How often the known-users filter reads the event stream's new entries.
pub const FOLLOW_EVERY: Duration = Duration::from_millis(200);

impl KnownUsers {
    /// A filter for about `capacity` users.
    pub fn new(capacity: u64) -> Self {
        let bits = capacity.saturating_mul(10).next_power_of_two().max(1 << 12);
        KnownUsers {
            bits: (0..bits / 64).map(|_| AtomicU64::new(0)).collect(),
            complete: AtomicBool::new(false),
        }
    }

    fn positions(&self, user: &str) -> impl Iterator<Item = u64> + use<> {
        use std::hash::{Hash, Hasher};
        let hash = |salt: u8| {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (salt, user).hash(&mut h);
            h.finish()
        };
        let (a, b) = (hash(0), hash(1) | 1);
        let mask = self.bits.len() as u64 * 64 - 1;
        (0..KNOWN_HASHES).map(move |i| a.wrapping_add(i.wrapping_mul(b)) & mask)
    }

    /// Records that `user` has (or is about to have) history.
    pub fn insert(&self, user: &str) {
        for p in self.positions(user) {
            self.bits[(p / 64) as usize].fetch_or(1 << (p % 64), Ordering::Relaxed);
        }
    }

    /// `user` has surely no history: the start scan is done and the filter
    /// has never seen the user.
    pub fn surely_new(&self, user: &str) -> bool {
        self.complete.load(Ordering::Acquire)
            && self.positions(user).any(|p| {
                self.bits[(p / 64) as usize].load(Ordering::Relaxed) & (1 << (p % 64)) == 0
            })
    }

    fn mark_complete(&self) {
        self.complete.store(true, Ordering::Release);
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

/// One seen-set entry: `key` 16 hex digits, `times` four comma-separated
/// Unix seconds. A malformed entry is skipped (and logged).
fn parse_seen(key: &str, times: &str) -> Option<(u64, SeenTimes)> {
    let parsed = (|| {
        let k = u64::from_str_radix(key, 16).ok()?;
        let mut t = [0u32; 4];
        let mut parts = times.split(',');
        for slot in &mut t {
            *slot = parts.next()?.parse().ok()?;
        }
        Some((k, t))
    })();
    if parsed.is_none() {
        tracing::warn!(key, times, "a malformed seen-set entry skipped");
    }
    parsed
}

fn parse_recent(entry: &str) -> Option<(String, EventKind, i64)> {
    let mut f = entry.split('\t');
    let item = f.next()?.to_owned();
    let kind = EventKind::parse(f.next()?)?;
    let ts = f.next()?.parse().ok()?;
    Some((item, kind, ts))
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

    fn args(&self, mode: &str, e: &ValidEvent) -> Vec<String> {
        let hour = hour_of(e.timestamp_ms);
        vec![
            mode.into(),
            self.config.key_prefix.clone(),
            e.event_id.clone(),
            e.user.clone(),
            e.item.clone(),
            e.kind.as_str().into(),
            kind_index(e.kind).to_string(),
            e.kind.weight().to_string(),
            e.timestamp_ms.to_string(),
            self.max_recent.to_string(),
            self.config.dedupe_ttl_s.max(1).to_string(),
            self.config.stream_max_len.to_string(),
            decay_factor(e.timestamp_ms, self.half_life_hours).to_string(),
            hour.to_string(),
            (hour - HOURS_KEPT + 1).to_string(),
            format!("{:016x}", item_key(&e.item)),
            seen_time(e.timestamp_ms).to_string(),
            self.max_seen.to_string(),
        ]
    }

    /// Runs the apply script for each event in one pipeline; reloads the
    /// script once if Redis lost it (a restart without its script cache).
    async fn run_script(
        &self,
        mode: &str,
        events: &[ValidEvent],
        options: &Options,
    ) -> Result<Vec<i64>, Error> {
        for attempt in 0..2 {
            let pipeline = self.pool.next_connected().pipeline().with_options(options);
            // EVALSHA sha 0 args...: through `custom`, the one way to send
            // it with per-command options (fail fast, timeout).
            let evalsha = CustomCommand::new_static("EVALSHA", ClusterHash::Random, false);
            for e in events {
                let mut args = vec![self.script_sha.clone(), "0".to_owned()];
                args.extend(self.args(mode, e));
                let _: () = pipeline.custom(evalsha.clone(), args).await?;
            }
            match within(options.timeout, pipeline.all::<Vec<i64>>()).await {
                Err(e) if attempt == 0 && e.details().contains("NOSCRIPT") => {
                    let _: String = self
                        .pool
                        .next()
                        .with_options(options)
                        .script_load(APPLY_LUA)
                        .await?;
                }
                // A batch of one comes back as a bare integer.
                Ok(r) => return Ok(r),
                Err(e) => return Err(e),
            }
        }
        Err(Error::new(ErrorKind::Unknown, "NOSCRIPT after reload"))
    }

    /// Loads the catalog and the dataset's interactions, in pipelines, with
    /// progress in the log; skipped when Redis already holds this dataset.
    async fn bulk_load(&self, data: &Dataset) -> anyhow::Result<()> {
        let client = self.pool.next_connected();
        let meta = self.key("meta");
        let fingerprint = data.fingerprint();
        let loaded: Option<String> = client.hget(&meta, "dataset").await?;
        match loaded {
            Some(f) if f == fingerprint => {
                tracing::info!(%fingerprint, "redis already holds this dataset; bulk load skipped");
                return Ok(());
            }
            Some(f) => anyhow::bail!(
                "redis at {} holds features of another dataset ({f}, this one is {fingerprint}) \
                 under prefix `{}`: set `redis.key_prefix` to a new prefix, or delete the old keys \
                 (redis-cli --scan --pattern '{}:*' | xargs redis-cli del)",
                self.config.url,
                self.config.key_prefix,
                self.config.key_prefix
            ),
            None => {}
        }
        let started = std::time::Instant::now();
        let batch = self.config.batch.max(1);
        for (n, chunk) in data.items.chunks(batch).enumerate() {
            let pipeline = client.pipeline();
            for i in chunk {
                let fields: Vec<(&str, String)> = vec![
                    ("cat", i.category.clone()),
                    ("brand", i.brand.clone()),
                    ("price", i.price.to_string()),
                    ("stock", u8::from(i.in_stock).to_string()),
                    ("promo", u8::from(i.promoted).to_string()),
                    ("created", i.created_at.to_string()),
                ];
                let _: () = pipeline
                    .hset(self.key(&format!("i:{}", i.id)), fields)
                    .await?;
            }
            let _: Vec<Value> = pipeline.all().await?;
            progress("items", (n + 1) * batch, data.items.len());
        }
        let events: Vec<ValidEvent> = data
            .interactions
            .iter()
            .map(|e| ValidEvent {
                event_id: String::new(),
                user: e.user.clone(),
                item: e.item.clone(),
                kind: e.kind,
                timestamp_ms: e.timestamp_ms,
            })
            .collect();
        for (n, chunk) in events.chunks(batch).enumerate() {
            self.run_script("load", chunk, &self.bulk_options()).await?;
            progress("interactions", (n + 1) * batch, events.len());
        }
        let _: () = client
            .hset(&meta, ("dataset", fingerprint.as_str()))
            .await?;
        tracing::info!(
            items = data.items.len(),
            interactions = events.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "bulk load into redis done"
        );
        Ok(())
    }

    async fn read_user(&self, user_id: &str) -> Result<Option<UserRaw>, Error> {
        let uk = self.key(&format!("u:{user_id}"));
        let pipeline = self
            .pool
            .next_connected()
            .pipeline()
            .with_options(&self.options());
        let _: () = pipeline.lrange(format!("{uk}:r"), 0, -1).await?;
        let _: () = pipeline.smembers(format!("{uk}:p")).await?;
        let _: () = pipeline.hgetall(format!("{uk}:c")).await?;
        let _: () = pipeline.hgetall(format!("{uk}:h")).await?;
        let _: () = pipeline.hgetall(format!("{uk}:s")).await?;
        type Read = (
            Vec<String>,
            Vec<String>,
            HashMap<String, f64>,
            HashMap<i64, u64>,
            HashMap<String, String>,
        );
        let (recent, purchased, affinity, hours, seen): Read =
            within(self.options().timeout, pipeline.all()).await?;
        if recent.is_empty() {
            return Ok(None);
        }
        Ok(Some(UserRaw {
            recent: recent.iter().filter_map(|r| parse_recent(r)).collect(),
            purchased,
            affinity,
            hours: hours.into_iter().collect(),
            seen: seen.iter().filter_map(|(k, v)| parse_seen(k, v)).collect(),
        }))
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

    /// Replays the buffer in order, a pipeline at a time, until it is empty
    /// or Redis fails again. The lock is not held during the Redis call:
    /// `Ingest` keeps appending to the back (and answering) meanwhile, and
    /// only this task removes from the front.
    async fn replay(&self) {
        let options = Options {
            timeout: Some(Duration::from_millis(
                self.config.command_timeout_ms.saturating_mul(20),
            )),
            ..self.options()
        };
        let mut replayed = 0usize;
        loop {
            let chunk: Vec<ValidEvent> = {
                let buffer = self.buffer.lock().await;
                let n = buffer.queue.len().min(self.config.batch.max(1));
                buffer.queue.iter().take(n).cloned().collect()
            };
            if chunk.is_empty() {
                break;
            }
            if let Err(e) = self.run_script("event", &chunk, &options).await {
                tracing::debug!(error = %e, "replay paused: redis still unreachable");
                break;
            }
            let mut buffer = self.buffer.lock().await;
            buffer.queue.drain(..chunk.len());
            replayed += chunk.len();
            self.buffered.store(buffer.queue.len(), Ordering::Release);
            metrics::counter!("recmesh_features_replayed_total").increment(chunk.len() as u64);
            metrics::gauge!("recmesh_features_buffered").set(buffer.queue.len() as f64);
            if buffer.queue.is_empty()
                && let Err(e) = buffer.on_file(EventFile::clear).await
            {
                tracing::error!(error = %e, "outage buffer replayed but the file could not be cleared; \
                    its events will be replayed again (deduplicated) at the next start");
            }
            drop(buffer);
            for e in &chunk {
                self.l1_users.invalidate(&e.user).await;
                self.l1_items.invalidate(&e.item).await;
            }
        }
        if replayed > 0 {
            tracing::info!(
                replayed,
                left = self.buffered(),
                "outage buffer replayed into redis"
            );
        }
    }

    /// Appends events to the outage buffer (durably) or refuses them.
    ///
    /// The batch is staged, and a writer task (the first batch staged
    /// since the last write starts it) writes every staged batch with one
    /// fsync once the write before it is done. On a slow disk, calls that
    /// come while a write is on the disk wait for one more fsync, not one
    /// each. The write runs in its own task, so a caller that gives up
    /// (its deadline passed) does not cut it short for the others.
    async fn buffer(&self, events: &[ValidEvent], reason: &str) -> Result<Ingested, StoreError> {
        let (done, answer) = tokio::sync::oneshot::channel();
        let first = {
            let mut staged = self.staged.lock().unwrap_or_else(|p| p.into_inner());
            staged.push(Staged {
                events: events.to_vec(),
                reason: reason.to_owned(),
                done,
            });
            staged.len() == 1
        };
        if first {
            let Some(store) = self.me.upgrade() else {
                return Err(StoreError::NotRecorded(
                    "outage buffer: the store is shutting down".into(),
                ));
            };
            tokio::spawn(async move { store.write_staged().await });
        }
        answer.await.unwrap_or_else(|_| {
            Err(StoreError::NotRecorded(
                "outage buffer: the writer stopped before the write".into(),
            ))
        })?;
        Ok(Ingested {
            buffered: events.len() as u32,
            ..Default::default()
        })
    }

    /// Writes every staged batch to the buffer file with one fsync, in the
    /// order they were staged, refusing those past `max_buffered` (a batch
    /// is taken whole or not at all).
    async fn write_staged(&self) {
        let mut buffer = self.buffer.lock().await;
        let staged = std::mem::take(&mut *self.staged.lock().unwrap_or_else(|p| p.into_inner()));
        let mut room = self.config.max_buffered.saturating_sub(buffer.queue.len());
        let mut taken = Vec::with_capacity(staged.len());
        for s in staged {
            if s.events.len() > room {
                metrics::counter!("recmesh_features_rejected_total", "reason" => "buffer_full")
                    .increment(s.events.len() as u64);
                let _ = s.done.send(Err(StoreError::NotRecorded(format!(
                    "redis is unreachable ({}) and the outage buffer is full \
                     ({} of {} events, `redis.max_buffered`); retry later",
                    s.reason,
                    self.config.max_buffered - room,
                    self.config.max_buffered
                ))));
            } else {
                room -= s.events.len();
                taken.push(s);
            }
        }
        let Some(first) = taken.first() else { return };
        if buffer.queue.is_empty() {
            tracing::warn!(
                reason = first.reason,
                "redis unreachable: buffering events to {}",
                buffer.path.display()
            );
        }
        let batch: Vec<ValidEvent> = taken.iter().flat_map(|s| s.events.clone()).collect();
        let n = batch.len();
        let written = buffer.on_file(move |f| f.append(&batch)).await;
        self.buffer_writes.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("recmesh_features_buffer_writes_total").increment(1);
        match written {
            Ok(()) => {
                for s in &mut taken {
                    buffer.queue.extend(std::mem::take(&mut s.events));
                }
                self.buffered.store(buffer.queue.len(), Ordering::Release);
                metrics::counter!("recmesh_features_buffered_total").increment(n as u64);
                metrics::gauge!("recmesh_features_buffered").set(buffer.queue.len() as f64);
                for s in taken {
                    let _ = s.done.send(Ok(()));
                }
            }
            Err(e) => {
                for s in taken {
                    let _ = s
                        .done
                        .send(Err(StoreError::NotRecorded(format!("outage buffer: {e}"))));
                }
            }
        }
    }

    /// Writes of the outage buffer file so far, one fsync each.
    pub fn buffer_writes(&self) -> u64 {
        self.buffer_writes.load(Ordering::Relaxed)
    }

    /// Events waiting in the outage buffer.
    pub fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Acquire)
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

/// Where [`export_stream`] reads and writes.
#[derive(Debug, Clone)]
pub struct Export {
    /// Redis URL.
    pub url: String,
    /// Key prefix of the features service.
    pub key_prefix: String,
    /// Consumer group; each group sees every event once.
    pub group: String,
    /// Consumer name inside the group.
    pub consumer: String,
    /// Event file appended to (created with its header when missing).
    pub out: PathBuf,
    /// Keep following the stream instead of stopping once it is drained.
    pub follow: bool,
}

fn stream_event(fields: &HashMap<String, String>) -> Result<ValidEvent, String> {
    let get = |k: &str| fields.get(k).ok_or_else(|| format!("field `{k}` missing"));
    let event = get("event")?;
    Ok(ValidEvent {
        event_id: get("id")?.clone(),
        user: get("user")?.clone(),
        item: get("item")?.clone(),
        kind: EventKind::parse(event).ok_or_else(|| format!("unknown event `{event}`"))?,
        timestamp_ms: get("ts")?
            .parse()
            .map_err(|_| "field `ts` is not an integer".to_owned())?,
    })
}

/// The entries of an `XREADGROUP` reply on one stream (RESP2:
/// `[[stream, [[id, [field, value, …]], …]]]`, or nil when nothing came).
fn stream_entries(reply: Value) -> Vec<(String, HashMap<String, String>)> {
    let array = |v: Value| match v {
        Value::Array(a) => a,
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for stream in array(reply) {
        let mut pair = array(stream).into_iter();
        let Some(entries) = pair.nth(1) else { continue };
        for entry in array(entries) {
            let mut entry = array(entry).into_iter();
            let (Some(id), Some(fields)) = (entry.next(), entry.next()) else {
                continue;
            };
            let mut map = HashMap::new();
            let mut fields = array(fields).into_iter();
            while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
                map.insert(
                    k.as_string().unwrap_or_default(),
                    v.as_string().unwrap_or_default(),
                );
            }
            out.push((id.as_string().unwrap_or_default(), map));
        }
    }
    out
}

/// Copies the event stream into an event file through a consumer group, the
/// way the trainer takes its events: read a page (`XREADGROUP`), append it
/// to the file and fsync, then `XACK` it. After a crash between the append
/// and the ack the page is delivered again (pending entries are read first),
/// so the file can hold an event twice; its readers deduplicate by event id.
/// Returns the events written.
pub async fn export_stream(export: &Export) -> anyhow::Result<u64> {
    let config = Config::from_url(&export.url)
        .map_err(|e| anyhow::anyhow!("--redis {:?}: {e}", export.url))?;
    let client = Builder::from_config(config)
        .set_policy(ReconnectPolicy::new_constant(0, 200))
        .build()?;
    client
        .init()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach Redis at {}: {e}", export.url))?;
    let stream = format!("{}:events", export.key_prefix);
    let created: Result<(), Error> = client
        .xgroup_create(&stream, export.group.as_str(), "0", true)
        .await;
    if let Err(e) = created
        && !e.details().contains("BUSYGROUP")
    {
        anyhow::bail!(
            "creating consumer group `{}` on {stream}: {e}",
            export.group
        );
    }
    let (mut file, _) = EventFile::open(&export.out, true)?;
    let mut written = 0u64;
    // "0": this consumer's pending (delivered, never acked) entries first.
    let mut from = "0";
    loop {
        let block = export.follow.then_some(1_000);
        let page: Value = client
            .xreadgroup(
                export.group.as_str(),
                export.consumer.as_str(),
                Some(1_000),
                if from == ">" { block } else { None },
                false,
                stream.as_str(),
                from,
            )
            .await?;
        let entries = stream_entries(page);
        if entries.is_empty() {
            if from == "0" {
                from = ">";
                continue;
            }
            if export.follow {
                continue;
            }
            break;
        }
        let mut events = Vec::with_capacity(entries.len());
        for (id, fields) in &entries {
            match stream_event(fields) {
                Ok(e) => events.push(e),
                Err(reason) => tracing::warn!(%id, reason, "stream entry is not an event; skipped"),
            }
        }
        file.append(&events)?;
        let ids: Vec<&str> = entries.iter().map(|(id, _)| id.as_str()).collect();
        let _: u64 = client.xack(&stream, export.group.as_str(), ids).await?;
        written += events.len() as u64;
        tracing::info!(written, "exported events");
    }
    Ok(written)
}

impl RedisStore {
    /// Entries in the event stream and the lag of each consumer group
    /// (Redis 7's `XINFO GROUPS` `lag`: entries not yet delivered to it).
    pub async fn stream_stats(&self) -> Result<(u64, Vec<(String, u64)>), StoreError> {
        let key = self.key("events");
        let client = self.pool.next_connected().with_options(&self.options());
        let len: u64 = client.xlen(&key).await.map_err(unavailable)?;
        let groups: Value = match client.xinfo_groups(&key).await {
            Ok(v) => v,
            // No stream yet: no groups.
            Err(e) if e.details().contains("no such key") => Value::Null,
            Err(e) => return Err(unavailable(e)),
        };
        let mut out = Vec::new();
        if let Value::Array(groups) = groups {
            for g in groups {
                let Value::Array(fields) = g else { continue };
                let mut fields = fields.into_iter();
                let (mut name, mut lag) = (String::new(), 0);
                while let (Some(k), Some(v)) = (fields.next(), fields.next()) {
                    match k.as_string().as_deref() {
                        Some("name") => name = v.as_string().unwrap_or_default(),
                        Some("lag") => lag = v.as_u64().unwrap_or(0),
                        _ => {}
                    }
                }
                out.push((name, lag));
            }
        }
        Ok((len, out))
    }
}

impl RedisStore {
    /// Whether `user` surely has no history, as the known-users filter
    /// tells: false while its start scan runs, and when it is off.
    pub fn has_no_history(&self, user: &str) -> bool {
        self.known.as_ref().is_some_and(|k| k.surely_new(user))
    }

    /// Whether this instance has read `user` (its snapshot holds the
    /// user's last read features).
    pub fn has_read(&self, user: &str) -> bool {
        self.snapshot_users.contains_key(user)
    }

    /// Whether the start's snapshot warm-up is over (done, stopped or off).
    pub fn snapshot_warmed(&self) -> bool {
        self.warmed.load(Ordering::Acquire)
    }

    /// The users of the event stream's latest `n` entries, latest first,
    /// each once; read in pages of 1,000 so no reply holds Redis long.
    async fn recent_users(&self, n: usize) -> Result<Vec<String>, Error> {
        let xrevrange = CustomCommand::new_static("XREVRANGE", ClusterHash::FirstKey, false);
        let (mut users, mut seen) = (Vec::new(), std::collections::HashSet::new());
        let (mut end, mut read) = ("+".to_owned(), 0);
        while read < n {
            let count = (n - read).min(1_000);
            let reply: Value = self
                .pool
                .next_connected()
                .with_options(&self.background())
                .custom(
                    xrevrange.clone(),
                    vec![
                        self.key("events"),
                        end.clone(),
                        "-".into(),
                        "COUNT".into(),
                        count.to_string(),
                    ],
                )
                .await?;
            let entries =
                stream_entries(Value::Array(vec![Value::Array(vec![Value::Null, reply])]));
            read += entries.len();
            let last = entries.last().map(|(id, _)| format!("({id}"));
            for (_, mut fields) in entries {
                if let Some(user) = fields.remove("user")
                    && seen.insert(user.clone())
                {
                    users.push(user);
                }
            }
            match last {
                Some(last) if read < n => end = last,
                _ => break,
            }
        }
        Ok(users)
    }

    /// Options for the known-users scan and follower: background reads, so
    /// as patient as the replay.
    fn background(&self) -> Options {
        Options {
            timeout: Some(Duration::from_millis(
                self.config.command_timeout_ms.saturating_mul(20),
            )),
            ..self.options()
        }
    }

    /// The id of the event stream's last entry ("" when it is empty).
    async fn stream_tail(&self) -> Result<String, Error> {
        let xrevrange = CustomCommand::new_static("XREVRANGE", ClusterHash::FirstKey, false);
        let reply: Value = self
            .pool
            .next_connected()
            .with_options(&self.background())
            .custom(
                xrevrange,
                vec![
                    self.key("events"),
                    "+".into(),
                    "-".into(),
                    "COUNT".into(),
                    "1".into(),
                ],
            )
            .await?;
        let entries = stream_entries(Value::Array(vec![Value::Array(vec![Value::Null, reply])]));
        Ok(entries
            .into_iter()
            .next()
            .map(|(id, _)| id)
            .unwrap_or_default())
    }

    /// One `SCAN` page of users with history (their `u:<user>:r` list):
    /// the next cursor ("0" at the end) and the users.
    async fn scan_users(&self, cursor: &str) -> Result<(String, Vec<String>), Error> {
        let scan = CustomCommand::new_static("SCAN", ClusterHash::Random, false);
        let prefix = self.key("u:");
        let reply: Value = self
            .pool
            .next_connected()
            .with_options(&self.background())
            .custom(
                scan,
                vec![
                    cursor.to_owned(),
                    "MATCH".into(),
                    format!("{prefix}*:r"),
                    "COUNT".into(),
                    "1000".into(),
                ],
            )
            .await?;
        let Value::Array(parts) = reply else {
            return Err(Error::new(ErrorKind::Protocol, "SCAN: not an array"));
        };
        let mut parts = parts.into_iter();
        let next = parts
            .next()
            .and_then(|c| c.as_string())
            .unwrap_or_else(|| "0".into());
        let users = match parts.next() {
            Some(Value::Array(keys)) => keys
                .into_iter()
                .filter_map(|k| k.as_string())
                .filter_map(|k| Some(k.strip_prefix(&prefix)?.strip_suffix(":r")?.to_owned()))
                .collect(),
            _ => Vec::new(),
        };
        Ok((next, users))
    }
}

/// Fills the store's [`KnownUsers`]: notes where the event stream ends,
/// scans the user keys (every user with history before that point), marks
/// the filter usable, then follows the stream from that point for the users
/// of every instance's events. Redis errors are retried; the task ends with
/// the store.
async fn follow_known_users(store: Weak<RedisStore>) {
    const RETRY: Duration = Duration::from_secs(1);
    let mut cursor = loop {
        let Some(s) = store.upgrade() else { return };
        match s.stream_tail().await {
            Ok(tail) => break tail,
            Err(e) => tracing::debug!(error = %e, "known users: stream tail not read; retrying"),
        }
        drop(s);
        tokio::time::sleep(RETRY).await;
    };
    let (mut page, mut users) = ("0".to_owned(), 0usize);
    loop {
        let Some(s) = store.upgrade() else { return };
        let Some(known) = &s.known else { return };
        match s.scan_users(&page).await {
            Ok((next, found)) => {
                users += found.len();
                found.iter().for_each(|u| known.insert(u));
                page = next;
                if page == "0" {
                    known.mark_complete();
                    tracing::info!(
                        users,
                        "known users scanned; a user never seen answers empty while redis is slow"
                    );
                    break;
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "known users: scan page failed; retrying");
                drop(s);
                tokio::time::sleep(RETRY).await;
            }
        }
    }
    loop {
        tokio::time::sleep(FOLLOW_EVERY).await;
        let Some(s) = store.upgrade() else { return };
        let Some(known) = &s.known else { return };
        while let Ok(read) = s.read_log(LogKind::Events, &cursor, 1_000).await {
            read.events.iter().for_each(|e| known.insert(&e.user));
            if read.next_cursor == cursor {
                break;
            }
            cursor = read.next_cursor;
        }
    }
}

/// Reads users with history into the store's snapshot, so it can answer
/// them while Redis is slow before a `GetUser` has read them: first the
/// recent users of the event stream (`warm_from_events`), then users a
/// `SCAN` of the user keys finds (`warm_from_scan`), at most `l1_capacity`
/// in all, eight at a time, skipping users already in the snapshot. Stops
/// when Redis does not answer (the snapshot then fills as users are read,
/// as without the warm-up).
async fn warm_snapshot(store: Weak<RedisStore>) {
    let Some(s) = store.upgrade() else { return };
    let started = std::time::Instant::now();
    let mut room = usize::try_from(s.config.l1_capacity).unwrap_or(usize::MAX);
    let (mut from_events, mut from_scan, mut answering) = (0, 0, true);
    if s.config.warm_from_events > 0 {
        match s.recent_users(s.config.warm_from_events).await {
            Ok(users) => {
                let wanted = users.len().min(room);
                (from_events, answering) = warm_users(&s, &users[..wanted]).await;
                room -= wanted;
            }
            Err(e) => {
                tracing::info!(error = %e, "snapshot not warmed from the event stream: it was not read");
            }
        }
    }
    let mut scan_room = room.min(s.config.warm_from_scan);
    let mut page = "0".to_owned();
    while answering && scan_room > 0 {
        let Ok((next, mut users)) = s.scan_users(&page).await else {
            answering = false;
            break;
        };
        users.truncate(scan_room);
        scan_room -= users.len();
        let (read, ok) = warm_users(&s, &users).await;
        (from_scan, answering) = (from_scan + read, ok);
        page = next;
        if page == "0" {
            break;
        }
    }
    // Users whose read failed now and then are left to their first
    // `GetUser`; the counts say how many were read.
    tracing::info!(
        from_events,
        from_scan,
        ms = started.elapsed().as_millis() as u64,
        "{}",
        if answering {
            "snapshot warmed with users with history"
        } else {
            "snapshot warm-up stopped: redis is not answering"
        }
    );
    s.warmed.store(true, Ordering::Release);
}

/// Reads `users` (those not in the snapshot yet) into the snapshot, eight
/// at a time; the users read, and false when a whole batch failed (Redis
/// is not answering: stop).
async fn warm_users(s: &Arc<RedisStore>, users: &[String]) -> (usize, bool) {
    const AT_ONCE: usize = 8;
    let mut warmed = 0;
    for chunk in users.chunks(AT_ONCE) {
        let mut reads = tokio::task::JoinSet::new();
        for user in chunk {
            let (s, user) = (Arc::clone(s), user.clone());
            reads.spawn(async move {
                if s.snapshot_users.contains_key(&user) {
                    return true;
                }
                let Ok(raw) = s.read_user(&user).await else {
                    return false;
                };
                let features = user_features(&user, raw, s.max_recent, now_ms());
                // Never over what a `GetUser` read meanwhile (newer).
                s.snapshot_users
                    .entry(user)
                    .or_insert(Arc::new(features))
                    .await;
                true
            });
        }
        let mut done = 0;
        while let Some(read) = reads.join_next().await {
            done += usize::from(matches!(read, Ok(true)));
        }
        warmed += done;
        if done == 0 {
            return (warmed, false);
        }
    }
    (warmed, true)
}

/// Publishes [`RedisStore::stream_stats`] as gauges every `every`.
pub fn watch_stream(store: &Arc<RedisStore>, every: Duration) {
    let weak = Arc::downgrade(store);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(store) = weak.upgrade() else { return };
            if let Ok((len, groups)) = store.stream_stats().await {
                metrics::gauge!("recmesh_features_stream_length").set(len as f64);
                for (group, lag) in groups {
                    metrics::gauge!("recmesh_features_stream_lag", "group" => group)
                        .set(lag as f64);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::KnownUsers;

    #[test]
    fn known_users_never_forget_and_rarely_imagine() {
        let known = KnownUsers::new(100_000);
        known.insert("u1");
        assert!(
            !known.surely_new("nobody"),
            "not usable before the scan ends"
        );
        known.mark_complete();
        for n in 0..100_000 {
            known.insert(&format!("user-{n}"));
        }
        assert!((0..100_000).all(|n| !known.surely_new(&format!("user-{n}"))));
        assert!(!known.surely_new("u1"));
        let imagined = (0..100_000)
            .filter(|n| !known.surely_new(&format!("stranger-{n}")))
            .count();
        // About 1% at capacity with 10 bits and 7 hashes per user.
        assert!(
            imagined < 2_000,
            "{imagined} of 100000 strangers taken for known"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_staged_during_a_write_share_the_next_one() {
        use super::{RedisConfig, RedisStore};
        use crate::store::ValidEvent;
        use recmesh_catalog::{Dataset, EventKind};
        use std::sync::Arc;
        use std::time::Duration;
        let dir = std::env::temp_dir().join(format!("recmesh-group-commit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let server = crate::testkit::RedisServer::start(&dir.join("redis")).expect("redis-server");
        let config = RedisConfig {
            url: server.url(),
            buffer_path: dir.join("buffer.tsv"),
            max_buffered: 25,
            // No replay during the test: the buffer keeps what was written.
            replay_interval_ms: 600_000,
            ..RedisConfig::default()
        };
        let store = RedisStore::open(
            config,
            &Dataset::default(),
            crate::Config::default().limits(),
        )
        .await
        .expect("open");
        let event = |n: usize| ValidEvent {
            event_id: format!("e{n}"),
            user: format!("u{n}"),
            item: "i1".into(),
            kind: EventKind::View,
            timestamp_ms: 1_700_000_000_000,
        };
        // Until `n` batches are staged; a staging that never comes fails
        // the test instead of hanging it.
        let staged_past = async |store: &RedisStore, n: usize| {
            let staged = async {
                while store.staged.lock().map(|s| s.len()).unwrap_or(0) < n {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(10), staged)
                .await
                .expect("batches staged");
        };
        // A write on a slow disk holds the buffer; meanwhile twenty calls
        // of one event each, then one of ten, are staged.
        let held = store.buffer.lock().await;
        let mut calls = Vec::new();
        for n in 0..20 {
            let store = Arc::clone(&store);
            calls.push(tokio::spawn(async move {
                store.buffer(&[event(n)], "test").await
            }));
        }
        staged_past(&store, 20).await;
        let big: Vec<ValidEvent> = (20..30).map(event).collect();
        let too_many = {
            let store = Arc::clone(&store);
            tokio::spawn(async move { store.buffer(&big, "test").await })
        };
        staged_past(&store, 21).await;
        drop(held);
        for call in calls {
            let done = call.await.expect("call").expect("buffered");
            assert_eq!(done.buffered, 1);
        }
        let err = too_many.await.expect("call").expect_err("past the bound");
        assert!(err.to_string().contains("redis.max_buffered"), "{err}");
        assert_eq!(store.buffer_writes(), 1, "one write for the twenty batches");
        assert_eq!(store.buffered(), 20, "the refused batch left nothing");
        let mut on_file: Vec<String> = crate::log::read_events(&dir.join("buffer.tsv"))
            .expect("buffer file")
            .into_iter()
            .map(|e| e.event_id)
            .collect();
        on_file.sort();
        let mut want: Vec<String> = (0..20).map(|n| format!("e{n}")).collect();
        want.sort();
        assert_eq!(on_file, want);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

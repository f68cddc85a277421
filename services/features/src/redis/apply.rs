//! Applying events: the Lua script every event goes through (live and bulk
//! load), the bulk load, and reading a user back.

use super::*;

/// The apply script. ARGV: mode (`event` logs and deduplicates, `load` only
/// applies), prefix, event id, user, item, event name, counter slot, weight,
/// timestamp, max recent, dedupe TTL, stream bound, decay factor, hour,
/// oldest hour kept, item key, timestamp in seconds, max seen. Returns 0 for a duplicate, 1 applied, 2 applied to an
/// item the catalog does not know.
pub(super) const APPLY_LUA: &str = r#"
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
    pub(super) fn args(&self, mode: &str, e: &ValidEvent) -> Vec<String> {
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
    pub(super) async fn run_script(
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
    pub(super) async fn bulk_load(&self, data: &Dataset) -> anyhow::Result<()> {
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

    pub(super) async fn read_user(&self, user_id: &str) -> Result<Option<UserRaw>, Error> {
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
}

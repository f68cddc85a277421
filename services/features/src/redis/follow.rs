//! Knowing which users have history while Redis is slow: the known-users
//! filter, the stream follower that keeps it current, and the snapshot
//! warm-up at start.

use super::*;

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

    pub(super) fn positions(&self, user: &str) -> impl Iterator<Item = u64> + use<> {
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

    pub(super) fn mark_complete(&self) {
        self.complete.store(true, Ordering::Release);
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
    pub(super) async fn recent_users(&self, n: usize) -> Result<Vec<String>, Error> {
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
    pub(super) fn background(&self) -> Options {
        Options {
            timeout: Some(Duration::from_millis(
                self.config.command_timeout_ms.saturating_mul(20),
            )),
            ..self.options()
        }
    }

    /// The id of the event stream's last entry ("" when it is empty).
    pub(super) async fn stream_tail(&self) -> Result<String, Error> {
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
    pub(super) async fn scan_users(&self, cursor: &str) -> Result<(String, Vec<String>), Error> {
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
pub(super) async fn follow_known_users(store: Weak<RedisStore>) {
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
pub(super) async fn warm_snapshot(store: Weak<RedisStore>) {
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
pub(super) async fn warm_users(s: &Arc<RedisStore>, users: &[String]) -> (usize, bool) {
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

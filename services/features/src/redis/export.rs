//! The event stream read by consumers: the export through a consumer group,
//! and the stream's figures.

use super::*;

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

pub(super) fn stream_event(fields: &HashMap<String, String>) -> Result<ValidEvent, String> {
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
pub(super) fn stream_entries(reply: Value) -> Vec<(String, HashMap<String, String>)> {
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

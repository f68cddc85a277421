//! Experiment configs from Consul KV, for A/B platforms that write there.
//!
//! Each key under the prefix holds one experiment as JSON (the fields of
//! the experiments file: `id`, `layer`, `traffic`, `variants`, …). The
//! watcher runs Consul's blocking queries
//! (`GET /v1/kv/<prefix>?recurse=true&index=<X-Consul-Index>&wait=<s>s`,
//! <https://developer.hashicorp.com/consul/api-docs/kv> and
//! <https://developer.hashicorp.com/consul/api-docs/features/blocking>):
//! every answer is validated and applied like a push. A key that does not
//! parse or validate is logged with the field and counted; the experiment
//! keeps its previous version. An experiment whose key disappears is
//! deleted (only experiments that came from Consul).
//!
//! No Consul agent can be installed on the machines this was built on: the
//! client is tested against a local server that answers with the documented
//! shapes (JSON array of `Key`/`Value` (base64)/`ModifyIndex`, the
//! `X-Consul-Index` header, 404 for an empty prefix, chunked bodies).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use recmesh_server::config::ConfigError;
use recmesh_server::consul::Consul;
use serde::{Deserialize, Serialize};

use crate::Experiments;
use crate::model::{ExperimentDef, Refused};

/// Consul KV settings (`[consul]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConsulConfig {
    /// Agent address, `http://host:port`; empty: no Consul.
    pub address: String,
    /// Key prefix holding one experiment per key.
    pub prefix: String,
    /// ACL token (`X-Consul-Token`); empty: none.
    pub token: String,
    /// Longest wait of one blocking query, seconds (Consul caps it at 600).
    pub wait_s: u64,
    /// Pause after a failed query, ms.
    pub retry_ms: u64,
}

impl Default for ConsulConfig {
    fn default() -> Self {
        ConsulConfig {
            address: String::new(),
            prefix: "recmesh/experiments/".into(),
            token: String::new(),
            wait_s: 55,
            retry_ms: 1_000,
        }
    }
}

impl ConsulConfig {
    /// True when an address is set.
    pub fn enabled(&self) -> bool {
        !self.address.is_empty()
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.enabled() {
            Consul::new(&self.address, &self.token)
                .map_err(|e| ConfigError::invalid("consul.address", e.to_string()))?;
            if self.prefix.is_empty() || self.prefix.contains(char::is_whitespace) {
                return Err(ConfigError::invalid(
                    "consul.prefix",
                    "must be a non-empty key prefix without spaces",
                ));
            }
            if !(1..=600).contains(&self.wait_s) {
                return Err(ConfigError::invalid("consul.wait_s", "must be in 1..=600"));
            }
        }
        Ok(())
    }
}

/// One entry of a KV listing, as Consul documents it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KvEntry {
    key: String,
    /// Base64; `null` for a key without a value.
    value: Option<String>,
}

/// Standard base64 (with or without padding).
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
    {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// What one listing did.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    /// Experiments created or changed.
    pub changed: Vec<String>,
    /// Keys refused, with the reason.
    pub rejected: Vec<(String, String)>,
    /// Experiments deleted (their key is gone).
    pub deleted: Vec<String>,
}

/// Applies a listing: every key an experiment. The experiment of a key
/// that is gone is deleted; that of a key that no longer parses is kept.
/// `from_consul`: key → the id of the experiment it last applied.
async fn apply(
    state: &Experiments,
    entries: &[KvEntry],
    from_consul: &mut HashMap<String, String>,
) -> Applied {
    let mut out = Applied::default();
    let mut seen = HashSet::new();
    for entry in entries {
        if entry.key.ends_with('/') {
            continue; // a "folder"
        }
        seen.insert(entry.key.clone());
        let parsed = entry
            .value
            .as_deref()
            .ok_or_else(|| "the key has no value".to_owned())
            .and_then(|v| base64_decode(v).ok_or_else(|| "Value is not base64".to_owned()))
            .and_then(|bytes| {
                serde_json::from_slice::<ExperimentDef>(&bytes)
                    .map_err(|e| format!("not an experiment as JSON: {e}"))
            });
        let def = match parsed {
            Ok(def) => def,
            Err(reason) => {
                out.rejected.push((entry.key.clone(), reason));
                continue;
            }
        };
        if state.current().get(&def.id).is_some_and(|s| s.def == def) {
            from_consul.insert(entry.key.clone(), def.id.clone());
            continue;
        }
        let id = def.id.clone();
        match state.change(|set| set.put(def.clone(), None)).await {
            Ok(Ok(_)) => {
                from_consul.insert(entry.key.clone(), id.clone());
                out.changed.push(id);
            }
            Ok(Err(Refused::Invalid(f))) => {
                out.rejected
                    .push((entry.key.clone(), format!("{}: {}", f.field, f.reason)));
            }
            Ok(Err(other)) => out.rejected.push((entry.key.clone(), format!("{other:?}"))),
            Err(e) => out
                .rejected
                .push((entry.key.clone(), format!("not saved: {e:#}"))),
        }
    }
    let gone: Vec<String> = from_consul
        .keys()
        .filter(|k| !seen.contains(*k))
        .cloned()
        .collect();
    for key in gone {
        if let Some(id) = from_consul.remove(&key)
            && let Ok(Ok(_)) = state.change(|set| set.delete(&id, None)).await
        {
            out.deleted.push(id);
        }
    }
    out
}

/// Watches the prefix until the process ends.
pub fn spawn_watch(config: ConsulConfig, state: Experiments) {
    tokio::spawn(async move {
        let Ok(consul) = Consul::new(&config.address, &config.token) else {
            return; // refused by validate() before this runs
        };
        let mut index: u64 = 0;
        let mut from_consul = HashMap::new();
        loop {
            let path = format!(
                "/v1/kv/{}?recurse=true&index={index}&wait={}s",
                config.prefix.trim_start_matches('/'),
                config.wait_s
            );
            // Consul adds up to wait/16 of jitter to a blocking query.
            let timeout = Duration::from_secs(config.wait_s + config.wait_s / 16 + 5);
            let answer = match consul.call("GET", &path, &[], timeout).await {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(address = %config.address, error = %e, "consul: query failed; retrying");
                    tokio::time::sleep(Duration::from_millis(config.retry_ms)).await;
                    continue;
                }
            };
            let entries: Vec<KvEntry> = match answer.status {
                200 => match serde_json::from_slice(&answer.body) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::warn!(error = %e, "consul: listing is not the documented JSON; retrying");
                        tokio::time::sleep(Duration::from_millis(config.retry_ms)).await;
                        continue;
                    }
                },
                // No key under the prefix.
                404 => Vec::new(),
                status => {
                    tracing::warn!(status, "consul: unexpected status; retrying");
                    tokio::time::sleep(Duration::from_millis(config.retry_ms)).await;
                    continue;
                }
            };
            let new_index = answer.index.unwrap_or(0);
            // The documented rules: an index that goes backwards resets the
            // watch; one that does not move means nothing changed.
            if new_index < index {
                index = 0;
                continue;
            }
            if new_index == index && index != 0 {
                continue;
            }
            let applied = apply(&state, &entries, &mut from_consul).await;
            for (key, reason) in &applied.rejected {
                metrics::counter!("recmesh_experiments_consul_rejected_total").increment(1);
                tracing::error!(%key, %reason, "consul: experiment refused; its previous version keeps serving");
            }
            if !applied.changed.is_empty() || !applied.deleted.is_empty() {
                tracing::info!(changed = ?applied.changed, deleted = ?applied.deleted, index = new_index,
                    "consul: experiments applied");
            }
            index = new_index.max(1);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Config;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[test]
    fn base64_decoding() {
        assert_eq!(
            base64_decode("aGVsbG8gd29ybGQ=").as_deref(),
            Some(&b"hello world"[..])
        );
        assert_eq!(base64_decode("YQ").as_deref(), Some(&b"a"[..]));
        assert!(base64_decode("a*b").is_none());
        assert!(
            ConsulConfig {
                address: "https://consul".into(),
                ..ConsulConfig::default()
            }
            .validate()
            .is_err()
        );
    }

    fn encode(bytes: &[u8]) -> String {
        const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn listing(experiments: &[&str], index: u64) -> Vec<u8> {
        let entries: Vec<String> = experiments
            .iter()
            .enumerate()
            .map(|(n, json)| {
                format!(
                    r#"{{"LockIndex":0,"Key":"recmesh/experiments/e{n}","Flags":0,"Value":"{}","CreateIndex":5,"ModifyIndex":{index}}}"#,
                    encode(json.as_bytes())
                )
            })
            .collect();
        let body = format!("[{}]", entries.join(","));
        // Chunked, as Go's net/http sends larger bodies.
        let (a, b) = body.split_at(body.len() / 2);
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Consul-Index: {index}\r\n\
             X-Consul-Knownleader: true\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        )
        .into_bytes()
    }

    /// Experiments in memory only, with no results consumer.
    async fn state() -> Experiments {
        Experiments::open(&Config {
            state_dir: String::new(),
            features_addr: String::new(),
            ..Config::default()
        })
        .await
        .expect("state")
    }

    const GOOD: &str = r#"{"id":"from-consul","layer":"consul","traffic":1.0,"variants":[{"name":"control","weight":1},{"name":"b","weight":1,"params":{"rerank.mmr_lambda":"0.5"}}]}"#;
    const BAD_WEIGHTS: &str = r#"{"id":"from-consul","layer":"consul","traffic":1.0,"variants":[{"name":"control","weight":0},{"name":"b","weight":0}]}"#;
    const CHANGED: &str = r#"{"id":"from-consul","layer":"consul","traffic":0.5,"variants":[{"name":"control","weight":1},{"name":"b","weight":3}]}"#;

    #[tokio::test]
    async fn watches_the_prefix_with_blocking_queries() {
        // A local server answering with Consul's documented shapes, one
        // answer per blocking query, checking each query's index.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let (gate_tx, gate_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut gate = Some(gate_rx);
            let answers: Vec<Vec<u8>> = vec![
                listing(&[GOOD], 10),
                listing(&[BAD_WEIGHTS], 11),
                listing(&[CHANGED], 12),
                b"HTTP/1.1 404 Not Found\r\nX-Consul-Index: 13\r\nContent-Length: 0\r\n\r\n"
                    .to_vec(),
            ];
            for (n, answer) in answers.into_iter().enumerate() {
                if n == 3
                    && let Some(gate) = gate.take()
                {
                    // The deletion waits until the test has seen the change.
                    gate.await.ok();
                }
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.expect("read");
                let request = String::from_utf8_lossy(&buf[..n]).to_string();
                seen_tx
                    .send(request.lines().next().unwrap_or_default().to_owned())
                    .ok();
                s.write_all(&answer).await.expect("write");
            }
            // Then block like Consul until the test ends.
            let _hold = listener.accept().await;
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        let state = state().await;
        spawn_watch(
            ConsulConfig {
                address: format!("http://{addr}"),
                retry_ms: 10,
                ..ConsulConfig::default()
            },
            state.clone(),
        );
        let wait_for = |what: &'static str, f: Box<dyn Fn(&Experiments) -> bool>| {
            let state = state.clone();
            async move {
                for _ in 0..500 {
                    if f(&state) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                panic!("timed out waiting for: {what}");
            }
        };
        wait_for(
            "the experiment from consul",
            Box::new(|s| {
                s.current()
                    .get("from-consul")
                    .is_some_and(|e| e.def.traffic == 0.5)
            }),
        )
        .await;
        gate_tx.send(()).ok();
        // The bad version in between was refused; the change after it applied.
        wait_for(
            "the deletion",
            Box::new(|s| s.current().get("from-consul").is_none()),
        )
        .await;
        let mut queries = Vec::new();
        while let Ok(q) = seen_rx.try_recv() {
            queries.push(q);
        }
        assert_eq!(queries.len(), 4, "{queries:?}");
        assert!(
            queries[0].starts_with("GET /v1/kv/recmesh/experiments/?recurse=true&index=0&wait=55s"),
            "{}",
            queries[0]
        );
        assert!(queries[1].contains("index=10&"), "{}", queries[1]);
        assert!(queries[2].contains("index=11&"), "{}", queries[2]);
        assert!(queries[3].contains("index=12&"), "{}", queries[3]);
        assert!(
            state.current().get("candidate-count").is_some(),
            "other experiments untouched"
        );
    }

    #[tokio::test]
    async fn a_refused_key_keeps_the_previous_version() {
        let state = state().await;
        let mut from = HashMap::new();
        let entry = |json: &str| KvEntry {
            key: "recmesh/experiments/x".into(),
            value: Some(encode(json.as_bytes())),
        };
        let a = apply(&state, &[entry(GOOD)], &mut from).await;
        assert_eq!(a.changed, ["from-consul"]);
        let before = state.current().get("from-consul").cloned();
        let a = apply(&state, &[entry(BAD_WEIGHTS)], &mut from).await;
        assert_eq!(a.rejected.len(), 1);
        assert!(
            a.rejected[0].1.starts_with("variants: at least one weight"),
            "{:?}",
            a.rejected
        );
        assert_eq!(state.current().get("from-consul").cloned(), before);
        let a = apply(&state, &[entry("{not json")], &mut from).await;
        assert!(
            a.rejected[0].1.starts_with("not an experiment as JSON"),
            "{:?}",
            a.rejected
        );
        assert_eq!(state.current().get("from-consul").cloned(), before, "kept");
        let a = apply(&state, &[], &mut from).await;
        assert_eq!(a.deleted, ["from-consul"], "its key is gone");
    }
}

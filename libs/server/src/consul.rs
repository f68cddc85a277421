//! A small client of the Consul agent's HTTP API: what recmesh needs to
//! register an instance with a gRPC health check, deregister it, and watch
//! the passing instances of a service with blocking queries.
//!
//! Written against the documented API (`/v1/agent/service/register`,
//! `/v1/agent/service/deregister/:id`, `/v1/health/service/:name` with
//! `passing`, `index` and `wait`); no Consul agent can be installed where
//! recmesh is built, so the tests run it against a stand-in agent that
//! speaks those shapes (see `tests/discovery.rs`). HTTP/1.1 over one
//! short-lived connection per call (`Connection: close`): calls are rare
//! (start, stop, one long poll at a time), so pooling buys nothing.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a Consul call failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    /// The agent address is not `http://host:port`.
    #[error("consul agent address `{0}` must look like http://127.0.0.1:8500")]
    Address(String),
    /// The agent could not be reached or the connection broke.
    #[error("consul agent at {agent}: {source}")]
    Io {
        /// The agent's host:port.
        agent: String,
        /// The error.
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("consul agent at {0}: no answer in time")]
    Timeout(String),
    /// The agent answered with an error status.
    #[error("consul agent at {agent}: {method} {path} answered {status}: {body}")]
    Status {
        /// The agent's host:port.
        agent: String,
        /// HTTP method.
        method: &'static str,
        /// Request path.
        path: String,
        /// HTTP status.
        status: u16,
        /// The body (Consul puts the reason there).
        body: String,
    },
    /// The answer was not HTTP or not the documented JSON.
    #[error("consul agent at {agent}: unexpected answer: {reason}")]
    Malformed {
        /// The agent's host:port.
        agent: String,
        /// What was wrong.
        reason: String,
    },
}

/// One instance to register (`PUT /v1/agent/service/register`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Registration {
    /// Unique id of this instance.
    #[serde(rename = "ID")]
    pub id: String,
    /// Service name clients discover it by.
    pub name: String,
    /// Address clients dial.
    pub address: String,
    /// gRPC port.
    pub port: u16,
    /// The check Consul runs against the instance.
    pub check: Check,
}

/// A gRPC health check (`grpc.health.v1.Health/Check`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// `host:port` (optionally `/service`) the agent probes.
    #[serde(rename = "GRPC")]
    pub grpc: String,
    /// Plain-text gRPC.
    #[serde(rename = "GRPCUseTLS")]
    pub grpc_use_tls: bool,
    /// How often, e.g. `10s`.
    #[serde(rename = "Interval")]
    pub interval: String,
    /// How long a probe may take, e.g. `2s`.
    #[serde(rename = "Timeout")]
    pub timeout: String,
    /// Consul removes an instance critical this long (e.g. killed with -9,
    /// so it never deregistered).
    #[serde(rename = "DeregisterCriticalServiceAfter")]
    pub deregister_critical_service_after: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: HealthNode,
    service: HealthService,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthNode {
    #[serde(default)]
    address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthService {
    #[serde(default)]
    address: String,
    port: u16,
}

/// The passing instances of a service at a Consul index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instances {
    /// `host:port` of each passing instance.
    pub addrs: Vec<String>,
    /// `X-Consul-Index`: pass it back to block until something changes.
    pub index: u64,
}

/// One answer of the agent: status, `X-Consul-Index` (when sent) and the
/// (de-chunked) body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// `X-Consul-Index`.
    pub index: Option<u64>,
    /// Body.
    pub body: Vec<u8>,
}

/// A Consul agent.
#[derive(Debug, Clone)]
pub struct Consul {
    agent: String,
    token: String,
}

impl Consul {
    /// The agent at `addr` (`http://host[:port]`, port 8500 when left out);
    /// `token` is sent as `X-Consul-Token` when not empty.
    pub fn new(addr: &str, token: &str) -> Result<Self, ConsulError> {
        let host = addr
            .strip_prefix("http://")
            .map(|a| a.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| ConsulError::Address(addr.to_owned()))?;
        let agent = if host.contains(':') {
            host.to_owned()
        } else {
            format!("{host}:8500")
        };
        Ok(Consul {
            agent,
            token: token.to_owned(),
        })
    }

    /// The agent's `host:port`.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// Registers (or re-registers) an instance.
    pub async fn register(&self, r: &Registration) -> Result<(), ConsulError> {
        let body = serde_json::to_vec(r).map_err(|e| self.malformed(e.to_string()))?;
        self.expect_ok(
            "PUT",
            "/v1/agent/service/register",
            &body,
            Duration::from_secs(5),
        )
        .await
        .map(drop)
    }

    /// Removes an instance by id.
    pub async fn deregister(&self, id: &str) -> Result<(), ConsulError> {
        let path = format!("/v1/agent/service/deregister/{}", encode(id));
        self.expect_ok("PUT", &path, &[], Duration::from_secs(5))
            .await
            .map(drop)
    }

    /// The passing instances of `service`. With `index` > 0 this is a
    /// blocking query: the agent answers when the set changes or after
    /// `wait`, whichever is first.
    pub async fn passing(
        &self,
        service: &str,
        index: u64,
        wait: Duration,
    ) -> Result<Instances, ConsulError> {
        let mut path = format!("/v1/health/service/{}?passing=true", encode(service));
        if index > 0 {
            path.push_str(&format!("&index={index}&wait={}s", wait.as_secs().max(1)));
        }
        // Consul adds up to wait/16 of jitter to a blocking query.
        let limit = wait + wait / 16 + Duration::from_secs(5);
        let answer = self.expect_ok("GET", &path, &[], limit).await?;
        let index = answer
            .index
            .ok_or_else(|| self.malformed("no X-Consul-Index header".into()))?;
        let entries: Vec<HealthEntry> =
            serde_json::from_slice(&answer.body).map_err(|e| self.malformed(e.to_string()))?;
        let addrs = entries
            .into_iter()
            .map(|e| {
                // The service address when registered with one, else the node's.
                let host = if e.service.address.is_empty() {
                    e.node.address
                } else {
                    e.service.address
                };
                join_host_port(&host, e.service.port)
            })
            .collect();
        Ok(Instances { addrs, index })
    }

    fn malformed(&self, reason: String) -> ConsulError {
        ConsulError::Malformed {
            agent: self.agent.clone(),
            reason,
        }
    }

    /// [`Consul::call`], with any status but 2xx an error.
    async fn expect_ok(
        &self,
        method: &'static str,
        path: &str,
        body: &[u8],
        limit: Duration,
    ) -> Result<Answer, ConsulError> {
        let answer = self.call(method, path, body, limit).await?;
        if !(200..300).contains(&answer.status) {
            return Err(ConsulError::Status {
                agent: self.agent.clone(),
                method,
                path: path.to_owned(),
                status: answer.status,
                body: String::from_utf8_lossy(&answer.body).trim().to_owned(),
            });
        }
        Ok(answer)
    }

    /// One HTTP/1.1 call (`Connection: close`) taking at most `limit`.
    pub async fn call(
        &self,
        method: &'static str,
        path: &str,
        body: &[u8],
        limit: Duration,
    ) -> Result<Answer, ConsulError> {
        let io = |source| ConsulError::Io {
            agent: self.agent.clone(),
            source,
        };
        let exchange = async {
            let mut stream = TcpStream::connect(&self.agent).await.map_err(io)?;
            let mut head = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
                self.agent,
                body.len()
            );
            if !self.token.is_empty() {
                head.push_str(&format!("X-Consul-Token: {}\r\n", self.token));
            }
            head.push_str("\r\n");
            stream.write_all(head.as_bytes()).await.map_err(io)?;
            stream.write_all(body).await.map_err(io)?;
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.map_err(io)?;
            Ok::<_, ConsulError>(raw)
        };
        let raw = tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| ConsulError::Timeout(self.agent.clone()))??;
        parse_response(&raw).map_err(|r| self.malformed(r))
    }
}

/// `host:port`, bracketing IPv6 hosts.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Percent-encodes what may not appear raw in a path segment.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parses an HTTP/1.1 answer; the body is delimited by Content-Length,
/// chunked, or the close.
fn parse_response(raw: &[u8]) -> Result<Answer, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers")?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| "headers are not UTF-8")?;
    let body = &raw[split + 4..];
    let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| format!("bad status line `{status_line}`"))?;
    let header = |name: &str| {
        headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        dechunk(body)?
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().map_err(|_| "bad Content-Length")?;
        body.get(..len)
            .ok_or("body shorter than Content-Length")?
            .to_vec()
    } else {
        body.to_vec()
    };
    let index = header("x-consul-index").and_then(|v| v.parse().ok());
    Ok(Answer {
        status,
        index,
        body,
    })
}

fn dechunk(mut body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_text = std::str::from_utf8(&body[..line_end]).map_err(|_| "bad chunk size")?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        body = &body[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(body.get(..size).ok_or("truncated chunk")?);
        body = body.get(size + 2..).ok_or("truncated chunk")?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed_with_length_chunks_or_close() {
        let raw = b"HTTP/1.1 200 OK\r\nX-Consul-Index: 7\r\nContent-Length: 2\r\n\r\n[]";
        let a = parse_response(raw).expect("parses");
        assert_eq!(
            (a.status, a.index, a.body.as_slice()),
            (200, Some(7), &b"[]"[..])
        );
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\n[1,\r\n2\r\n2]\r\n0\r\n\r\n";
        assert_eq!(parse_response(raw).expect("chunked").body, b"[1,2]");
        let raw = b"HTTP/1.1 500 Internal\r\n\r\nno leader";
        let a = parse_response(raw).expect("close-delimited");
        assert_eq!(
            (a.status, a.index, a.body.as_slice()),
            (500, None, &b"no leader"[..])
        );
        let a =
            parse_response(b"HTTP/1.1 404 Not Found\r\nX-Consul-Index: 7\r\n\r\n").expect("404");
        assert_eq!((a.status, a.index), (404, Some(7)));
        assert!(parse_response(b"garbage").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
    }

    #[test]
    fn registration_uses_the_documented_field_names() {
        let r = Registration {
            id: "recmesh-retrieval-10.0.0.7-50052".into(),
            name: "recmesh-retrieval".into(),
            address: "10.0.0.7".into(),
            port: 50052,
            check: Check {
                grpc: "10.0.0.7:50052".into(),
                grpc_use_tls: false,
                interval: "5s".into(),
                timeout: "2s".into(),
                deregister_critical_service_after: "1m".into(),
            },
        };
        let v = serde_json::to_value(&r).expect("json");
        assert_eq!(v["ID"], "recmesh-retrieval-10.0.0.7-50052");
        assert_eq!(v["Name"], "recmesh-retrieval");
        assert_eq!(v["Port"], 50052);
        assert_eq!(v["Check"]["GRPC"], "10.0.0.7:50052");
        assert_eq!(v["Check"]["GRPCUseTLS"], false);
        assert_eq!(v["Check"]["DeregisterCriticalServiceAfter"], "1m");
    }

    #[test]
    fn agent_addresses_and_paths_are_checked_and_encoded() {
        assert_eq!(
            Consul::new("http://127.0.0.1:8501/", "")
                .expect("ok")
                .agent(),
            "127.0.0.1:8501"
        );
        assert_eq!(
            Consul::new("http://consul", "").expect("ok").agent(),
            "consul:8500"
        );
        assert!(Consul::new("127.0.0.1:8500", "").is_err());
        assert!(Consul::new("http://", "").is_err());
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
        assert_eq!(join_host_port("::1", 5), "[::1]:5");
        assert_eq!(join_host_port("10.0.0.1", 5), "10.0.0.1:5");
    }
}

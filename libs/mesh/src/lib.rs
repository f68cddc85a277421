//! How recmesh services call each other: lazily connected channels, and
//! calls bounded by a deadline that shrinks along the request path.
//!
//! The gateway owns each request's end-to-end [`Deadline`]; every downstream
//! call gets the smaller of its stage budget and what is left
//! ([`Deadline::budget`]), sent as `grpc-timeout` so the callee stops working
//! when the caller has stopped waiting, and enforced locally so a stalled peer
//! cannot hold the caller past it.

#![forbid(unsafe_code)]

pub mod convert;

use std::future::Future;
use std::time::{Duration, Instant};

use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

/// Header carrying the request id (the server layer sets and echoes it).
pub use recmesh_server::layers::REQUEST_ID_HEADER as REQUEST_ID;

/// A channel could not be configured (the address is malformed).
#[derive(Debug, thiserror::Error)]
#[error("invalid upstream address `{addr}` (config key `{key}`): {reason}")]
pub struct AddressError {
    /// Config key holding the address.
    pub key: String,
    /// The address.
    pub addr: String,
    /// What is wrong.
    pub reason: String,
}

impl From<AddressError> for recmesh_server::ConfigError {
    fn from(e: AddressError) -> Self {
        recmesh_server::ConfigError::invalid(e.key, format!("`{}` {}", e.addr, e.reason))
    }
}

/// Checks an upstream address (`http://host:port`) without connecting; for
/// config validation at start.
pub fn check_address(key: &str, addr: &str) -> Result<Endpoint, AddressError> {
    let err = |reason: String| AddressError {
        key: key.to_owned(),
        addr: addr.to_owned(),
        reason,
    };
    if !addr.starts_with("http://") && !addr.starts_with("https://") {
        return Err(err(
            "must start with http:// (e.g. http://127.0.0.1:50052)".into()
        ));
    }
    Endpoint::from_shared(addr.to_owned()).map_err(|e| err(e.to_string()))
}

/// A channel to `addr` (`http://host:port`) that connects on first use and
/// reconnects after failures, so services can start in any order.
pub fn lazy_channel(key: &str, addr: &str) -> Result<Channel, AddressError> {
    let endpoint = check_address(key, addr)?;
    Ok(endpoint
        // A peer that does not accept within 1 s is down for our purposes;
        // stage budgets are far shorter, so this only bounds background work.
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true)
        .initial_stream_window_size(recmesh_server::HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(recmesh_server::HTTP2_CONNECTION_WINDOW)
        // Detect half-dead connections (peer frozen, cable pulled) within seconds.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_lazy())
}

/// The end-to-end deadline of one request.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    at: Instant,
}

impl Deadline {
    /// A deadline `total` from now.
    pub fn after(total: Duration) -> Self {
        Deadline {
            at: Instant::now() + total,
        }
    }

    /// The deadline of an incoming call: the caller's `grpc-timeout` when it
    /// sent one and it is shorter than `default`, else `default`.
    pub fn from_metadata(metadata: &tonic::metadata::MetadataMap, default: Duration) -> Self {
        let caller = metadata
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(recmesh_server::layers::parse_grpc_timeout);
        Deadline::after(caller.map_or(default, |c| c.min(default)))
    }

    /// Time left, zero once passed.
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }

    /// What a stage with `budget` may spend: the smaller of the two.
    pub fn budget(&self, budget: Duration) -> Duration {
        budget.min(self.remaining())
    }
}

/// A request with `grpc-timeout` set to `timeout` and the request id attached.
pub fn outgoing<T>(message: T, timeout: Duration, request_id: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(message);
    req.set_timeout(timeout);
    if let Ok(v) = MetadataValue::try_from(request_id) {
        req.metadata_mut().insert(REQUEST_ID, v);
    }
    req
}

/// The request id of an incoming call (set by the server's request-id layer).
pub fn request_id<T>(req: &tonic::Request<T>) -> String {
    req.metadata()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

/// How a bounded call ended.
#[derive(Debug)]
pub enum CallError {
    /// No answer within the time given.
    Timeout(Duration),
    /// The peer answered with an error, or could not be reached.
    Status(tonic::Status),
    /// Nothing was left of the deadline, so the call was not made.
    NoBudget,
}

impl CallError {
    /// Short label for metrics and stage reports.
    pub fn outcome(&self) -> &'static str {
        match self {
            CallError::Timeout(_) => "timeout",
            CallError::Status(_) => "error",
            CallError::NoBudget => "skipped",
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Timeout(d) => write!(f, "no answer within {} ms", d.as_millis()),
            CallError::Status(s) => write!(f, "{:?}: {}", s.code(), s.message()),
            CallError::NoBudget => f.write_str("request deadline already reached"),
        }
    }
}

/// Runs `call(timeout)` bounded by `timeout` (which it should also send as
/// `grpc-timeout`, see [`outgoing`]). Returns the message or why there is none.
pub async fn bounded<T, F, Fut>(timeout: Duration, call: F) -> Result<T, CallError>
where
    F: FnOnce(Duration) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    // Below a millisecond a call cannot complete a round trip; skip it and
    // leave the time to the fallback.
    if timeout < Duration::from_millis(1) {
        return Err(CallError::NoBudget);
    }
    let started = Instant::now();
    match tokio::time::timeout(timeout, call(timeout)).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        // Late, whoever noticed first: the peer (DEADLINE_EXCEEDED) or tonic's
        // own client timer, which races ours and reports CANCELLED. A
        // CANCELLED before the deadline is a failure (e.g. a reset connection).
        Ok(Err(status))
            if status.code() == tonic::Code::DeadlineExceeded || started.elapsed() >= timeout =>
        {
            Err(CallError::Timeout(timeout))
        }
        Ok(Err(status)) => Err(CallError::Status(status)),
        Err(_) => Err(CallError::Timeout(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_the_smaller_of_stage_and_remaining() {
        let d = Deadline::after(Duration::from_millis(30));
        assert!(d.budget(Duration::from_millis(5)) == Duration::from_millis(5));
        assert!(d.budget(Duration::from_secs(5)) <= Duration::from_millis(30));
        let past = Deadline::after(Duration::ZERO);
        assert_eq!(past.budget(Duration::from_millis(5)), Duration::ZERO);
    }

    #[test]
    fn incoming_deadline_honours_a_shorter_grpc_timeout() {
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert("grpc-timeout", MetadataValue::from_static("20m"));
        let d = Deadline::from_metadata(&md, Duration::from_secs(1));
        assert!(d.remaining() <= Duration::from_millis(20));
        let d = Deadline::from_metadata(
            &tonic::metadata::MetadataMap::new(),
            Duration::from_millis(50),
        );
        assert!(
            d.remaining() <= Duration::from_millis(50) && d.remaining() > Duration::from_millis(10)
        );
    }

    #[tokio::test]
    async fn addresses_are_checked() {
        let err = lazy_channel("upstreams.ranking", "127.0.0.1:1").expect_err("no scheme");
        assert!(err.to_string().contains("upstreams.ranking"), "{err}");
        assert!(lazy_channel("upstreams.ranking", "http://127.0.0.1:1").is_ok());
    }
}

//! How recmesh services call each other: lazily connected channels, and
//! calls bounded by a deadline that shrinks along the request path.
//!
//! The gateway owns each request's end-to-end [`Deadline`]; every downstream
//! call gets the smaller of its stage budget and what is left
//! ([`Deadline::budget`]), sent as `grpc-timeout` so the callee stops working
//! when the caller has stopped waiting, and enforced locally so a stalled peer
//! cannot hold the caller past it.

#![forbid(unsafe_code)]

pub mod assign;
pub mod balance;
pub mod body;
pub mod connect;
pub mod convert;
pub mod lean;
pub mod timer;
pub mod wire;

pub use balance::{BalanceConfig, Balanced};

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
/// reconnects after failures, so services can start in any order (a
/// connection to itself, possible while nothing listens, is refused:
/// [`connect`]).
pub fn lazy_channel(key: &str, addr: &str) -> Result<Channel, AddressError> {
    let endpoint = check_address(key, addr)?;
    Ok(endpoint
        // A peer that does not accept within 1 s is down for our purposes;
        // stage budgets are far shorter, so this only bounds background work.
        .connect_timeout(Duration::from_secs(1))
        .initial_stream_window_size(recmesh_server::HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(recmesh_server::HTTP2_CONNECTION_WINDOW)
        // Detect half-dead connections (peer frozen, cable pulled) within seconds.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_with_connector_lazy(connect::NoSelfConnect::http()))
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
    match timer::timeout(timeout, call(timeout)).await {
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

/// Retries of idempotent reads that failed in transport (`UNAVAILABLE`, or
/// a connection dropped mid-call: a reset, an instance restarting): up to `retries` more
/// attempts, each after a jittered exponential backoff, never past the
/// call's time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// More attempts after the first (0: off).
    pub retries: u32,
    /// Backoff before the first retry; doubles each time, drawn uniformly
    /// from [backoff/2, backoff] ("equal jitter").
    pub base_ms: u64,
    /// Longest backoff.
    pub cap_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // One quick retry: enough for a reset connection or an instance that
        // just restarted; more would only eat the budget of a dead one.
        RetryPolicy {
            retries: 1,
            base_ms: 2,
            cap_ms: 20,
        }
    }
}

impl RetryPolicy {
    /// Backoff before retry `n` (0-based), with `draw` in [0, 1).
    pub fn backoff(&self, n: u32, draw: f64) -> Duration {
        let full = self
            .base_ms
            .saturating_mul(1u64 << n.min(20))
            .min(self.cap_ms.max(self.base_ms));
        let ms = full as f64 * (0.5 + 0.5 * draw.clamp(0.0, 1.0));
        Duration::from_secs_f64(ms / 1_000.0)
    }
}

/// A uniform draw in [0, 1) from the clock, for backoff jitter (spreading
/// retries apart is all it is for).
fn jitter_draw() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let z = recmesh_server::layers::splitmix64(u64::from(nanos));
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether a call failed in transport: `UNAVAILABLE` (refused, not
/// connected, or the peer said so), `CANCELLED` before the deadline (how
/// tonic reports a connection dropped mid-call; [`bounded`] turns a late one
/// into a timeout), or `UNKNOWN` made by the client itself from a transport
/// error (it carries the error as its source; a peer's `UNKNOWN` arrives as
/// headers and has none). Seen all three for one dropped connection.
pub fn is_transport(status: &tonic::Status) -> bool {
    use std::error::Error as _;
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Cancelled => true,
        tonic::Code::Unknown => status.source().is_some(),
        _ => false,
    }
}

/// [`bounded`] with retries on transport failures ([`is_transport`]) under `policy`, all inside
/// `timeout`: a retry is made only when its backoff plus a millisecond still
/// fits. `call` makes each attempt (so it must be repeatable: an idempotent
/// read). Returns the outcome and how many retries were made.
pub async fn bounded_retry<T, F, Fut>(
    timeout: Duration,
    policy: &RetryPolicy,
    mut call: F,
) -> (Result<T, CallError>, u32)
where
    F: FnMut(Duration) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let end = Instant::now() + timeout;
    let mut retries = 0;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        let result = bounded(left, &mut call).await;
        match result {
            Err(CallError::Status(status)) if is_transport(&status) && retries < policy.retries => {
                let pause = policy.backoff(retries, jitter_draw());
                let left = end.saturating_duration_since(Instant::now());
                if left <= pause + Duration::from_millis(1) {
                    return (Err(CallError::Status(status)), retries);
                }
                tokio::time::sleep(pause).await;
                retries += 1;
            }
            other => return (other, retries),
        }
    }
}

/// What a [`hedged`] call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hedge {
    /// The first call ended before the delay: no hedge.
    NotSent,
    /// A hedge was sent and the first call answered first.
    FirstWon,
    /// A hedge was sent and answered first.
    HedgeWon,
}

impl Hedge {
    /// Label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Hedge::NotSent => "not_sent",
            Hedge::FirstWon => "first_won",
            Hedge::HedgeWon => "hedge_won",
        }
    }
}

/// Runs `call`; when it has not ended after `after`, runs it a second time
/// (on a balanced client, p2c sends it to another instance: the first
/// one has a call more in flight) and returns the first success, else the
/// last failure. The loser is dropped, which cancels it. `after` zero: one
/// call, no hedge. Only for idempotent reads.
pub async fn hedged<T, F, Fut>(after: Duration, mut call: F) -> (Result<T, tonic::Status>, Hedge)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let first = call();
    if after.is_zero() {
        return (first.await, Hedge::NotSent);
    }
    tokio::pin!(first);
    tokio::select! {
        r = &mut first => return (r, Hedge::NotSent),
        () = tokio::time::sleep(after) => {}
    }
    let second = call();
    tokio::pin!(second);
    tokio::select! {
        r = &mut first => match r {
            Ok(v) => (Ok(v), Hedge::FirstWon),
            Err(_) => (second.await, Hedge::HedgeWon),
        },
        r = &mut second => match r {
            Ok(v) => (Ok(v), Hedge::HedgeWon),
            Err(_) => (first.await, Hedge::FirstWon),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unavailable_then_ok(
        failures: u32,
        calls: &std::cell::Cell<u32>,
    ) -> impl FnMut(Duration) -> std::future::Ready<Result<tonic::Response<u32>, tonic::Status>> + '_
    {
        move |_| {
            let n = calls.get();
            calls.set(n + 1);
            std::future::ready(if n < failures {
                Err(tonic::Status::unavailable("connection refused"))
            } else {
                Ok(tonic::Response::new(n))
            })
        }
    }

    #[tokio::test]
    async fn unavailable_is_retried_within_the_policy_and_the_time() {
        let policy = RetryPolicy {
            retries: 2,
            base_ms: 1,
            cap_ms: 2,
        };
        let calls = std::cell::Cell::new(0);
        let (r, retries) = bounded_retry(
            Duration::from_secs(5),
            &policy,
            unavailable_then_ok(2, &calls),
        )
        .await;
        assert_eq!((r.ok(), retries, calls.get()), (Some(2), 2, 3));

        // More failures than retries: the last error comes back.
        let calls = std::cell::Cell::new(0);
        let (r, retries) = bounded_retry(
            Duration::from_secs(5),
            &policy,
            unavailable_then_ok(9, &calls),
        )
        .await;
        assert!(matches!(r, Err(CallError::Status(s)) if s.code() == tonic::Code::Unavailable));
        assert_eq!((retries, calls.get()), (2, 3));

        // No time for a backoff: no retry.
        let calls = std::cell::Cell::new(0);
        let slow = RetryPolicy {
            retries: 3,
            base_ms: 50,
            cap_ms: 50,
        };
        let (r, retries) = bounded_retry(
            Duration::from_millis(20),
            &slow,
            unavailable_then_ok(1, &calls),
        )
        .await;
        assert!(r.is_err());
        assert_eq!((retries, calls.get()), (0, 1));

        // Other errors are not retried.
        let calls = std::cell::Cell::new(0);
        let (r, retries) = bounded_retry(Duration::from_secs(5), &policy, |_| {
            calls.set(calls.get() + 1);
            std::future::ready(Err::<tonic::Response<u32>, _>(
                tonic::Status::invalid_argument("user_id"),
            ))
        })
        .await;
        assert!(r.is_err());
        assert_eq!((retries, calls.get()), (0, 1));
    }

    #[tokio::test]
    async fn a_slow_call_is_hedged_and_the_first_answer_wins() {
        // Attempt 0 takes 60 s (it is dropped when the hedge wins), attempt 1
        // answers at once.
        let n = std::cell::Cell::new(0u32);
        let call = || {
            let i = n.get();
            n.set(i + 1);
            async move {
                if i == 0 {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                Ok::<u32, tonic::Status>(i)
            }
        };
        let (r, h) = hedged(Duration::from_millis(10), call).await;
        assert_eq!((r.ok(), h, n.get()), (Some(1), Hedge::HedgeWon, 2));

        // Fast enough: no hedge.
        let n = std::cell::Cell::new(0u32);
        let (r, h) = hedged(Duration::from_millis(10), || {
            n.set(n.get() + 1);
            async { Ok::<u32, tonic::Status>(7) }
        })
        .await;
        assert_eq!((r.ok(), h, n.get()), (Some(7), Hedge::NotSent, 1));

        // The hedge fails at once: the first call's answer is awaited.
        let n = std::cell::Cell::new(0u32);
        let (r, h) = hedged(Duration::from_millis(10), || {
            let i = n.get();
            n.set(i + 1);
            async move {
                if i == 0 {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(i)
                } else {
                    Err(tonic::Status::unavailable("refused"))
                }
            }
        })
        .await;
        assert_eq!((r.ok(), h), (Some(0), Hedge::FirstWon));

        // Zero delay: never hedged.
        let (r, h) = hedged(Duration::ZERO, || async { Ok::<u32, tonic::Status>(3) }).await;
        assert_eq!((r.ok(), h), (Some(3), Hedge::NotSent));
    }

    #[test]
    fn transport_failures_are_told_from_answers() {
        assert!(is_transport(&tonic::Status::unavailable("refused")));
        assert!(is_transport(&tonic::Status::cancelled("reset")));
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(is_transport(&tonic::Status::from_error(Box::new(io))));
        // A peer's UNKNOWN (no local source) and other answers are not.
        assert!(!is_transport(&tonic::Status::unknown("handler failed")));
        assert!(!is_transport(&tonic::Status::invalid_argument("user_id")));
        assert!(!is_transport(&tonic::Status::not_found("item_id")));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_equal_jitter() {
        let p = RetryPolicy {
            retries: 5,
            base_ms: 2,
            cap_ms: 10,
        };
        assert_eq!(p.backoff(0, 0.0), Duration::from_millis(1));
        assert_eq!(p.backoff(0, 1.0), Duration::from_millis(2));
        assert_eq!(p.backoff(1, 1.0), Duration::from_millis(4));
        assert_eq!(p.backoff(9, 1.0), Duration::from_millis(10));
        assert_eq!(p.backoff(9, 0.0), Duration::from_millis(5));
        let d = jitter_draw();
        assert!((0.0..1.0).contains(&d));
    }

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

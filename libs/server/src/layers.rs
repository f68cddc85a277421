//! The server's middleware, in the one order every recmesh server uses:
//!
//! 1. [`RequestIdLayer`] — outermost, so every log line of the call, including
//!    those written by the layers below, carries the request id, and the id is
//!    echoed to the client even when an inner layer refuses the call.
//! 2. [`MetricsLayer`] — sees every outcome, including timeouts and sheds from
//!    the layers below, so dashboards count what clients experienced.
//! 3. [`DeadlineLayer`] — bounds the work by the client's `grpc-timeout` (or the
//!    server default); it sits outside the limiter so time spent is bounded
//!    from arrival, and a call that times out releases its permit.
//! 4. [`ShedLayer`] — innermost: a permit is held only while the handler runs;
//!    when none is free the call fails fast with `RESOURCE_EXHAUSTED` rather
//!    than queueing (a queued call would miss its deadline anyway).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{HeaderValue, Request, Response};
use tokio::sync::Semaphore;
use tonic::Status;
use tower::{Layer, Service};
use tracing::Instrument;

/// Header that carries the request id across every hop of the mesh.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A new request id: 16 hex digits, unique within a process and very likely
/// across processes (seeded from the clock and the pid).
pub fn new_request_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:016x}", splitmix64(seed().wrapping_add(n)))
}

/// A per-process seed (the clock at first use and the pid), for ids and
/// random draws that must differ between processes.
pub fn seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        nanos ^ (u64::from(std::process::id()) << 32)
    })
}

/// SplitMix64: a fast, well-mixed bijection on u64 (Steele et al., 2014).
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Parses a gRPC `grpc-timeout` header value ("150m", "2S", ...), per the
/// gRPC over HTTP/2 spec: at most 8 digits and one unit letter.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn status_response<B: Default>(status: Status, request_id: Option<&HeaderValue>) -> Response<B> {
    let mut response = status.into_http::<B>();
    if let Some(id) = request_id {
        response.headers_mut().insert(REQUEST_ID_HEADER, id.clone());
    }
    response
}

/// Takes the ready service out of `slot`, leaving a fresh clone behind, as
/// tower requires when a call's future outlives `&mut self`.
fn take_ready<S: Clone>(slot: &mut S) -> S {
    let clone = slot.clone();
    std::mem::replace(slot, clone)
}

/// Layer 1: request id and tracing span.
#[derive(Debug, Clone)]
pub struct RequestIdLayer {
    service: &'static str,
}

impl RequestIdLayer {
    /// `service` names the server in every span.
    pub fn new(service: &'static str) -> Self {
        RequestIdLayer { service }
    }
}

impl<S> Layer<S> for RequestIdLayer {
    type Service = RequestId<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestId {
            inner,
            service: self.service,
        }
    }
}

/// See [`RequestIdLayer`].
#[derive(Debug, Clone)]
pub struct RequestId<S> {
    inner: S,
    service: &'static str,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for RequestId<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ResB: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqB>) -> Self::Future {
        // Accept a caller's id when it is short, printable ASCII; otherwise mint one.
        let id = req
            .headers()
            .get(REQUEST_ID_HEADER)
            .filter(|v| v.len() <= 64 && v.to_str().is_ok_and(|s| !s.is_empty()))
            .cloned()
            .unwrap_or_else(|| {
                HeaderValue::from_str(&new_request_id()).unwrap_or(HeaderValue::from_static("0"))
            });
        req.headers_mut().insert(REQUEST_ID_HEADER, id.clone());
        let span = tracing::info_span!(
            "rpc",
            service = self.service,
            path = %req.uri().path(),
            request_id = %id.to_str().unwrap_or_default(),
        );
        let fut = take_ready(&mut self.inner).call(req).instrument(span);
        Box::pin(async move {
            let mut response = fut.await?;
            response.headers_mut().insert(REQUEST_ID_HEADER, id);
            Ok(response)
        })
    }
}

/// Layer 2: request count and latency per RPC and status code.
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    service: &'static str,
}

impl MetricsLayer {
    /// `service` becomes the `service` label of every series.
    pub fn new(service: &'static str) -> Self {
        MetricsLayer { service }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = Metrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Metrics {
            inner,
            service: self.service,
        }
    }
}

/// See [`MetricsLayer`].
#[derive(Debug, Clone)]
pub struct Metrics<S> {
    inner: S,
    service: &'static str,
}

/// The `rpc` label: the method path for our own and the standard gRPC
/// services, one shared value for anything else so a scanner probing random
/// paths cannot blow up the series count.
fn rpc_label(path: &str) -> String {
    if path.starts_with("/recmesh.") || path.starts_with("/grpc.") {
        path.trim_start_matches('/').to_owned()
    } else {
        "other".to_owned()
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Metrics<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ResB: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let rpc = rpc_label(req.uri().path());
        let service = self.service;
        let started = Instant::now();
        let fut = take_ready(&mut self.inner).call(req);
        Box::pin(async move {
            let result = fut.await;
            // Errors travel as trailers-only responses with `grpc-status` in
            // the headers; a successful unary call has it in the trailers, so
            // no header means OK as far as the handler is concerned.
            let code = match &result {
                Ok(r) => r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map(|c| format!("{:?}", tonic::Code::from_i32(c)))
                    .unwrap_or_else(|| "Ok".to_owned()),
                Err(_) => "TransportError".to_owned(),
            };
            let labels = [
                ("service", service.to_owned()),
                ("rpc", rpc),
                ("code", code),
            ];
            metrics::counter!("recmesh_grpc_server_requests_total", &labels).increment(1);
            metrics::histogram!("recmesh_grpc_server_duration_seconds", &labels)
                .record(started.elapsed().as_secs_f64());
            result
        })
    }
}

/// Layer 3: the call's deadline, the smaller of the client's `grpc-timeout`
/// and the server's default.
#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    default: Duration,
}

impl DeadlineLayer {
    /// `default` applies to calls that carry no `grpc-timeout`.
    pub fn new(default: Duration) -> Self {
        DeadlineLayer { default }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            default: self.default,
        }
    }
}

/// See [`DeadlineLayer`].
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    default: Duration,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Deadline<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ResB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let client = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let limit = client.map_or(self.default, |c| c.min(self.default));
        let request_id = req.headers().get(REQUEST_ID_HEADER).cloned();
        let fut = take_ready(&mut self.inner).call(req);
        Box::pin(async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(result) => result,
                Err(_) => Ok(status_response(
                    Status::deadline_exceeded(format!(
                        "call did not finish within its deadline of {} ms",
                        limit.as_millis()
                    )),
                    request_id.as_ref(),
                )),
            }
        })
    }
}

/// Layer 4: at most `limit` calls in the handler at once; the rest are shed.
#[derive(Debug, Clone)]
pub struct ShedLayer {
    service: &'static str,
    permits: Arc<Semaphore>,
    limit: usize,
}

impl ShedLayer {
    /// Admits `limit` concurrent calls.
    pub fn new(service: &'static str, limit: usize) -> Self {
        ShedLayer {
            service,
            permits: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`ShedLayer`].
#[derive(Debug, Clone)]
pub struct Shed<S> {
    inner: S,
    layer: ShedLayer,
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Shed<S>
where
    S: Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ResB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqB>) -> Self::Future {
        let Ok(permit) = self.layer.permits.clone().try_acquire_owned() else {
            metrics::counter!("recmesh_grpc_server_shed_total", "service" => self.layer.service)
                .increment(1);
            let response = status_response(
                Status::resource_exhausted(format!(
                    "{} is at its limit of {} concurrent calls; retry with backoff",
                    self.layer.service, self.layer.limit
                )),
                req.headers().get(REQUEST_ID_HEADER),
            );
            return Box::pin(async move { Ok(response) });
        };
        let fut = take_ready(&mut self.inner).call(req);
        Box::pin(async move {
            let result = fut.await;
            drop(permit);
            result
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_parses_every_unit_and_rejects_garbage() {
        assert_eq!(parse_grpc_timeout("150m"), Some(Duration::from_millis(150)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("500u"), Some(Duration::from_micros(500)));
        assert_eq!(parse_grpc_timeout("7n"), Some(Duration::from_nanos(7)));
        assert_eq!(parse_grpc_timeout("m"), None);
        assert_eq!(parse_grpc_timeout("123456789m"), None, "more than 8 digits");
        assert_eq!(parse_grpc_timeout("10x"), None);
        assert_eq!(parse_grpc_timeout("-1m"), None);
    }

    #[test]
    fn request_ids_are_distinct() {
        let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_request_id()).collect();
        assert_eq!(ids.len(), 1000);
    }

    #[test]
    fn foreign_paths_share_one_metric_label() {
        assert_eq!(
            rpc_label("/recmesh.v1.Gateway/Recommend"),
            "recmesh.v1.Gateway/Recommend"
        );
        assert_eq!(rpc_label("/wp-admin/x"), "other");
    }
}

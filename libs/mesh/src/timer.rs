//! A timeout that tells a late answer from a paused caller.
//!
//! `tokio::time::timeout` decides at the first poll after its deadline.
//! When this process was not running for a while (CPU starved, a VM
//! stall, SIGSTOP), its timers and its sockets become ready in the same
//! turn of the runtime, and the timer usually wins: the answer came in
//! time and sits unread, because the connection task that reads it (and
//! hyper's task that hands it on) have not run yet. tonic's own client
//! timer, set from the same `grpc-timeout`, fails the call the same way
//! as soon as the call is polled. The test below shows it over real gRPC:
//! a call answered within a millisecond, while its caller was blocked past
//! the deadline, timed out in 5 runs of 5 under `tokio::time::timeout`.
//!
//! [`timeout`] notices that it was woken well past its deadline and then
//! lets the runtime run its other tasks first, a few times, before it
//! looks at the call again. A call whose answer is already here completes;
//! a call still waiting for its peer times out a little later than it
//! would have (after the tasks already queued have run). Under whole-gateway pauses at 500/s
//! the count of degraded answers did not measurably move, because the
//! requests that queue during a pause are then late on their own
//! (docs/faults.md, run 13).

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use tokio::time::Instant;

/// How late past its deadline a wake-up must come for the caller to count
/// as having been paused. Tokio's timers fire up to a millisecond late.
pub const PAUSED_AFTER: Duration = Duration::from_millis(2);

/// Times a paused caller yields to the runtime before looking at its call
/// again. Each yield lets the runtime poll its IO driver and run what is
/// queued: the connection task reads the answer, hyper's per-call task
/// hands it on.
pub const PAUSE_YIELDS: u32 = 3;

/// The future did not end within its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimedOut;

/// `fut` bounded by `limit`, like `tokio::time::timeout`, except that a
/// caller woken [`PAUSED_AFTER`] or more past the deadline first yields to
/// the runtime (up to [`PAUSE_YIELDS`] times) without polling `fut`, so an
/// answer that arrived while this process was not running is read and
/// used.
pub async fn timeout<F: Future>(limit: Duration, fut: F) -> Result<F::Output, TimedOut> {
    let deadline = Instant::now() + limit;
    let mut fut = std::pin::pin!(fut);
    let mut sleep = std::pin::pin!(tokio::time::sleep_until(deadline));
    let mut yields = 0;
    loop {
        // None: woken well past the deadline, with yields left.
        let ended = std::future::poll_fn(|cx| {
            if yields < PAUSE_YIELDS && Instant::now() >= deadline + PAUSED_AFTER {
                return Poll::Ready(None);
            }
            match fut.as_mut().poll(cx) {
                Poll::Ready(out) => Poll::Ready(Some(Ok(out))),
                Poll::Pending => sleep.as_mut().poll(cx).map(|()| Some(Err(TimedOut))),
            }
        })
        .await;
        match ended {
            Some(out) => {
                if yields > 0 {
                    let outcome = if out.is_ok() { "answered" } else { "timed_out" };
                    metrics::counter!("recmesh_paused_timeouts_total", "outcome" => outcome)
                        .increment(1);
                }
                return out;
            }
            // Tokio resumes a task that yields only after it has polled its
            // IO driver and run the tasks queued before: the connection
            // tasks read what came in meanwhile and hand it on.
            None => {
                yields += 1;
                tokio::task::yield_now().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_future_that_ends_in_time_is_returned() {
        let got = timeout(Duration::from_millis(50), async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            7
        })
        .await;
        assert_eq!(got, Ok(7));
    }

    #[tokio::test]
    async fn a_future_that_does_not_end_times_out() {
        let got = timeout(Duration::from_millis(10), std::future::pending::<()>()).await;
        assert_eq!(got, Err(TimedOut));
    }

    /// The pause, made by hand on a one-thread runtime: the thread sleeps
    /// (nothing runs) past the deadline while the answer is already on its
    /// way. The answer needs two more task switches to arrive, as a gRPC
    /// answer needs the connection task and hyper's task; both are queued
    /// when the timer fires.
    #[tokio::test]
    async fn an_answer_that_came_during_a_pause_is_used() {
        for (yields_allowed, expect_answer) in [(false, false), (true, true)] {
            let (tx1, rx1) = tokio::sync::oneshot::channel::<u32>();
            let (tx2, rx2) = tokio::sync::oneshot::channel::<u32>();
            // Hop 2: hands the answer on (hyper's per-call task).
            tokio::spawn(async move {
                if let Ok(v) = rx1.await {
                    let _ = tx2.send(v);
                }
            });
            let started = Instant::now();
            let limit = Duration::from_millis(5);
            // Hop 1 and the pause: the connection task has the answer as
            // soon as the runtime runs again, 30 ms after the deadline.
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                std::thread::sleep(Duration::from_millis(35));
                tokio::task::yield_now().await;
                let _ = tx1.send(42);
            });
            let got = if yields_allowed {
                timeout(limit, rx2).await.map(Result::ok)
            } else {
                tokio::time::timeout(limit, rx2)
                    .await
                    .map(Result::ok)
                    .map_err(|_| TimedOut)
            };
            assert!(started.elapsed() >= limit);
            assert_eq!(
                got.is_ok(),
                expect_answer,
                "yields allowed: {yields_allowed}"
            );
            if expect_answer {
                assert_eq!(got, Ok(Some(42)));
            }
        }
    }

    /// The same through real gRPC: a health check answered by a server on
    /// its own runtime while the caller's one-thread runtime is blocked
    /// past the call's deadline, after the request went out.
    #[test]
    fn a_grpc_answer_that_came_during_a_pause_is_used() {
        use tonic_health::pb::health_client::HealthClient;
        let server = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("server runtime");
        let listener = server
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let (_reporter, health) = tonic_health::server::health_reporter();
        server.spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let client = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("client runtime");
        client.block_on(async {
            let channel = crate::lazy_channel("test", &format!("http://{addr}")).expect("channel");
            let health = HealthClient::new(channel);
            let check = |t| {
                let mut h = health.clone();
                async move {
                    h.check(crate::outgoing(Default::default(), t, "pause"))
                        .await
                }
            };
            // Connected and answering before the paused call.
            crate::bounded(Duration::from_secs(5), check)
                .await
                .expect("a first check");
            let limit = Duration::from_millis(20);
            // The pause: once the tasks queued by the call have run (the
            // request is written), the whole runtime stops for 100 ms, and
            // the answer comes meanwhile.
            tokio::spawn(async {
                tokio::task::yield_now().await;
                std::thread::sleep(Duration::from_millis(100));
            });
            let started = Instant::now();
            let got = crate::bounded(limit, check).await;
            assert!(
                started.elapsed() >= limit + PAUSED_AFTER,
                "the pause happened"
            );
            assert!(got.is_ok(), "answered during the pause, yet: {got:?}");
        });
    }
}

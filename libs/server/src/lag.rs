//! Runtime lag: how late a task that asks to wake every 10 ms is woken.
//!
//! A late wake-up means every task of the runtime could have waited that
//! long too: a worker thread blocked or busy in one poll, the process not
//! scheduled, or the machine paused. Stage budgets are a few ms, so lag of
//! that size shows up as degraded answers; this metric tells an operator
//! whether the time was lost in this process's runtime
//! (`recmesh_runtime_lag_seconds{service}`, a histogram). Wake-ups 5 ms or
//! more late are also logged at debug with their time
//! (`RECMESH_LOG=info,recmesh_server::lag=debug`), to be put next to a
//! load test's trace. The cost is one timer wake-up per 10 ms.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

/// How often the probe asks to wake.
pub const PERIOD: Duration = Duration::from_millis(10);
/// Lag from which a wake-up is logged.
pub const LOGGED: Duration = Duration::from_millis(5);

/// The running probe; dropping it stops it.
#[derive(Debug)]
pub struct Probe(JoinHandle<()>);

impl Drop for Probe {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the probe on the current runtime.
pub fn spawn(service: &'static str) -> Probe {
    let histogram = metrics::histogram!("recmesh_runtime_lag_seconds", "service" => service);
    Probe(tokio::spawn(watch(move |lag| {
        histogram.record(lag.as_secs_f64());
        if lag >= LOGGED {
            tracing::debug!(
                service,
                lag_ms = lag.as_secs_f64() * 1e3,
                "runtime woke late"
            );
        }
    })))
}

/// Wakes every [`PERIOD`] and tells `record` how late each wake-up was.
async fn watch(mut record: impl FnMut(Duration)) {
    let mut ticks = tokio::time::interval(PERIOD);
    // A stall is measured once; the ticks it swallowed are not replayed.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticks.tick().await;
    let mut due = Instant::now() + PERIOD;
    loop {
        ticks.tick().await;
        record(Instant::now().saturating_duration_since(due));
        due = Instant::now() + PERIOD;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A worker blocked for 30 ms shows as about 30 ms of lag.
    #[test]
    fn a_blocked_runtime_shows_as_lag() {
        let lags = Arc::new(Mutex::new(Vec::new()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let seen = lags.clone();
            let probe = tokio::spawn(watch(move |lag| seen.lock().expect("lags").push(lag)));
            tokio::time::sleep(Duration::from_millis(25)).await;
            // Blocks the only worker: the probe cannot run meanwhile.
            std::thread::sleep(Duration::from_millis(30));
            tokio::time::sleep(Duration::from_millis(25)).await;
            probe.abort();
        });
        let lags = lags.lock().expect("lags").clone();
        let worst = lags.iter().max().copied().unwrap_or_default();
        assert!(lags.len() >= 3, "the probe records every wake-up: {lags:?}");
        assert!(
            worst >= Duration::from_millis(20),
            "a 30 ms block must show as 20 ms of lag or more: {lags:?}"
        );
    }
}

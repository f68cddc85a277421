//! `recmesh bench`: a quick closed-loop measurement of `Recommend` against a
//! running gateway. Client-side latency percentiles, per-stage latencies from
//! the responses' stage reports, and the degraded share.
//!
//! Closed loop (each worker sends its next request when the previous answer
//! arrives) understates tail latency under overload. It measures what one
//! request costs, not what the mesh sustains: the open-loop load test with an
//! SLO verdict is `loadtest/` (issue #9).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use recmesh_proto::v1 as pb;

/// What one run measured.
#[derive(Debug, Default)]
pub struct BenchReport {
    /// Client-side latency of each request.
    pub latencies: Vec<Duration>,
    /// Gateway-measured latency of each stage, by stage name.
    pub stages: BTreeMap<String, Vec<Duration>>,
    /// Responses with `degraded` set.
    pub degraded: usize,
    /// Calls that failed.
    pub errors: usize,
    /// Wall time of the run.
    pub elapsed: Duration,
}

/// The `q` quantile (0..=1) of `values` (sorted in place).
pub fn quantile(values: &mut [Duration], q: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort();
    let rank = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[rank.min(values.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl BenchReport {
    /// A Markdown summary.
    pub fn render(&mut self) -> String {
        let n = self.latencies.len();
        let mut out = format!(
            "{n} requests in {:.1}s ({:.0}/s), {} errors, {} degraded\n\n",
            self.elapsed.as_secs_f64(),
            n as f64 / self.elapsed.as_secs_f64().max(1e-9),
            self.errors,
            self.degraded
        );
        out.push_str("| measured | p50 ms | p90 ms | p99 ms | max ms |\n|---|---|---|---|---|\n");
        let mut row = |name: &str, v: &mut Vec<Duration>| {
            out.push_str(&format!(
                "| {name} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                ms(quantile(v, 0.5)),
                ms(quantile(v, 0.9)),
                ms(quantile(v, 0.99)),
                ms(quantile(v, 1.0))
            ));
        };
        row("Recommend (client side)", &mut self.latencies);
        for (stage, v) in &mut self.stages {
            row(&format!("stage {stage} (gateway side)"), v);
        }
        out
    }
}

/// Sends `requests` `Recommend` calls over `concurrency` workers, users drawn
/// round-robin from `users` demo users (u0..), `debug` set so the cache
/// does not answer.
pub async fn run(
    gateway: &str,
    requests: usize,
    concurrency: usize,
    users: u32,
) -> anyhow::Result<BenchReport> {
    let client = crate::client::connect(gateway).await?;
    let started = Instant::now();
    let mut tasks = Vec::new();
    let per_worker = requests.div_ceil(concurrency.max(1));
    for w in 0..concurrency.max(1) {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut report = BenchReport::default();
            for i in 0..per_worker {
                let user = format!("u{}", (w * per_worker + i) as u32 % users.max(1));
                let t = Instant::now();
                let answer = client
                    .recommend(pb::RecommendRequest {
                        user_id: user,
                        count: 10,
                        debug: true,
                        ..Default::default()
                    })
                    .await;
                report.latencies.push(t.elapsed());
                match answer {
                    Ok(r) => {
                        let r = r.into_inner();
                        report.degraded += usize::from(r.degraded);
                        for s in r.stages {
                            report
                                .stages
                                .entry(s.stage)
                                .or_default()
                                .push(Duration::from_micros(u64::from(s.latency_us)));
                        }
                    }
                    Err(_) => report.errors += 1,
                }
            }
            report
        }));
    }
    let mut total = BenchReport::default();
    for t in tasks {
        let r = t.await?;
        total.latencies.extend(r.latencies);
        total.degraded += r.degraded;
        total.errors += r.errors;
        for (k, v) in r.stages {
            total.stages.entry(k).or_default().extend(v);
        }
    }
    total.elapsed = started.elapsed();
    Ok(total)
}

/// What a freshness run measured.
#[derive(Debug, Default)]
pub struct FreshnessReport {
    /// `Track` sent → acknowledged.
    pub ack: Vec<Duration>,
    /// `Track` sent → a `Recommend` answered with a history-based (CF)
    /// candidate for the item just viewed.
    pub visible: Vec<Duration>,
    /// Samples whose first `Recommend` after the ack did not show it yet.
    pub stale_first: usize,
    /// Samples that never showed it within the 2 s limit, or failed.
    pub never: usize,
}

impl FreshnessReport {
    /// A Markdown summary.
    pub fn render(&mut self) -> String {
        let mut out = format!(
            "{} samples; first Recommend after the ack already fresh in {} of them; {} never fresh within 2 s\n\n",
            self.visible.len() + self.never,
            self.visible.len().saturating_sub(self.stale_first),
            self.never
        );
        out.push_str("| measured | p50 ms | p90 ms | p99 ms | max ms |\n|---|---|---|---|---|\n");
        for (name, v) in [
            ("Track acknowledged", &mut self.ack),
            ("Track sent → visible in Recommend", &mut self.visible),
        ] {
            out.push_str(&format!(
                "| {name} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                ms(quantile(v, 0.5)),
                ms(quantile(v, 0.9)),
                ms(quantile(v, 0.99)),
                ms(quantile(v, 1.0)),
            ));
        }
        out
    }
}

/// Freshness: for `samples` new users, one after another, `Track` a view of
/// a popular item, then call `Recommend` until an answer carries a CF
/// candidate (a history-based source: "because you viewed ..."). A new user
/// has no CF candidates before the event, so their appearance is the event
/// reaching the pipeline.
pub async fn freshness(gateway: &str, samples: usize) -> anyhow::Result<FreshnessReport> {
    let mut client = crate::client::connect(gateway).await?;
    let popular: Vec<String> = client
        .trending(pb::TrendingRequest {
            category: String::new(),
            count: 50,
        })
        .await
        .map_err(|s| anyhow::anyhow!("Trending: {}", s.message()))?
        .into_inner()
        .items
        .into_iter()
        .map(|i| i.item_id)
        .collect();
    anyhow::ensure!(
        !popular.is_empty(),
        "the gateway returned no trending items to view"
    );
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut report = FreshnessReport::default();
    for n in 0..samples {
        let user = format!("fresh-{run}-{n}");
        let sent = Instant::now();
        let tracked = client
            .track(pb::TrackRequest {
                event_id: format!("{user}-view"),
                user_id: user.clone(),
                item_id: popular[n % popular.len()].clone(),
                event_type: pb::EventType::View as i32,
                timestamp_ms: 0,
            })
            .await;
        if tracked.is_err() {
            report.never += 1;
            continue;
        }
        report.ack.push(sent.elapsed());
        let mut polls = 0;
        loop {
            polls += 1;
            let answer = client
                .recommend(pb::RecommendRequest {
                    user_id: user.clone(),
                    count: 10,
                    ..Default::default()
                })
                .await;
            if answer.is_ok_and(|a| a.into_inner().items.iter().any(|i| i.source == "cf")) {
                report.visible.push(sent.elapsed());
                report.stale_first += usize::from(polls > 1);
                break;
            }
            if sent.elapsed() > Duration::from_secs(2) {
                report.never += 1;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_hand() {
        let mut v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&mut v, 0.5), Duration::from_millis(51));
        assert_eq!(quantile(&mut v, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&mut v, 1.0), Duration::from_millis(100));
        assert_eq!(quantile(&mut [], 0.5), Duration::ZERO);
    }
}

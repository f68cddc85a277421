//! What a run measured, the SLO verdict, and the JSON and text forms.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{Measured, Scenario};

/// Latency percentiles, ms.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.5)),
            p90: ms(h.value_at_quantile(0.9)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// One second of the run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Second {
    /// Seconds from the start (warm-up included).
    pub t: u64,
    /// True inside the warm-up.
    pub warmup: bool,
    /// Answers intended in this second.
    pub count: u64,
    /// Median latency, ms.
    pub p50: f64,
    /// 99th percentile, ms.
    pub p99: f64,
    /// Failed calls.
    pub errors: u64,
}

/// A call that failed or was answered degraded.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Bad {
    /// Intended send time, ms from the start of the run.
    pub at_ms: u64,
    /// When the answer or the error came, ms from the start of the run.
    pub answered_ms: u64,
    /// Which call.
    pub call: &'static str,
    /// gRPC status (`OK` when only degraded).
    pub code: &'static str,
    /// Answered with a fallback.
    pub degraded: bool,
    /// `stage:fallback` of each stage that fell back (`Recommend` only).
    pub fallbacks: Vec<String>,
    /// The status message of a failed call; for a degraded answer, the
    /// latency of each stage that fell back and of the whole call.
    pub message: String,
}

/// The SLO verdict.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Verdict {
    /// Every objective held.
    pub pass: bool,
    /// One line per objective, with the measured value.
    pub checks: Vec<String>,
}

/// A run's report (also its JSON form).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario as run.
    pub scenario: Scenario,
    /// Requests per second offered.
    pub offered_rate: f64,
    /// Answers per second received in the measured window.
    pub achieved_rate: f64,
    /// Requests sent, warm-up included.
    pub sent: u64,
    /// Requests measured.
    pub measured: u64,
    /// Latency of every measured call, from its intended send time.
    pub latency: Percentiles,
    /// By call.
    pub per_call: BTreeMap<String, Percentiles>,
    /// By gateway stage, from the `Recommend` stage reports (the gateway's
    /// own measurement of each stage).
    pub per_stage: BTreeMap<String, Percentiles>,
    /// Failed calls by gRPC status.
    pub errors: BTreeMap<String, u64>,
    /// The first status message of each failing call and status
    /// (`track UNAVAILABLE`), warm-up included: what to read first.
    pub error_examples: BTreeMap<String, String>,
    /// Failed calls / measured calls.
    pub error_rate: f64,
    /// Answers flagged `degraded` / measured calls.
    pub degraded_rate: f64,
    /// Measured `Recommend` answers from the gateway's response cache /
    /// measured `Recommend` answers (0 with `bypass_cache`).
    pub cache_hit_rate: f64,
    /// Stage fallbacks by `stage:fallback`.
    pub fallbacks: BTreeMap<String, u64>,
    /// Per second.
    pub timeline: Vec<Second>,
    /// Answered calls by call, warm-up included.
    pub ok_by_call: BTreeMap<String, u64>,
    /// Every failed or degraded call, warm-up included (not in the JSON).
    #[serde(skip)]
    pub bad: Vec<Bad>,
    /// Against the scenario's SLO.
    pub verdict: Verdict,
}

impl Report {
    pub(crate) fn new(scenario: &Scenario, m: Measured) -> Self {
        let errors: u64 = m.errors.values().sum();
        let rate = |n: u64| {
            if m.counted > 0 {
                n as f64 / m.counted as f64
            } else {
                0.0
            }
        };
        let latency = Percentiles::of(&m.latency);
        let error_rate = rate(errors);
        let warmup = scenario.warmup_s;
        let timeline = m
            .seconds
            .iter()
            .enumerate()
            .filter(|(_, (h, _))| !h.is_empty())
            .map(|(t, (h, e))| Second {
                t: t as u64,
                warmup: (t as f64) < warmup,
                count: h.len(),
                p50: ms(h.value_at_quantile(0.5)),
                p99: ms(h.value_at_quantile(0.99)),
                errors: *e,
            })
            .collect();
        let mut checks = Vec::new();
        let mut pass = true;
        let p99_ok = latency.count > 0 && latency.p99 <= scenario.slo.p99_ms;
        pass &= p99_ok;
        checks.push(format!(
            "{} p99 {:.2} ms ≤ {} ms",
            if p99_ok { "PASS" } else { "FAIL" },
            latency.p99,
            scenario.slo.p99_ms
        ));
        let err_ok = error_rate <= scenario.slo.max_error_rate;
        pass &= err_ok;
        checks.push(format!(
            "{} error rate {:.4}% ≤ {:.4}%",
            if err_ok { "PASS" } else { "FAIL" },
            error_rate * 100.0,
            scenario.slo.max_error_rate * 100.0
        ));
        let degraded_rate = rate(m.degraded);
        if scenario.slo.max_degraded_rate < 1.0 {
            let ok = degraded_rate <= scenario.slo.max_degraded_rate;
            pass &= ok;
            checks.push(format!(
                "{} degraded {:.3}% ≤ {:.3}%",
                if ok { "PASS" } else { "FAIL" },
                degraded_rate * 100.0,
                scenario.slo.max_degraded_rate * 100.0
            ));
        }
        let achieved = m.counted as f64 / scenario.duration_s;
        Report {
            scenario: scenario.clone(),
            offered_rate: scenario.rate,
            achieved_rate: achieved,
            sent: m.sent,
            measured: m.counted,
            per_call: m
                .per_call
                .iter()
                .map(|(k, h)| (k.to_string(), Percentiles::of(h)))
                .collect(),
            per_stage: m
                .per_stage
                .iter()
                .map(|(k, h)| (k.clone(), Percentiles::of(h)))
                .collect(),
            errors: m.errors.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            error_examples: m.error_examples.clone(),
            error_rate,
            degraded_rate,
            cache_hit_rate: if m.recommends > 0 {
                m.cached as f64 / m.recommends as f64
            } else {
                0.0
            },
            fallbacks: m.fallbacks,
            timeline,
            ok_by_call: m
                .ok_by_call
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
            bad: m.bad,
            latency,
            verdict: Verdict { pass, checks },
        }
    }

    /// One line: rate, p50/p99, errors, verdict.
    pub fn summary_line(&self) -> String {
        format!(
            "{:.0}/s offered, {:.0}/s achieved: p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, errors {:.3}%, degraded {:.2}%, Recommends from cache {:.1}% → {}",
            self.offered_rate,
            self.achieved_rate,
            self.latency.p50,
            self.latency.p99,
            self.latency.p999,
            self.error_rate * 100.0,
            self.degraded_rate * 100.0,
            self.cache_hit_rate * 100.0,
            if self.verdict.pass { "PASS" } else { "FAIL" }
        )
    }

    /// The report as text for a terminal.
    pub fn text(&self) -> String {
        let mut out = format!(
            "{} requests measured ({} sent with warm-up), {:.1}/s offered, {:.1}/s achieved\n\n",
            self.measured, self.sent, self.offered_rate, self.achieved_rate
        );
        out.push_str("| latency ms | count | p50 | p90 | p95 | p99 | p99.9 | max |\n|---|---|---|---|---|---|---|---|\n");
        let mut row = |name: &str, p: &Percentiles| {
            out.push_str(&format!(
                "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
                p.count, p.p50, p.p90, p.p95, p.p99, p.p999, p.max
            ));
        };
        row("all calls", &self.latency);
        for (k, p) in &self.per_call {
            row(k, p);
        }
        for (k, p) in &self.per_stage {
            row(&format!("stage {k} (gateway side)"), p);
        }
        out.push_str(&format!(
            "\nerrors: {} ({:.3}%); degraded answers: {:.2}%; Recommends from the gateway's response cache: {:.1}%{}\n",
            if self.errors.is_empty() {
                "none".to_owned()
            } else {
                self.errors
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            self.error_rate * 100.0,
            self.degraded_rate * 100.0,
            self.cache_hit_rate * 100.0,
            if self.scenario.bypass_cache {
                " (bypass_cache)"
            } else {
                ""
            }
        ));
        for (kind, message) in &self.error_examples {
            out.push_str(&format!("first {kind}: {message}\n"));
        }
        if !self.fallbacks.is_empty() {
            out.push_str(&format!(
                "fallbacks: {}\n",
                self.fallbacks
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        out.push_str(&format!(
            "\nSLO verdict: {}\n",
            if self.verdict.pass { "PASS" } else { "FAIL" }
        ));
        for c in &self.verdict.checks {
            out.push_str(&format!("  {c}\n"));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn measured(counted: u64, degraded: u64, errors: u64, latency_ms: u64) -> Measured {
        let mut latency = crate::histogram();
        for _ in 0..counted {
            crate::record(&mut latency, Duration::from_millis(latency_ms));
        }
        Measured {
            latency,
            per_call: BTreeMap::new(),
            per_stage: BTreeMap::new(),
            fallbacks: BTreeMap::new(),
            errors: if errors > 0 {
                BTreeMap::from([("UNAVAILABLE", errors)])
            } else {
                BTreeMap::new()
            },
            error_examples: BTreeMap::new(),
            degraded,
            recommends: 0,
            cached: 0,
            counted,
            sent: counted,
            seconds: Vec::new(),
            wall: Duration::from_secs(1),
            ok_by_call: BTreeMap::new(),
            bad: Vec::new(),
        }
    }

    #[test]
    fn the_cache_hit_share_is_of_answered_recommends() {
        let mut m = measured(1000, 0, 0, 5);
        m.recommends = 800;
        m.cached = 200;
        let r = Report::new(&Scenario::default(), m);
        assert_eq!(r.cache_hit_rate, 0.25);
        assert!(
            r.summary_line().contains("Recommends from cache 25.0%"),
            "{}",
            r.summary_line()
        );
        let r = Report::new(&Scenario::default(), measured(1000, 0, 0, 5));
        assert_eq!(r.cache_hit_rate, 0.0, "no Recommend, no share");
    }

    #[test]
    fn the_text_shows_the_first_message_of_each_failure() {
        let mut m = measured(1000, 0, 4, 5);
        m.error_examples.insert(
            "track UNAVAILABLE".into(),
            "event not recorded (no answer within 200 ms)".into(),
        );
        let text = Report::new(&Scenario::default(), m).text();
        assert!(
            text.contains("first track UNAVAILABLE: event not recorded (no answer within 200 ms)"),
            "{text}"
        );
    }

    #[test]
    fn the_verdict_checks_each_objective() {
        let s = Scenario::default();
        let r = Report::new(&s, measured(1000, 0, 0, 50));
        assert!(r.verdict.pass, "{:?}", r.verdict);
        assert_eq!(
            r.verdict.checks.len(),
            2,
            "degraded share not checked by default"
        );
        let r = Report::new(&s, measured(1000, 0, 0, 250));
        assert!(!r.verdict.pass && r.verdict.checks[0].starts_with("FAIL p99 25"));
        let r = Report::new(&s, measured(1000, 0, 2, 50));
        assert!(!r.verdict.pass && r.verdict.checks[1].starts_with("FAIL error rate 0.2000%"));
        let mut strict = s.clone();
        strict.slo.max_degraded_rate = 0.05;
        let r = Report::new(&strict, measured(1000, 100, 0, 50));
        assert!(!r.verdict.pass);
        assert_eq!(r.verdict.checks[2], "FAIL degraded 10.000% ≤ 5.000%");
        assert!((r.degraded_rate - 0.1).abs() < 1e-12);
    }
}

//! An offline simulator over the real results code: the proof that the
//! statistics hold what [`crate::results`] promises.
//!
//! Each simulated experiment has `users` users with heterogeneous click
//! propensity (a Beta(0.5, 4) CTR per user, mean 0.111) and 1 + Poisson(3)
//! lists each, spread uniformly over `looks` results polls. Every list is a
//! real [`pb::Exposure`] fed to [`Results`], every click (and one purchase
//! in ten clicks) a real [`pb::Event`]; after each poll's lists the results
//! take one [`Results::look`], exactly as the service does, and the old
//! impression-level peeking rule is evaluated on the same tallies. A user's
//! pre-experiment engagement (the CUPED covariate) is their clicks over 20
//! earlier lists at the same propensity.
//!
//! Scenarios: A/A (no effect), A/B (the variant's propensity scaled), SRM
//! (a broken split under 50/50 weights). Runs are seeded one by one, so a
//! result does not depend on the number of threads.

use std::fmt::Write;

use recmesh_algo::stats::{Guardrail, guardrail_breached, two_proportion};
use recmesh_proto::v1 as pb;

use crate::model::{ExperimentDef, ExperimentSet, GuardrailDef, VariantDef};
use crate::results::{ALPHA, Results};

/// What to simulate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scenario {
    /// Users per experiment.
    pub users: usize,
    /// Results polls over the horizon.
    pub looks: usize,
    /// The variant's propensity relative to control's (1.0: A/A).
    pub effect: f64,
    /// Share of users assigned to the variant (0.5 under the 50/50 weights;
    /// anything else is a broken split).
    pub variant_share: f64,
    /// Apply CUPED.
    pub cuped: bool,
    /// The guardrail's minimum users per arm.
    pub min_sample: u64,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            users: 10_000,
            looks: 200,
            effect: 1.0,
            variant_share: 0.5,
            cuped: false,
            min_sample: 1_000,
        }
    }
}

/// The guardrail of every simulated experiment: stop a variant more than
/// 5% below control.
pub const MAX_RELATIVE_DROP: f64 = 0.05;

/// The old rule's minimum: impressions per arm.
const LEGACY_MIN_SAMPLE: u64 = 1_000;

/// What one simulated experiment did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RunOutcome {
    /// The look at which the guardrail first fired (per-user, always
    /// valid, SRM-checked).
    pub guardrail_stop: Option<usize>,
    /// The look at which the old impression-level rule (z-test at α = 0.05
    /// re-tested every poll) first fired.
    pub legacy_stop: Option<usize>,
    /// The impression-level two-sided p < 0.05 at some look (peeking).
    pub legacy_ever_significant: bool,
    /// At the horizon: two-sided p < 0.05 per user (fixed horizon),
    /// always valid, and per impression.
    pub fixed_significant: bool,
    pub always_valid_significant: bool,
    pub impression_significant: bool,
    /// CUPED-adjusted, fixed horizon (false without CUPED).
    pub cuped_significant: bool,
    /// Significant and in the variant's disfavour (for power).
    pub fixed_negative: bool,
    pub cuped_negative: bool,
    pub always_valid_negative: bool,
    /// SRM flagged at the horizon, and at some look.
    pub srm_at_horizon: bool,
    pub srm_ever: bool,
    /// CUPED's variance reduction at the horizon (0 without CUPED).
    pub variance_reduction: f64,
    /// Users per arm at the horizon.
    pub users: (u64, u64),
}

/// The demo data's SplitMix64 with the few distributions the simulation
/// needs.
struct Rng(recmesh_catalog::demo::Rng);

impl Rng {
    /// The generator whose state starts at `state`.
    fn with_state(state: u64) -> Self {
        Rng(recmesh_catalog::demo::Rng::new(
            state ^ 0x5851_f42d_4c95_7f2d,
        ))
    }

    /// Uniform on [0, 1).
    fn unit(&mut self) -> f64 {
        self.0.f64()
    }

    fn normal(&mut self) -> f64 {
        let u = 1.0 - self.unit();
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }

    /// Gamma(shape, 1): Marsaglia and Tsang, boosted below shape 1.
    fn gamma(&mut self, shape: f64) -> f64 {
        if shape < 1.0 {
            let u = 1.0 - self.unit();
            return self.gamma(shape + 1.0) * u.powf(1.0 / shape);
        }
        let d = shape - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = (1.0 + c * x).powi(3);
            if v <= 0.0 {
                continue;
            }
            let u = 1.0 - self.unit();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v;
            }
        }
    }

    fn beta(&mut self, a: f64, b: f64) -> f64 {
        let x = self.gamma(a);
        let y = self.gamma(b);
        x / (x + y)
    }

    /// Poisson(mean), Knuth's method (small means only).
    fn poisson(&mut self, mean: f64) -> u32 {
        let limit = (-mean).exp();
        let (mut k, mut p) = (0, 1.0);
        loop {
            p *= self.unit();
            if p <= limit {
                return k;
            }
            k += 1;
        }
    }
}

fn experiment_set(s: &Scenario) -> ExperimentSet {
    let mut set = ExperimentSet::default();
    let def = ExperimentDef {
        id: "sim".into(),
        layer: "sim".into(),
        traffic: 1.0,
        status: "running".into(),
        start_ms: 0,
        end_ms: 0,
        sticky: false,
        cuped: s.cuped,
        guardrails: vec![GuardrailDef {
            metric: "ctr".into(),
            max_relative_drop: MAX_RELATIVE_DROP,
            min_sample: s.min_sample,
        }],
        variants: ["control", "b"]
            .iter()
            .map(|n| VariantDef {
                name: (*n).into(),
                weight: 1,
                params: Default::default(),
                stopped_reason: String::new(),
            })
            .collect(),
    };
    // The definition above is valid by construction.
    let _ = set.put(def, None);
    set
}

struct User {
    name: String,
    variant: &'static str,
    propensity: f64,
    covariate: u32,
}

/// Simulates one experiment with seed `seed`.
pub fn run(s: &Scenario, seed: u64) -> RunOutcome {
    let mut rng = Rng::with_state(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x5eed);
    let set = experiment_set(s);
    let looks = s.looks.max(1);
    let mut by_look: Vec<Vec<u32>> = vec![Vec::new(); looks];
    let users: Vec<User> = (0..s.users)
        .map(|i| {
            let variant = if rng.unit() < s.variant_share {
                "b"
            } else {
                "control"
            };
            let propensity = rng.beta(0.5, 4.0);
            let covariate = (0..20).filter(|_| rng.unit() < propensity).count() as u32;
            for _ in 0..1 + rng.poisson(3.0) {
                let at = ((rng.unit() * looks as f64) as usize).min(looks - 1);
                by_look[at].push(i as u32);
            }
            User {
                name: format!("u{i}"),
                variant,
                propensity: if variant == "b" {
                    (propensity * s.effect).min(1.0)
                } else {
                    propensity
                },
                covariate,
            }
        })
        .collect();

    // Clicks are attributed in the same millisecond as their list: one
    // list per millisecond, a window longer than the whole run.
    let mut results = Results::new(u64::MAX / 4, 0);
    let legacy = Guardrail {
        max_relative_drop: MAX_RELATIVE_DROP,
        min_sample: LEGACY_MIN_SAMPLE,
        alpha: ALPHA,
    };
    let mut out = RunOutcome::default();
    let mut clock = 0i64;
    let items = vec!["i1".to_owned()];
    for (look, lists) in by_look.iter().enumerate() {
        for &i in lists {
            let u = &users[i as usize];
            clock += 1;
            results.add_exposures(&[pb::Exposure {
                request_id: String::new(),
                user_id: u.name.clone(),
                timestamp_ms: clock,
                assignments: vec![pb::Assignment {
                    experiment_id: "sim".into(),
                    variant: u.variant.into(),
                    params: Default::default(),
                }],
                item_ids: items.clone(),
                user_events_7d: Some(u.covariate),
            }]);
            if rng.unit() < u.propensity {
                let mut events = vec![event(&u.name, pb::EventType::Click, clock)];
                if rng.unit() < 0.1 {
                    events.push(event(&u.name, pb::EventType::Purchase, clock));
                }
                results.add_events(events);
                results.attribute(clock);
            }
        }
        results.attribute(clock);
        let seen = results.look(&set);
        if out.guardrail_stop.is_none() && !seen.breaches.is_empty() {
            out.guardrail_stop = Some(look + 1);
        }
        out.srm_ever |= seen.srm.iter().any(|(_, flagged)| *flagged);
        let (c, v) = (results.tally("sim", "control"), results.tally("sim", "b"));
        if out.legacy_stop.is_none()
            && guardrail_breached(&legacy, c.clicks, c.impressions, v.clicks, v.impressions)
        {
            out.legacy_stop = Some(look + 1);
        }
        if let Some(cmp) = two_proportion(c.clicks, c.impressions, v.clicks, v.impressions) {
            out.legacy_ever_significant |= cmp.p_value < ALPHA;
        }
    }
    if let Some(report) = results.report(&set, "sim") {
        let (c, b) = (&report.variants[0], &report.variants[1]);
        out.fixed_significant = b.user_ctr_p_value < ALPHA;
        out.fixed_negative = out.fixed_significant && b.user_ctr_diff_ci_high < 0.0;
        out.cuped_significant = b.cuped_p_value < ALPHA;
        out.cuped_negative = out.cuped_significant && b.cuped_diff_ci_high < 0.0;
        out.always_valid_significant = b.always_valid_p_value < ALPHA;
        out.always_valid_negative =
            out.always_valid_significant && b.always_valid_lift_ci_high < 0.0;
        out.impression_significant = b.ctr_p_value < ALPHA;
        out.srm_at_horizon = report.srm_flagged;
        out.variance_reduction = b.cuped_variance_reduction;
        out.users = (c.users, b.users);
    }
    out
}

fn event(user: &str, kind: pb::EventType, ts: i64) -> pb::Event {
    pb::Event {
        event_id: String::new(),
        user_id: user.to_owned(),
        item_id: "i1".into(),
        event_type: kind as i32,
        timestamp_ms: ts,
    }
}

/// Runs `runs` experiments of scenario `s` (seeds `seed`, `seed + 1`, …)
/// on `threads` threads.
pub fn run_many(s: &Scenario, runs: usize, seed: u64, threads: usize) -> Vec<RunOutcome> {
    let threads = threads.clamp(1, runs.max(1));
    let mut out = vec![RunOutcome::default(); runs];
    std::thread::scope(|scope| {
        for (t, chunk) in out.chunks_mut(runs.div_ceil(threads).max(1)).enumerate() {
            let first = t * runs.div_ceil(threads).max(1);
            scope.spawn(move || {
                for (k, slot) in chunk.iter_mut().enumerate() {
                    *slot = run(s, seed.wrapping_add((first + k) as u64));
                }
            });
        }
    });
    out
}

/// A share with its Wilson 95% interval, as "4.1% [2.9, 5.6]".
pub fn share(hits: usize, n: usize) -> String {
    if n == 0 {
        return "—".into();
    }
    let (p, nf) = (hits as f64 / n as f64, n as f64);
    let z = recmesh_algo::stats::Z_95;
    let centre = (p + z * z / (2.0 * nf)) / (1.0 + z * z / nf);
    let half = z / (1.0 + z * z / nf) * (p * (1.0 - p) / nf + z * z / (4.0 * nf * nf)).sqrt();
    format!(
        "{:.1}% [{:.1}, {:.1}]",
        p * 100.0,
        (centre - half).max(0.0) * 100.0,
        (centre + half).min(1.0) * 100.0
    )
}

fn count(outcomes: &[RunOutcome], f: impl Fn(&RunOutcome) -> bool) -> usize {
    outcomes.iter().filter(|o| f(o)).count()
}

fn mean_reduction(o: &[RunOutcome]) -> f64 {
    o.iter().map(|r| r.variance_reduction).sum::<f64>() / o.len().max(1) as f64
}

fn median(mut xs: Vec<usize>) -> Option<usize> {
    xs.sort_unstable();
    xs.get(xs.len() / 2).copied()
}

/// The A/A table: false stops and horizon calls, new against old.
pub fn render_aa(s: &Scenario, o: &[RunOutcome]) -> String {
    let n = o.len();
    let mut out = format!(
        "A/A: {n} experiments, {} users each, {} looks, CUPED {}\n\n\
         | what | rate (95% CI) |\n|---|---|\n",
        s.users,
        s.looks,
        if s.cuped { "on" } else { "off" }
    );
    for (what, hits) in [
        (
            "guardrail stop at any look (per user, always valid, SRM-checked)",
            count(o, |r| r.guardrail_stop.is_some()),
        ),
        (
            "old guardrail stop at any look (per impression, z-test re-tested every poll)",
            count(o, |r| r.legacy_stop.is_some()),
        ),
        (
            "old: impression-level p < 0.05 at any look (peeking)",
            count(o, |r| r.legacy_ever_significant),
        ),
        (
            "significant at the horizon: always valid",
            count(o, |r| r.always_valid_significant),
        ),
        (
            "significant at the horizon: per user, fixed horizon",
            count(o, |r| r.fixed_significant),
        ),
        (
            "significant at the horizon: per impression, fixed horizon",
            count(o, |r| r.impression_significant),
        ),
        (
            "significant at the horizon: CUPED-adjusted, fixed horizon",
            count(o, |r| r.cuped_significant),
        ),
        ("SRM flagged at any look", count(o, |r| r.srm_ever)),
    ] {
        if what.contains("CUPED") && !s.cuped {
            continue;
        }
        let _ = writeln!(out, "| {what} | {} |", share(hits, n));
    }
    if s.cuped {
        let _ = writeln!(
            out,
            "| CUPED variance reduction at the horizon (mean) | {:.1}% |",
            mean_reduction(o) * 100.0
        );
    }
    out
}

/// The A/B table: how often and how fast the guardrail stops a worse
/// variant, and the power at the horizon.
pub fn render_ab(s: &Scenario, o: &[RunOutcome]) -> String {
    let n = o.len();
    let stops: Vec<usize> = o.iter().filter_map(|r| r.guardrail_stop).collect();
    let legacy: Vec<usize> = o.iter().filter_map(|r| r.legacy_stop).collect();
    let at = |m: Option<usize>| {
        m.map_or("—".into(), |m| {
            format!(
                "look {m} of {} ({:.0}% of the horizon)",
                s.looks,
                m as f64 * 100.0 / s.looks as f64
            )
        })
    };
    let mut out = format!(
        "A/B, variant CTR {:+.0}%: {n} experiments, {} users each, {} looks, CUPED {}\n\n\
         | what | figure |\n|---|---|\n",
        (s.effect - 1.0) * 100.0,
        s.users,
        s.looks,
        if s.cuped { "on" } else { "off" }
    );
    let _ = writeln!(
        out,
        "| guardrail stops it (per user, always valid) | {} |",
        share(stops.len(), n)
    );
    let _ = writeln!(out, "| median time to stop | {} |", at(median(stops)));
    let _ = writeln!(
        out,
        "| power at the horizon: always valid, variant worse | {} |",
        share(count(o, |r| r.always_valid_negative), n)
    );
    let _ = writeln!(
        out,
        "| power at the horizon: per user, fixed horizon, variant worse | {} |",
        share(count(o, |r| r.fixed_negative), n)
    );
    if s.cuped {
        let _ = writeln!(
            out,
            "| power at the horizon: CUPED-adjusted, fixed horizon, variant worse | {} |",
            share(count(o, |r| r.cuped_negative), n)
        );
    }
    let _ = writeln!(
        out,
        "| old guardrail stops it (per impression, peeking) | {}; median {} |",
        share(legacy.len(), n),
        at(median(legacy))
    );
    if s.cuped {
        let _ = writeln!(
            out,
            "| CUPED variance reduction (mean) | {:.1}% |",
            mean_reduction(o) * 100.0
        );
    }
    out
}

/// The SRM table row: a split of `variant_share` under 50/50 weights.
pub fn render_srm_row(s: &Scenario, o: &[RunOutcome]) -> String {
    let n = o.len();
    format!(
        "| {:.0}/{:.0} | {} | {} | {} |",
        (1.0 - s.variant_share) * 100.0,
        s.variant_share * 100.0,
        s.users,
        share(count(o, |r| r.srm_at_horizon), n),
        share(count(o, |r| r.srm_ever), n)
    )
}

/// The whole proof, as `recmesh ab-sim` prints it.
#[derive(Debug, Clone, PartialEq)]
pub struct Suite {
    /// Experiments per A/A and A/B scenario.
    pub runs: usize,
    /// Experiments per SRM row.
    pub srm_runs: usize,
    pub users: usize,
    pub looks: usize,
    /// The A/B variant's CTR change (−0.10: 10% worse).
    pub effect: f64,
    /// SRM sample sizes (users per experiment).
    pub srm_users: Vec<usize>,
    pub seed: u64,
    pub threads: usize,
}

impl Suite {
    /// Runs every scenario; returns the Markdown report. `progress` hears
    /// the name of each scenario as it starts.
    pub fn run(&self, mut progress: impl FnMut(&str)) -> String {
        let base = Scenario {
            users: self.users,
            looks: self.looks,
            ..Scenario::default()
        };
        let mut out = String::new();
        for cuped in [false, true] {
            let aa = Scenario { cuped, ..base };
            progress(&format!("A/A, CUPED {cuped}"));
            let o = run_many(&aa, self.runs, self.seed, self.threads);
            out.push_str(&render_aa(&aa, &o));
            out.push('\n');
            let ab = Scenario {
                cuped,
                effect: 1.0 + self.effect,
                ..base
            };
            progress(&format!("A/B, CUPED {cuped}"));
            let o = run_many(&ab, self.runs, self.seed + 1_000_000, self.threads);
            out.push_str(&render_ab(&ab, &o));
            out.push('\n');
        }
        out.push_str(&format!(
            "SRM: {} experiments per row, {} looks; flagged when p < 0.001\n\n\
             | split | users | flagged at the horizon | flagged at any look |\n|---|---|---|---|\n",
            self.srm_runs, self.looks
        ));
        for &users in &self.srm_users {
            for variant_share in [0.48, 0.5] {
                let s = Scenario {
                    users,
                    variant_share,
                    ..base
                };
                progress(&format!("SRM {users} users, share {variant_share}"));
                let o = run_many(&s, self.srm_runs, self.seed + 2_000_000, self.threads);
                out.push_str(&render_srm_row(&s, &o));
                out.push('\n');
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_feeds_every_user_and_list_through_the_results() {
        let s = Scenario {
            users: 300,
            looks: 10,
            min_sample: 10,
            ..Scenario::default()
        };
        let o = run(&s, 1);
        // Every user has at least one list, so every user is counted in
        // exactly one arm.
        assert_eq!(o.users.0 + o.users.1, 300);
        // Seeded: the same seed gives the same experiment.
        assert_eq!(run(&s, 1), o);
        assert_eq!(run_many(&s, 3, 1, 2)[0], o);
    }

    #[test]
    fn wilson_interval_by_hand() {
        // 50 of 1,000: p = 0.05, Wilson 95% interval [0.0382, 0.0653].
        assert_eq!(share(50, 1_000), "5.0% [3.8, 6.5]");
        assert_eq!(share(0, 0), "—");
    }
}

//! What the results say: per-user comparisons, the always-valid test at
//! every look, the sample-ratio check, and the guardrail decisions.
//!
//! - **Per user, fixed horizon**: each arm's CTR is Σclicks / Σimpressions
//!   over its users; the difference's variance is the delta method's
//!   ([`ratio::compare`]). Valid when read once at a sample size chosen in
//!   advance.
//! - **Always valid**: an mSPRT on the log lift (variant CTR / control CTR),
//!   mixed over effect scales from 1% to 100% ([`TAUS`]), updated at every
//!   [`Results::look`]. Its p-value and interval stay valid
//!   however often they are read, so the guardrail and the "can stop" flag
//!   use it.
//! - **SRM**: users per variant against the weights (chi-square, flagged
//!   below p = 0.001). While flagged, no guardrail fires and nothing can
//!   stop.
//! - **CUPED** (per experiment): the CTR comparison adjusted by the users'
//!   pre-exposure engagement; the always-valid test then uses it too.

use recmesh_algo::stats::ratio::{self, Cuped, RatioComparison};
use recmesh_algo::stats::sequential::{AlwaysValid, TAUS};
use recmesh_algo::stats::srm::{self, SRM_ALPHA, Srm};
use recmesh_algo::stats::two_proportion;
use recmesh_proto::v1 as pb;

use super::{Arm, ExperimentTally, Results};
use crate::model::{ExperimentDef, ExperimentSet};

/// Significance level of the always-valid test and the guardrail.
pub const ALPHA: f64 = 0.05;

/// A change of an experiment's sample-ratio flag at a look.
#[derive(Debug, Clone, PartialEq)]
pub struct SrmChange {
    pub experiment: String,
    pub flagged: bool,
    /// What was seen, for the log.
    pub note: String,
}

/// What one look decided.
#[derive(Debug, Default)]
pub struct Look {
    /// Variants to stop: (experiment, variant, reason).
    pub breaches: Vec<(String, String, String)>,
    /// Every running experiment's sample-ratio flag (for the gauge).
    pub srm: Vec<(String, bool)>,
    /// Flags that changed at this look (for the log).
    pub srm_changes: Vec<SrmChange>,
}

/// One variant against control.
struct Compared {
    ctr: Option<RatioComparison>,
    cuped: Option<Cuped>,
    conversion: Option<RatioComparison>,
}

impl Compared {
    fn new(control: Option<&Arm>, arm: Option<&Arm>) -> Self {
        let (Some(c), Some(a)) = (control, arm) else {
            return Compared {
                ctr: None,
                cuped: None,
                conversion: None,
            };
        };
        Compared {
            ctr: ratio::compare(&c.ctr, &a.ctr),
            cuped: ratio::cuped(&c.ctr, &a.ctr),
            conversion: ratio::compare(&c.conversion, &a.conversion),
        }
    }

    /// The comparison decisions use: CUPED's when the experiment asks for
    /// it and it could be computed.
    fn decisive(&self, e: &ExperimentDef) -> Option<&RatioComparison> {
        match (&self.cuped, e.cuped) {
            (Some(k), true) => Some(&k.comparison),
            _ => self.ctr.as_ref(),
        }
    }
}

/// The always-valid interval of the log lift as a relative lift.
fn lift_ci(s: &AlwaysValid) -> (f64, f64) {
    (s.ci.0.exp() - 1.0, s.ci.1.exp() - 1.0)
}

/// The sample-ratio check of an experiment and what to say about it.
fn split_check(e: &ExperimentDef, t: Option<&ExperimentTally>) -> (Option<Srm>, String) {
    if let Some(v) = e.variants.iter().find(|v| !v.stopped_reason.is_empty()) {
        return (
            None,
            format!(
                "not checked: variant {} was stopped, its share no longer follows its weight",
                v.name
            ),
        );
    }
    let users: Vec<u64> = e
        .variants
        .iter()
        .map(|v| {
            t.and_then(|t| t.arms.get(&v.name))
                .map_or(0, |a| a.users.len() as u64)
        })
        .collect();
    let weights: Vec<f64> = e.variants.iter().map(|v| f64::from(v.weight)).collect();
    let Some(s) = srm::srm(&users, &weights) else {
        return (None, "not checked: no users yet".into());
    };
    let split = e
        .variants
        .iter()
        .zip(&users)
        .map(|(v, n)| format!("{} {n}", v.name))
        .collect::<Vec<_>>()
        .join(", ");
    let ratio = e
        .variants
        .iter()
        .map(|v| v.weight.to_string())
        .collect::<Vec<_>>()
        .join(":");
    let verdict = if s.flagged() {
        format!(
            " < {SRM_ALPHA}: sample-ratio mismatch. Find why one variant gets more users \
             (assignment, exposure logging, a filter or cache in front of one variant) \
             before reading any result; guardrails are held"
        )
    } else {
        String::new()
    };
    (
        Some(s),
        format!(
            "users {split} against weights {ratio}: chi-square {:.2}, p = {:.3e}{verdict}",
            s.chi_square, s.p_value
        ),
    )
}

impl Results {
    /// One look at every running experiment: updates the always-valid
    /// tests, checks the split, and returns the variants whose guardrail
    /// fires. Called once per results round; the always-valid figures in
    /// [`Results::report`] are those of the latest look.
    pub fn look(&mut self, set: &ExperimentSet) -> Look {
        // A deleted experiment's counts go with it.
        self.experiments.retain(|id, _| set.get(id).is_some());
        let mut out = Look::default();
        for s in &set.experiments {
            let e = &s.def;
            if e.status != "running" {
                continue;
            }
            let (check, note) = split_check(e, self.experiments.get(&e.id));
            let flagged = check.is_some_and(|c| c.flagged());
            out.srm.push((e.id.clone(), flagged));
            let Some(t) = self.experiments.get_mut(&e.id) else {
                continue;
            };
            if flagged != t.srm_flagged {
                t.srm_flagged = flagged;
                out.srm_changes.push(SrmChange {
                    experiment: e.id.clone(),
                    flagged,
                    note: note.clone(),
                });
            }
            let control = &e.variants[e.control()].name;
            for v in &e.variants {
                if &v.name == control || !v.stopped_reason.is_empty() {
                    continue;
                }
                let compared = Compared::new(t.arms.get(control), t.arms.get(&v.name));
                let Some(cmp) = compared.decisive(e) else {
                    continue;
                };
                let test = t.sequential.entry(v.name.clone()).or_default();
                if let Some((log_lift, var)) = cmp.log_lift {
                    test.look(log_lift, var, &TAUS, ALPHA);
                }
                if flagged {
                    continue;
                }
                let users = |name: &str| t.arms.get(name).map_or(0, |a| a.users.len() as u64);
                let (n0, n1) = (users(control), users(&v.name));
                let (low, high) = lift_ci(test);
                for g in e.guardrails.iter().filter(|g| g.metric == "ctr") {
                    if n0 < g.min_sample
                        || n1 < g.min_sample
                        || cmp.lift >= -g.max_relative_drop
                        || high >= 0.0
                    {
                        continue;
                    }
                    out.breaches.push((
                        e.id.clone(),
                        v.name.clone(),
                        format!(
                            "guardrail ctr: {:.4} vs control {:.4} ({:+.1}%, allowed −{:.1}%){}, \
                             always-valid p = {:.2e}, lift in [{:+.1}%, {:+.1}%], {n1} and {n0} users",
                            cmp.variant,
                            cmp.control,
                            cmp.lift * 100.0,
                            g.max_relative_drop * 100.0,
                            if e.cuped && compared.cuped.is_some() {
                                " CUPED-adjusted"
                            } else {
                                ""
                            },
                            test.p_value,
                            low * 100.0,
                            high * 100.0,
                        ),
                    ));
                    break;
                }
            }
        }
        out
    }

    /// The results of experiment `id` as defined in `set`.
    pub fn report(&self, set: &ExperimentSet, id: &str) -> Option<pb::ExperimentResults> {
        let e = &set.get(id)?.def;
        let control = &e.variants[e.control()];
        let t = self.experiments.get(id);
        let arm = |name: &str| t.and_then(|t| t.arms.get(name));
        let c = self.tally(id, &control.name);
        let (check, srm_note) = split_check(e, t);
        let srm_flagged = check.is_some_and(|c| c.flagged());
        let mut cuped_note = String::new();
        let variants = e
            .variants
            .iter()
            .map(|v| {
                let tally = self.tally(id, &v.name);
                let rate = |x: u64| {
                    if tally.impressions > 0 {
                        x as f64 / tally.impressions as f64
                    } else {
                        0.0
                    }
                };
                let mut r = pb::VariantResult {
                    variant: v.name.clone(),
                    impressions: tally.impressions,
                    clicks: tally.clicks,
                    conversions: tally.conversions,
                    ctr: rate(tally.clicks),
                    conversion_rate: rate(tally.conversions),
                    stopped_reason: v.stopped_reason.clone(),
                    users: self.users(id, &v.name),
                    ctr_p_value: 1.0,
                    user_ctr_p_value: 1.0,
                    always_valid_p_value: 1.0,
                    user_conversion_p_value: 1.0,
                    cuped_p_value: 1.0,
                    ..Default::default()
                };
                if v.name == control.name {
                    if e.cuped {
                        r.cuped_ctr = r.ctr;
                    }
                    return r;
                }
                if let Some(cmp) =
                    two_proportion(c.clicks, c.impressions, tally.clicks, tally.impressions)
                {
                    r.ctr_lift = cmp.lift;
                    r.ctr_p_value = cmp.p_value;
                    (r.ctr_diff_ci_low, r.ctr_diff_ci_high) = cmp.diff_ci;
                }
                let compared = Compared::new(arm(&control.name), arm(&v.name));
                if let Some(cmp) = &compared.ctr {
                    r.user_ctr_se = cmp.se;
                    r.user_ctr_p_value = cmp.p_value;
                    (r.user_ctr_diff_ci_low, r.user_ctr_diff_ci_high) = cmp.diff_ci;
                }
                if let Some(cmp) = &compared.conversion {
                    r.user_conversion_p_value = cmp.p_value;
                }
                if e.cuped && compared.cuped.is_none() && compared.ctr.is_some() {
                    cuped_note = "not applied: the covariate (events in the 7 days before a \
                                  user's first exposure) is the same for every user, or unknown"
                        .into();
                }
                if e.cuped
                    && let Some(k) = &compared.cuped
                {
                    r.cuped_ctr = k.comparison.variant;
                    r.cuped_lift = k.comparison.lift;
                    r.cuped_variance_reduction = k.variance_reduction;
                    r.cuped_p_value = k.comparison.p_value;
                    (r.cuped_diff_ci_low, r.cuped_diff_ci_high) = k.comparison.diff_ci;
                }
                let test = t
                    .and_then(|t| t.sequential.get(&v.name))
                    .copied()
                    .unwrap_or_default();
                r.always_valid_p_value = test.p_value;
                (r.always_valid_lift_ci_low, r.always_valid_lift_ci_high) = lift_ci(&test);
                r.can_stop = !srm_flagged && test.can_stop(ALPHA);
                r
            })
            .collect();
        Some(pb::ExperimentResults {
            experiment_id: id.to_owned(),
            control: control.name.clone(),
            variants,
            exposures_read: self.exposures_read,
            events_read: self.events_read,
            srm_p_value: check.map_or(1.0, |c| c.p_value),
            srm_flagged,
            srm_note,
            cuped: e.cuped,
            cuped_note,
        })
    }
}

//! Experiment results from the event log, and the guardrail.
//!
//! A consumer follows the features service's exposure log and event log
//! (`Features.ReadLog`, the same on both backends). An impression is one
//! exposed list: one per (exposure, experiment), counted for the variant
//! the user saw. A click is a `CLICK` event of that user on an item of their
//! latest exposed list in the experiment; a conversion a `PURCHASE` likewise.
//! Each impression counts at most one click and one conversion, so CTR and
//! conversion rate are proportions and the two-proportion z-test applies.
//!
//! Events are attributed `attribution_delay_ms` after their time, so an
//! exposure still in a gateway's send queue when the click arrives is read
//! first. A click or purchase counts only within `attribution_window_ms` of
//! its list's exposure; lists are kept at least that long (plus the delay)
//! and then dropped, so the consumer's memory holds the users exposed in
//! the last one or two windows, not every user ever exposed.

use std::collections::{HashMap, VecDeque};

use recmesh_algo::stats::{Guardrail, guardrail_breached, two_proportion};
use recmesh_proto::v1 as pb;

use crate::model::ExperimentSet;

/// Counters of one variant.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Exposed lists.
    pub impressions: u64,
    /// Impressions with a click on a shown item.
    pub clicks: u64,
    /// Impressions with a purchase of a shown item.
    pub conversions: u64,
}

#[derive(Debug)]
struct Shown {
    experiment: String,
    variant: String,
    /// The exposure's time (the gateway's clock).
    exposed_ms: i64,
    items: Vec<String>,
    clicked: bool,
    converted: bool,
}

/// Everything the consumer has read.
#[derive(Debug)]
pub struct Results {
    /// By (experiment, variant).
    tallies: HashMap<(String, String), Tally>,
    /// Each user's latest exposed list per experiment, in two generations:
    /// users exposed since `generation_ms` (attribution clock) and users
    /// last exposed in the generation before. A user's lists move to the
    /// current generation when they are exposed again.
    shown: HashMap<String, Vec<Shown>>,
    shown_before: HashMap<String, Vec<Shown>>,
    /// Start of the current generation; `None` before the first round.
    generation_ms: Option<i64>,
    /// How long after its exposure a list can be clicked, ms.
    window_ms: i64,
    /// How long a generation lasts: the window plus the attribution delay
    /// (an exposure's time is at most that far ahead of the attribution
    /// clock when it is read).
    generation_len_ms: i64,
    /// Events read but not yet old enough to attribute.
    pending: VecDeque<pb::Event>,
    /// Where the next reads start.
    pub exposures_cursor: String,
    /// Where the next reads start.
    pub events_cursor: String,
    /// Entries read so far.
    pub exposures_read: u64,
    /// Entries read so far.
    pub events_read: u64,
}

impl Default for Results {
    fn default() -> Self {
        let config = crate::ResultsConfig::default();
        Results::new(config.attribution_window_ms, config.attribution_delay_ms)
    }
}

impl Results {
    /// Nothing read yet; clicks count within `window_ms` of their exposure,
    /// events are attributed `delay_ms` after their time.
    pub fn new(window_ms: u64, delay_ms: u64) -> Self {
        let window_ms = i64::try_from(window_ms).unwrap_or(i64::MAX);
        Results {
            tallies: HashMap::new(),
            shown: HashMap::new(),
            shown_before: HashMap::new(),
            generation_ms: None,
            window_ms,
            generation_len_ms: window_ms
                .saturating_add(i64::try_from(delay_ms).unwrap_or(i64::MAX)),
            pending: VecDeque::new(),
            exposures_cursor: String::new(),
            events_cursor: String::new(),
            exposures_read: 0,
            events_read: 0,
        }
    }

    /// Users whose exposed lists are kept (both generations).
    pub fn users_kept(&self) -> usize {
        self.shown.len() + self.shown_before.len()
    }

    /// Counts exposures.
    pub fn add_exposures(&mut self, exposures: &[pb::Exposure]) {
        self.exposures_read += exposures.len() as u64;
        for e in exposures {
            let lists = match self.shown_before.remove(&e.user_id) {
                Some(before) => self.shown.entry(e.user_id.clone()).or_insert(before),
                None => self.shown.entry(e.user_id.clone()).or_default(),
            };
            for a in &e.assignments {
                self.tallies
                    .entry((a.experiment_id.clone(), a.variant.clone()))
                    .or_default()
                    .impressions += 1;
                lists.retain(|s| s.experiment != a.experiment_id);
                lists.push(Shown {
                    experiment: a.experiment_id.clone(),
                    variant: a.variant.clone(),
                    exposed_ms: e.timestamp_ms,
                    items: e.item_ids.clone(),
                    clicked: false,
                    converted: false,
                });
            }
        }
    }

    /// Queues events; they are attributed once older than the delay.
    pub fn add_events(&mut self, events: Vec<pb::Event>) {
        self.events_read += events.len() as u64;
        self.pending.extend(events);
    }

    /// Attributes the queued events with a time before `until_ms` (the
    /// attribution clock), then drops the lists no event can count for any
    /// more.
    pub fn attribute(&mut self, until_ms: i64) {
        self.attribute_events(until_ms);
        match self.generation_ms {
            None => self.generation_ms = Some(until_ms),
            // A list in `shown_before` was read while the clock was before
            // `start`, and an exposure's time is at most the delay ahead of
            // the clock when it is read, so it was exposed before
            // start + delay and
            // no event after start + delay + window counts for it. Once the
            // clock has passed that, every event that could count has been
            // attributed (this round's above): drop them.
            Some(start) if until_ms.saturating_sub(start) >= self.generation_len_ms => {
                self.shown_before = std::mem::take(&mut self.shown);
                self.generation_ms = Some(until_ms);
            }
            Some(_) => {}
        }
    }

    fn attribute_events(&mut self, until_ms: i64) {
        // Events arrive about in time order; a late-stamped one waits for
        // those before it to be old enough.
        while self
            .pending
            .front()
            .is_some_and(|e| e.timestamp_ms <= until_ms)
        {
            let Some(e) = self.pending.pop_front() else {
                break;
            };
            let click = e.event_type == pb::EventType::Click as i32;
            let purchase = e.event_type == pb::EventType::Purchase as i32;
            if !click && !purchase {
                continue;
            }
            let Some(lists) = self
                .shown
                .get_mut(&e.user_id)
                .or_else(|| self.shown_before.get_mut(&e.user_id))
            else {
                continue;
            };
            let window_ms = self.window_ms;
            let counts = |s: &Shown| {
                s.items.contains(&e.item_id)
                    && e.timestamp_ms.saturating_sub(s.exposed_ms) <= window_ms
            };
            for s in lists.iter_mut().filter(|s| counts(s)) {
                let tally = self
                    .tallies
                    .entry((s.experiment.clone(), s.variant.clone()))
                    .or_default();
                if click && !s.clicked {
                    s.clicked = true;
                    tally.clicks += 1;
                }
                if purchase && !s.converted {
                    s.converted = true;
                    tally.conversions += 1;
                }
            }
        }
    }

    /// The tally of one variant.
    pub fn tally(&self, experiment: &str, variant: &str) -> Tally {
        self.tallies
            .get(&(experiment.to_owned(), variant.to_owned()))
            .copied()
            .unwrap_or_default()
    }

    /// The results of experiment `id` as defined in `set`.
    pub fn report(&self, set: &ExperimentSet, id: &str) -> Option<pb::ExperimentResults> {
        let e = &set.get(id)?.def;
        let control = &e.variants[e.control()];
        let c = self.tally(id, &control.name);
        let variants = e
            .variants
            .iter()
            .map(|v| {
                let t = self.tally(id, &v.name);
                let rate = |x: u64| {
                    if t.impressions > 0 {
                        x as f64 / t.impressions as f64
                    } else {
                        0.0
                    }
                };
                let mut r = pb::VariantResult {
                    variant: v.name.clone(),
                    impressions: t.impressions,
                    clicks: t.clicks,
                    conversions: t.conversions,
                    ctr: rate(t.clicks),
                    conversion_rate: rate(t.conversions),
                    stopped_reason: v.stopped_reason.clone(),
                    ctr_p_value: 1.0,
                    ..Default::default()
                };
                if v.name != control.name
                    && let Some(cmp) =
                        two_proportion(c.clicks, c.impressions, t.clicks, t.impressions)
                {
                    r.ctr_lift = cmp.lift;
                    r.ctr_p_value = cmp.p_value;
                    (r.ctr_diff_ci_low, r.ctr_diff_ci_high) = cmp.diff_ci;
                }
                r
            })
            .collect();
        Some(pb::ExperimentResults {
            experiment_id: id.to_owned(),
            control: control.name.clone(),
            variants,
            exposures_read: self.exposures_read,
            events_read: self.events_read,
        })
    }

    /// Variants of running experiments whose guardrail fires now, with the
    /// reason to record: (experiment, variant, reason).
    pub fn breaches(&self, set: &ExperimentSet) -> Vec<(String, String, String)> {
        let mut out = Vec::new();
        for s in &set.experiments {
            let e = &s.def;
            if e.status != "running" {
                continue;
            }
            let control = &e.variants[e.control()].name;
            let c = self.tally(&e.id, control);
            for g in &e.guardrails {
                let rule = Guardrail {
                    max_relative_drop: g.max_relative_drop,
                    min_sample: g.min_sample,
                    alpha: 0.05,
                };
                for v in &e.variants {
                    if &v.name == control || !v.stopped_reason.is_empty() {
                        continue;
                    }
                    let t = self.tally(&e.id, &v.name);
                    if guardrail_breached(&rule, c.clicks, c.impressions, t.clicks, t.impressions)
                        && let Some(cmp) =
                            two_proportion(c.clicks, c.impressions, t.clicks, t.impressions)
                    {
                        out.push((
                            e.id.clone(),
                            v.name.clone(),
                            format!(
                                "guardrail ctr: {:.4} vs control {:.4} ({:+.1}%, allowed −{:.1}%), p = {:.2e}, \
                                 {} and {} impressions",
                                cmp.variant,
                                cmp.control,
                                cmp.lift * 100.0,
                                g.max_relative_drop * 100.0,
                                cmp.p_value,
                                t.impressions,
                                c.impressions
                            ),
                        ));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ExperimentDef, GuardrailDef, VariantDef};

    fn exposure(user: &str, variant: &str, items: &[&str]) -> pb::Exposure {
        pb::Exposure {
            request_id: "r".into(),
            user_id: user.into(),
            timestamp_ms: 1,
            assignments: vec![pb::Assignment {
                experiment_id: "x".into(),
                variant: variant.into(),
                params: Default::default(),
            }],
            item_ids: items.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn event(user: &str, item: &str, kind: pb::EventType, ts: i64) -> pb::Event {
        pb::Event {
            event_id: format!("{user}-{item}-{ts}"),
            user_id: user.into(),
            item_id: item.into(),
            event_type: kind as i32,
            timestamp_ms: ts,
        }
    }

    fn set_with_guardrail(min_sample: u64) -> ExperimentSet {
        let mut set = ExperimentSet::default();
        set.put(
            ExperimentDef {
                id: "x".into(),
                layer: "l".into(),
                traffic: 1.0,
                status: "running".into(),
                start_ms: 0,
                end_ms: 0,
                sticky: false,
                guardrails: vec![GuardrailDef {
                    metric: "ctr".into(),
                    max_relative_drop: 0.05,
                    min_sample,
                }],
                variants: ["control", "b"]
                    .iter()
                    .map(|n| VariantDef {
                        name: n.to_string(),
                        weight: 1,
                        params: Default::default(),
                        stopped_reason: String::new(),
                    })
                    .collect(),
            },
            None,
        )
        .expect("valid");
        set
    }

    #[test]
    fn clicks_count_once_per_impression_on_shown_items_only() {
        let mut r = Results::default();
        r.add_exposures(&[
            exposure("u1", "b", &["i1", "i2"]),
            exposure("u2", "control", &["i3"]),
        ]);
        r.add_events(vec![
            event("u1", "i1", pb::EventType::Click, 10),
            event("u1", "i2", pb::EventType::Click, 11), // same impression: once
            event("u1", "i9", pb::EventType::Click, 12), // not shown
            event("u2", "i3", pb::EventType::View, 13),  // not a click
            event("u2", "i3", pb::EventType::Purchase, 14),
            event("u3", "i3", pb::EventType::Click, 15), // never exposed
            event("u2", "i3", pb::EventType::Click, 100), // too recent yet
        ]);
        r.attribute(50);
        assert_eq!(
            r.tally("x", "b"),
            Tally {
                impressions: 1,
                clicks: 1,
                conversions: 0
            }
        );
        assert_eq!(
            r.tally("x", "control"),
            Tally {
                impressions: 1,
                clicks: 0,
                conversions: 1
            }
        );
        r.attribute(100);
        assert_eq!(
            r.tally("x", "control").clicks,
            1,
            "attributed once old enough"
        );
        // A new exposure starts a new impression that can be clicked again.
        r.add_exposures(&[exposure("u1", "b", &["i1"])]);
        r.add_events(vec![event("u1", "i1", pb::EventType::Click, 101)]);
        r.attribute(200);
        assert_eq!(
            r.tally("x", "b"),
            Tally {
                impressions: 2,
                clicks: 2,
                conversions: 0
            }
        );
        let report = r.report(&set_with_guardrail(10), "x").expect("known");
        assert_eq!(report.control, "control");
        assert_eq!(report.variants[1].ctr, 1.0);
    }

    fn exposure_at(user: &str, items: &[&str], ts: i64) -> pb::Exposure {
        pb::Exposure {
            timestamp_ms: ts,
            ..exposure(user, "b", items)
        }
    }

    #[test]
    fn a_click_counts_only_within_the_window_of_its_exposure() {
        let mut r = Results::new(1_000, 0);
        r.add_exposures(&[
            exposure_at("u1", &["i1"], 5_000),
            exposure_at("u2", &["i1"], 5_000),
        ]);
        r.add_events(vec![
            event("u1", "i1", pb::EventType::Click, 6_000), // at the window's end
            event("u2", "i1", pb::EventType::Click, 6_001), // 1 ms past it
        ]);
        r.attribute(10_000);
        assert_eq!(r.tally("x", "b").impressions, 2);
        assert_eq!(r.tally("x", "b").clicks, 1);
    }

    #[test]
    fn lists_are_dropped_once_no_event_can_count_for_them() {
        // Window 1 s, delay 500 ms: a generation lasts 1.5 s.
        let mut r = Results::new(1_000, 500);
        r.attribute(0);
        for i in 0..1_000 {
            r.add_exposures(&[exposure_at(&format!("u{i}"), &["i1"], 400)]);
        }
        r.attribute(900);
        assert_eq!(r.users_kept(), 1_000);
        // A generation later the lists move to the older generation, where
        // a click inside the window still counts for them.
        r.attribute(1_500);
        assert_eq!(r.users_kept(), 1_000);
        r.add_events(vec![event("u1", "i1", pb::EventType::Click, 1_400)]);
        r.attribute(1_600);
        assert_eq!(r.tally("x", "b").clicks, 1);
        // u2 is exposed again: their lists move to the current generation.
        r.add_exposures(&[exposure_at("u2", &["i2"], 1_700)]);
        r.attribute(2_000);
        assert_eq!(r.users_kept(), 1_000);
        // Another generation later everyone not exposed since is dropped.
        r.attribute(3_000);
        assert_eq!(r.users_kept(), 1, "only u2 is kept");
        r.add_events(vec![event("u2", "i2", pb::EventType::Click, 2_600)]);
        r.attribute(3_100);
        assert_eq!(r.tally("x", "b").clicks, 2, "u2's latest list still counts");
        // The tallies stay whatever is dropped.
        assert_eq!(r.tally("x", "b").impressions, 1_001);
    }

    /// A deterministic Bernoulli source (SplitMix64).
    struct Rng(u64);
    impl Rng {
        fn chance(&mut self, p: f64) -> bool {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 11) as f64 / (1u64 << 53) as f64) < p
        }
    }

    /// Simulates `n` impressions per arm with the given CTRs; returns the
    /// guardrail's breaches.
    fn simulate(seed: u64, n: usize, ctr_control: f64, ctr_variant: f64) -> usize {
        let set = set_with_guardrail(2_000);
        let mut rng = Rng(seed);
        let mut r = Results::default();
        let mut events = Vec::new();
        for i in 0..n {
            for (arm, ctr) in [("control", ctr_control), ("b", ctr_variant)] {
                let user = format!("{arm}-{i}");
                r.add_exposures(&[exposure(&user, arm, &["i1"])]);
                if rng.chance(ctr) {
                    events.push(event(&user, "i1", pb::EventType::Click, 1));
                }
            }
        }
        r.add_events(events);
        r.attribute(i64::MAX);
        r.breaches(&set).len()
    }

    #[test]
    fn guardrail_fires_on_a_ctr_drop() {
        // 10% vs 8% over 5,000 impressions each.
        let fired: usize = (0..20).map(|seed| simulate(seed, 5_000, 0.10, 0.08)).sum();
        assert!(fired >= 19, "fired in {fired} of 20 runs");
        let reason = {
            let set = set_with_guardrail(10);
            let mut r = Results::default();
            for i in 0..100 {
                r.add_exposures(&[exposure(&format!("c{i}"), "control", &["i1"])]);
                r.add_exposures(&[exposure(&format!("v{i}"), "b", &["i1"])]);
            }
            r.add_events(
                (0..50)
                    .map(|i| event(&format!("c{i}"), "i1", pb::EventType::Click, 1))
                    .collect(),
            );
            r.add_events(
                (0..10)
                    .map(|i| event(&format!("v{i}"), "i1", pb::EventType::Click, 1))
                    .collect(),
            );
            r.attribute(i64::MAX);
            r.breaches(&set)
        };
        assert_eq!(reason.len(), 1);
        assert!(
            reason[0]
                .2
                .starts_with("guardrail ctr: 0.1000 vs control 0.5000"),
            "{}",
            reason[0].2
        );
    }

    #[test]
    fn guardrail_stays_quiet_on_a_a_noise() {
        // Equal CTRs: a breach needs a >5% drop *and* p < 0.05 in the drop
        // direction, about 2.5% of runs by chance at this size. Over 100
        // seeded runs allow at most the nominal 5%.
        let fired: usize = (0..100)
            .map(|seed| simulate(1_000 + seed, 10_000, 0.10, 0.10))
            .sum();
        assert!(fired <= 5, "fired in {fired} of 100 A/A runs");
        // Below the minimum sample nothing fires however large the drop.
        assert_eq!(simulate(7, 1_000, 0.10, 0.01), 0);
    }
}

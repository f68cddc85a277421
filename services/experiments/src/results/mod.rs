//! Experiment results from the event log, and the guardrail.
//!
//! A consumer follows the features service's exposure log and event log
//! (`Features.ReadLog`, the same on both backends). An impression is one
//! exposed list: one per (exposure, experiment), counted for the variant
//! the user saw. A click is a `CLICK` event of that user on an item of their
//! latest exposed list in the experiment; a conversion a `PURCHASE` likewise.
//! Each impression counts at most one click and one conversion.
//!
//! The unit of analysis is the user, the unit assignment randomises: each
//! user's impressions, clicks and conversions in each variant are kept, and
//! the arms are compared on the ratio Σclicks / Σimpressions over users
//! with the delta method ([`analysis`]). The impression-level figures (every
//! list an independent trial) are kept beside them, labelled as such. A user
//! exposed in two variants (weights changed on a non-sticky experiment)
//! counts as a user of each. A user's covariate for CUPED is their
//! `user_events_7d` at their first exposure in the variant (0 when the
//! gateway did not know it).
//!
//! Events are attributed `attribution_delay_ms` after their time, so an
//! exposure still in a gateway's send queue when the click arrives is read
//! first. A click or purchase counts only within `attribution_window_ms` of
//! its list's exposure; lists are kept at least that long (plus the delay)
//! and then dropped, so the consumer's memory holds the users exposed in
//! the last one or two windows, not every user ever exposed.

mod analysis;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque, hash_map::Entry};

use recmesh_algo::assign::fnv1a64;
use recmesh_algo::stats::ratio::RatioSums;
use recmesh_algo::stats::sequential::AlwaysValid;
use recmesh_proto::v1 as pb;

pub use analysis::{ALPHA, Look, SrmChange};

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

/// One user's counts in one variant.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct UserTally {
    impressions: u32,
    clicks: u32,
    conversions: u32,
    /// Events in the 7 days before their first exposure here.
    covariate: u32,
}

/// One variant: each user's counts, and the per-user sums the comparisons
/// need (kept up to date as users change). The impression-level counts are
/// the sums' totals (Σy impressions, Σx clicks or conversions).
#[derive(Debug, Default)]
struct Arm {
    users: HashMap<u64, UserTally>,
    /// Clicks over impressions per user, covariate = `covariate`.
    ctr: RatioSums,
    /// Conversions over impressions per user.
    conversion: RatioSums,
}

impl Arm {
    /// Changes one user's counts (adding the user with `covariate` when
    /// new) and the sums with them.
    fn update(&mut self, user: u64, covariate: Option<u32>, change: impl FnOnce(&mut UserTally)) {
        let u = match self.users.entry(user) {
            Entry::Occupied(o) => {
                let u = o.into_mut();
                self.ctr.remove(
                    f64::from(u.clicks),
                    f64::from(u.impressions),
                    f64::from(u.covariate),
                );
                self.conversion.remove(
                    f64::from(u.conversions),
                    f64::from(u.impressions),
                    f64::from(u.covariate),
                );
                u
            }
            Entry::Vacant(v) => v.insert(UserTally {
                covariate: covariate.unwrap_or(0),
                ..UserTally::default()
            }),
        };
        change(u);
        self.ctr.add(
            f64::from(u.clicks),
            f64::from(u.impressions),
            f64::from(u.covariate),
        );
        self.conversion.add(
            f64::from(u.conversions),
            f64::from(u.impressions),
            f64::from(u.covariate),
        );
    }
}

/// Everything known about one experiment's arms.
#[derive(Debug, Default)]
struct ExperimentTally {
    /// By variant name.
    arms: HashMap<String, Arm>,
    /// The always-valid test of each variant against control, updated at
    /// every look.
    sequential: HashMap<String, AlwaysValid>,
    /// Whether the last look flagged a sample-ratio mismatch.
    srm_flagged: bool,
}

#[derive(Debug)]
struct Shown {
    experiment: String,
    variant: String,
    /// The exposure's time (the gateway's clock).
    exposed_ms: i64,
    /// The user's hash: the key of their per-user counts.
    user: u64,
    items: Vec<String>,
    clicked: bool,
    converted: bool,
}

/// Everything the consumer has read.
#[derive(Debug)]
pub struct Results {
    /// By experiment.
    experiments: HashMap<String, ExperimentTally>,
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
            experiments: HashMap::new(),
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
            let user = fnv1a64(e.user_id.as_bytes());
            let lists = match self.shown_before.remove(&e.user_id) {
                Some(before) => self.shown.entry(e.user_id.clone()).or_insert(before),
                None => self.shown.entry(e.user_id.clone()).or_default(),
            };
            for a in &e.assignments {
                let arm = Self::arm_in(&mut self.experiments, &a.experiment_id, &a.variant);
                arm.update(user, e.user_events_7d, |u| {
                    u.impressions = u.impressions.saturating_add(1);
                });
                lists.retain(|s| s.experiment != a.experiment_id);
                lists.push(Shown {
                    experiment: a.experiment_id.clone(),
                    variant: a.variant.clone(),
                    exposed_ms: e.timestamp_ms,
                    user,
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
                let arm = Self::arm_in(&mut self.experiments, &s.experiment, &s.variant);
                if click && !s.clicked {
                    s.clicked = true;
                    arm.update(s.user, None, |u| u.clicks = u.clicks.saturating_add(1));
                }
                if purchase && !s.converted {
                    s.converted = true;
                    arm.update(s.user, None, |u| {
                        u.conversions = u.conversions.saturating_add(1);
                    });
                }
            }
        }
    }

    fn arm_in<'a>(
        experiments: &'a mut HashMap<String, ExperimentTally>,
        experiment: &str,
        variant: &str,
    ) -> &'a mut Arm {
        experiments
            .entry(experiment.to_owned())
            .or_default()
            .arms
            .entry(variant.to_owned())
            .or_default()
    }

    /// The impression-level tally of one variant.
    pub fn tally(&self, experiment: &str, variant: &str) -> Tally {
        self.experiments
            .get(experiment)
            .and_then(|e| e.arms.get(variant))
            .map(|a| Tally {
                // Sums of integer counts: exact in f64.
                impressions: a.ctr.y as u64,
                clicks: a.ctr.x as u64,
                conversions: a.conversion.x as u64,
            })
            .unwrap_or_default()
    }

    /// Per-user counts kept, over every experiment and variant (about 40
    /// bytes each, kept until the experiment is deleted).
    pub fn tracked_users(&self) -> usize {
        self.experiments
            .values()
            .flat_map(|e| e.arms.values())
            .map(|a| a.users.len())
            .sum()
    }

    /// Distinct users exposed in one variant.
    pub fn users(&self, experiment: &str, variant: &str) -> u64 {
        self.experiments
            .get(experiment)
            .and_then(|e| e.arms.get(variant))
            .map_or(0, |a| a.users.len() as u64)
    }
}

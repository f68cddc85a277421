//! Experiments, their validation, and assignment.
//!
//! A user's bucket in a layer is `fnv1a64(layer ‖ ":" ‖ user) mod 10,000`
//! (`recmesh_algo::assign`). Each experiment owns a contiguous bucket range
//! of its layer, allocated when it is created (first fit) and kept while it
//! exists: creating, changing or deleting another experiment never moves a
//! user of this one. Inside its range the variants take sub-ranges in
//! proportion to their weights. A global holdout (its own salt) keeps a
//! share of users out of every experiment.

use std::collections::{BTreeMap, HashMap, HashSet};

use recmesh_algo::assign::{BUCKETS, share_buckets};
use recmesh_algo::params::VariantParams;
use recmesh_mesh::convert::{FieldError, check_id};
use recmesh_proto::v1 as pb;
use serde::{Deserialize, Serialize};

/// Lifecycle of an experiment; only `running` assigns.
pub const STATUSES: &[&str] = &["draft", "running", "paused", "stopped"];

/// One variant of an experiment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VariantDef {
    /// Name, unique in the experiment; reported in responses.
    pub name: String,
    /// Relative weight.
    pub weight: u32,
    /// Pipeline params (see `recmesh_algo::params`).
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Why the variant was stopped (by a guardrail); empty while it runs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stopped_reason: String,
}

/// A guardrail on a variant metric against control.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GuardrailDef {
    /// `ctr`.
    #[serde(default = "ctr")]
    pub metric: String,
    /// Largest accepted relative drop, 0 < x < 1.
    #[serde(default = "five_percent")]
    pub max_relative_drop: f64,
    /// Impressions each arm needs before the guardrail may fire.
    #[serde(default = "thousand")]
    pub min_sample: u64,
}

fn ctr() -> String {
    "ctr".into()
}
fn five_percent() -> f64 {
    0.05
}
fn thousand() -> u64 {
    1_000
}

/// One experiment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExperimentDef {
    /// Unique id: lowercase letters, digits, `-` and `_`.
    pub id: String,
    /// Layer: experiments in one layer are mutually exclusive.
    pub layer: String,
    /// Share of the layer's users in the experiment, 0..=1.
    pub traffic: f64,
    /// `draft`, `running`, `paused` or `stopped`.
    #[serde(default = "running")]
    pub status: String,
    /// Variants, at least one; the control is the one named `control`, else
    /// the first.
    pub variants: Vec<VariantDef>,
    /// Assigns only from this time on (Unix ms; 0: now).
    #[serde(default)]
    pub start_ms: i64,
    /// Assigns only until this time (Unix ms; 0: no end).
    #[serde(default)]
    pub end_ms: i64,
    /// Guardrails that stop a losing variant.
    #[serde(default)]
    pub guardrails: Vec<GuardrailDef>,
    /// Keep each user's first variant when weights change.
    #[serde(default)]
    pub sticky: bool,
    /// Adjust the per-user CTR comparison with CUPED (the user's events in
    /// the 7 days before their first exposure as the covariate).
    #[serde(default)]
    pub cuped: bool,
}

fn running() -> String {
    "running".into()
}

impl ExperimentDef {
    /// Index of the control variant.
    pub fn control(&self) -> usize {
        self.variants
            .iter()
            .position(|v| v.name == "control")
            .unwrap_or(0)
    }
}

/// Validates everything about one experiment that does not depend on the
/// others.
pub fn validate(e: &ExperimentDef) -> Result<(), FieldError> {
    check_id("id", &e.id)?;
    if !e
        .id
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    {
        return Err(FieldError::new(
            "id",
            "must be lowercase letters, digits, `-` or `_`",
        ));
    }
    check_id("layer", &e.layer)?;
    if !(0.0..=1.0).contains(&e.traffic) || e.traffic.is_nan() {
        return Err(FieldError::new("traffic", "must be in 0.0..=1.0"));
    }
    if !STATUSES.contains(&e.status.as_str()) {
        return Err(FieldError::new(
            "status",
            format!("must be one of {}", STATUSES.join(", ")),
        ));
    }
    if e.start_ms < 0 || e.end_ms < 0 || (e.end_ms != 0 && e.end_ms <= e.start_ms) {
        return Err(FieldError::new(
            "end_ms",
            "must be 0 (no end) or after start_ms (Unix ms, both non-negative)",
        ));
    }
    if e.variants.is_empty() {
        return Err(FieldError::new("variants", "needs at least one variant"));
    }
    if e.variants.len() > 20 {
        return Err(FieldError::new("variants", "at most 20 variants"));
    }
    let mut names = HashSet::new();
    for (n, v) in e.variants.iter().enumerate() {
        check_id(&format!("variants[{n}].name"), &v.name)?;
        if !names.insert(v.name.as_str()) {
            return Err(FieldError::new(
                format!("variants[{n}].name"),
                format!("`{}` is used twice", v.name),
            ));
        }
        if v.weight > 1_000_000 {
            return Err(FieldError::new(
                format!("variants[{n}].weight"),
                "must be at most 1000000",
            ));
        }
        let params: HashMap<String, String> = v.params.clone().into_iter().collect();
        VariantParams::default().apply(&params).map_err(|err| {
            FieldError::new(format!("variants[{n}].params.{}", err.key), err.reason)
        })?;
    }
    if e.variants.iter().all(|v| v.weight == 0) {
        return Err(FieldError::new(
            "variants",
            "at least one weight must be above 0",
        ));
    }
    for (n, g) in e.guardrails.iter().enumerate() {
        if g.metric != "ctr" {
            return Err(FieldError::new(
                format!("guardrails[{n}].metric"),
                "must be `ctr`",
            ));
        }
        if !(g.max_relative_drop > 0.0 && g.max_relative_drop < 1.0) {
            return Err(FieldError::new(
                format!("guardrails[{n}].max_relative_drop"),
                "must be between 0 and 1 (0.05 = 5%)",
            ));
        }
        if g.min_sample == 0 {
            return Err(FieldError::new(
                format!("guardrails[{n}].min_sample"),
                "must be at least 1",
            ));
        }
    }
    Ok(())
}

/// A stored experiment: its definition, version and bucket range.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stored {
    /// The definition.
    pub def: ExperimentDef,
    /// Version of its last change.
    pub version: u64,
    /// First bucket of its range in its layer.
    pub start: u32,
}

impl Stored {
    fn range(&self) -> std::ops::Range<u32> {
        self.start..self.start + share_buckets(self.def.traffic)
    }
}

/// A change refused.
#[derive(Debug, Clone, PartialEq)]
pub enum Refused {
    /// Invalid: the field and why.
    Invalid(FieldError),
    /// The caller's expected version is not the current one.
    Stale {
        /// What the caller expected.
        expected: u64,
        /// What is current.
        current: u64,
    },
    /// No experiment with this id.
    NotFound(String),
}

impl From<FieldError> for Refused {
    fn from(e: FieldError) -> Self {
        Refused::Invalid(e)
    }
}

/// All experiments, the set's version, and the sticky assignments.
#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExperimentSet {
    /// Experiments by id, in creation order.
    pub experiments: Vec<Stored>,
    /// Increases with every accepted change.
    pub version: u64,
}

/// First bucket where `len` buckets fit between `taken` ranges, if any.
fn first_fit(taken: &[std::ops::Range<u32>], len: u32) -> Option<u32> {
    let mut taken: Vec<_> = taken.iter().filter(|r| !r.is_empty()).cloned().collect();
    taken.sort_by_key(|r| r.start);
    let mut at = 0u32;
    for r in taken {
        if r.start >= at + len {
            return Some(at);
        }
        at = at.max(r.end);
    }
    (at + len <= BUCKETS).then_some(at)
}

impl ExperimentSet {
    /// The stored experiment `id`.
    pub fn get(&self, id: &str) -> Option<&Stored> {
        self.experiments.iter().find(|s| s.def.id == id)
    }

    fn check_expected(&self, id: &str, expected: Option<u64>) -> Result<Option<usize>, Refused> {
        let at = self.experiments.iter().position(|s| s.def.id == id);
        if let (Some(want), Some(i)) = (expected, at)
            && self.experiments[i].version != want
        {
            return Err(Refused::Stale {
                expected: want,
                current: self.experiments[i].version,
            });
        }
        Ok(at)
    }

    /// Validates and stores `e` (creating, or replacing the one with its id);
    /// returns the new version. A rejected change leaves everything as it
    /// was. `expected`: the version the caller last read.
    pub fn put(&mut self, e: ExperimentDef, expected: Option<u64>) -> Result<u64, Refused> {
        validate(&e)?;
        let at = self.check_expected(&e.id, expected)?;
        let len = share_buckets(e.traffic);
        let others: Vec<std::ops::Range<u32>> = self
            .experiments
            .iter()
            .filter(|s| s.def.layer == e.layer && s.def.id != e.id)
            .map(Stored::range)
            .collect();
        // Keep the range when it still fits (same layer, no overlap), so
        // the experiment's own users stay where they are.
        let keep = at
            .map(|i| &self.experiments[i])
            .filter(|s| s.def.layer == e.layer)
            .map(|s| s.start)
            .filter(|&start| {
                start + len <= BUCKETS
                    && others
                        .iter()
                        .all(|r| r.is_empty() || start + len <= r.start || start >= r.end)
            });
        let start = match keep.or_else(|| first_fit(&others, len)) {
            Some(s) => s,
            None => {
                let used: u32 = others.iter().map(|r| r.len() as u32).sum();
                return Err(Refused::Invalid(FieldError::new(
                    "traffic",
                    format!(
                        "layer `{}` has {:.2} of its users free in one piece; {} asked for {:.2}",
                        e.layer,
                        f64::from(BUCKETS - used) / f64::from(BUCKETS),
                        e.id,
                        e.traffic
                    ),
                )));
            }
        };
        self.version += 1;
        let stored = Stored {
            def: e,
            version: self.version,
            start,
        };
        match at {
            Some(i) => self.experiments[i] = stored,
            None => self.experiments.push(stored),
        }
        Ok(self.version)
    }

    /// Sets an experiment's status; returns the new version.
    pub fn set_status(
        &mut self,
        id: &str,
        status: &str,
        expected: Option<u64>,
    ) -> Result<u64, Refused> {
        let i = self
            .check_expected(id, expected)?
            .ok_or_else(|| Refused::NotFound(id.to_owned()))?;
        if !STATUSES.contains(&status) {
            return Err(Refused::Invalid(FieldError::new(
                "status",
                format!("must be one of {}", STATUSES.join(", ")),
            )));
        }
        self.version += 1;
        let s = &mut self.experiments[i];
        s.def.status = status.to_owned();
        s.version = self.version;
        Ok(self.version)
    }

    /// Deletes an experiment (its buckets become free).
    pub fn delete(&mut self, id: &str, expected: Option<u64>) -> Result<u64, Refused> {
        let i = self
            .check_expected(id, expected)?
            .ok_or_else(|| Refused::NotFound(id.to_owned()))?;
        self.experiments.remove(i);
        self.version += 1;
        Ok(self.version)
    }

    /// Stops a variant (a guardrail fired): it assigns no one from now on
    /// and its users get the control variant.
    pub fn stop_variant(&mut self, id: &str, variant: &str, reason: String) -> Option<u64> {
        let s = self.experiments.iter_mut().find(|s| s.def.id == id)?;
        let v = s.def.variants.iter_mut().find(|v| v.name == variant)?;
        if !v.stopped_reason.is_empty() {
            return None;
        }
        v.stopped_reason = reason;
        self.version += 1;
        s.version = self.version;
        Some(self.version)
    }

    /// What `Assign` follows at this version, with the global `holdout`
    /// share: every experiment, in order, with its range's first bucket.
    pub fn rules(&self, holdout: f64) -> pb::AssignmentRules {
        pb::AssignmentRules {
            holdout,
            experiments: self
                .experiments
                .iter()
                .map(|s| pb::AssignmentRule {
                    experiment: Some(to_proto(s)),
                    offset: s.start,
                })
                .collect(),
        }
    }

    /// The variants `user` is in at `now_ms` (see
    /// [`recmesh_mesh::assign::assign`]), for the tests here; the service
    /// assigns from the rules it keeps per version.
    #[cfg(test)]
    pub fn assign(
        &self,
        user: &str,
        now_ms: i64,
        holdout: f64,
        sticky: impl Fn(&str) -> Option<String>,
        record: impl FnMut(&str, &str),
    ) -> (Vec<pb::Assignment>, bool) {
        recmesh_mesh::assign::assign(&self.rules(holdout), user, now_ms, sticky, record)
    }
}

/// The proto form of a stored experiment.
pub fn to_proto(s: &Stored) -> pb::Experiment {
    let e = &s.def;
    pb::Experiment {
        id: e.id.clone(),
        layer: e.layer.clone(),
        traffic: e.traffic,
        status: e.status.clone(),
        version: s.version,
        start_ms: e.start_ms,
        end_ms: e.end_ms,
        sticky: e.sticky,
        cuped: e.cuped,
        guardrails: e
            .guardrails
            .iter()
            .map(|g| pb::Guardrail {
                metric: g.metric.clone(),
                max_relative_drop: g.max_relative_drop,
                min_sample: g.min_sample,
            })
            .collect(),
        variants: e
            .variants
            .iter()
            .map(|v| pb::Variant {
                name: v.name.clone(),
                weight: v.weight,
                params: v.params.clone().into_iter().collect(),
                stopped_reason: v.stopped_reason.clone(),
            })
            .collect(),
    }
}

/// An experiment definition from its proto form (a push).
pub fn from_proto(e: pb::Experiment) -> ExperimentDef {
    ExperimentDef {
        id: e.id,
        layer: e.layer,
        traffic: e.traffic,
        status: if e.status.is_empty() {
            running()
        } else {
            e.status
        },
        start_ms: e.start_ms,
        end_ms: e.end_ms,
        sticky: e.sticky,
        cuped: e.cuped,
        guardrails: e
            .guardrails
            .into_iter()
            .map(|g| GuardrailDef {
                metric: if g.metric.is_empty() { ctr() } else { g.metric },
                max_relative_drop: if g.max_relative_drop == 0.0 {
                    five_percent()
                } else {
                    g.max_relative_drop
                },
                min_sample: if g.min_sample == 0 {
                    thousand()
                } else {
                    g.min_sample
                },
            })
            .collect(),
        variants: e
            .variants
            .into_iter()
            .map(|v| VariantDef {
                name: v.name,
                weight: v.weight,
                params: v.params.into_iter().collect(),
                stopped_reason: v.stopped_reason,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use recmesh_algo::assign::bucket;

    pub(crate) fn experiment(id: &str, layer: &str, traffic: f64) -> ExperimentDef {
        ExperimentDef {
            id: id.into(),
            layer: layer.into(),
            traffic,
            status: "running".into(),
            start_ms: 0,
            end_ms: 0,
            guardrails: vec![],
            sticky: false,
            cuped: false,
            variants: vec![
                VariantDef {
                    name: "control".into(),
                    weight: 1,
                    params: BTreeMap::new(),
                    stopped_reason: String::new(),
                },
                VariantDef {
                    name: "b".into(),
                    weight: 1,
                    params: BTreeMap::new(),
                    stopped_reason: String::new(),
                },
            ],
        }
    }

    fn assign(set: &ExperimentSet, user: &str) -> Vec<pb::Assignment> {
        set.assign(user, 1, 0.0, |_| None, |_, _| {}).0
    }

    #[test]
    fn buckets_are_uniform_chi_square_over_100k_users() {
        // 10 equal bins of 1,000 buckets each: chi-square with 9 degrees of
        // freedom; its 99.9th percentile is 27.88.
        let mut bins = [0u64; 10];
        for u in 0..100_000 {
            bins[(bucket("home", &format!("user-{u}")) / 1_000) as usize] += 1;
        }
        let expected = 10_000.0;
        let chi2: f64 = bins
            .iter()
            .map(|&o| (o as f64 - expected).powi(2) / expected)
            .sum();
        assert!(chi2 < 27.88, "chi-square {chi2} over {bins:?}");
    }

    #[test]
    fn variant_split_follows_weights_chi_square() {
        let mut set = ExperimentSet::default();
        let mut e = experiment("x", "home", 1.0);
        e.variants[0].weight = 1;
        e.variants[1].weight = 3;
        set.put(e, None).expect("ok");
        let mut counts = [0u64; 2];
        for u in 0..100_000 {
            let a = assign(&set, &format!("user-{u}"));
            counts[usize::from(a[0].variant == "b")] += 1;
        }
        // Expected 25,000 / 75,000; chi-square with 1 degree of freedom, 99.9th
        // percentile 10.83.
        let chi2 = (counts[0] as f64 - 25_000.0).powi(2) / 25_000.0
            + (counts[1] as f64 - 75_000.0).powi(2) / 75_000.0;
        assert!(chi2 < 10.83, "chi-square {chi2} over {counts:?}");
    }

    #[test]
    fn deterministic_exclusive_in_a_layer_independent_across_layers() {
        let mut set = ExperimentSet::default();
        set.put(experiment("x", "home", 0.5), None).expect("ok");
        set.put(experiment("y", "home", 0.5), None).expect("ok");
        set.put(experiment("z", "other", 1.0), None).expect("ok");
        let (mut in_x, mut x_and_zb) = (0, 0);
        for u in 0..20_000 {
            let user = format!("u{u}");
            let a = assign(&set, &user);
            assert_eq!(a, assign(&set, &user), "deterministic");
            let home: Vec<_> = a.iter().filter(|x| x.experiment_id != "z").collect();
            assert_eq!(home.len(), 1, "exactly one experiment of a full layer");
            let x = home[0].experiment_id == "x";
            in_x += usize::from(x);
            let zb = a.iter().any(|x| x.experiment_id == "z" && x.variant == "b");
            x_and_zb += usize::from(x && zb);
        }
        assert!((9_500..10_500).contains(&in_x), "{in_x}");
        // Independence: z's split inside x is z's split overall (~half).
        let share = x_and_zb as f64 / in_x as f64;
        assert!((0.47..0.53).contains(&share), "{share}");
    }

    #[test]
    fn unrelated_changes_do_not_move_users() {
        let mut set = ExperimentSet::default();
        set.put(experiment("x", "home", 0.3), None).expect("ok");
        set.put(experiment("y", "home", 0.3), None).expect("ok");
        let before: Vec<_> = (0..5_000).map(|u| assign(&set, &format!("u{u}"))).collect();
        // Delete x, change y's sibling z, add w: y's users stay in y, same variant.
        set.delete("x", None).expect("delete");
        set.put(experiment("w", "home", 0.2), None).expect("ok");
        set.put(experiment("z", "other", 1.0), None).expect("ok");
        for (u, old) in before.iter().enumerate() {
            let now = assign(&set, &format!("u{u}"));
            let y_old = old.iter().find(|a| a.experiment_id == "y");
            let y_now = now.iter().find(|a| a.experiment_id == "y");
            assert_eq!(y_old, y_now, "user u{u}");
        }
    }

    #[test]
    fn sticky_users_keep_their_variant_when_weights_change() {
        let mut set = ExperimentSet::default();
        let mut e = experiment("s", "home", 1.0);
        e.sticky = true;
        set.put(e.clone(), None).expect("ok");
        let mut kept: HashMap<String, String> = HashMap::new();
        for u in 0..2_000 {
            let user = format!("u{u}");
            set.assign(
                &user,
                1,
                0.0,
                |_| None,
                |_, v| {
                    kept.insert(user.clone(), v.to_owned());
                },
            );
        }
        e.variants[0].weight = 9;
        set.put(e.clone(), None).expect("reweighted");
        let mut moved_without_sticky = 0;
        for u in 0..2_000 {
            let user = format!("u{u}");
            let first = kept[&user].clone();
            let (a, _) = set.assign(
                &user,
                1,
                0.0,
                |_| Some(first.clone()),
                |_, _| panic!("already recorded"),
            );
            assert_eq!(a[0].variant, first, "{user} kept its variant");
            let (fresh, _) = set.assign(&user, 1, 0.0, |_| None, |_, _| {});
            moved_without_sticky += usize::from(fresh[0].variant != first);
        }
        assert!(
            moved_without_sticky > 500,
            "the weight change does move non-sticky users"
        );
    }

    #[test]
    fn holdout_schedule_status_and_stopped_variants() {
        let mut set = ExperimentSet::default();
        let mut e = experiment("x", "home", 1.0);
        e.start_ms = 100;
        e.end_ms = 200;
        set.put(e, None).expect("ok");
        fn at(
            set: &ExperimentSet,
            t: i64,
            holdout: f64,
            user: &str,
        ) -> (Vec<pb::Assignment>, bool) {
            set.assign(user, t, holdout, |_| None, |_, _| {})
        }
        assert!(at(&set, 50, 0.0, "u1").0.is_empty(), "before the start");
        assert_eq!(at(&set, 150, 0.0, "u1").0.len(), 1);
        assert!(at(&set, 200, 0.0, "u1").0.is_empty(), "after the end");
        let held = (0..10_000)
            .filter(|u| at(&set, 150, 0.1, &format!("u{u}")).1)
            .count();
        assert!((900..1_100).contains(&held), "10% holdout: {held}");

        set.set_status("x", "paused", None).expect("pause");
        assert!(
            at(&set, 150, 0.0, "u1").0.is_empty(),
            "paused assigns no one"
        );
        set.set_status("x", "running", None).expect("resume");
        set.stop_variant("x", "b", "guardrail".into())
            .expect("stop");
        for u in 0..500 {
            let (a, _) = at(&set, 150, 0.0, &format!("u{u}"));
            assert_eq!(
                a[0].variant, "control",
                "a stopped variant's users get control"
            );
        }
    }

    #[test]
    fn every_validation_rule_names_its_field_and_changes_nothing() {
        let mut set = ExperimentSet::default();
        set.put(experiment("x", "home", 0.6), None).expect("ok");
        let field = |set: &mut ExperimentSet, e: ExperimentDef| match set.put(e, None) {
            Err(Refused::Invalid(f)) => f.field,
            other => panic!("expected invalid, got {other:?}"),
        };
        type Change = Box<dyn Fn(&mut ExperimentDef)>;
        let cases: Vec<(&str, Change)> = vec![
            ("id", Box::new(|e| e.id = "Bad Id".into())),
            ("id", Box::new(|e| e.id = String::new())),
            ("layer", Box::new(|e| e.layer = String::new())),
            ("traffic", Box::new(|e| e.traffic = 1.5)),
            ("traffic", Box::new(|e| e.traffic = f64::NAN)),
            ("status", Box::new(|e| e.status = "live".into())),
            (
                "end_ms",
                Box::new(|e| {
                    e.start_ms = 10;
                    e.end_ms = 5;
                }),
            ),
            ("variants", Box::new(|e| e.variants.clear())),
            (
                "variants",
                Box::new(|e| e.variants.iter_mut().for_each(|v| v.weight = 0)),
            ),
            (
                "variants[1].name",
                Box::new(|e| e.variants[1].name = "control".into()),
            ),
            (
                "variants[0].weight",
                Box::new(|e| e.variants[0].weight = 2_000_000),
            ),
            (
                "variants[1].params.retrieval.candidates",
                Box::new(|e| {
                    e.variants[1]
                        .params
                        .insert("retrieval.candidates".into(), "1".into());
                }),
            ),
            (
                "variants[1].params.nope",
                Box::new(|e| {
                    e.variants[1].params.insert("nope".into(), "1".into());
                }),
            ),
            (
                "guardrails[0].metric",
                Box::new(|e| {
                    e.guardrails.push(GuardrailDef {
                        metric: "revenue".into(),
                        max_relative_drop: 0.05,
                        min_sample: 10,
                    })
                }),
            ),
            (
                "guardrails[0].max_relative_drop",
                Box::new(|e| {
                    e.guardrails.push(GuardrailDef {
                        metric: "ctr".into(),
                        max_relative_drop: 1.5,
                        min_sample: 10,
                    })
                }),
            ),
            (
                "guardrails[0].min_sample",
                Box::new(|e| {
                    e.guardrails.push(GuardrailDef {
                        metric: "ctr".into(),
                        max_relative_drop: 0.05,
                        min_sample: 0,
                    })
                }),
            ),
        ];
        for (want, change) in cases {
            let mut e = experiment("x", "home", 0.6);
            change(&mut e);
            assert_eq!(field(&mut set, e), want);
        }
        // Over-allocating the layer.
        assert_eq!(field(&mut set, experiment("y", "home", 0.6)), "traffic");
        assert!(matches!(
            set.put(experiment("x", "home", 0.6), Some(99)),
            Err(Refused::Stale {
                expected: 99,
                current: 1
            })
        ));
        assert!(matches!(
            set.delete("nope", None),
            Err(Refused::NotFound(_))
        ));
        assert_eq!(set.experiments.len(), 1);
        assert_eq!(
            (set.version, set.experiments[0].version),
            (1, 1),
            "nothing changed"
        );
    }
}

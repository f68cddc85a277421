//! Experiment assignment from [`pb::AssignmentRules`]: the one
//! implementation behind the experiments service's `Assign` and the
//! gateway's local assignment, so both always give a user the same variants.

use recmesh_algo::assign::{bucket, pick_variant, share_buckets};
use recmesh_proto::v1 as pb;

/// The salt of the global holdout's buckets.
pub const HOLDOUT_SALT: &str = "recmesh-holdout";

/// Only `running` experiments assign, and only inside their schedule.
pub fn live_at(e: &pb::Experiment, now_ms: i64) -> bool {
    e.status == "running"
        && (e.start_ms == 0 || now_ms >= e.start_ms)
        && (e.end_ms == 0 || now_ms < e.end_ms)
}

/// The control variant: the one named `control`, else the first.
pub fn control(variants: &[pb::Variant]) -> usize {
    variants
        .iter()
        .position(|v| v.name == "control")
        .unwrap_or(0)
}

/// Whether a caller must call `Assign` rather than assign from `rules`: a
/// running sticky experiment keeps users' first variants, which only the
/// service records.
pub fn needs_service(rules: &pb::AssignmentRules) -> bool {
    rules
        .experiments
        .iter()
        .filter_map(|r| r.experiment.as_ref())
        .any(|e| e.sticky && e.status == "running")
}

/// The variants `user` is in at `now_ms`, one per layer at most, and
/// whether the user is in the holdout. `sticky` gives a user's recorded
/// variant of a sticky experiment; `record` is told a sticky experiment's
/// new assignment.
pub fn assign(
    rules: &pb::AssignmentRules,
    user: &str,
    now_ms: i64,
    sticky: impl Fn(&str) -> Option<String>,
    mut record: impl FnMut(&str, &str),
) -> (Vec<pb::Assignment>, bool) {
    if rules.holdout > 0.0 && bucket(HOLDOUT_SALT, user) < share_buckets(rules.holdout) {
        return (Vec::new(), true);
    }
    let mut out = Vec::new();
    for rule in &rules.experiments {
        let Some(e) = &rule.experiment else { continue };
        if !live_at(e, now_ms) {
            continue;
        }
        let weights: Vec<u32> = e.variants.iter().map(|v| v.weight).collect();
        let Some(mut v) = pick_variant(bucket(&e.layer, user), rule.offset, e.traffic, &weights)
        else {
            continue;
        };
        if e.sticky {
            match sticky(&e.id).and_then(|name| e.variants.iter().position(|x| x.name == name)) {
                Some(kept) => v = kept,
                None => record(&e.id, &e.variants[v].name),
            }
        }
        if !e.variants[v].stopped_reason.is_empty() {
            v = control(&e.variants);
        }
        let variant = &e.variants[v];
        out.push(pb::Assignment {
            experiment_id: e.id.clone(),
            variant: variant.name.clone(),
            params: variant.params.clone(),
        });
    }
    (out, false)
}

use super::*;
use crate::model::{ExperimentDef, ExperimentSet, GuardrailDef, VariantDef};
use recmesh_algo::stats::ratio::{self, RatioSums};
use recmesh_algo::stats::sequential::{AlwaysValid, TAUS};

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
        user_events_7d: None,
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
    set_with(min_sample, false, [1, 1])
}

fn set_with(min_sample: u64, cuped: bool, weights: [u32; 2]) -> ExperimentSet {
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
            cuped,
            guardrails: vec![GuardrailDef {
                metric: "ctr".into(),
                max_relative_drop: 0.05,
                min_sample,
            }],
            variants: ["control", "b"]
                .iter()
                .zip(weights)
                .map(|(n, weight)| VariantDef {
                    name: n.to_string(),
                    weight,
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

/// `users` users in `variant`, one list each, of whom the first `clickers`
/// click it; user names start with `prefix`.
fn arm(r: &mut Results, prefix: &str, variant: &str, users: usize, clickers: usize) {
    for i in 0..users {
        r.add_exposures(&[exposure(&format!("{prefix}{i}"), variant, &["i1"])]);
    }
    r.add_events(
        (0..clickers)
            .map(|i| event(&format!("{prefix}{i}"), "i1", pb::EventType::Click, 1))
            .collect(),
    );
}

#[test]
fn a_user_counts_once_per_variant_with_the_covariate_of_their_first_exposure() {
    let mut r = Results::default();
    let with = |user: &str, c: Option<u32>| pb::Exposure {
        user_events_7d: c,
        ..exposure(user, "b", &["i1"])
    };
    r.add_exposures(&[with("u1", Some(4)), with("u1", Some(9)), with("u2", None)]);
    r.add_events(vec![event("u1", "i1", pb::EventType::Click, 1)]);
    r.attribute(i64::MAX);
    assert_eq!(r.users("x", "b"), 2);
    assert_eq!(r.tally("x", "b").impressions, 3);
    let arm = &r.experiments["x"].arms["b"];
    let u1 = arm.users[&fnv1a64(b"u1")];
    assert_eq!((u1.impressions, u1.clicks, u1.covariate), (2, 1, 4));
    assert_eq!(arm.users[&fnv1a64(b"u2")].covariate, 0, "unknown: 0");
    // The sums are those of the users as they stand.
    let mut want = RatioSums::default();
    want.add(1.0, 2.0, 4.0);
    want.add(0.0, 1.0, 0.0);
    assert_eq!(arm.ctr, want);
}

#[test]
fn the_report_gives_the_per_user_figures_beside_the_impression_level_ones() {
    // Control: 40 users with 3 lists each, 20 of whom click all 3 (a heavy
    // clicker clicks every list); b: 40 users, 10 click all 3.
    let set = set_with(10, false, [1, 1]);
    let mut r = Results::default();
    for (variant, clickers) in [("control", 20), ("b", 10)] {
        for i in 0..40 {
            let user = format!("{variant}{i}");
            for round in 0..3 {
                r.add_exposures(&[pb::Exposure {
                    timestamp_ms: round * 10,
                    ..exposure(&user, variant, &["i1"])
                }]);
                if i < clickers {
                    r.add_events(vec![event(
                        &user,
                        "i1",
                        pb::EventType::Click,
                        round * 10 + 1,
                    )]);
                    r.attribute(round * 10 + 5);
                }
            }
            r.attribute(i64::MAX);
        }
    }
    r.attribute(i64::MAX);
    r.look(&set);
    let report = r.report(&set, "x").expect("known");
    let b = &report.variants[1];
    assert_eq!((b.users, b.impressions, b.clicks), (40, 120, 30));
    // By hand: per-user sums as the statistics module computes them.
    let sums = |clickers: usize| {
        let mut s = RatioSums::default();
        for i in 0..40 {
            s.add(if i < clickers { 3.0 } else { 0.0 }, 3.0, 0.0);
        }
        s
    };
    let cmp = ratio::compare(&sums(20), &sums(10)).expect("usable");
    assert!((b.user_ctr_p_value - cmp.p_value).abs() < 1e-12);
    assert!((b.user_ctr_se - cmp.se).abs() < 1e-12);
    // The impression-level test counts 120 lists as 120 independent trials
    // where there are 40 users: its p-value is far smaller.
    assert!(b.ctr_p_value < b.user_ctr_p_value / 5.0, "{b:?}");
    // The always-valid figures are those of the one look taken.
    let mut av = AlwaysValid::default();
    let (log_lift, var) = cmp.log_lift.expect("both positive");
    av.look(log_lift, var, &TAUS, ALPHA);
    assert_eq!(b.always_valid_p_value, av.p_value);
    assert!((b.always_valid_lift_ci_high - (av.ci.1.exp() - 1.0)).abs() < 1e-12);
    assert_eq!(b.can_stop, av.can_stop(ALPHA));
    assert!(!report.srm_flagged, "{}", report.srm_note);
    assert_eq!(b.cuped_variance_reduction, 0.0, "CUPED off");
}

#[test]
fn the_guardrail_fires_on_a_clear_drop_once_enough_users_are_in() {
    let mut r = Results::default();
    arm(&mut r, "c", "control", 100, 50);
    arm(&mut r, "v", "b", 100, 10);
    r.attribute(i64::MAX);
    // Not before each arm has min_sample users.
    assert!(r.look(&set_with_guardrail(101)).breaches.is_empty());
    let look = r.look(&set_with_guardrail(100));
    assert_eq!(look.breaches.len(), 1, "{look:?}");
    let reason = &look.breaches[0].2;
    assert!(
        reason.starts_with("guardrail ctr: 0.1000 vs control 0.5000 (-80.0%, allowed −5.0%)"),
        "{reason}"
    );
    assert!(reason.ends_with("100 and 100 users"), "{reason}");
    // A small drop, inside what the guardrail accepts, does not fire however
    // certain: 50% vs 48.5% over 2,000 users each.
    let mut r = Results::default();
    arm(&mut r, "c", "control", 2_000, 1_000);
    arm(&mut r, "v", "b", 2_000, 970);
    r.attribute(i64::MAX);
    assert!(r.look(&set_with_guardrail(100)).breaches.is_empty());
}

#[test]
fn a_sample_ratio_mismatch_is_flagged_and_holds_the_guardrail() {
    // 1:1 weights, 300 users against 200: chi-square 20, p = 7.7e-6.
    let set = set_with(10, false, [1, 1]);
    let mut r = Results::default();
    arm(&mut r, "c", "control", 300, 150);
    arm(&mut r, "v", "b", 200, 20);
    r.attribute(i64::MAX);
    let look = r.look(&set);
    assert!(look.breaches.is_empty(), "held: {look:?}");
    assert_eq!(look.srm, vec![("x".to_owned(), true)]);
    assert_eq!(look.srm_changes.len(), 1);
    assert!(
        look.srm_changes[0]
            .note
            .contains("users control 300, b 200")
    );
    assert!(
        r.look(&set).srm_changes.is_empty(),
        "reported on change only"
    );
    let report = r.report(&set, "x").expect("known");
    assert!(report.srm_flagged);
    assert!(
        (report.srm_p_value - 7.744e-6).abs() < 1e-8,
        "{}",
        report.srm_p_value
    );
    assert!(
        report.srm_note.contains("sample-ratio mismatch"),
        "{}",
        report.srm_note
    );
    assert!(!report.variants[1].can_stop, "nothing can stop under SRM");
    assert!(
        report.variants[1].always_valid_p_value < ALPHA,
        "the test itself rejects"
    );
    // The same split is what 3:2 weights ask for: nothing to flag, and the
    // guardrail fires.
    let set = set_with(10, false, [3, 2]);
    let look = r.look(&set);
    assert_eq!(look.srm, vec![("x".to_owned(), false)]);
    assert_eq!(look.breaches.len(), 1);
}

#[test]
fn a_stopped_variant_is_left_out_of_the_split_check() {
    let mut set = set_with(10, false, [1, 1]);
    set.stop_variant("x", "b", "by hand".into()).expect("known");
    let mut r = Results::default();
    arm(&mut r, "c", "control", 300, 150);
    arm(&mut r, "v", "b", 100, 20);
    r.attribute(i64::MAX);
    let look = r.look(&set);
    assert_eq!(look.srm, vec![("x".to_owned(), false)]);
    let report = r.report(&set, "x").expect("known");
    assert!(
        report
            .srm_note
            .starts_with("not checked: variant b was stopped")
    );
}

#[test]
fn cuped_is_reported_when_the_experiment_asks_for_it() {
    // A user's clicks follow their pre-exposure engagement: users with
    // covariate 2 click, those with 0 do not. The covariate explains the
    // whole spread, so CUPED removes all of the variance.
    let set = set_with(10, true, [1, 1]);
    let mut r = Results::default();
    for (variant, engaged) in [("control", 20), ("b", 10)] {
        for i in 0..40 {
            let user = format!("{variant}{i}");
            r.add_exposures(&[pb::Exposure {
                user_events_7d: Some(if i < engaged { 2 } else { 0 }),
                ..exposure(&user, variant, &["i1"])
            }]);
            if i < engaged {
                r.add_events(vec![event(&user, "i1", pb::EventType::Click, 1)]);
            }
        }
    }
    r.attribute(i64::MAX);
    let report = r.report(&set, "x").expect("known");
    assert!(report.cuped);
    let b = &report.variants[1];
    assert!(b.cuped_variance_reduction > 0.999, "{b:?}");
    // The arms differ in engagement (20 vs 10 engaged users), so the
    // adjusted CTRs are closer than the plain ones: 0.5 vs 0.25 plain,
    // both 0.375 adjusted.
    assert!((b.cuped_ctr - 0.375).abs() < 1e-9, "{}", b.cuped_ctr);
    assert!(b.cuped_lift.abs() < 1e-9, "{}", b.cuped_lift);
    assert!(
        (report.variants[0].cuped_ctr - 0.5).abs() < 1e-12,
        "control: plain"
    );
    assert!(report.cuped_note.is_empty());
    // Every user with the same covariate: nothing to adjust by, and the
    // results say so.
    let mut r = Results::default();
    arm(&mut r, "c", "control", 40, 20);
    arm(&mut r, "v", "b", 40, 10);
    r.attribute(i64::MAX);
    let report = r.report(&set, "x").expect("known");
    assert!(report.cuped_note.starts_with("not applied"), "{report:?}");
    assert_eq!(report.variants[1].cuped_variance_reduction, 0.0);
}

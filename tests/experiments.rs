//! An A/B platform's view of the mesh: push an experiment over the admin
//! API, see `Recommend` follow it, simulate traffic, read results with
//! significance, watch a guardrail stop a losing variant, and see a bad push
//! refused while the old config keeps serving.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use recmesh_e2e::{Fault, TestMesh};
use recmesh_proto::v1::{
    self as pb, experiments_admin_client::ExperimentsAdminClient, gateway_client::GatewayClient,
};
use tonic::Code;

const TOKEN: &str = "test-admin-token";

async fn start() -> TestMesh {
    TestMesh::start_with(|c| {
        c.experiments.admin_token = TOKEN.into();
        // Fast results for a test; the defaults are 500 ms and 2 s.
        c.experiments.results.poll_ms = 50;
        c.experiments.results.attribution_delay_ms = 300;
    })
    .await
}

async fn admin(mesh: &TestMesh) -> ExperimentsAdminClient<tonic::transport::Channel> {
    ExperimentsAdminClient::connect(mesh.mesh.stages.experiments.grpc_uri())
        .await
        .expect("admin reachable")
}

fn authed<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("ascii"),
    );
    req
}

fn variant(name: &str, weight: u32, params: &[(&str, &str)]) -> pb::Variant {
    pb::Variant {
        name: name.into(),
        weight,
        params: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

/// Two variants that differ in MMR λ and in the source mix (no popularity
/// sources at all in `personal`).
fn mmr_and_mix(weights: [u32; 2]) -> pb::Experiment {
    pb::Experiment {
        id: "mmr-and-mix".into(),
        layer: "rerank".into(),
        traffic: 1.0,
        variants: vec![
            variant("control", weights[0], &[]),
            variant(
                "personal",
                weights[1],
                &[
                    ("rerank.mmr_lambda", "0.5"),
                    ("retrieval.weight.popular", "0"),
                    ("retrieval.weight.category", "0"),
                    ("retrieval.weight.trending", "0"),
                ],
            ),
        ],
        ..Default::default()
    }
}

fn variant_of<'a>(r: &'a pb::RecommendResponse, experiment: &str) -> Option<&'a str> {
    r.assignments
        .iter()
        .find(|a| a.experiment_id == experiment)
        .map(|a| a.variant.as_str())
}

/// `Recommend` for `user`, asked again (up to 5 times) when the assignment
/// stage itself fell back: late on a loaded debug build, the gateway serves
/// control defaults without an assignment, as it should. These tests are
/// about what an assignment does; latency is the load test's business.
async fn recommend_assigned(
    client: &mut GatewayClient<tonic::transport::Channel>,
    user: &str,
    count: u32,
) -> pb::RecommendResponse {
    let mut r = pb::RecommendResponse::default();
    for attempt in 0..5 {
        r = client
            .recommend(pb::RecommendRequest {
                user_id: user.into(),
                count,
                ..Default::default()
            })
            .await
            .expect("answer")
            .into_inner();
        let assign = r.stages.iter().find(|s| s.stage == "assign");
        match assign {
            Some(s) if !s.fallback.is_empty() => {
                eprintln!("{user}, attempt {attempt}: the assign stage fell back: {s:?}")
            }
            _ => return r,
        }
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_experiment_changes_recommendations_and_reports_results() {
    let mesh = start().await;
    let mut client = mesh.client().await;
    let mut admin = admin(&mesh).await;

    // u1 gets a cached answer before the push.
    let recommend = |user: &str| pb::RecommendRequest {
        user_id: user.into(),
        count: 10,
        ..Default::default()
    };
    client.recommend(recommend("u1")).await.expect("answer");
    assert!(
        client
            .recommend(recommend("u1"))
            .await
            .expect("answer")
            .into_inner()
            .cached
    );

    let err = admin
        .put_experiment(tonic::Request::new(pb::PutExperimentRequest {
            experiment: Some(mmr_and_mix([1, 1])),
        }))
        .await
        .expect_err("no token");
    assert_eq!(err.code(), Code::Unauthenticated);
    let pushed = Instant::now();
    let version = admin
        .put_experiment(authed(pb::PutExperimentRequest {
            experiment: Some(mmr_and_mix([1, 1])),
        }))
        .await
        .expect("accepted")
        .into_inner()
        .version;

    // The push reaches the gateway within a second: even u1's cached
    // answer is dropped.
    loop {
        let r = client
            .recommend(recommend("u1"))
            .await
            .expect("answer")
            .into_inner();
        if variant_of(&r, "mmr-and-mix").is_some() {
            assert!(!r.cached);
            break;
        }
        assert!(
            pushed.elapsed() < Duration::from_secs(1),
            "not applied within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Behaviour differs by variant: `personal` never shows popularity
    // candidates; control does.
    let mut popular_items = HashMap::<String, usize>::new();
    let mut answers = HashMap::<String, usize>::new();
    for n in 0..120 {
        let r = recommend_assigned(&mut client, &format!("u{n}"), 10).await;
        let v = variant_of(&r, "mmr-and-mix")
            .expect("full traffic")
            .to_owned();
        *answers.entry(v.clone()).or_default() += 1;
        *popular_items.entry(v).or_default() += r
            .items
            .iter()
            .filter(|i| i.source == "popular" || i.source == "trending")
            .count();
    }
    assert!(
        answers["control"] > 20 && answers["personal"] > 20,
        "{answers:?}"
    );
    assert_eq!(
        popular_items.get("personal").copied().unwrap_or(0),
        0,
        "{popular_items:?}"
    );
    assert!(popular_items["control"] > 0, "{popular_items:?}");

    // Simulated traffic, then results with a p-value per variant.
    let spec = recmesh::ab::SimSpec {
        users: 150,
        rounds: 2,
        seed: 11,
        drop: None,
    };
    let sim = recmesh::ab::simulate(&mesh.mesh.gateway.grpc_uri(), &spec)
        .await
        .expect("simulation");
    assert_eq!(sim.errors, 0, "{:?}", sim.first_errors);
    assert!(sim.clicks > 0);
    let shown = |v: &str| {
        sim.by_variant
            .get(&("mmr-and-mix".to_string(), v.to_string()))
            .copied()
            .unwrap_or(0)
    };
    let assigned: u64 = sim
        .by_variant
        .iter()
        .filter(|((experiment, _), _)| experiment == "mmr-and-mix")
        .map(|(_, n)| n)
        .sum();
    assert!(assigned > 0, "the simulation's answers carry assignments");
    let started = Instant::now();
    let results = loop {
        let r = admin
            .get_results(authed(pb::GetResultsRequest {
                id: "mmr-and-mix".into(),
            }))
            .await
            .expect("results")
            .into_inner();
        let counted: u64 = r.variants.iter().map(|v| v.clicks).sum();
        // Every answer the simulation got with an assignment to this
        // experiment is an impression (plus the 121 such answers before it),
        // and its clicks were attributed. An answer whose assignment stage
        // fell back carries no assignment and logs no impression.
        let impressions: u64 = r.variants.iter().map(|v| v.impressions).sum();
        if impressions >= assigned + 121 && counted > 0 && r.events_read >= sim.clicks {
            break r;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "results never caught up: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(results.control, "control");
    let personal = results
        .variants
        .iter()
        .find(|v| v.variant == "personal")
        .expect("personal");
    assert!(personal.impressions >= shown("personal"));
    assert!(personal.ctr > 0.0 && personal.ctr <= 1.0);
    assert!((0.0..=1.0).contains(&personal.ctr_p_value) && personal.ctr_p_value > 0.0);
    assert!(personal.ctr_diff_ci_low <= personal.ctr_diff_ci_high);
    // Per user: at most the 150 simulated users and the earlier ones, each
    // counted once however many lists they saw.
    let users: u64 = results.variants.iter().map(|v| v.users).sum();
    let impressions: u64 = results.variants.iter().map(|v| v.impressions).sum();
    assert!(users > 0 && users < impressions, "{results:?}");
    assert!(personal.users <= personal.impressions);
    assert!(personal.user_ctr_se > 0.0, "{personal:?}");
    assert!(personal.user_ctr_p_value > 0.0 && personal.user_ctr_p_value <= 1.0);
    assert!(personal.user_ctr_diff_ci_low <= personal.user_ctr_diff_ci_high);
    assert!(personal.always_valid_p_value > 0.0 && personal.always_valid_p_value <= 1.0);
    assert!(personal.always_valid_lift_ci_low <= personal.always_valid_lift_ci_high);
    assert!(
        !results.srm_note.is_empty(),
        "the split check says what it saw"
    );

    // A push with bad weights is refused naming the field; the old config
    // keeps serving.
    let err = admin
        .put_experiment(authed(pb::PutExperimentRequest {
            experiment: Some(mmr_and_mix([0, 0])),
        }))
        .await
        .expect_err("bad weights");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().starts_with("experiment.variants"),
        "{}",
        err.message()
    );
    let current = admin
        .get_experiment(authed(pb::GetExperimentRequest {
            id: "mmr-and-mix".into(),
        }))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(current.version, version);
    let r = recommend_assigned(&mut client, "u7", 10).await;
    assert!(variant_of(&r, "mmr-and-mix").is_some(), "still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guardrail_stops_a_variant_whose_ctr_drops() {
    let mesh = start().await;
    let mut admin = admin(&mesh).await;
    let mut e = mmr_and_mix([1, 1]);
    e.id = "guarded".into();
    e.variants[1] = variant("worse", 1, &[]);
    e.guardrails = vec![pb::Guardrail {
        metric: "ctr".into(),
        max_relative_drop: 0.05,
        // Users per arm (200 users split about evenly between two arms).
        min_sample: 50,
    }];
    admin
        .put_experiment(authed(pb::PutExperimentRequest {
            experiment: Some(e),
        }))
        .await
        .expect("accepted");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Users in `worse` click 90% less.
    let spec = recmesh::ab::SimSpec {
        users: 200,
        rounds: 2,
        seed: 3,
        drop: Some(("worse".into(), 0.9)),
    };
    recmesh::ab::simulate(&mesh.mesh.gateway.grpc_uri(), &spec)
        .await
        .expect("simulation");
    let started = Instant::now();
    let stopped = loop {
        let e = admin
            .get_experiment(authed(pb::GetExperimentRequest {
                id: "guarded".into(),
            }))
            .await
            .expect("get")
            .into_inner();
        if !e.variants[1].stopped_reason.is_empty() {
            break e;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "guardrail never fired: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        stopped.variants[1]
            .stopped_reason
            .starts_with("guardrail ctr:"),
        "{}",
        stopped.variants[1].stopped_reason
    );
    assert!(
        stopped.variants[1]
            .stopped_reason
            .contains("always-valid p = "),
        "{}",
        stopped.variants[1].stopped_reason
    );
    let results = admin
        .get_results(authed(pb::GetResultsRequest {
            id: "guarded".into(),
        }))
        .await
        .expect("results")
        .into_inner();
    assert!(
        !results.variants[1].stopped_reason.is_empty(),
        "visible in results"
    );
    // Its users now get control.
    let mut client = mesh.client().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for n in 0..50 {
        let r = recommend_assigned(&mut client, &format!("u{n}"), 5).await;
        assert_eq!(variant_of(&r, "guarded"), Some("control"), "u{n}");
    }
}

/// The assign stage's report in `r`.
fn assign_report(r: &pb::RecommendResponse) -> &pb::StageReport {
    r.stages
        .iter()
        .find(|s| s.stage == "assign")
        .expect("assign reported")
}

const LOCAL: &str = "assigned in the gateway";

/// The gateway assigns users from the rules the experiments service pushes
/// with each version, exactly as `Assign` would, with no call: a user it
/// never saw is assigned while the service is unreachable. A change of the
/// rules reaches it; a running sticky experiment (first variants recorded
/// by the service) sends it back to `Assign`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_assigns_from_the_pushed_rules_as_assign_would() {
    let mesh = start().await;
    let mut client = mesh.client().await;
    let mut admin = admin(&mesh).await;
    let mut service =
        pb::experiments_client::ExperimentsClient::connect(mesh.mesh.stages.experiments.grpc_uri())
            .await
            .expect("experiments reachable");
    let mut n = 0;
    // A user never asked before: neither cache can answer.
    let mut ask = async |debug: bool| {
        n += 1;
        let user = format!("rules-{n}");
        let r = client
            .recommend(pb::RecommendRequest {
                user_id: user.clone(),
                count: 5,
                debug,
                ..Default::default()
            })
            .await
            .expect("answer")
            .into_inner();
        (user, r)
    };
    let waited = Instant::now();
    while !assign_report(&ask(false).await.1).detail.contains(LOCAL) {
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the rules reach the gateway"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Same answers as Assign's, over enough users to see both variants.
    let mut variants = HashMap::new();
    for _ in 0..200 {
        let (user, r) = ask(false).await;
        let report = assign_report(&r);
        assert!(report.detail.contains(LOCAL), "{report:?}");
        assert!(report.fallback.is_empty(), "{report:?}");
        let expected = service
            .assign(pb::AssignRequest {
                user_id: user.clone(),
                context: None,
            })
            .await
            .expect("assign")
            .into_inner();
        assert_eq!(r.assignments, expected.assignments, "{user}");
        for a in &r.assignments {
            *variants.entry(a.variant.clone()).or_insert(0) += 1;
        }
    }
    assert_eq!(variants.len(), 2, "both demo variants: {variants:?}");

    // The experiments service unreachable from the gateway: new users are
    // still assigned, nothing degraded; a debug request calls the service
    // and falls back to control.
    mesh.proxy("assign").set(Fault::Refuse);
    for _ in 0..20 {
        let (user, r) = ask(false).await;
        assert!(assign_report(&r).fallback.is_empty(), "{:?}", r.stages);
        let expected = service
            .assign(pb::AssignRequest {
                user_id: user,
                context: None,
            })
            .await
            .expect("assign")
            .into_inner();
        assert_eq!(r.assignments, expected.assignments);
        assert_eq!(r.assignments.len(), 1, "the demo experiment");
    }
    let (_, r) = ask(true).await;
    assert_eq!(assign_report(&r).fallback, "control", "{:?}", r.stages);
    mesh.proxy("assign").set(Fault::None);

    // A change of the rules reaches the gateway: the demo experiment
    // paused, nobody is in it.
    admin
        .set_status(authed(pb::SetStatusRequest {
            id: "candidate-count".into(),
            status: "paused".into(),
            expected_version: 0,
        }))
        .await
        .expect("paused");
    let waited = Instant::now();
    loop {
        let (_, r) = ask(false).await;
        if assign_report(&r).detail.contains(LOCAL) && r.assignments.is_empty() {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the pause reaches the gateway: {:?}",
            r.stages
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A running sticky experiment: the gateway calls Assign, which records
    // the user's first variant.
    let mut sticky = mmr_and_mix([50, 50]);
    sticky.sticky = true;
    admin
        .put_experiment(authed(pb::PutExperimentRequest {
            experiment: Some(sticky),
        }))
        .await
        .expect("accepted");
    let waited = Instant::now();
    let r = loop {
        let (_, r) = ask(false).await;
        let report = assign_report(&r);
        if !report.detail.contains(LOCAL) && report.fallback.is_empty() {
            break r;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "the sticky experiment reaches the gateway: {:?}",
            r.stages
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        variant_of(&r, "mmr-and-mix").is_some(),
        "{:?}",
        r.assignments
    );
}

use super::*;
use pb::experiments_admin_server::ExperimentsAdmin;
use pb::experiments_server::Experiments as _;

fn scratch(what: &str) -> String {
    let dir = std::env::temp_dir().join(format!("recmesh-exp-{what}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.display().to_string()
}

fn config(state_dir: String, token: &str) -> Config {
    Config {
        state_dir,
        admin_token: token.into(),
        features_addr: String::new(),
        ..Config::default()
    }
}

fn authed<T>(msg: T, token: &str) -> Request<T> {
    let mut req = Request::new(msg);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii"),
    );
    req
}

fn push(id: &str, weights: [u32; 2], lambda: &str) -> pb::PutExperimentRequest {
    pb::PutExperimentRequest {
        experiment: Some(pb::Experiment {
            id: id.into(),
            layer: "rerank".into(),
            traffic: 1.0,
            variants: vec![
                pb::Variant {
                    name: "control".into(),
                    weight: weights[0],
                    ..Default::default()
                },
                pb::Variant {
                    name: "diverse".into(),
                    weight: weights[1],
                    params: [("rerank.mmr_lambda".to_string(), lambda.to_string())].into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }),
    }
}

#[test]
fn defaults_and_demo_set_are_valid() {
    let c: Config = recmesh_server::config::load(None).expect("defaults load");
    assert_eq!(c, Config::default());
    assert_eq!(
        parse_file(DEMO_EXPERIMENTS)
            .expect("demo parses")
            .experiments
            .len(),
        1
    );
}

#[test]
fn the_readme_example_files_are_what_they_say() {
    let good = parse_file(include_str!("../examples/mmr-and-mix.toml")).expect("valid");
    let e = &good.get("mmr-and-mix").expect("present").def;
    assert_eq!(e.variants[1].params["rerank.mmr_lambda"], "0.5");
    assert_eq!(e.guardrails[0].min_sample, 300);
    assert!(e.cuped);
    let err = parse_file(include_str!("../examples/bad-weights.toml")).expect_err("refused");
    assert_eq!(err.field, "experiments[0].variants");
}

#[tokio::test]
async fn admin_needs_the_token() {
    let svc = Experiments::open(&config(String::new(), "s3cret"))
        .await
        .expect("state");
    let err = svc
        .list_experiments(Request::new(pb::ListExperimentsRequest {}))
        .await
        .expect_err("no token");
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let wrong = svc
        .list_experiments(authed(pb::ListExperimentsRequest {}, "nope"))
        .await
        .expect_err("wrong");
    assert_eq!(wrong.code(), tonic::Code::PermissionDenied);
    for call in [
        svc.put_experiment(Request::new(push("x", [1, 1], "0.5")))
            .await
            .err(),
        svc.delete_experiment(Request::new(pb::DeleteExperimentRequest {
            id: "candidate-count".into(),
            expected_version: 0,
        }))
        .await
        .err(),
        svc.get_results(Request::new(pb::GetResultsRequest {
            id: "candidate-count".into(),
        }))
        .await
        .err(),
    ] {
        assert_eq!(call.map(|e| e.code()), Some(tonic::Code::Unauthenticated));
    }
    let ok = svc
        .list_experiments(authed(pb::ListExperimentsRequest {}, "s3cret"))
        .await
        .expect("ok");
    assert_eq!(ok.into_inner().experiments.len(), 1);
}

#[tokio::test]
async fn pushes_survive_a_restart_and_a_bad_push_keeps_the_old_version() {
    let dir = scratch("restart");
    let svc = Experiments::open(&config(dir.clone(), "t"))
        .await
        .expect("state");
    let v = svc
        .put_experiment(authed(push("mmr", [1, 1], "0.5"), "t"))
        .await
        .expect("accepted")
        .into_inner()
        .version;
    // Bad weights: rejected naming the field, nothing changes.
    let err = svc
        .put_experiment(authed(push("mmr", [0, 0], "0.5"), "t"))
        .await
        .expect_err("bad weights");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message().starts_with("experiment.variants"),
        "{}",
        err.message()
    );
    let err = svc
        .put_experiment(authed(push("mmr", [1, 1], "7"), "t"))
        .await
        .expect_err("bad lambda");
    assert!(
        err.message()
            .starts_with("experiment.variants[1].params.rerank.mmr_lambda"),
        "{}",
        err.message()
    );
    // A stale expected version.
    let mut stale = push("mmr", [1, 2], "0.5");
    if let Some(e) = stale.experiment.as_mut() {
        e.version = v + 10;
    }
    let err = svc
        .put_experiment(authed(stale, "t"))
        .await
        .expect_err("stale");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert_eq!(
        svc.current().version,
        v,
        "the accepted version still serves"
    );

    svc.set_status(authed(
        pb::SetStatusRequest {
            id: "mmr".into(),
            status: "paused".into(),
            expected_version: 0,
        },
        "t",
    ))
    .await
    .expect("paused");
    drop(svc);
    let again = Experiments::open(&config(dir.clone(), "t"))
        .await
        .expect("restart");
    let mmr = again.current().get("mmr").cloned().expect("survived");
    assert_eq!(mmr.def.status, "paused");
    assert_eq!(mmr.def.variants[1].params["rerank.mmr_lambda"], "0.5");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn sticky_assignments_survive_a_restart() {
    let dir = scratch("sticky");
    let svc = Experiments::open(&config(dir.clone(), ""))
        .await
        .expect("state");
    let mut req = push("s", [1, 1], "0.5");
    if let Some(e) = req.experiment.as_mut() {
        e.sticky = true;
        e.layer = "ranking".into();
    }
    svc.put_experiment(Request::new(req.clone()))
        .await
        .expect("ok");
    let first: Vec<String> = (0..200)
        .map(|u| {
            svc.assign(&format!("u{u}"))
                .assignments
                .iter()
                .find(|a| a.experiment_id == "s")
                .expect("in s")
                .variant
                .clone()
        })
        .collect();
    drop(svc);
    let svc = Experiments::open(&config(dir.clone(), ""))
        .await
        .expect("restart");
    if let Some(e) = req.experiment.as_mut() {
        e.variants[0].weight = 99;
    }
    svc.put_experiment(Request::new(req))
        .await
        .expect("reweighted");
    for (u, want) in first.iter().enumerate() {
        let a = svc.assign(&format!("u{u}"));
        let got = &a
            .assignments
            .iter()
            .find(|a| a.experiment_id == "s")
            .expect("in s")
            .variant;
        assert_eq!(got, want, "u{u}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn version_stream_sends_current_then_changes_and_ends_on_close() {
    use futures::StreamExt;
    let svc = Experiments::open(&config(String::new(), ""))
        .await
        .expect("state");
    let mut stream = svc
        .watch_version(Request::new(pb::WatchVersionRequest {}))
        .await
        .expect("stream")
        .into_inner();
    let first = stream.next().await.expect("current").expect("ok");
    svc.put_experiment(Request::new(push("w", [1, 1], "0.5")))
        .await
        .expect("ok");
    let second = stream.next().await.expect("change").expect("ok");
    assert_eq!(second.version, first.version + 1);
    // Each version comes with the rules Assign follows at it.
    let ids = |v: &pb::ConfigVersion| -> Vec<String> {
        let rules = v.rules.as_ref().expect("rules");
        rules
            .experiments
            .iter()
            .map(|r| r.experiment.as_ref().expect("experiment").id.clone())
            .collect()
    };
    assert!(!ids(&first).contains(&"w".to_owned()));
    assert!(ids(&second).contains(&"w".to_owned()));
    for u in 0..100 {
        let user = format!("u{u}");
        let local = recmesh_mesh::assign::assign(
            second.rules.as_ref().expect("rules"),
            &user,
            now_ms(),
            |_| None,
            |_, _| {},
        );
        let served = svc.assign(&user);
        assert_eq!(local, (served.assignments, served.holdout), "{user}");
    }
    svc.close();
    assert!(stream.next().await.is_none(), "ends when the server drains");
}

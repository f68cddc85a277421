//! The offline evaluation's served rows and the real `Recommend` RPC give
//! the same lists for the same requests: the in-process pipeline
//! (`recmesh_trainer::served`) and a mesh over loopback gRPC, both serving
//! one published bundle (with its learned ranker) over one training period,
//! asked for the same users with the same request ids and no client
//! exclusions. If the two drift apart, the offline figures stop describing
//! what clients get.

use std::sync::Arc;

use recmesh_catalog::demo::{DemoSpec, generate};
use recmesh_catalog::item_key;
use recmesh_e2e::{BUDGET_SCALE, scratch_dir, test_budgets};
use recmesh_trainer::{Protocol, Split, grpc, served::ServedStages};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_served_lists_equal_the_recommend_rpc() {
    let data = generate(&DemoSpec {
        items: 600,
        users: 120,
        interactions: 12_000,
        ..DemoSpec::default()
    });
    let mut split = Split::new(&data, Protocol::PerUserTemporal);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    grpc::shift_to_now(&mut split, now_ms);
    let ranker =
        tokio::task::block_in_place(|| recmesh_trainer::train_ranker(&split)).expect("ranker");
    let dir = scratch_dir("served-eval");
    let (data_dir, root) =
        tokio::task::block_in_place(|| grpc::prepare(&split, Some(&ranker), &dir))
            .expect("prepare");
    // What `recmesh up --data-dir` reads.
    let served = Arc::new(recmesh_catalog::files::read_dir(&data_dir).expect("data"));

    // Late sources and late features would make the lists differ for
    // reasons of speed, not of logic: budgets wide enough for a debug build.
    let mut retrieval = recmesh_retrieval::Config {
        bundle_dir: root.display().to_string(),
        ..Default::default()
    };
    retrieval.ann.budget_ms *= BUDGET_SCALE * 4;
    retrieval.content_budget_ms *= BUDGET_SCALE * 4;

    // In process: the retrieval service as the mesh loads it.
    let mut stages = {
        let r = recmesh_retrieval::service(retrieval.clone(), || unreachable!("bundle given"))
            .expect("retrieval from the bundle");
        ServedStages::with_retrieval(&served, r)
    };
    let scorer =
        recmesh_ranking::Scorer::from_lightgbm_text(&ranker.model_text, "ranker").expect("scorer");
    let reranker = recmesh_reranker::RerankerService::new(Default::default());

    // Over gRPC: the six services on loopback, the same bundle.
    let mut configs = recmesh::StageConfigs {
        retrieval,
        ..Default::default()
    };
    configs.ranking.bundle_dir = root.display().to_string();
    configs.ranking.features_budget_ms *= BUDGET_SCALE * 4;
    configs.features.event_log.path = dir.join("events.tsv");
    configs.features.event_log.exposures_path = dir.join("exposures.jsonl");
    configs.experiments.state_dir = dir.join("experiments").display().to_string();
    configs.experiments.experiments_file = dir.join(grpc::EXPERIMENTS_FILE).display().to_string();
    let mesh = recmesh::start(
        Arc::clone(&served),
        recmesh::PortPlan::EPHEMERAL,
        configs,
        |g| g.budgets = test_budgets(),
    )
    .await
    .expect("mesh starts");

    let mut users: Vec<String> = split.test.keys().cloned().collect();
    users.sort();
    users.truncate(40);
    let k = 10;
    let seed = 42;
    let answers = grpc::recommend_all(&mesh.gateway.grpc_uri(), &users, k, seed)
        .await
        .expect("Recommend");
    assert_eq!(answers.degraded, 0, "every stage answered in time");
    assert_eq!(answers.cached, 0);

    let mut history: std::collections::HashMap<&str, std::collections::HashSet<u64>> =
        Default::default();
    for e in &served.interactions {
        history
            .entry(e.user.as_str())
            .or_default()
            .insert(item_key(&e.item));
    }
    for user in &users {
        stages.now_s = now_ms / 1000;
        let in_process = tokio::task::block_in_place(|| {
            stages.list(user, k, &format!("{seed}:{user}"), &scorer, &reranker)
        })
        .expect("in process");
        let over_grpc = &answers.lists[user];
        assert_eq!(over_grpc.len(), k, "{user}: a full list");
        assert_eq!(&in_process, over_grpc, "{user}: the two paths differ");
        let had = &history[user.as_str()];
        assert!(
            over_grpc.iter().all(|i| !had.contains(&item_key(i))),
            "{user}: an item of their history came back"
        );
    }
    mesh.shutdown().await.expect("shutdown");
    // The split, its bundle and the mesh's state: 1.7 MB a run.
    let _ = std::fs::remove_dir_all(&dir);
}

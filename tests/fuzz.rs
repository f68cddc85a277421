//! Every decoder and validator on the request path, fed arbitrary input
//! (proptest): arbitrary bytes decoded as each request message, and
//! structured requests with hostile field values, called on the services
//! in process. Nothing may panic, and every refusal must be a clean status
//! (INVALID_ARGUMENT for bad input, naming the field where one is known);
//! stages that are down (the gateway here has none up) only ever degrade.

use std::sync::{Arc, OnceLock};

use proptest::prelude::*;
use prost::Message;
use recmesh_proto::v1::{
    self as pb, experiments_admin_server::ExperimentsAdmin, features_server::Features,
    gateway_server::Gateway as _, ranking_server::Ranking, reranker_server::Reranker,
    retrieval_server::Retrieval,
};
use tonic::{Code, Request};

struct Services {
    rt: tokio::runtime::Runtime,
    gateway: recmesh_gateway::Gateway,
    retrieval: recmesh_retrieval::RetrievalService,
    ranking: recmesh_ranking::RankingService,
    reranker: recmesh_reranker::RerankerService,
    features: recmesh_features::FeaturesService,
    experiments: recmesh_experiments::Experiments,
}

fn services() -> &'static Services {
    static S: OnceLock<Services> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let data = recmesh_catalog::demo::generate(&recmesh_catalog::demo::DemoSpec {
            items: 300,
            users: 50,
            interactions: 3_000,
            ..Default::default()
        });
        // Nothing listens on port 1: every upstream call is refused at once.
        let nowhere = "http://127.0.0.1:1".to_string();
        let (gateway, ranking, experiments) = rt.block_on(async {
            let gateway = recmesh_gateway::Gateway::new(
                recmesh_gateway::Config {
                    upstreams: recmesh_gateway::config::Upstreams {
                        experiments: nowhere.clone(),
                        features: nowhere.clone(),
                        retrieval: nowhere.clone(),
                        ranking: nowhere.clone(),
                        reranker: nowhere.clone(),
                    },
                    ..Default::default()
                },
                &data,
            )
            .expect("gateway");
            let features = recmesh_mesh::balance::Balanced::new(
                "features_addr",
                &nowhere,
                &Default::default(),
            )
            .expect("address");
            let ranking = recmesh_ranking::RankingService::new(Default::default(), features)
                .expect("ranking");
            let experiments =
                recmesh_experiments::Experiments::open(&recmesh_experiments::Config {
                    state_dir: String::new(),
                    features_addr: String::new(),
                    ..Default::default()
                })
                .await
                .expect("experiments");
            (gateway, ranking, experiments)
        });
        let store = recmesh_features::memory::MemoryStore::open(
            &data,
            recmesh_features::Config::default().limits(),
            None,
        )
        .expect("store");
        Services {
            gateway,
            retrieval: recmesh_retrieval::RetrievalService::new(Default::default(), &data),
            ranking,
            reranker: recmesh_reranker::RerankerService::new(Default::default()),
            features: recmesh_features::FeaturesService::new(Default::default(), Arc::new(store)),
            experiments,
            rt,
        }
    })
}

/// The status codes a call may end with; anything else (or a panic) fails.
fn allowed<T>(what: &str, r: Result<tonic::Response<T>, tonic::Status>, codes: &[Code]) {
    if let Err(s) = r {
        assert!(
            codes.contains(&s.code()),
            "{what}: unexpected {:?}: {}",
            s.code(),
            s.message()
        );
        assert!(!s.message().is_empty(), "{what}: a refusal says why");
    }
}

/// Runs every handler on whatever `bytes` decode to.
fn feed_bytes(bytes: &[u8]) {
    let s = services();
    let invalid = [Code::InvalidArgument];
    s.rt.block_on(async {
        if let Ok(m) = pb::RecommendRequest::decode(bytes) {
            allowed(
                "Recommend",
                s.gateway.recommend(Request::new(m)).await,
                &invalid,
            );
        }
        if let Ok(m) = pb::SimilarItemsRequest::decode(bytes) {
            allowed(
                "SimilarItems",
                s.gateway.similar_items(Request::new(m)).await,
                &[Code::InvalidArgument, Code::NotFound],
            );
        }
        if let Ok(m) = pb::TrendingRequest::decode(bytes) {
            allowed(
                "Trending",
                s.gateway.trending(Request::new(m)).await,
                &invalid,
            );
        }
        if let Ok(m) = pb::TrackRequest::decode(bytes) {
            // Features is down: a valid event is refused as UNAVAILABLE (retry).
            allowed(
                "Track",
                s.gateway.track(Request::new(m)).await,
                &[Code::InvalidArgument, Code::Unavailable],
            );
        }
        if let Ok(m) = pb::RetrieveRequest::decode(bytes) {
            allowed(
                "Retrieve",
                Retrieval::retrieve(&s.retrieval, Request::new(m)).await,
                &invalid,
            );
        }
        if let Ok(m) = pb::SimilarRequest::decode(bytes) {
            allowed(
                "Similar",
                Retrieval::similar(&s.retrieval, Request::new(m)).await,
                &[Code::InvalidArgument, Code::NotFound],
            );
        }
        if let Ok(m) = pb::PopularRequest::decode(bytes) {
            allowed(
                "Popular",
                Retrieval::popular(&s.retrieval, Request::new(m)).await,
                &invalid,
            );
        }
        if let Ok(m) = pb::RankRequest::decode(bytes) {
            allowed(
                "Rank",
                Ranking::rank(&s.ranking, Request::new(m)).await,
                &invalid,
            );
        }
        if let Ok(m) = pb::RerankRequest::decode(bytes) {
            allowed(
                "Rerank",
                Reranker::rerank(&s.reranker, Request::new(m)).await,
                &invalid,
            );
        }
        if let Ok(m) = pb::GetUserRequest::decode(bytes) {
            allowed(
                "GetUser",
                s.features.get_user(Request::new(m)).await,
                &invalid,
            );
        }
        if let Ok(m) = pb::GetItemsRequest::decode(bytes) {
            allowed(
                "GetItems",
                s.features.get_items(Request::new(m)).await,
                &invalid,
            );
        }
        if let Ok(m) = pb::IngestRequest::decode(bytes) {
            allowed("Ingest", s.features.ingest(Request::new(m)).await, &invalid);
        }
        if let Ok(m) = pb::ReadLogRequest::decode(bytes) {
            allowed(
                "ReadLog",
                s.features.read_log(Request::new(m)).await,
                &[Code::InvalidArgument, Code::FailedPrecondition],
            );
        }
        if let Ok(m) = pb::AssignRequest::decode(bytes) {
            allowed(
                "Assign",
                pb::experiments_server::Experiments::assign(&s.experiments, Request::new(m)).await,
                &invalid,
            );
        }
        if let Ok(m) = pb::PutExperimentRequest::decode(bytes) {
            allowed(
                "PutExperiment",
                s.experiments.put_experiment(Request::new(m)).await,
                &[Code::InvalidArgument, Code::FailedPrecondition],
            );
        }
    });
}

/// Strings that stress the validators: empty, huge, control characters,
/// unicode, and ordinary ids.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[a-z0-9]{1,12}",
        "\\PC{0,40}",
        "[\\x00-\\x1f]{1,4}",
        Just("x".repeat(300)),
        Just("u1".to_string()),
        Just("i1".to_string()),
    ]
}

fn bad_id(id: &str) -> bool {
    id.is_empty() || id.len() > 256 || id.chars().any(char::is_control)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        feed_bytes(&bytes);
    }

    #[test]
    fn hostile_recommend_requests_are_answered_or_refused_by_field(
        user in hostile_string(),
        count in any::<u32>(),
        category in hostile_string(),
        exclude in proptest::collection::vec(hostile_string(), 0..4),
        min_price in any::<f64>(),
    ) {
        let s = services();
        let req = pb::RecommendRequest {
            user_id: user.clone(),
            count,
            context: Some(pb::RequestContext { category, ..Default::default() }),
            exclude_item_ids: exclude,
            filters: Some(pb::Filters { min_price, ..Default::default() }),
            ..Default::default()
        };
        let r = s.rt.block_on(s.gateway.recommend(Request::new(req)));
        match r {
            Ok(a) => {
                let a = a.into_inner();
                prop_assert!(!bad_id(&user), "a bad user id was accepted");
                prop_assert!(a.items.len() as u64 <= u64::from(count));
            }
            Err(e) => {
                prop_assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
                if bad_id(&user) {
                    prop_assert!(e.message().starts_with("user_id"), "{}", e.message());
                }
            }
        }
    }

    #[test]
    fn hostile_events_are_refused_naming_the_field(
        id in hostile_string(),
        user in hostile_string(),
        item in hostile_string(),
        kind in -2i32..7,
        ts in prop_oneof![Just(0i64), any::<i64>()],
    ) {
        let s = services();
        let req = pb::IngestRequest {
            events: vec![pb::Event { event_id: id.clone(), user_id: user.clone(), item_id: item.clone(), event_type: kind, timestamp_ms: ts }],
        };
        let r = s.rt.block_on(s.features.ingest(Request::new(req)));
        let valid_kind = (1..=4).contains(&kind);
        match r {
            Ok(_) => prop_assert!(!bad_id(&id) && !bad_id(&user) && !bad_id(&item) && valid_kind),
            Err(e) => {
                prop_assert_eq!(e.code(), Code::InvalidArgument);
                prop_assert!(e.message().starts_with("events[0]."), "{}", e.message());
            }
        }
    }
}

//! The served pipeline's first stages, fitted on a training period: the
//! retrieval index and the feature store, built by the services' own code.
//! Ranker training and the evaluation both get candidates here, so the rows
//! a model learns from are the rows it is evaluated (and served) on.

use std::sync::Arc;

use recmesh_algo::seen::SeenPolicy;
use recmesh_catalog::Dataset;
use recmesh_catalog::bundle::{BuildParams, Bundle};
use recmesh_proto::v1 as pb;

/// Retrieval and features over one training period.
pub struct ServedStages {
    retrieval: recmesh_retrieval::RetrievalService,
    store: recmesh_features::memory::MemoryStore,
    /// The end of the training period, Unix seconds (the "now" of scoring).
    pub now_s: i64,
    /// The seen-items policy, as the gateway's `[seen]` default.
    pub policy: SeenPolicy,
}

/// One user's candidates, with what ranking and re-ranking need.
pub struct Candidates {
    /// The user's features (recent items, purchases, top categories).
    pub profile: pb::UserFeatures,
    /// What the user has seen under the policy (item keys), as the gateway
    /// sends it to retrieval and the reranker.
    pub seen: Vec<u64>,
    /// Retrieval's candidates, best first, as `Retrieve` sends them.
    pub list: recmesh_mesh::lean::Candidates,
    /// Item features of the candidates and of the user's recent items.
    pub features: recmesh_ranking::ItemFeatureMap,
}

impl ServedStages {
    /// Fits retrieval (a bundle with the default build parameters, ALS
    /// included) and the feature store on `train`.
    pub fn new(train: &Dataset) -> Self {
        let bundle = Bundle::build(train, &BuildParams::default(), |_| {});
        ServedStages::with_bundle(train, bundle)
    }

    /// Retrieval over `bundle` (built from `train`) and the feature store on `train`.
    pub fn with_bundle(train: &Dataset, bundle: Bundle) -> Self {
        ServedStages::with_retrieval(
            train,
            recmesh_retrieval::RetrievalService::from_bundle(Default::default(), bundle),
        )
    }

    /// `retrieval` (e.g. the retrieval service as a mesh loads it from a
    /// published bundle) and the feature store on `train`.
    pub fn with_retrieval(train: &Dataset, retrieval: recmesh_retrieval::RetrievalService) -> Self {
        ServedStages {
            retrieval,
            policy: SeenPolicy::default(),
            store: recmesh_features::memory::MemoryStore::open(
                train,
                recmesh_features::Config::default().limits(),
                None,
            )
            .expect("no event file: nothing to fail"),
            now_s: train
                .interactions
                .last()
                .map_or(0, |e| e.timestamp_ms / 1000),
        }
    }

    /// Retrieval's candidates for `user`, as the gateway asks for them:
    /// no client exclusions, the seen set under [`ServedStages::policy`].
    pub fn candidates(&self, user: &str) -> anyhow::Result<Candidates> {
        let profile = self.store.user_features(user, 20);
        let seen = self
            .policy
            .select(&profile.seen_items, &profile.seen_at_s, self.now_s);
        let list = self
            .retrieval
            .retrieve_blocking(&pb::RetrieveRequest {
                user_id: user.to_owned(),
                recent: profile.recent.clone(),
                count: recmesh_algo::params::VariantParams::default().candidates,
                seen_items: seen.clone(),
                ..Default::default()
            })
            .map_err(|e| anyhow::anyhow!("retrieve: {e}"))?
            .list
            .unwrap_or_default();
        let list = recmesh_mesh::lean::Candidates::new(list, "list")
            .map_err(|e| anyhow::anyhow!("retrieve: {e}"))?;
        let mut ids: Vec<String> = list.ids().map(str::to_owned).collect();
        ids.extend(profile.recent.iter().map(|r| r.item_id.clone()));
        let features = self
            .store
            .item_features(&ids)
            .items
            .into_iter()
            .map(|f| (f.item_id.clone(), Arc::new(f)))
            .collect();
        Ok(Candidates {
            profile,
            seen,
            list,
            features,
        })
    }

    /// One user's top `k` through retrieval → ranking → re-ranking, as the
    /// gateway runs them for a `Recommend` with this request id and no
    /// client exclusions.
    pub fn list(
        &self,
        user: &str,
        k: usize,
        request_id: &str,
        scorer: &recmesh_ranking::Scorer,
        reranker: &recmesh_reranker::RerankerService,
    ) -> anyhow::Result<Vec<String>> {
        let c = self.candidates(user)?;
        let ranked = scorer.rank(&c.list, &c.profile.recent, &c.features, self.now_s);
        let out = reranker
            .rerank(
                pb::RerankRequest {
                    user_id: user.to_owned(),
                    candidates: Some(ranked),
                    count: k as u32,
                    purchased_item_ids: c.profile.purchased_item_ids,
                    request_id: request_id.to_owned(),
                    recent: c.profile.recent,
                    usual_categories: c.profile.top_categories,
                    seen_items: c.seen,
                    filters: Some(Default::default()),
                    ..Default::default()
                },
                self.now_s,
            )
            .map_err(|e| anyhow::anyhow!("rerank: {e}"))?;
        Ok(out.candidates.into_iter().map(|c| c.item_id).collect())
    }
}

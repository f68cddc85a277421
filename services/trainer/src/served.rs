//! The served pipeline's first stages, fitted on a training period: the
//! retrieval index and the feature store, built by the services' own code.
//! Ranker training and the evaluation both get candidates here, so the rows
//! a model learns from are the rows it is evaluated (and served) on.

use std::sync::Arc;

use recmesh_catalog::Dataset;
use recmesh_catalog::bundle::{BuildParams, Bundle};
use recmesh_proto::v1 as pb;

/// Retrieval and features over one training period.
pub struct ServedStages {
    retrieval: recmesh_retrieval::RetrievalService,
    store: recmesh_features::memory::MemoryStore,
    /// The end of the training period, Unix seconds (the "now" of scoring).
    pub now_s: i64,
}

/// One user's candidates, with what ranking and re-ranking need.
pub struct Candidates {
    /// The user's features (recent items, purchases, top categories).
    pub profile: pb::UserFeatures,
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
        ServedStages {
            retrieval: recmesh_retrieval::RetrievalService::from_bundle(
                recmesh_retrieval::Config {
                    // Training histories of heavy users are long; all are excluded.
                    max_exclusions: 5_000,
                    ..Default::default()
                },
                bundle,
            ),
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

    /// Retrieval's candidates for `user`, never any of `seen`.
    pub fn candidates(&self, user: &str, seen: &[String]) -> anyhow::Result<Candidates> {
        let profile = self.store.user_features(user, 20);
        let list = self
            .retrieval
            .retrieve_blocking(&pb::RetrieveRequest {
                user_id: user.to_owned(),
                recent: profile.recent.clone(),
                count: recmesh_algo::params::VariantParams::default().candidates,
                exclude_item_ids: seen.to_vec(),
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
            list,
            features,
        })
    }
}

//! The gateway's side of experiments, off the request path: following the
//! experiment set's version and its assignment rules (a change drops the
//! cached answers, so a pushed config reaches every user at once), and
//! sending exposures to the exposure log in batches.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use recmesh_mesh::Balanced;
use recmesh_proto::v1::{
    self as pb, experiments_client::ExperimentsClient, features_client::FeaturesClient,
};
use tokio::sync::mpsc;

use crate::cache::{AssignmentCache, ResponseCache};
use crate::config::ExposureConfig;

/// The latest config version seen and its assignment rules, shared by
/// the watch and the request path. While the watch is broken the last
/// rules keep serving (a change made meanwhile is seen when it is back).
#[derive(Debug, Clone, Default)]
pub struct PushedRules(Arc<RwLock<Option<Arc<pb::ConfigVersion>>>>);

impl PushedRules {
    /// The latest version seen, if any.
    pub fn get(&self) -> Option<Arc<pb::ConfigVersion>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, v: pb::ConfigVersion) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(v));
    }
}

/// Now, in Unix ms (experiments' schedules are in it).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Follows `WatchVersion` for as long as the process lives: every version
/// different from the last one seen drops the whole response cache, the
/// assignment cache serves only assignments made under the latest, and
/// `rules` gets its assignment rules. A broken stream is reopened after a
/// short pause; the first message of a new stream is the current version,
/// so a change made meanwhile is not missed.
pub fn watch_version(
    mut client: ExperimentsClient<Balanced>,
    cache: ResponseCache,
    assignments: AssignmentCache,
    rules: PushedRules,
) {
    tokio::spawn(async move {
        let mut last: Option<u64> = None;
        loop {
            match client.watch_version(pb::WatchVersionRequest {}).await {
                Ok(stream) => {
                    let mut stream = stream.into_inner();
                    while let Ok(Some(v)) = stream.message().await {
                        if last.is_some_and(|l| l != v.version) {
                            cache.invalidate_all();
                            metrics::counter!("recmesh_gateway_config_changes_total").increment(1);
                            tracing::info!(
                                version = v.version,
                                "experiment config changed; cache dropped"
                            );
                        }
                        assignments.set_version(v.version);
                        last = Some(v.version);
                        metrics::gauge!("recmesh_gateway_config_version").set(v.version as f64);
                        rules.set(v);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "experiments watch unavailable; retrying"),
            }
            // While the stream is down a change goes unseen until it is back
            // (answers cached meanwhile still expire by their TTL).
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
}

/// Starts the exposure sender; returns its queue.
pub fn spawn_exposure_log(
    mut client: FeaturesClient<Balanced>,
    config: &ExposureConfig,
) -> mpsc::Sender<pb::Exposure> {
    let (tx, mut rx) = mpsc::channel::<pb::Exposure>(config.queue.max(1));
    let batch = config.batch.max(1);
    let flush = Duration::from_millis(config.flush_ms.max(1));
    tokio::spawn(async move {
        let mut pending: Vec<pb::Exposure> = Vec::with_capacity(batch);
        loop {
            // Wait for the first exposure, then gather until full or late.
            match rx.recv().await {
                Some(e) => pending.push(e),
                None => return,
            }
            let deadline = tokio::time::Instant::now() + flush;
            while pending.len() < batch {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(e)) => pending.push(e),
                    Ok(None) | Err(_) => break,
                }
            }
            let n = pending.len() as u64;
            let req = pb::LogExposuresRequest {
                exposures: std::mem::take(&mut pending),
            };
            match tokio::time::timeout(Duration::from_secs(2), client.log_exposures(req)).await {
                Ok(Ok(_)) => {
                    metrics::counter!("recmesh_gateway_exposures_total", "outcome" => "logged")
                        .increment(n)
                }
                outcome => {
                    metrics::counter!("recmesh_gateway_exposures_total", "outcome" => "failed")
                        .increment(n);
                    tracing::warn!(exposures = n, ?outcome, "exposures not logged");
                }
            }
        }
    });
    tx
}

/// Queues the exposure of `response` to `user`, with the user's events in
/// the last 7 days when the answer was computed from their features (the
/// covariate of CUPED); a full queue drops it.
pub fn queue_exposure(
    queue: &mpsc::Sender<pb::Exposure>,
    user: &str,
    response: &pb::RecommendResponse,
    user_events_7d: Option<u32>,
) {
    let exposure = pb::Exposure {
        request_id: response.request_id.clone(),
        user_id: user.to_owned(),
        timestamp_ms: now_ms(),
        assignments: response
            .assignments
            .iter()
            .map(|a| pb::Assignment {
                experiment_id: a.experiment_id.clone(),
                variant: a.variant.clone(),
                params: Default::default(),
            })
            .collect(),
        item_ids: response.items.iter().map(|i| i.item_id.clone()).collect(),
        user_events_7d,
    };
    if queue.try_send(exposure).is_err() {
        metrics::counter!("recmesh_gateway_exposures_total", "outcome" => "dropped").increment(1);
    }
}

//! The results consumer: follows the features service's exposure and event
//! logs, feeds them to [`Results`](crate::results::Results), takes one look
//! per round and stops the variants whose guardrail fires.

use std::time::Duration;

use recmesh_proto::v1::{self as pb, features_client::FeaturesClient};
use recmesh_server::config::ConfigError;
use tonic::Status;

use crate::{Experiments, Refused, ResultsConfig, now_ms};

impl Experiments {
    /// Follows the exposure and event logs through the features service,
    /// keeps the results, and stops variants whose guardrail fires.
    pub fn spawn_results(
        &self,
        features_addr: &str,
        config: ResultsConfig,
    ) -> Result<(), ConfigError> {
        let channel = recmesh_mesh::lazy_channel("features_addr", features_addr)
            .map_err(|e| ConfigError::invalid("features_addr", e.to_string()))?;
        let mut client = FeaturesClient::new(channel);
        let state = self.clone();
        tokio::spawn(async move {
            loop {
                let drained = match state.read_logs(&mut client, &config).await {
                    Ok(drained) => drained,
                    Err(e) => {
                        tracing::debug!(error = %e, "results: logs unavailable; retrying");
                        true
                    }
                };
                state.check_guardrails().await;
                if drained {
                    tokio::time::sleep(Duration::from_millis(config.poll_ms)).await;
                }
            }
        });
        Ok(())
    }

    /// One round: a page of each log. True when both are drained.
    async fn read_logs(
        &self,
        client: &mut FeaturesClient<tonic::transport::Channel>,
        config: &ResultsConfig,
    ) -> Result<bool, Status> {
        let (exposures_cursor, events_cursor) = {
            let r = self.0.results.lock().unwrap_or_else(|p| p.into_inner());
            (r.exposures_cursor.clone(), r.events_cursor.clone())
        };
        let exposures = client
            .read_log(pb::ReadLogRequest {
                log: pb::LogName::Exposures as i32,
                cursor: exposures_cursor,
                max: config.page,
            })
            .await?
            .into_inner();
        let events = client
            .read_log(pb::ReadLogRequest {
                log: pb::LogName::Events as i32,
                cursor: events_cursor,
                max: config.page,
            })
            .await?
            .into_inner();
        let drained = exposures.exposures.len() < config.page as usize
            && events.events.len() < config.page as usize;
        // Tallying a page is CPU work (a full page of 5,000 exposures after a
        // restart took 25 ms): on the blocking pool, so no `Assign` waits
        // behind it on an async worker.
        let state = self.clone();
        let delay_ms = config.attribution_delay_ms as i64;
        tokio::task::spawn_blocking(move || {
            let mut r = state.0.results.lock().unwrap_or_else(|p| p.into_inner());
            r.add_exposures(&exposures.exposures);
            r.exposures_cursor = exposures.next_cursor;
            r.add_events(events.events);
            r.events_cursor = events.next_cursor;
            r.attribute(now_ms() - delay_ms);
            metrics::gauge!("recmesh_experiments_results_users").set(r.users_kept() as f64);
            metrics::gauge!("recmesh_experiments_results_tracked_users")
                .set(r.tracked_users() as f64);
        })
        .await
        .map_err(|e| Status::internal(format!("results tally failed: {e}")))?;
        Ok(drained)
    }

    /// One look at the results: the always-valid tests advance, the split
    /// is checked, and variants whose guardrail fires are stopped.
    async fn check_guardrails(&self) {
        let set = self.current();
        let look = self
            .0
            .results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .look(&set);
        for (experiment, flagged) in &look.srm {
            metrics::gauge!("recmesh_experiments_srm_flagged", "experiment" => experiment.clone())
                .set(if *flagged { 1.0 } else { 0.0 });
        }
        for c in look.srm_changes {
            if c.flagged {
                tracing::error!(experiment = %c.experiment, note = %c.note,
                    "sample-ratio mismatch: guardrails held and no variant can stop until it is explained");
            } else {
                tracing::info!(experiment = %c.experiment, note = %c.note, "sample ratio back in line");
            }
        }
        for (experiment, variant, reason) in look.breaches {
            let stopped = self
                .change(|set| {
                    set.stop_variant(&experiment, &variant, reason.clone())
                        .ok_or_else(|| Refused::NotFound(experiment.clone()))
                })
                .await;
            match stopped {
                Ok(Ok(version)) => {
                    metrics::counter!("recmesh_experiments_guardrail_stops_total",
                        "experiment" => experiment.clone(), "variant" => variant.clone())
                    .increment(1);
                    tracing::warn!(%experiment, %variant, version, %reason,
                        "guardrail fired: variant stopped, its users get control");
                }
                Ok(Err(_)) => {}
                Err(e) => tracing::error!(%experiment, %variant, error = %format!("{e:#}"),
                    "guardrail fired but the stop could not be saved; retrying next round"),
            }
        }
    }
}

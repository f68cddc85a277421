//! `recmesh experiments …` (the admin API, as an A/B platform calls it) and
//! `recmesh simulate` (synthetic users that look at recommendations and
//! click, so results have something to count).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use recmesh_experiments::ExperimentDef;
use recmesh_proto::v1::{self as pb, experiments_admin_client::ExperimentsAdminClient};
use serde::Deserialize;
use tonic::transport::Channel;

/// The admin API with its bearer token.
#[derive(Debug, Clone)]
pub struct Admin {
    client: ExperimentsAdminClient<Channel>,
    token: String,
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ExperimentsFile {
    experiments: Vec<ExperimentDef>,
}

impl Admin {
    /// Connects to the experiments service at `addr`.
    pub async fn connect(addr: &str, token: &str) -> anyhow::Result<Self> {
        let endpoint = recmesh_mesh::check_address("--experiments", addr)?;
        let channel = endpoint.connect().await.map_err(|e| {
            anyhow::anyhow!("cannot reach the experiments service at {addr}: {e}. Is the mesh up? Set --experiments.")
        })?;
        Ok(Admin {
            client: ExperimentsAdminClient::new(channel),
            token: token.to_owned(),
        })
    }

    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if !self.token.is_empty()
            && let Ok(v) = format!("Bearer {}", self.token).parse()
        {
            req.metadata_mut().insert("authorization", v);
        }
        req
    }

    /// Pushes every experiment of a TOML file (`[[experiments]]`, the
    /// experiments file's format); returns (id, version) of each.
    pub async fn put_file(&mut self, text: &str) -> anyhow::Result<Vec<(String, u64)>> {
        let file: ExperimentsFile =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("experiments file: {e}"))?;
        let mut out = Vec::new();
        for def in file.experiments {
            let id = def.id.clone();
            let experiment =
                recmesh_experiments::model::to_proto(&recmesh_experiments::model::Stored {
                    def,
                    version: 0,
                    start: 0,
                });
            let r = self
                .client
                .put_experiment(self.req(pb::PutExperimentRequest {
                    experiment: Some(experiment),
                }))
                .await
                .map_err(|e| anyhow::anyhow!("{id}: {}", status(e)))?;
            out.push((id, r.into_inner().version));
        }
        Ok(out)
    }

    /// Every experiment.
    pub async fn list(&mut self) -> anyhow::Result<Vec<pb::Experiment>> {
        let r = self
            .client
            .list_experiments(self.req(pb::ListExperimentsRequest {}))
            .await
            .map_err(status)?;
        Ok(r.into_inner().experiments)
    }

    /// Sets a status.
    pub async fn set_status(&mut self, id: &str, to: &str) -> anyhow::Result<pb::Experiment> {
        let r = self
            .client
            .set_status(self.req(pb::SetStatusRequest {
                id: id.to_owned(),
                status: to.to_owned(),
                expected_version: 0,
            }))
            .await
            .map_err(status)?;
        Ok(r.into_inner())
    }

    /// Deletes an experiment.
    pub async fn delete(&mut self, id: &str) -> anyhow::Result<()> {
        self.client
            .delete_experiment(self.req(pb::DeleteExperimentRequest {
                id: id.to_owned(),
                expected_version: 0,
            }))
            .await
            .map_err(status)?;
        Ok(())
    }

    /// Results of one experiment.
    pub async fn results(&mut self, id: &str) -> anyhow::Result<pb::ExperimentResults> {
        let r = self
            .client
            .get_results(self.req(pb::GetResultsRequest { id: id.to_owned() }))
            .await
            .map_err(status)?;
        Ok(r.into_inner())
    }
}

/// One experiment as text.
pub fn render_experiment(e: &pb::Experiment) -> String {
    let mut out = format!(
        "{} (layer {}, {:.0}% of traffic, {}, version {}{}{})\n",
        e.id,
        e.layer,
        e.traffic * 100.0,
        e.status,
        e.version,
        if e.sticky { ", sticky" } else { "" },
        if e.cuped { ", CUPED" } else { "" }
    );
    for v in &e.variants {
        let mut params: Vec<String> = v.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        params.sort();
        let _ = writeln!(
            out,
            "  {:<14} weight {:<4} {}{}",
            v.name,
            v.weight,
            params.join(" "),
            if v.stopped_reason.is_empty() {
                String::new()
            } else {
                format!("  STOPPED: {}", v.stopped_reason)
            }
        );
    }
    for g in &e.guardrails {
        let _ = writeln!(
            out,
            "  guardrail {}: stop a variant more than {:.0}% below control (always-valid p < 0.05, ≥ {} users each, no sample-ratio mismatch)",
            g.metric,
            g.max_relative_drop * 100.0,
            g.min_sample
        );
    }
    out
}

/// A lift interval's bound as a percentage; unbounded before the first look.
fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:+.1}%", x * 100.0)
    } else if x > 0.0 {
        "+∞".into()
    } else {
        "−∞".into()
    }
}

/// Results as Markdown: the split check, then per user (the figures to
/// decide on), then per impression (labelled, for comparison).
pub fn render_results(r: &pb::ExperimentResults) -> String {
    let mut out = format!(
        "experiment {} (control: {}); {} exposures and {} events read\n\n",
        r.experiment_id, r.control, r.exposures_read, r.events_read
    );
    let _ = writeln!(
        out,
        "split: {}{}\n",
        if r.srm_flagged {
            "SAMPLE-RATIO MISMATCH. "
        } else {
            ""
        },
        r.srm_note
    );
    out.push_str(
        "Per user (delta method; fixed-horizon p valid at a pre-set sample size, \
         always-valid p and CI valid at any look):\n\n\
         | variant | users | CTR | CTR lift | fixed-horizon p | 95% CI of CTR diff | always-valid p | always-valid CI of lift | can stop | conv. p |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for v in &r.variants {
        let name = format!(
            "{}{}",
            v.variant,
            if v.stopped_reason.is_empty() {
                ""
            } else {
                " (stopped)"
            }
        );
        if v.variant == r.control {
            let _ = writeln!(
                out,
                "| {name} | {} | {:.4} | — | — | — | — | — | — | — |",
                v.users, v.ctr
            );
            continue;
        }
        let _ = writeln!(
            out,
            "| {name} | {} | {:.4} | {:+.1}% | {:.4} | [{:+.4}, {:+.4}] | {:.4} | [{}, {}] | {} | {:.4} |",
            v.users,
            v.ctr,
            v.ctr_lift * 100.0,
            v.user_ctr_p_value,
            v.user_ctr_diff_ci_low,
            v.user_ctr_diff_ci_high,
            v.always_valid_p_value,
            pct(v.always_valid_lift_ci_low),
            pct(v.always_valid_lift_ci_high),
            if v.can_stop { "yes" } else { "no" },
            v.user_conversion_p_value,
        );
    }
    if r.cuped && !r.cuped_note.is_empty() {
        let _ = writeln!(out, "\nCUPED {}", r.cuped_note);
    } else if r.cuped {
        out.push_str(
            "\nCUPED (covariate: the user's events in the 7 days before their first exposure):\n\n\
             | variant | adjusted CTR | adjusted lift | fixed-horizon p | 95% CI of adjusted diff | variance removed |\n\
             |---|---|---|---|---|---|\n",
        );
        for v in r.variants.iter().filter(|v| v.variant != r.control) {
            let _ = writeln!(
                out,
                "| {} | {:.4} | {:+.1}% | {:.4} | [{:+.4}, {:+.4}] | {:.1}% |",
                v.variant,
                v.cuped_ctr,
                v.cuped_lift * 100.0,
                v.cuped_p_value,
                v.cuped_diff_ci_low,
                v.cuped_diff_ci_high,
                v.cuped_variance_reduction * 100.0
            );
        }
    }
    out.push_str(
        "\nPer impression (every list an independent trial: intervals too narrow, do not decide on these):\n\n\
         | variant | impressions | clicks | CTR | conversions | conv. rate | CTR lift | p-value | 95% CI of CTR diff |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for v in &r.variants {
        let versus = if v.variant == r.control {
            "| — | — | — |".to_owned()
        } else {
            format!(
                "| {:+.1}% | {:.4} | [{:+.4}, {:+.4}] |",
                v.ctr_lift * 100.0,
                v.ctr_p_value,
                v.ctr_diff_ci_low,
                v.ctr_diff_ci_high
            )
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {:.4} | {} | {:.4} {versus}",
            v.variant, v.impressions, v.clicks, v.ctr, v.conversions, v.conversion_rate
        );
    }
    for v in r.variants.iter().filter(|v| !v.stopped_reason.is_empty()) {
        let _ = writeln!(out, "\n{} was stopped: {}", v.variant, v.stopped_reason);
    }
    out
}

/// A simulation run.
#[derive(Debug, Clone)]
pub struct SimSpec {
    /// Users `u0 .. u{users-1}` (the demo users, who have histories).
    pub users: u32,
    /// Recommendations per user.
    pub rounds: u32,
    /// Seed of the click draws.
    pub seed: u64,
    /// A variant whose users click less, and by how much (0..1): a
    /// simulated CTR drop, to watch a guardrail fire.
    pub drop: Option<(String, f64)>,
}

/// What a simulation did.
#[derive(Debug, Default)]
pub struct SimReport {
    /// `Recommend` calls answered.
    pub recommends: u64,
    /// Clicks sent.
    pub clicks: u64,
    /// Purchases sent.
    pub purchases: u64,
    /// Calls that failed (a `Track` only after its retries).
    pub errors: u64,
    /// The first few failures' messages, for the operator (or test) to read.
    pub first_errors: Vec<String>,
    /// Answers by (experiment, variant).
    pub by_variant: HashMap<(String, String), u64>,
}

impl SimReport {
    /// How many failure messages [`SimReport::first_errors`] keeps.
    const KEPT_ERRORS: usize = 5;

    fn failed(&mut self, call: &str, status: &tonic::Status) {
        self.errors += 1;
        if self.first_errors.len() < Self::KEPT_ERRORS {
            self.first_errors
                .push(format!("{call}: {:?}: {}", status.code(), status.message()));
        }
    }
}

/// How many times the simulation sends one event before it counts an error.
/// The gateway answers an unrecorded event `UNAVAILABLE` and asks for a retry
/// with the same `event_id` (the feature store drops the duplicate), which is
/// what a real client does.
const TRACK_ATTEMPTS: u32 = 3;

/// SplitMix64: a small deterministic source of draws.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Click probability of the simulated user model: position bias
/// `0.10 / (1 + 0.3 × position)`, ×2.5 for the user's preferred category
/// (the category of the first item they were ever shown in this run), ×0.6
/// otherwise; × (1 − drop) in the dropped variant.
fn click_probability(position: usize, preferred: bool, drop: f64) -> f64 {
    let base = 0.10 / (1.0 + 0.3 * position as f64);
    base * if preferred { 2.5 } else { 0.6 } * (1.0 - drop)
}

/// Runs the simulation against the gateway at `gateway`.
pub async fn simulate(gateway: &str, spec: &SimSpec) -> anyhow::Result<SimReport> {
    let mut client = crate::client::connect(gateway).await?;
    let mut rng = Rng(spec.seed);
    let mut report = SimReport::default();
    let mut preferred: HashMap<String, String> = HashMap::new();
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut event = 0u64;
    for round in 0..spec.rounds {
        for n in 0..spec.users {
            let user = format!("u{n}");
            let answer = match client
                .recommend(pb::RecommendRequest {
                    user_id: user.clone(),
                    count: 10,
                    ..Default::default()
                })
                .await
            {
                Ok(a) => a.into_inner(),
                Err(status) => {
                    report.failed("Recommend", &status);
                    continue;
                }
            };
            report.recommends += 1;
            let mut drop = 0.0;
            for a in &answer.assignments {
                *report
                    .by_variant
                    .entry((a.experiment_id.clone(), a.variant.clone()))
                    .or_default() += 1;
                if let Some((v, d)) = &spec.drop
                    && &a.variant == v
                {
                    drop = *d;
                }
            }
            let favourite = preferred
                .entry(user.clone())
                .or_insert_with(|| {
                    answer
                        .items
                        .first()
                        .map(|i| i.category.clone())
                        .unwrap_or_default()
                })
                .clone();
            for (position, item) in answer.items.iter().enumerate() {
                if rng.unit() >= click_probability(position, item.category == favourite, drop) {
                    continue;
                }
                let mut kinds = vec![pb::EventType::Click];
                if rng.unit() < 0.1 {
                    kinds.push(pb::EventType::Purchase);
                }
                for kind in kinds {
                    event += 1;
                    let track = pb::TrackRequest {
                        event_id: format!("sim-{run}-{round}-{event}"),
                        user_id: user.clone(),
                        item_id: item.item_id.clone(),
                        event_type: kind as i32,
                        timestamp_ms: 0,
                    };
                    let mut attempt = 1;
                    let sent = loop {
                        match client.track(track.clone()).await {
                            Err(s)
                                if s.code() == tonic::Code::Unavailable
                                    && attempt < TRACK_ATTEMPTS =>
                            {
                                attempt += 1;
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            sent => break sent,
                        }
                    };
                    match (sent, kind) {
                        (Err(status), _) => report.failed("Track", &status),
                        (Ok(_), pb::EventType::Purchase) => report.purchases += 1,
                        (Ok(_), _) => report.clicks += 1,
                    }
                }
            }
        }
    }
    // Let the gateway's exposure batches and the results' attribution delay pass.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_click_model_prefers_top_positions_and_the_favourite_category() {
        assert!(click_probability(0, true, 0.0) > click_probability(5, true, 0.0));
        assert!(click_probability(2, true, 0.0) > click_probability(2, false, 0.0));
        assert!((click_probability(0, false, 0.5) - 0.03).abs() < 1e-12);
        // The draws are uniform on [0, 1): chi-square over 10 bins of
        // 100,000 draws, below the 99.9th percentile with 9 degrees of
        // freedom (27.88).
        let mut rng = Rng(1);
        let mut bins = [0u64; 10];
        for _ in 0..100_000 {
            let x = rng.unit();
            assert!((0.0..1.0).contains(&x));
            bins[(x * 10.0) as usize] += 1;
        }
        let chi2: f64 = bins
            .iter()
            .map(|&o| (o as f64 - 10_000.0).powi(2) / 10_000.0)
            .sum();
        assert!(chi2 < 27.88, "chi-square {chi2} over {bins:?}");
    }
}

//! The `Recommend` pipeline: assignment and features side by side, then
//! retrieval, ranking and re-ranking, each within its budget and with its
//! fallback, and the stage reports.

use super::*;

/// Runs one stage call bounded by `budget` within `deadline` and reports it.
pub(crate) async fn run_stage<T, F, Fut>(
    name: &'static str,
    budget: Duration,
    deadline: &Deadline,
    call: F,
) -> (Result<T, CallError>, pb::StageReport)
where
    F: FnOnce(Duration) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    report_stage(name, budget, deadline, async |given| {
        (bounded(given, call).await, 0)
    })
    .await
}

/// [`run_stage`] for an idempotent read: a transport failure
/// (`recmesh_mesh::is_transport`) is retried under
/// `policy` inside the same budget (`call` makes each attempt).
pub(crate) async fn run_stage_retrying<T, F, Fut>(
    name: &'static str,
    budget: Duration,
    deadline: &Deadline,
    policy: &RetryPolicy,
    call: F,
) -> (Result<T, CallError>, pb::StageReport)
where
    F: FnMut(Duration) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    report_stage(name, budget, deadline, async |given| {
        bounded_retry(given, policy, call).await
    })
    .await
}

/// Runs `attempt` with the stage's time, then measures, traces and reports it.
pub(crate) async fn report_stage<T>(
    name: &'static str,
    budget: Duration,
    deadline: &Deadline,
    attempt: impl AsyncFnOnce(Duration) -> (Result<T, CallError>, u32),
) -> (Result<T, CallError>, pb::StageReport) {
    let given = deadline.budget(budget);
    // One span per stage, inside the request's span (which carries the
    // request id, also sent to the stage in the call's metadata).
    let span = tracing::debug_span!(
        "stage",
        stage = name,
        budget_ms = given.as_millis() as u64,
        outcome = tracing::field::Empty,
        latency_us = tracing::field::Empty
    );
    let started = Instant::now();
    let (result, retries) = tracing::Instrument::instrument(attempt(given), span.clone()).await;
    if retries > 0 {
        metrics::counter!("recmesh_gateway_retries_total", "stage" => name, "outcome" => if result.is_ok() { "answered" } else { "failed" })
            .increment(u64::from(retries));
    }
    let latency = started.elapsed();
    let (outcome, label, detail) = match &result {
        Ok(_) => (pb::StageOutcome::Ok, "ok", String::new()),
        Err(e @ CallError::Timeout(_)) => (pb::StageOutcome::Timeout, e.outcome(), e.to_string()),
        Err(e @ CallError::Status(_)) => (pb::StageOutcome::Error, e.outcome(), e.to_string()),
        Err(e @ CallError::NoBudget) => (pb::StageOutcome::Skipped, e.outcome(), e.to_string()),
    };
    metrics::histogram!("recmesh_gateway_stage_duration_seconds", "stage" => name, "outcome" => label)
        .record(latency.as_secs_f64());
    span.record("outcome", label);
    span.record("latency_us", latency.as_micros() as u64);
    if !matches!(outcome, pb::StageOutcome::Ok) {
        tracing::debug!(parent: &span, %detail, "stage did not answer in time or failed");
    }
    let detail = match (retries, detail.is_empty()) {
        (0, _) => detail,
        (n, true) => format!("answered after {n} retry(ies) on a transport failure"),
        (n, false) => format!("{detail} (after {n} retry(ies))"),
    };
    let report = pb::StageReport {
        stage: name.to_owned(),
        latency_us: latency.as_micros().min(u128::from(u32::MAX)) as u32,
        outcome: outcome as i32,
        fallback: String::new(),
        budget_us: given.as_micros().min(u128::from(u32::MAX)) as u32,
        detail,
    };
    (result, report)
}

/// Marks `report` as answered by `fallback` and counts it.
pub(crate) fn fell_back(report: &mut pb::StageReport, fallback: &'static str) {
    metrics::counter!("recmesh_gateway_fallback_total", "stage" => report.stage.clone(), "fallback" => fallback)
        .increment(1);
    report.fallback = fallback.to_owned();
}

pub(crate) fn to_items(candidates: Vec<pb::Candidate>) -> Vec<pb::RecommendedItem> {
    candidates
        .into_iter()
        .map(|c| {
            let exploration = c.exploration;
            let (category, price) = c
                .attributes
                .map_or((String::new(), 0.0), |a| (a.category, a.price));
            let mut reasons = c.reasons;
            if reasons.is_empty() {
                reasons.push("recommended for you".to_owned());
            }
            pb::RecommendedItem {
                item_id: c.item_id,
                score: c.score,
                source: c.source,
                reasons,
                category,
                price,
                exploration,
            }
        })
        .collect()
}

impl Gateway {
    /// The pipeline's answer, and how long the variant lets it be cached.
    pub(crate) async fn recommend_pipeline(
        &self,
        q: &RecommendQuery,
        deadline: Deadline,
        rid: &str,
    ) -> (pb::RecommendResponse, Option<Duration>, Option<u32>) {
        let b = &self.config.budgets;
        let mut stages = Vec::with_capacity(5);

        // 1. Assignment and user features, in parallel.
        let experiments = &self.clients.experiments;
        let features = &self.clients.features;
        let assign_req = pb::AssignRequest {
            user_id: q.user_id.clone(),
            context: Some(q.context.clone()),
        };
        let user_req = pb::GetUserRequest {
            user_id: q.user_id.clone(),
            max_recent: 0,
        };
        let retry = &self.config.retry;
        // The step waits for features anyway: assignment is given up at its
        // own budget only once features has answered, so a late assignment
        // that arrives while features is still awaited costs no time (the
        // step still ends by features' budget).
        let (features_done, features_awaited) = tokio::sync::watch::channel(false);
        let assign_budget = Budgets::ms(b.assign_ms);
        let step_budget = assign_budget.max(Budgets::ms(b.features_ms));
        let assign = async {
            // Assigned here from the pushed rules, with no call (debug
            // requests run the whole pipeline).
            if self.config.assign_locally
                && !q.debug
                && let Some(a) = self.assign_locally(&q.user_id, &deadline)
            {
                return a;
            }
            // A user's assignments do not change while the config version
            // does not.
            if !q.debug
                && let Some(a) = self.assignments.get(&q.user_id).await
            {
                metrics::counter!("recmesh_gateway_assign_cache_total", "result" => "hit")
                    .increment(1);
                let report = pb::StageReport {
                    stage: stage::ASSIGN.to_owned(),
                    outcome: pb::StageOutcome::Ok as i32,
                    budget_us: deadline.budget(Budgets::ms(b.assign_ms)).as_micros() as u32,
                    detail: format!(
                        "from the gateway's assignment cache (config version {})",
                        a.config_version
                    ),
                    ..Default::default()
                };
                return (Ok((*a).clone()), report);
            }
            let (assigned, mut report) =
                report_stage(stage::ASSIGN, assign_budget, &deadline, async |own| {
                    let call = |t| {
                        let (mut c, r) = (experiments.clone(), assign_req.clone());
                        async move { c.assign(outgoing(r, t, rid)).await }
                    };
                    let give_up = async {
                        tokio::time::sleep(own).await;
                        let mut awaited = features_awaited.clone();
                        // An error means features is done with too.
                        let _ = awaited.wait_for(|done| *done).await;
                    };
                    tokio::select! {
                        biased;
                        answered = bounded_retry(deadline.budget(step_budget), retry, call) => answered,
                        () = give_up => (Err(CallError::Timeout(own)), 0),
                    }
                })
                .await;
            if assigned.is_ok() && report.latency_us > report.budget_us {
                report.detail = format!(
                    "answered after its budget, while user features were still awaited (no time lost){}",
                    if report.detail.is_empty() {
                        String::new()
                    } else {
                        format!("; {}", report.detail)
                    }
                );
            }
            if let Ok(a) = &assigned
                && !q.debug
            {
                metrics::counter!("recmesh_gateway_assign_cache_total", "result" => "miss")
                    .increment(1);
                self.assignments.put(&q.user_id, a).await;
            }
            (assigned, report)
        };
        let user = async {
            let got = run_stage_retrying(
                stage::FEATURES,
                Budgets::ms(b.features_ms),
                &deadline,
                retry,
                |t| {
                    let (mut c, r) = (features.clone(), user_req.clone());
                    async move { c.get_user(outgoing(r, t, rid)).await }
                },
            )
            .await;
            features_done.send_replace(true);
            got
        };
        let ((assigned, mut assign_report), (user, mut user_report)) = tokio::join!(assign, user);
        let (assignments, params) = match assigned {
            Ok(a) => {
                let mut params = VariantParams::default();
                for x in &a.assignments {
                    let map: HashMap<String, String> = x.params.clone().into_iter().collect();
                    match params.clone().apply(&map) {
                        Ok(p) => params = p,
                        Err(e) => {
                            tracing::warn!(experiment = %x.experiment_id, error = %e, "variant params ignored")
                        }
                    }
                }
                (a.assignments, params)
            }
            Err(_) => {
                fell_back(&mut assign_report, fallback_name::CONTROL);
                (Vec::new(), VariantParams::default())
            }
        };
        // The user's recent engagement, logged with the exposure as the
        // covariate of CUPED; unknown when their features are not at hand.
        let events_7d = user.as_ref().ok().map(|u| u.events_7d);
        let profile = user.unwrap_or_else(|_| {
            fell_back(&mut user_report, fallback_name::ANONYMOUS);
            pb::UserFeatures {
                user_id: q.user_id.clone(),
                ..Default::default()
            }
        });
        stages.push(assign_report);
        stages.push(user_report);
        // What the user already has, under the variant's seen-items policy:
        // retrieval drops it before cutting its lists, the reranker (or the
        // gateway's rules) drops whatever still arrives.
        let seen = params.seen_policy(self.seen_policy).select(
            &profile.seen_items,
            &profile.seen_at_s,
            experiments::now_ms() / 1000,
        );

        // 2. Retrieval.
        let retrieval = &self.clients.retrieval;
        let (_guard, in_flight) = InFlight::enter(&self.in_flight);
        let a = &self.config.adaptive;
        let mut count = params.candidates;
        let mut source_weights: HashMap<String, f64> =
            params.source_weights.clone().into_iter().collect();
        let mut adapted = String::new();
        if a.enabled && in_flight > a.soft_inflight {
            count = adaptive_candidates(count, in_flight, a.soft_inflight, a.min_candidates);
            source_weights.insert("category".into(), 0.0);
            adapted = format!(
                "under load ({in_flight} in flight): {count} of {} candidates, category source off",
                params.candidates
            );
            metrics::counter!("recmesh_gateway_adaptive_total").increment(1);
        }
        let retrieve_req = pb::RetrieveRequest {
            user_id: q.user_id.clone(),
            recent: profile.recent.clone(),
            context: Some(q.context.clone()),
            count,
            exclude_item_ids: q.exclude.clone(),
            filters: Some(q.filters.clone()),
            source_weights,
            seen_items: seen.clone(),
        };
        let budget = params.retrieval_budget_ms.unwrap_or(b.retrieval_ms);
        let hedge_after = Duration::from_millis(self.config.hedge.retrieval_after_ms);
        let (retrieved, mut report) = run_stage_retrying(
            stage::RETRIEVAL,
            Budgets::ms(budget),
            &deadline,
            retry,
            |t| {
                let r = &retrieve_req;
                async move {
                    let (answer, hedge) = hedged(hedge_after, || {
                        let r = r.clone();
                        async move {
                            wire::unary::<_, wire::RetrieveResponse>(
                                retrieval,
                                wire::RETRIEVE,
                                outgoing(r, t, rid),
                            )
                            .await
                        }
                    })
                    .await;
                    if hedge != Hedge::NotSent {
                        metrics::counter!("recmesh_gateway_hedges_total", "stage" => stage::RETRIEVAL, "winner" => hedge.label())
                            .increment(1);
                    }
                    answer
                }
            },
        )
        .await;
        if let Ok(r) = &retrieved {
            // Sources retrieval dropped (late or failed) make the answer
            // thinner, not wrong: said in the stage report.
            let dropped: Vec<String> = r
                .sources
                .iter()
                .filter(|s| s.outcome == "late" || s.outcome == "error")
                .map(|s| format!("{} {} ({})", s.source, s.outcome, s.detail))
                .collect();
            if !dropped.is_empty() {
                report.detail = format!("sources dropped: {}", dropped.join("; "));
            }
        }
        let candidates = match retrieved {
            Ok(r) if !r.list.is_empty() => r.list,
            _ => {
                fell_back(&mut report, fallback_name::POPULARITY);
                let categories = Self::fallback_categories(q, &profile);
                wire::encode(
                    &self
                        .lists()
                        .candidates(&categories, params.candidates as usize),
                )
            }
        };
        if !adapted.is_empty() && report.detail.is_empty() {
            report.detail = adapted;
        }
        stages.push(report);

        // 3. Ranking.
        let ranking = &self.clients.ranking;
        let rank_req = wire::RankRequest {
            user_id: q.user_id.clone(),
            candidates: candidates.clone(),
            model: params.ranking_model.clone(),
            recent: profile.recent.clone(),
        };
        let budget = params.ranking_budget_ms.unwrap_or(b.ranking_ms);
        let (ranked, mut report) = run_stage(stage::RANKING, Budgets::ms(budget), &deadline, |t| {
            wire::unary::<_, wire::RankResponse>(ranking, wire::RANK, outgoing(rank_req, t, rid))
        })
        .await;
        let (candidates, model_version) = match ranked {
            Ok(r) => {
                if r.degraded {
                    // Ranked, but without part of the model's input.
                    fell_back(&mut report, fallback_name::WITHOUT_FEATURES);
                    report.detail = r.detail;
                }
                (r.candidates, r.model_version)
            }
            Err(_) => {
                fell_back(&mut report, fallback_name::RETRIEVAL_ORDER);
                (candidates, String::new())
            }
        };
        stages.push(report);

        // 4. Re-ranking.
        let reranker = &self.clients.reranker;
        let rerank_req = wire::RerankRequest {
            user_id: q.user_id.clone(),
            candidates: candidates.clone(),
            count: q.count,
            exclude_item_ids: q.exclude.clone(),
            purchased_item_ids: profile.purchased_item_ids.clone(),
            filters: Some(q.filters.clone()),
            rule_overrides: params.rerank.clone().into_iter().collect(),
            request_id: rid.to_owned(),
            recent: profile.recent.clone(),
            usual_categories: profile.top_categories.clone(),
            seen_items: seen.clone(),
        };
        let budget = params.rerank_budget_ms.unwrap_or(b.rerank_ms);
        let (reranked, mut report) =
            run_stage(stage::RERANK, Budgets::ms(budget), &deadline, |t| {
                wire::unary::<_, pb::RerankResponse>(
                    reranker,
                    wire::RERANK,
                    outgoing(rerank_req, t, rid),
                )
            })
            .await;
        let finals = match reranked {
            Ok(r) => r.candidates,
            Err(_) => {
                fell_back(&mut report, fallback_name::GATEWAY_RULES);
                let cap = params
                    .rerank
                    .get("category_cap")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(self.config.popularity.fallback_category_cap);
                Self::gateway_rules(
                    wire::decode(&candidates),
                    q.count,
                    &q.exclude,
                    &profile.purchased_item_ids,
                    &seen,
                    &q.filters,
                    cap,
                )
            }
        };
        stages.push(report);

        let degraded = stages.iter().any(|s| !s.fallback.is_empty());
        let response = pb::RecommendResponse {
            request_id: rid.to_owned(),
            items: to_items(finals),
            model_version,
            assignments,
            stages,
            degraded,
            cached: false,
        };
        (
            response,
            params.cache_ttl_ms.map(Duration::from_millis),
            events_7d,
        )
    }
}

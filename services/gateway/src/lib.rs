//! Gateway: the public `Recommend`, `SimilarItems`, `Trending` and `Track`
//! RPCs, orchestrating the stage services under latency budgets.
//!
//! `Recommend` runs assignment and user features in parallel, then
//! retrieval → ranking → rerank. Assignment is made here from the rules the
//! experiments service pushes with its config version, with no call, unless
//! a running experiment is sticky; a called `Assign` is given up at its
//! budget only once features has answered: until then the step waits
//! anyway. Every
//! call gets the smaller of its stage budget and what is left of the
//! request's deadline. Every stage has a
//! fallback, so a valid request always gets an answer while the gateway is
//! up; the response's stage report says which stages fell back and
//! `degraded` is set when any did:
//!
//! | stage late or failing | fallback           |
//! |-----------------------|--------------------|
//! | assign                | `control` params   |
//! | features              | `anonymous` profile|
//! | retrieval             | `popularity` lists |
//! | ranking               | `retrieval_order`  |
//! | ranking's features    | `without_features` |
//! | rerank                | `gateway_rules`    |

#![forbid(unsafe_code)]

pub mod cache;
pub mod config;
pub mod experiments;
pub mod fallback;
mod pipeline;
use recmesh_mesh::wire;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use recmesh_algo::params::VariantParams;
use recmesh_algo::rules::{HardFilters, select};
use recmesh_catalog::Dataset;
use recmesh_mesh::convert::{FieldError, check_id, event_kind, rule_item};
use recmesh_mesh::{
    Balanced, CallError, Deadline, Hedge, RetryPolicy, bounded, bounded_retry, hedged, outgoing,
    request_id,
};
use recmesh_proto::v1::{
    self as pb, experiments_client::ExperimentsClient, features_client::FeaturesClient,
    gateway_server::GatewayServer, retrieval_client::RetrievalClient,
};
use recmesh_server::GrpcServer;
use tonic::{Request, Response, Status};

use config::Budgets;
pub use config::Config;
use fallback::{PopularityLists, SharedLists};
use pipeline::{fell_back, run_stage, run_stage_retrying, to_items};

/// Stage names as they appear in reports and metric labels.
pub mod stage {
    /// Experiment assignment.
    pub const ASSIGN: &str = "assign";
    /// User features.
    pub const FEATURES: &str = "features";
    /// Candidate retrieval.
    pub const RETRIEVAL: &str = "retrieval";
    /// Ranking.
    pub const RANKING: &str = "ranking";
    /// Re-ranking.
    pub const RERANK: &str = "rerank";
}

/// Fallback names as they appear in reports and metric labels.
pub mod fallback_name {
    /// Control variant params instead of an assignment.
    pub const CONTROL: &str = "control";
    /// An anonymous (cold-start) profile instead of the user's features.
    pub const ANONYMOUS: &str = "anonymous";
    /// The gateway's popularity lists instead of retrieval.
    pub const POPULARITY: &str = "popularity";
    /// Retrieval's order instead of the ranking model's.
    pub const RETRIEVAL_ORDER: &str = "retrieval_order";
    /// Ranking answered, but scored without item features (its own fallback).
    pub const WITHOUT_FEATURES: &str = "without_features";
    /// Hard filters and truncation in the gateway instead of the reranker.
    pub const GATEWAY_RULES: &str = "gateway_rules";
}

#[derive(Debug, Clone)]
struct Clients {
    experiments: ExperimentsClient<Balanced>,
    features: FeaturesClient<Balanced>,
    /// `Retrieve`, `Rank` and `Rerank` go in [`wire`] form; the other
    /// retrieval calls through a `RetrievalClient` over the same instances.
    retrieval: Balanced,
    ranking: Balanced,
    reranker: Balanced,
}

/// The gateway service.
#[derive(Debug, Clone)]
pub struct Gateway {
    clients: Clients,
    config: Arc<Config>,
    lists: SharedLists,
    cache: cache::ResponseCache,
    /// Users' assignments under the current experiment config version.
    assignments: cache::AssignmentCache,
    /// The assignment rules pushed with the current version.
    rules: experiments::PushedRules,
    /// Exposures on their way to the exposure log (`None`: not logged).
    exposures: Option<tokio::sync::mpsc::Sender<pb::Exposure>>,
    /// Recommends in flight, for adaptive degradation.
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    /// The `[seen]` policy, parsed once (`Config::validate` refused a bad one
    /// at start).
    seen_policy: recmesh_algo::seen::SeenPolicy,
}

/// Counts a Recommend in flight until dropped.
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    fn enter(counter: &Arc<std::sync::atomic::AtomicUsize>) -> (Self, usize) {
        let now = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        (InFlight(counter.clone()), now)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Candidates to ask for with `in_flight` Recommends running: all of them
/// up to `soft`, then in proportion, never below `min`.
pub fn adaptive_candidates(wanted: u32, in_flight: usize, soft: usize, min: u32) -> u32 {
    if in_flight <= soft {
        return wanted;
    }
    let scaled = (u64::from(wanted) * soft as u64 / in_flight as u64) as u32;
    scaled.max(min.min(wanted))
}

/// A `Recommend` request after validation.
#[derive(Debug, Clone)]
struct RecommendQuery {
    user_id: String,
    context: pb::RequestContext,
    count: u32,
    exclude: Vec<String>,
    filters: pb::Filters,
    debug: bool,
}

/// What a `SimilarItems` or `Trending` list must satisfy.
struct ListQuery<'a> {
    /// Popularity list to fall back on (`None`: overall).
    fallback_category: Option<&'a str>,
    count: u32,
    exclude: &'a [String],
    /// Items the user bought (empty when no user was named).
    purchased: &'a [String],
    filters: &'a pb::Filters,
    /// Reports of stages run before retrieval (the user's features).
    earlier: Vec<pb::StageReport>,
}

impl Gateway {
    /// A gateway with lazily connected channels to the stages, popularity
    /// lists seeded from `data`, and (inside a Tokio runtime) the background
    /// refresh of those lists.
    pub fn new(config: Config, data: &Dataset) -> Result<Self, recmesh_mesh::AddressError> {
        let u = &config.upstreams;
        let upstream = |name: &str, addr: &str| {
            Balanced::new(&format!("upstreams.{name}"), addr, &config.balance)
        };
        let clients = Clients {
            experiments: ExperimentsClient::new(upstream("experiments", &u.experiments)?),
            features: FeaturesClient::new(upstream("features", &u.features)?),
            retrieval: upstream("retrieval", &u.retrieval)?,
            ranking: upstream("ranking", &u.ranking)?,
            reranker: upstream("reranker", &u.reranker)?,
        };
        let p = &config.popularity;
        let lists: SharedLists = Arc::new(RwLock::new(Arc::new(PopularityLists::from_dataset(
            data,
            p.overall as usize,
            p.per_category as usize,
        ))));
        fallback::spawn_refresh(
            &lists,
            RetrievalClient::new(clients.retrieval.clone()),
            Duration::from_millis(p.refresh_ms),
            p.overall,
            p.per_category,
        );
        let cache = cache::ResponseCache::new(&config.cache);
        let assignments = cache::AssignmentCache::new(&config.assign_cache);
        let rules = experiments::PushedRules::default();
        experiments::watch_version(
            clients.experiments.clone(),
            cache.clone(),
            assignments.clone(),
            rules.clone(),
        );
        let exposures = config
            .exposures
            .enabled
            .then(|| experiments::spawn_exposure_log(clients.features.clone(), &config.exposures));
        Ok(Gateway {
            seen_policy: config.seen.policy().unwrap_or_default(),
            clients,
            cache,
            assignments,
            rules,
            config: Arc::new(config),
            lists,
            exposures,
            in_flight: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        })
    }

    fn lists(&self) -> Arc<PopularityLists> {
        self.lists.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn check_category(
        &self,
        lists: &PopularityLists,
        field: &str,
        name: &str,
    ) -> Result<(), FieldError> {
        if lists.knows_category(name) {
            Ok(())
        } else {
            let known: Vec<&str> = lists.categories().collect();
            Err(FieldError::new(
                field,
                format!("unknown category `{name}`; known: {}", known.join(", ")),
            ))
        }
    }

    fn check_count(&self, count: u32) -> Result<(), FieldError> {
        let max = self.config.limits.max_count;
        if count == 0 || count > max {
            Err(FieldError::new(
                "count",
                format!("must be in 1..={max}, got {count}"),
            ))
        } else {
            Ok(())
        }
    }

    fn check_exclusions(&self, ids: &[String]) -> Result<(), FieldError> {
        let max = self.config.limits.max_exclusions;
        if ids.len() > max {
            return Err(FieldError::new(
                "exclude_item_ids",
                format!("at most {max} ids, got {}", ids.len()),
            ));
        }
        for (n, id) in ids.iter().enumerate() {
            check_id(&format!("exclude_item_ids[{n}]"), id)?;
        }
        Ok(())
    }

    fn check_filters(
        &self,
        lists: &PopularityLists,
        filters: &pb::Filters,
    ) -> Result<(), FieldError> {
        for (n, c) in filters.categories.iter().enumerate() {
            self.check_category(lists, &format!("filters.categories[{n}]"), c)?;
        }
        let (lo, hi) = (filters.min_price, filters.max_price);
        if lo.is_nan() || lo < 0.0 {
            return Err(FieldError::new("filters.min_price", "must be ≥ 0"));
        }
        if hi.is_nan() || hi < 0.0 {
            return Err(FieldError::new(
                "filters.max_price",
                "must be ≥ 0 (0 = no maximum)",
            ));
        }
        if hi > 0.0 && lo > hi {
            return Err(FieldError::new(
                "filters.min_price",
                format!("{lo} is above filters.max_price {hi}"),
            ));
        }
        Ok(())
    }

    fn validate(&self, req: pb::RecommendRequest) -> Result<RecommendQuery, FieldError> {
        let lists = self.lists();
        check_id("user_id", &req.user_id)?;
        self.check_count(req.count)?;
        self.check_exclusions(&req.exclude_item_ids)?;
        let context = req.context.unwrap_or_default();
        for (field, value) in [
            ("context.page", &context.page),
            ("context.device", &context.device),
        ] {
            if value.len() > 64 {
                return Err(FieldError::new(field, "must be at most 64 bytes"));
            }
        }
        if !context.anchor_item_id.is_empty() {
            check_id("context.anchor_item_id", &context.anchor_item_id)?;
        }
        if !context.category.is_empty() {
            self.check_category(&lists, "context.category", &context.category)?;
        }
        let filters = req.filters.unwrap_or_default();
        self.check_filters(&lists, &filters)?;
        Ok(RecommendQuery {
            user_id: req.user_id,
            context,
            count: req.count,
            exclude: req.exclude_item_ids,
            filters,
            debug: req.debug,
        })
    }

    /// The request deadline: the budget, or the client's deadline less the
    /// reserve for building a fallback answer, whichever is sooner.
    fn deadline<T>(&self, req: &Request<T>) -> Deadline {
        let b = &self.config.budgets;
        let client = Deadline::from_metadata(req.metadata(), Duration::from_secs(3600)).remaining();
        Deadline::after(
            Budgets::ms(b.request_ms).min(client.saturating_sub(Budgets::ms(b.reserve_ms))),
        )
    }

    /// Categories whose popularity best fits a query without retrieval.
    fn fallback_categories<'a>(
        q: &'a RecommendQuery,
        profile: &'a pb::UserFeatures,
    ) -> Vec<&'a str> {
        let mut categories: Vec<&str> = Vec::new();
        if !q.context.category.is_empty() {
            categories.push(&q.context.category);
        }
        categories.extend(q.filters.categories.iter().map(String::as_str));
        if categories.is_empty() {
            categories.extend(profile.top_categories.iter().map(String::as_str));
        }
        categories
    }

    /// Applies the hard filters and cap in the gateway (the rerank fallback).
    fn gateway_rules(
        candidates: Vec<pb::Candidate>,
        count: u32,
        exclude: &[String],
        purchased: &[String],
        seen: &[u64],
        filters: &pb::Filters,
        cap: u32,
    ) -> Vec<pb::Candidate> {
        let rules = HardFilters {
            excluded: exclude.iter().map(String::as_str).collect(),
            purchased: purchased.iter().map(String::as_str).collect(),
            seen: seen.iter().copied().collect(),
            categories: filters.categories.iter().map(String::as_str).collect(),
            min_price: filters.min_price,
            max_price: filters.max_price,
        };
        let items: Vec<_> = candidates.iter().map(rule_item).collect();
        let (kept, _) = select(&items, &rules, count as usize, cap as usize);
        let mut slots: Vec<Option<pb::Candidate>> = candidates.into_iter().map(Some).collect();
        kept.into_iter().filter_map(|i| slots[i].take()).collect()
    }

    /// `user`'s assignments from the rules pushed with the current config
    /// version, when there are rules and none needs the experiments
    /// service (a running sticky experiment).
    fn assign_locally(
        &self,
        user: &str,
        deadline: &Deadline,
    ) -> Option<(Result<pb::AssignResponse, CallError>, pb::StageReport)> {
        let started = Instant::now();
        let pushed = self.rules.get()?;
        let rules = pushed.rules.as_ref()?;
        if recmesh_mesh::assign::needs_service(rules) {
            return None;
        }
        let (assignments, holdout) =
            recmesh_mesh::assign::assign(rules, user, experiments::now_ms(), |_| None, |_, _| {});
        metrics::counter!("recmesh_gateway_assign_local_total").increment(1);
        let report = pb::StageReport {
            stage: stage::ASSIGN.to_owned(),
            outcome: pb::StageOutcome::Ok as i32,
            budget_us: deadline
                .budget(Budgets::ms(self.config.budgets.assign_ms))
                .as_micros() as u32,
            latency_us: started.elapsed().as_micros() as u32,
            detail: format!(
                "assigned in the gateway from the pushed rules (config version {})",
                pushed.version
            ),
            ..Default::default()
        };
        let answer = pb::AssignResponse {
            assignments,
            config_version: pushed.version,
            holdout,
        };
        Some((Ok(answer), report))
    }

    /// Queues the exposure of an answer with assignments; never waits.
    fn log_exposure(
        &self,
        user: &str,
        response: &pb::RecommendResponse,
        user_events_7d: Option<u32>,
    ) {
        if let Some(queue) = &self.exposures
            && !response.assignments.is_empty()
        {
            experiments::queue_exposure(queue, user, response, user_events_7d);
        }
    }

    /// `SimilarItems` / `Trending`: one retrieval call, the gateway's rules,
    /// popularity when retrieval fails.
    async fn list_with_fallback(
        &self,
        deadline: Deadline,
        rid: &str,
        call: impl AsyncFnOnce(
            &mut RetrievalClient<Balanced>,
            Duration,
        ) -> Result<tonic::Response<pb::RetrieveResponse>, Status>,
        list: ListQuery<'_>,
    ) -> Result<pb::RecommendResponse, Status> {
        let mut retrieval = RetrievalClient::new(self.clients.retrieval.clone());
        let budget = Budgets::ms(self.config.budgets.retrieval_ms);
        let (answer, mut report) = run_stage(stage::RETRIEVAL, budget, &deadline, |t| {
            call(&mut retrieval, t)
        })
        .await;
        let candidates = match answer {
            Ok(r) => r.candidates,
            // The item or category does not exist: the client's mistake, not ours.
            Err(CallError::Status(s)) if s.code() == tonic::Code::NotFound => return Err(s),
            Err(_) => {
                fell_back(&mut report, fallback_name::POPULARITY);
                self.lists().list(list.fallback_category).to_vec()
            }
        };
        let finals = Self::gateway_rules(
            candidates,
            list.count,
            list.exclude,
            list.purchased,
            &[],
            list.filters,
            0,
        );
        let mut stages = list.earlier;
        stages.push(report);
        Ok(pb::RecommendResponse {
            request_id: rid.to_owned(),
            items: to_items(finals),
            degraded: stages.iter().any(|s| !s.fallback.is_empty()),
            stages,
            ..Default::default()
        })
    }
}

#[tonic::async_trait]
impl pb::gateway_server::Gateway for Gateway {
    async fn recommend(
        &self,
        request: Request<pb::RecommendRequest>,
    ) -> Result<Response<pb::RecommendResponse>, Status> {
        let deadline = self.deadline(&request);
        let rid = request_id(&request);
        let fresh = cache::wants_fresh(request.metadata());
        let q = self.validate(request.into_inner())?;

        let key = cache::query_key(&q.context, q.count, &q.exclude, &q.filters);
        let entry = self.cache.entry(&q.user_id).await;
        if fresh && !q.debug {
            metrics::counter!("recmesh_gateway_cache_total", "result" => "bypass").increment(1);
        } else if !q.debug {
            if let Some(hit) = entry.as_ref().and_then(|e| e.get(key)) {
                metrics::counter!("recmesh_gateway_cache_total", "result" => "hit").increment(1);
                let mut response = (*hit).clone();
                response.request_id = rid;
                response.cached = true;
                self.log_exposure(&q.user_id, &response, None);
                return Ok(Response::new(response));
            }
            metrics::counter!("recmesh_gateway_cache_total", "result" => "miss").increment(1);
        }

        let (response, variant_ttl, events_7d) = self.recommend_pipeline(&q, deadline, &rid).await;
        self.log_exposure(&q.user_id, &response, events_7d);
        metrics::counter!("recmesh_gateway_recommend_total", "degraded" => if response.degraded { "true" } else { "false" })
            .increment(1);
        // Degraded answers are not cached: the next request should get the
        // real thing as soon as the stage is back.
        if !response.degraded
            && !q.debug
            && variant_ttl != Some(Duration::ZERO)
            && let Some(e) = entry
        {
            e.put(key, Arc::new(response.clone()), variant_ttl);
        }
        Ok(Response::new(response))
    }

    async fn similar_items(
        &self,
        request: Request<pb::SimilarItemsRequest>,
    ) -> Result<Response<pb::RecommendResponse>, Status> {
        let deadline = self.deadline(&request);
        let rid = request_id(&request);
        let req = request.into_inner();
        check_id("item_id", &req.item_id)?;
        if !req.user_id.is_empty() {
            check_id("user_id", &req.user_id)?;
        }
        self.check_count(req.count)?;
        self.check_exclusions(&req.exclude_item_ids)?;
        let filters = req.filters.clone().unwrap_or_default();
        self.check_filters(&self.lists(), &filters)?;
        let mut exclude = req.exclude_item_ids.clone();
        exclude.push(req.item_id.clone());
        // A named user never sees what they already bought.
        let mut earlier = Vec::new();
        let mut purchased = Vec::new();
        if !req.user_id.is_empty() {
            let features = &self.clients.features;
            let user_req = pb::GetUserRequest {
                user_id: req.user_id.clone(),
                max_recent: 0,
            };
            let budget = Budgets::ms(self.config.budgets.features_ms);
            let (user, mut report) = run_stage_retrying(
                stage::FEATURES,
                budget,
                &deadline,
                &self.config.retry,
                |t| {
                    let (mut c, r) = (features.clone(), user_req.clone());
                    let rid = rid.as_str();
                    async move { c.get_user(outgoing(r, t, rid)).await }
                },
            )
            .await;
            match user {
                Ok(u) => purchased = u.purchased_item_ids,
                Err(_) => fell_back(&mut report, fallback_name::ANONYMOUS),
            }
            earlier.push(report);
        }
        let similar = pb::SimilarRequest {
            item_id: req.item_id.clone(),
            // Ask for more than needed: the gateway's rules may drop some.
            count: req.count.saturating_mul(2),
            exclude_item_ids: req.exclude_item_ids.clone(),
            filters: req.filters.clone(),
        };
        let response = self
            .list_with_fallback(
                deadline,
                &rid,
                async |c, t| c.similar(outgoing(similar, t, &rid)).await,
                ListQuery {
                    fallback_category: None,
                    count: req.count,
                    exclude: &exclude,
                    purchased: &purchased,
                    filters: &filters,
                    earlier,
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn trending(
        &self,
        request: Request<pb::TrendingRequest>,
    ) -> Result<Response<pb::RecommendResponse>, Status> {
        let deadline = self.deadline(&request);
        let rid = request_id(&request);
        let req = request.into_inner();
        self.check_count(req.count)?;
        let category = (!req.category.is_empty()).then_some(req.category.as_str());
        if let Some(c) = category {
            self.check_category(&self.lists(), "category", c)?;
        }
        let trending = pb::PopularRequest {
            category: req.category.clone(),
            count: req.count.saturating_mul(2),
            per_category: 0,
        };
        let response = self
            .list_with_fallback(
                deadline,
                &rid,
                async |c, t| c.trending(outgoing(trending, t, &rid)).await,
                ListQuery {
                    fallback_category: category,
                    count: req.count,
                    exclude: &[],
                    purchased: &[],
                    filters: &pb::Filters::default(),
                    earlier: Vec::new(),
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn track(
        &self,
        request: Request<pb::TrackRequest>,
    ) -> Result<Response<pb::TrackResponse>, Status> {
        let rid = request_id(&request);
        let deadline = Deadline::from_metadata(
            request.metadata(),
            Budgets::ms(self.config.budgets.track_ms),
        );
        let req = request.into_inner();
        check_id("event_id", &req.event_id)?;
        check_id("user_id", &req.user_id)?;
        check_id("item_id", &req.item_id)?;
        if event_kind(req.event_type).is_none() {
            return Err(FieldError::new(
                "event_type",
                "must be VIEW, CLICK, ADD_TO_CART or PURCHASE",
            )
            .into());
        }
        let ingest = pb::IngestRequest {
            events: vec![pb::Event {
                event_id: req.event_id,
                user_id: req.user_id.clone(),
                item_id: req.item_id,
                event_type: req.event_type,
                timestamp_ms: req.timestamp_ms,
            }],
        };
        let mut features = self.clients.features.clone();
        match bounded(deadline.remaining(), |t| {
            features.ingest(outgoing(ingest, t, &rid))
        })
        .await
        {
            Ok(r) => {
                // The user's next Recommend must reflect the event.
                self.cache.invalidate(&req.user_id).await;
                Ok(Response::new(pb::TrackResponse {
                    applied: r.applied == 1,
                    buffered: r.buffered == 1,
                    new_item: !r.new_items.is_empty(),
                }))
            }
            // Field errors come back as `events[0].<field>: ...`; the client sent `<field>`.
            Err(CallError::Status(s)) if s.code() == tonic::Code::InvalidArgument => Err(
                Status::invalid_argument(s.message().trim_start_matches("events[0].")),
            ),
            Err(e) => Err(Status::unavailable(format!(
                "event not recorded ({e}); retry with the same event_id"
            ))),
        }
    }
}

/// The gateway server over `data` (for the fallback lists), ready to start or
/// run. Must be called inside a Tokio runtime (it starts the list refresh).
pub fn server(config: Config, data: &Dataset) -> Result<GrpcServer, recmesh_mesh::AddressError> {
    let server_config = config.server.clone();
    Ok(GrpcServer::new("gateway", server_config)
        .add_service(GatewayServer::new(Gateway::new(config, data)?)))
}

/// Loads the data, serves until `shutdown`, then drains.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let data = config.data.load()?;
    server(config, &data)?.run(shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_candidates_shrink_in_proportion_with_a_floor() {
        assert_eq!(adaptive_candidates(200, 10, 32, 50), 200, "below soft: all");
        assert_eq!(adaptive_candidates(200, 32, 32, 50), 200);
        assert_eq!(
            adaptive_candidates(200, 64, 32, 50),
            100,
            "twice the load: half"
        );
        assert_eq!(
            adaptive_candidates(200, 1000, 32, 50),
            50,
            "never below the floor"
        );
        assert_eq!(
            adaptive_candidates(30, 1000, 32, 50),
            30,
            "nor above what was asked"
        );
    }

    #[test]
    fn defaults_are_valid() {
        let c: Config = recmesh_server::config::load(None).expect("defaults load");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn a_bad_seen_policy_is_a_config_error_naming_the_key() {
        use recmesh_server::ServiceConfig;
        let mut c = Config::default();
        c.seen.kinds = "view,likes".into();
        let e = c.validate().expect_err("unknown kind").to_string();
        assert!(e.contains("seen.kinds") && e.contains("likes"), "{e}");
        let mut c = Config::default();
        c.seen.window_s = 400 * 86_400;
        let e = c.validate().expect_err("past a year").to_string();
        assert!(e.contains("seen.window_s"), "{e}");
        let mut c = Config::default();
        c.seen.kinds = "click, add_to_cart".into();
        assert_eq!(c.seen.policy().expect("valid").kinds, 0b0110);
    }
}

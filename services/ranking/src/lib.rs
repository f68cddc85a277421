//! Ranking service: orders candidates by how likely the user is to engage.
//!
//! One call to the features service fetches the item features of every
//! candidate and of the user's recent items, under its own budget inside the
//! caller's deadline. A cache with a TTL and a size bound (`item_cache`) sits
//! in front of it, so repeated candidates cost nothing. From those come each
//! candidate's row of named features (`recmesh_algo::ranking`): retrieval
//! scores by source, item popularity, CTR, price, age and promotion, the
//! user's affinity to the item's category, price fit, and user activity.
//!
//! The model is a LightGBM text model when `model_path` names one, or the
//! ranker of the current model bundle when `bundle_dir` is set (evaluated
//! natively, `recmesh_algo::gbdt`). Otherwise it is the documented baseline
//! formula (`recmesh_algo::scoring`) until the trainer's bundle ships a model.
//! When features are missing or late, the service still answers: it scores
//! with what it has and says so (`degraded`, `detail`, and `+no-features` in
//! the model version).

#![forbid(unsafe_code)]

mod item_cache;
mod scorer;
#[cfg(test)]
mod tests;

use item_cache::Lookup;
pub use scorer::{
    Fetched, ItemFeatureMap, ItemFeatureSource, Listed, RankInput, Scorer, feature_rows,
};
use scorer::{load_model, model_stamp};

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use recmesh_mesh::balance::{BalanceConfig, Balanced, Source};
use recmesh_mesh::convert::{FieldError, check_id};
use recmesh_mesh::lean::Candidates;
use recmesh_mesh::{Deadline, bounded, outgoing, request_id};
use recmesh_proto::v1::{
    self as pb, features_client::FeaturesClient, ranking_server::RankingServer,
};
use recmesh_server::GrpcServer;
use recmesh_server::config::{ConfigError, ServerConfig, ServiceConfig, at_least_one};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

/// Default gRPC port of the ranking service.
pub const DEFAULT_PORT: u16 = 50053;

/// Version string of the baseline model.
pub const BASELINE_VERSION: &str = "baseline-1";

/// Configuration of the ranking service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC and admin server.
    pub server: ServerConfig,
    /// Address of the features service: `http://host:port[,…]`,
    /// `dns://host:port` (every address the name resolves to, re-resolved)
    /// or `consul://service` (its passing instances).
    pub features_addr: String,
    /// Balancing over the features instances (as the gateway's `balance`).
    pub balance: BalanceConfig,
    /// Budget of the batched item-features call, inside the caller's deadline.
    pub features_budget_ms: u64,
    /// Time kept back from the caller's deadline for scoring and the answer.
    pub scoring_reserve_ms: u64,
    /// Most candidates one request may carry.
    pub max_candidates: usize,
    /// LightGBM text model to score with (`booster.save_model(...)`); empty:
    /// the baseline formula.
    pub model_path: String,
    /// How long fetched item features are reused before being fetched again.
    pub item_cache_ttl_ms: u64,
    /// How long past that TTL they are still used while one background
    /// fetch refreshes them (0: an expired item is fetched inline, on the
    /// request's time). Items fetched together expire together; without
    /// this, a restart's refill came back as a burst of full fetches one
    /// TTL later.
    pub item_cache_max_stale_ms: u64,
    /// Most items whose features are cached.
    pub item_cache_size: u64,
    /// Root of the trainer's published bundles: with `model_path` empty, the
    /// model is `bundle_dir/current/ranker.txt`, followed as bundles are
    /// published (the baseline until a bundle with a ranker exists).
    pub bundle_dir: String,
    /// How often the model file is checked for a newer model (0: never). A
    /// newer model is swapped in without a restart; one that does not load
    /// is refused and the current model keeps serving.
    pub model_reload_ms: u64,
    /// More models by name (LightGBM text files), for experiments: a variant
    /// with `ranking.model = "<name>"` is scored by that model, `baseline`
    /// by the baseline formula. An unknown name is scored by the default
    /// model (the answer's `model_version` says which ran) and counted.
    pub models: std::collections::BTreeMap<String, String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::on_port(DEFAULT_PORT),
            // The features service's default address (see its DEFAULT_PORT).
            features_addr: "http://127.0.0.1:50056".into(),
            balance: BalanceConfig::default(),
            // A batched in-memory lookup takes well under 5 ms; 20 leaves room
            // for a Redis round trip in production.
            features_budget_ms: 20,
            // Scoring 500 candidates takes well under 2 ms (docs/performance.md).
            scoring_reserve_ms: 2,
            max_candidates: 2_000,
            model_path: String::new(),
            bundle_dir: String::new(),
            // Counters and stock move slowly compared with a request; 5 s of
            // staleness is invisible, and the cache absorbs the hot items.
            item_cache_ttl_ms: 5_000,
            // A minute of counters at worst, and only while the features
            // service does not answer the refresh.
            item_cache_max_stale_ms: 60_000,
            // About 100 bytes an entry: ~10 MB at the bound.
            item_cache_size: 100_000,
            // A new model shows within seconds; a stat() every 2 s costs nothing.
            model_reload_ms: 2_000,
            models: std::collections::BTreeMap::new(),
        }
    }
}

impl Config {
    /// The model file served: `model_path`, else the current bundle's
    /// ranker when `bundle_dir` is set; empty for the baseline.
    pub fn model_file(&self) -> String {
        if self.model_path.is_empty() && !self.bundle_dir.is_empty() {
            recmesh_catalog::bundle::current_ranker(std::path::Path::new(&self.bundle_dir))
                .display()
                .to_string()
        } else {
            self.model_path.clone()
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        at_least_one(&[
            ("features_budget_ms", self.features_budget_ms),
            ("max_candidates", self.max_candidates as u64),
        ])?;
        Source::parse("features_addr", &self.features_addr)?;
        self.balance.validate("balance")?;
        if !self.model_path.is_empty() {
            load_model(&self.model_path)?;
        }
        if self.model_path.is_empty() && !self.bundle_dir.is_empty() {
            let file = self.model_file();
            if std::path::Path::new(&file).exists() {
                load_model(&file).map_err(|e| ConfigError::invalid("bundle_dir", e.to_string()))?;
            }
        }
        for (name, path) in &self.models {
            if name == "baseline"
                || name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(ConfigError::invalid(
                    format!("models.{name}"),
                    "names are [A-Za-z0-9-_.], and `baseline` is built in",
                ));
            }
            load_model(path)
                .map_err(|e| ConfigError::invalid(format!("models.{name}"), e.to_string()))?;
        }
        Ok(())
    }
}

/// The ranking gRPC service.
#[derive(Debug, Clone)]
pub struct RankingService {
    features: FeaturesClient<Balanced>,
    config: Arc<Config>,
    /// The current model; swapped whole when `model_path` changes.
    scorer: Arc<std::sync::RwLock<Arc<Scorer>>>,
    /// (modified time, length) of the model file the scorer was loaded from.
    loaded: Arc<std::sync::Mutex<Option<(std::time::SystemTime, u64)>>>,
    /// Models a request can ask for by name (`baseline` included).
    named: Arc<HashMap<String, Arc<Scorer>>>,
    cache: Arc<item_cache::ItemCache>,
    /// Item fetches in flight, shared by concurrent requests.
    fetches: Arc<item_cache::Fetches>,
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl RankingService {
    /// A service that fetches features through `features`, scoring with the
    /// model of `config.model_path` (or the baseline).
    pub fn new(config: Config, features: Balanced) -> Result<Self, ConfigError> {
        let file = config.model_file();
        // A bundle without a ranker (yet) serves the baseline.
        let file = if model_stamp(&file).is_some() || !config.model_path.is_empty() {
            file
        } else {
            String::new()
        };
        let loaded = model_stamp(&file);
        let scorer = Scorer::new(&file)?;
        if let Some(m) = &scorer.model {
            tracing::info!(version = %scorer.version, trees = m.gbdt.trees(), "ranking model loaded");
        }
        metrics::gauge!("recmesh_ranking_model_info", "version" => scorer.version.to_string())
            .set(1.0);
        let cache = Arc::new(item_cache::ItemCache::new(
            config.item_cache_size,
            Duration::from_millis(config.item_cache_ttl_ms.max(1)),
            Duration::from_millis(config.item_cache_max_stale_ms),
        ));
        let mut named = HashMap::new();
        named.insert("baseline".to_owned(), Arc::new(Scorer::new("")?));
        for (name, path) in &config.models {
            let s = Scorer::new(path)
                .map_err(|e| ConfigError::invalid(format!("models.{name}"), e.to_string()))?;
            tracing::info!(%name, version = %s.version, "named ranking model loaded");
            named.insert(name.clone(), Arc::new(s));
        }
        Ok(RankingService {
            features: FeaturesClient::new(features),
            config: Arc::new(config),
            scorer: Arc::new(std::sync::RwLock::new(Arc::new(scorer))),
            loaded: Arc::new(std::sync::Mutex::new(loaded)),
            named: Arc::new(named),
            cache,
            fetches: Arc::new(item_cache::Fetches::default()),
        })
    }

    /// The model a request asked for: by name, or the default for "" and
    /// for a name this service does not have (counted).
    pub fn scorer_for(&self, name: &str) -> Arc<Scorer> {
        if name.is_empty() {
            return self.scorer();
        }
        match self.named.get(name) {
            Some(s) => s.clone(),
            None => {
                metrics::counter!("recmesh_ranking_unknown_model_total").increment(1);
                tracing::debug!(model = name, "unknown model asked for; the default scores");
                self.scorer()
            }
        }
    }

    /// The model serving now.
    pub fn scorer(&self) -> Arc<Scorer> {
        self.scorer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Loads `model_path` again if the file changed since the last load.
    /// Returns the new version when a model was swapped in; a model that
    /// does not load is an error and changes nothing.
    pub fn reload_if_changed(&self) -> Result<Option<String>, ConfigError> {
        let path = &self.config.model_file();
        if path.is_empty() {
            return Ok(None);
        }
        let stamp = model_stamp(path);
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if stamp.is_none() || stamp == *loaded {
            return Ok(None);
        }
        // Remember the attempt either way: a broken file is reported once,
        // not every poll, and a fixed one is picked up when it changes again.
        *loaded = stamp;
        let scorer = Scorer::new(path)?;
        let version = scorer.version.to_string();
        let old = std::mem::replace(
            &mut *self.scorer.write().unwrap_or_else(|p| p.into_inner()),
            Arc::new(scorer),
        );
        metrics::gauge!("recmesh_ranking_model_info", "version" => old.version.to_string())
            .set(0.0);
        metrics::gauge!("recmesh_ranking_model_info", "version" => version.clone()).set(1.0);
        Ok(Some(version))
    }

    /// Polls `model_path` every `model_reload_ms` while the service lives.
    fn spawn_model_watch(&self) {
        let every = self.config.model_reload_ms;
        if every == 0 || self.config.model_file().is_empty() {
            return;
        }
        let svc = self.clone();
        recmesh_server::spawn_reload_watch(
            "ranking model",
            Duration::from_millis(every),
            Arc::downgrade(&self.scorer),
            move || svc.reload_if_changed(),
            |outcome| {
                metrics::counter!("recmesh_ranking_model_reload_total", "outcome" => outcome)
                    .increment(1);
            },
        );
    }

    /// Checks the request: the user id, and a list within bounds whose
    /// every array and position is in range (refused naming the field).
    fn validate(&self, req: &mut pb::RankRequest) -> Result<Candidates, FieldError> {
        check_id("user_id", &req.user_id)?;
        let list = Candidates::new(req.candidates.take().unwrap_or_default(), "candidates")?;
        if list.len() > self.config.max_candidates {
            return Err(FieldError::new(
                "candidates",
                format!("at most {} candidates per call", self.config.max_candidates),
            ));
        }
        Ok(list)
    }

    /// `Rank`: the candidates in the model's order, each with its score
    /// and the freshest attributes in place of what retrieval knew.
    pub async fn rank_list(
        &self,
        request: Request<pb::RankRequest>,
    ) -> Result<pb::RankResponse, Status> {
        let deadline =
            Deadline::from_metadata(request.metadata(), self.config.server.request_timeout());
        let rid = request_id(&request);
        let mut req = request.into_inner();
        let list = self.validate(&mut req)?;
        let (features, missing) = self
            .item_features(&list, &req.recent, &deadline, &rid)
            .await;
        let scorer = self.scorer_for(&req.model);
        let ranked = scorer.rank(&list, &req.recent, &features, now_s());
        let version = match &missing {
            None => scorer.version.to_string(),
            Some(_) => format!("{}+no-features", scorer.version),
        };
        metrics::counter!("recmesh_ranking_scored_total", "model" => version.clone())
            .increment(list.len() as u64);
        Ok(pb::RankResponse {
            candidates: Some(ranked),
            model_version: version,
            degraded: missing.is_some(),
            detail: missing.unwrap_or_default(),
        })
    }

    /// Item features of `list`'s candidates and of the `recent` items, by
    /// position: from the cache, the rest in one call. Returns them and why
    /// some are missing (None: nothing missing).
    async fn item_features(
        &self,
        list: &Candidates,
        recent: &[pb::Interaction],
        deadline: &Deadline,
        rid: &str,
    ) -> (Fetched, Option<String>) {
        let ids: Vec<&str> = list
            .ids()
            .chain(recent.iter().map(|r| r.item_id.as_str()))
            .collect();
        let mut out = Fetched {
            items: Vec::with_capacity(ids.len()),
            candidates: list.len(),
        };
        let mut asked = std::collections::HashSet::<&str, foldhash::fast::RandomState>::default();
        let (mut missing, mut refresh) = (Vec::new(), Vec::new());
        let (mut hits, mut stale) = (0, 0);
        let now = std::time::Instant::now();
        for &id in &ids {
            let slot = match self.cache.get_at(id, now) {
                Lookup::Fresh(f) => {
                    hits += 1;
                    Some(f)
                }
                Lookup::Stale {
                    features,
                    refresh: mine,
                } => {
                    stale += 1;
                    if mine {
                        refresh.push(id.to_owned());
                    }
                    Some(features)
                }
                Lookup::Miss => {
                    if asked.insert(id) {
                        missing.push(id.to_owned());
                    }
                    None
                }
            };
            out.items.push(slot);
        }
        metrics::counter!("recmesh_ranking_item_cache_total", "result" => "hit").increment(hits);
        metrics::counter!("recmesh_ranking_item_cache_total", "result" => "stale").increment(stale);
        metrics::counter!("recmesh_ranking_item_cache_total", "result" => "miss")
            .increment(missing.len() as u64);
        if !refresh.is_empty() {
            self.refresh_in_background(refresh, rid);
        }
        if missing.is_empty() {
            return (out, None);
        }
        // The slow path: what the features service sends, by id, then put
        // in the positions that missed.
        let mut found = ItemFeatureMap::with_capacity_and_hasher(missing.len(), Default::default());
        let reserve = Duration::from_millis(self.config.scoring_reserve_ms);
        let budget = deadline
            .budget(Duration::from_millis(self.config.features_budget_ms))
            .min(deadline.remaining().saturating_sub(reserve));
        // Items another request is fetching now are waited for, not asked
        // for again (`item_cache::Fetches`).
        let (mut owned, awaited, theirs) = self.fetches.split(missing);
        metrics::counter!("recmesh_ranking_item_cache_total", "result" => "shared")
            .increment(theirs.len() as u64);
        let mut client = self.features.clone();
        let cache = &self.cache;
        let fetch = async move {
            if owned.ids.is_empty() {
                return Ok(Vec::new());
            }
            let req = pb::GetItemsRequest {
                item_ids: owned.ids.clone(),
            };
            let got = bounded(budget, |t| client.get_items(outgoing(req, t, rid)))
                .await
                .map(|resp| resp.items.into_iter().map(Arc::new).collect::<Vec<_>>());
            match &got {
                // Stored before `owned` is dropped, so its waiters find them.
                Ok(items) => {
                    for f in items {
                        cache.insert(f.item_id.clone(), f.clone());
                    }
                    owned.answered();
                }
                Err(e) => owned.failed(e.to_string()),
            }
            drop(owned);
            got
        };
        let wait = recmesh_mesh::timer::timeout(budget, async {
            let mut failed = None;
            for a in awaited {
                if let Some(reason) = a.ended().await {
                    failed = Some(reason);
                }
            }
            failed
        });
        let (fetched, waited) = tokio::join!(fetch, wait);
        let mut missing = Vec::new();
        match fetched {
            Ok(items) => {
                for f in items {
                    found.insert(f.item_id.clone(), f);
                }
            }
            Err(e) => {
                metrics::counter!("recmesh_ranking_features_fallback_total", "outcome" => e.outcome())
                    .increment(1);
                tracing::warn!(error = %e, "item features unavailable; scoring without them");
                missing.push(format!("item features unavailable ({e})"));
            }
        }
        let mut absent = Vec::new();
        for id in theirs {
            match self.cache.get(&id) {
                Lookup::Fresh(f) | Lookup::Stale { features: f, .. } => {
                    found.insert(id, f);
                }
                Lookup::Miss => absent.push(id),
            }
        }
        // The other request's fetch failed or was cancelled: fetch those
        // items here if time is left, as without the sharing.
        let mut waited = waited;
        let left = deadline.remaining().saturating_sub(reserve).min(budget);
        if matches!(waited, Ok(Some(_))) && !absent.is_empty() && left >= Duration::from_millis(1) {
            let mut client = self.features.clone();
            let req = pb::GetItemsRequest { item_ids: absent };
            if let Ok(resp) = bounded(left, |t| client.get_items(outgoing(req, t, rid))).await {
                for f in resp.items {
                    let f = Arc::new(f);
                    self.cache.insert(f.item_id.clone(), f.clone());
                    found.insert(f.item_id.clone(), f);
                }
                waited = Ok(None);
            }
        }
        if !matches!(waited, Ok(None)) {
            metrics::counter!("recmesh_ranking_features_fallback_total", "outcome" => "shared")
                .increment(1);
        }
        match waited {
            Ok(None) => {}
            Ok(Some(reason)) => missing.push(format!(
                "item features fetched by a concurrent request unavailable ({reason})"
            )),
            Err(_) => missing.push(format!(
                "item features a concurrent request was fetching did not come within {} ms",
                budget.as_millis()
            )),
        }
        for (slot, id) in out.items.iter_mut().zip(&ids) {
            if slot.is_none() {
                *slot = found.get(*id).cloned();
            }
        }
        if missing.is_empty() {
            (out, None)
        } else {
            (
                out,
                Some(format!("{}; scored without them", missing.join("; "))),
            )
        }
    }

    /// Fetches `ids` again after their TTL, off the request path, under the
    /// features budget; the answers replace the stale entries. A failed
    /// refresh leaves them stale (each is claimed again a TTL later) and is
    /// counted.
    fn refresh_in_background(&self, ids: Vec<String>, rid: &str) {
        let (mut client, cache) = (self.features.clone(), self.cache.clone());
        let budget = Duration::from_millis(self.config.features_budget_ms);
        let rid = rid.to_owned();
        tokio::spawn(async move {
            let req = pb::GetItemsRequest { item_ids: ids };
            let outcome = match bounded(budget, |t| client.get_items(outgoing(req, t, &rid))).await
            {
                Ok(resp) => {
                    for f in resp.items {
                        cache.insert(f.item_id.clone(), Arc::new(f));
                    }
                    "ok"
                }
                Err(e) => {
                    tracing::debug!(error = %e, "item features refresh failed; stale ones stay in use");
                    e.outcome()
                }
            };
            metrics::counter!("recmesh_ranking_item_refresh_total", "outcome" => outcome)
                .increment(1);
        });
    }
}

#[tonic::async_trait]
impl pb::ranking_server::Ranking for RankingService {
    async fn rank(
        &self,
        request: Request<pb::RankRequest>,
    ) -> Result<Response<pb::RankResponse>, Status> {
        self.rank_list(request).await.map(Response::new)
    }
}

/// The ranking server, ready to start or run.
pub fn server(config: Config) -> Result<GrpcServer, ConfigError> {
    let features = Balanced::new("features_addr", &config.features_addr, &config.balance)?;
    let service = RankingService::new(config.clone(), features)?;
    service.spawn_model_watch();
    Ok(GrpcServer::new("ranking", config.server.clone()).add_service(RankingServer::new(service)))
}

/// Serves until `shutdown`, then drains.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    server(config)?.run(shutdown).await?;
    Ok(())
}

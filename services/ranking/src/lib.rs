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

use item_cache::Lookup;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use recmesh_algo::gbdt::GbdtModel;
use recmesh_algo::ranking::{self, CandidateSignals, ItemSignals, UserSignals};
use recmesh_algo::scoring::{BaselineInput, BaselineWeights, baseline_scores};
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

/// A loaded LightGBM model and where its features sit in a feature row.
#[derive(Debug)]
struct LearnedModel {
    gbdt: GbdtModel,
    columns: Vec<usize>,
}

/// Loads and checks a LightGBM model file; errors name `model_path`.
fn load_model(path: &str) -> Result<(LearnedModel, String), ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::invalid("model_path", format!("{path}: {e}")))?;
    let stem = std::path::Path::new(path)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("model");
    parse_model(&text, stem, path)
}

/// Parses a LightGBM text model and maps its features onto recmesh's rows;
/// `origin` names the source in errors.
fn parse_model(
    text: &str,
    name: &str,
    origin: &str,
) -> Result<(LearnedModel, String), ConfigError> {
    let gbdt = GbdtModel::from_lightgbm(text)
        .map_err(|e| ConfigError::invalid("model_path", format!("{origin}: {e}")))?;
    let columns = ranking::column_map(&gbdt.feature_names).map_err(|feature| {
        ConfigError::invalid(
            "model_path",
            format!(
                "{origin} uses feature `{feature}`, which recmesh does not produce; available: {}",
                ranking::FEATURE_NAMES.join(", ")
            ),
        )
    })?;
    let version = format!(
        "lightgbm-{name}-{:08x}",
        recmesh_algo::assign::fnv1a64(text.as_bytes()) as u32
    );
    Ok((LearnedModel { gbdt, columns }, version))
}

/// (modified time, length) of the model file, to notice a new one.
fn model_stamp(path: &str) -> Option<(std::time::SystemTime, u64)> {
    if path.is_empty() {
        return None;
    }
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Item features by item id, as ranking fetched them for one call. Hashed
/// with foldhash: hundreds of lookups per call, and SipHash showed in the
/// profile (keys are seeded per map, as with the standard hasher).
pub type ItemFeatureMap = HashMap<String, Arc<pb::ItemFeatures>, foldhash::fast::RandomState>;

/// The feature rows ([`ranking::FEATURE_NAMES`] order) of `candidates`, given
/// the user's recent interactions and the fetched item features. Serving and
/// training both build rows here, so a model sees at serving time exactly
/// the features it was trained on.
pub fn feature_rows(
    candidates: &[impl RankInput],
    recent: &[pb::Interaction],
    features: &ItemFeatureMap,
    now_s: i64,
) -> Vec<[f64; ranking::FEATURES]> {
    let user = UserSignals::from_recent(recent.iter().filter_map(|r| {
        let a = features.get(&r.item_id)?.attributes.as_ref()?;
        Some((a.category.as_str(), a.price))
    }));
    candidates
        .iter()
        .map(|c| {
            let item = features
                .get(c.item_id())
                .and_then(|f| item_signals(f, now_s));
            ranking::row(&c.signals(), item.as_ref(), &user)
        })
        .collect()
}

/// The model half of ranking, usable without a server: the offline
/// evaluation scores with exactly what the service serves.
#[derive(Debug, Clone)]
pub struct Scorer {
    model: Option<Arc<LearnedModel>>,
    version: Arc<str>,
}

impl Scorer {
    /// The LightGBM model at `model_path`, or the baseline when it is empty.
    pub fn new(model_path: &str) -> Result<Self, ConfigError> {
        let (model, version) = if model_path.is_empty() {
            (None, BASELINE_VERSION.to_owned())
        } else {
            let (m, v) = load_model(model_path)?;
            (Some(Arc::new(m)), v)
        };
        Ok(Scorer {
            model,
            version: Arc::from(version),
        })
    }

    /// A scorer for a LightGBM text model held in memory (the trainer's
    /// freshly trained ranker); `name` goes into the version string.
    pub fn from_lightgbm_text(text: &str, name: &str) -> Result<Self, ConfigError> {
        let (model, version) = parse_model(text, name, "model")?;
        Ok(Scorer {
            model: Some(Arc::new(model)),
            version: Arc::from(version),
        })
    }

    /// The model's version string.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Scores and orders `candidates` given the fetched features.
    pub fn score(
        &self,
        mut candidates: Vec<pb::Candidate>,
        recent: &[pb::Interaction],
        features: &ItemFeatureMap,
        now_s: i64,
    ) -> Vec<pb::Candidate> {
        let scores = self.scores(&candidates, recent, features, now_s);
        for (c, s) in candidates.iter_mut().zip(scores) {
            c.score = s;
            if let Some(a) = fresh_attributes(features, &c.item_id) {
                c.attributes = Some(a.clone());
            }
        }
        candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
        candidates
    }

    /// `list` ordered by the model's score (stable: equal scores keep
    /// retrieval's order), each candidate with that score and the freshest
    /// attributes in `features`; every other field as it came.
    pub fn rank(
        &self,
        list: &Candidates,
        recent: &[pb::Interaction],
        features: &ItemFeatureMap,
        now_s: i64,
    ) -> pb::CandidateList {
        let scores = self.scores(&Listed::all(list), recent, features, now_s);
        let mut order: Vec<usize> = (0..list.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        let sorted: Vec<f64> = order.iter().map(|&k| scores[k]).collect();
        list.reordered(&order, &sorted, |id| fresh_attributes(features, id))
    }

    /// The model's score of each of `candidates`, in their order.
    pub fn scores(
        &self,
        candidates: &[impl RankInput],
        recent: &[pb::Interaction],
        features: &ItemFeatureMap,
        now_s: i64,
    ) -> Vec<f64> {
        match &self.model {
            Some(m) => {
                // One buffer for the model's columns, reused for every candidate.
                let mut row = vec![0.0; m.columns.len()];
                feature_rows(candidates, recent, features, now_s)
                    .iter()
                    .map(|full| {
                        for (slot, &col) in row.iter_mut().zip(&m.columns) {
                            *slot = full[col];
                        }
                        m.gbdt.predict(&row)
                    })
                    .collect()
            }
            None => {
                let sources: std::collections::HashSet<&str> =
                    candidates.iter().flat_map(|c| c.source_names()).collect();
                let inputs: Vec<BaselineInput> = candidates
                    .iter()
                    .map(|c| {
                        let signals = c.signals();
                        BaselineInput {
                            retrieval_score: signals.retrieval_score,
                            popularity: features.get(c.item_id()).map_or(0.0, |f| f.popularity),
                            sources: signals.sources,
                        }
                    })
                    .collect();
                baseline_scores(&inputs, sources.len(), BaselineWeights::default())
            }
        }
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

/// Fresh attributes (stock above all) from the features service win over
/// what retrieval knew.
fn fresh_attributes<'a>(features: &'a ItemFeatureMap, id: &str) -> Option<&'a pb::ItemAttributes> {
    features.get(id)?.attributes.as_ref()
}

/// What scoring reads of a candidate: the generated type (the trainer, and
/// tests), or a view of its encoded bytes (the service). Both give the same
/// signals, so the model sees at serving time what it was trained on.
pub trait RankInput {
    /// The candidate's item.
    fn item_id(&self) -> &str;
    /// Retrieval's score and its score per source.
    fn signals(&self) -> CandidateSignals;
    /// The sources that found it.
    fn source_names(&self) -> impl Iterator<Item = &str>;
}

fn candidate_signals(score: f64, source: impl Fn(&str) -> f64, sources: usize) -> CandidateSignals {
    CandidateSignals {
        retrieval_score: score,
        cf: source("cf"),
        anchor: source("anchor"),
        popular: source("popular"),
        ann: source("ann"),
        content: source("content"),
        sources: sources.max(1),
    }
}

impl RankInput for pb::Candidate {
    fn item_id(&self) -> &str {
        &self.item_id
    }

    fn signals(&self) -> CandidateSignals {
        let s = |name: &str| self.source_scores.get(name).copied().unwrap_or(0.0);
        candidate_signals(self.score, s, self.source_scores.len())
    }

    fn source_names(&self) -> impl Iterator<Item = &str> {
        self.source_scores.keys().map(String::as_str)
    }
}

/// Candidate `k` of a lean list, as the service scores it.
#[derive(Debug, Clone, Copy)]
pub struct Listed<'a> {
    list: &'a Candidates,
    k: usize,
}

impl<'a> Listed<'a> {
    /// Every candidate of `list`, in order.
    pub fn all(list: &'a Candidates) -> Vec<Listed<'a>> {
        (0..list.len()).map(|k| Listed { list, k }).collect()
    }
}

impl RankInput for Listed<'_> {
    fn item_id(&self) -> &str {
        self.list.id(self.k)
    }

    fn signals(&self) -> CandidateSignals {
        let (list, k) = (self.list, self.k);
        candidate_signals(
            list.score(k),
            |name| list.source_score(k, name),
            list.source_count(k),
        )
    }

    fn source_names(&self) -> impl Iterator<Item = &str> {
        self.list.source_scores(self.k).map(|(s, _)| s)
    }
}

fn item_signals(f: &pb::ItemFeatures, now_s: i64) -> Option<ItemSignals<'_>> {
    let a = f.attributes.as_ref()?;
    Some(ItemSignals {
        category: &a.category,
        popularity: f.popularity,
        ctr: if f.views > 0 {
            f.clicks as f64 / f.views as f64
        } else {
            0.0
        },
        price: a.price,
        age_days: ((now_s - a.created_at).max(0) as f64) / 86_400.0,
        promoted: a.promoted,
    })
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
        let ids = list
            .ids()
            .chain(req.recent.iter().map(|r| r.item_id.as_str()));
        let (features, missing) = self.item_features(ids, &deadline, &rid).await;
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

    /// Item features for `ids` (repeats allowed): from the cache, the rest in
    /// one call. Returns the features found and why some are missing (None:
    /// nothing missing).
    async fn item_features(
        &self,
        ids: impl Iterator<Item = &str>,
        deadline: &Deadline,
        rid: &str,
    ) -> (ItemFeatureMap, Option<String>) {
        let mut found = ItemFeatureMap::with_capacity_and_hasher(256, Default::default());
        let mut asked = std::collections::HashSet::<&str, foldhash::fast::RandomState>::default();
        let (mut missing, mut refresh) = (Vec::new(), Vec::new());
        let mut stale = 0;
        for id in ids {
            if found.contains_key(id) {
                continue;
            }
            match self.cache.get(id) {
                Lookup::Fresh(f) => {
                    found.insert(id.to_owned(), f);
                }
                Lookup::Stale {
                    features,
                    refresh: mine,
                } => {
                    stale += 1;
                    if mine {
                        refresh.push(id.to_owned());
                    }
                    found.insert(id.to_owned(), features);
                }
                Lookup::Miss if asked.insert(id) => missing.push(id.to_owned()),
                Lookup::Miss => {}
            }
        }
        let hits = found.len() as u64 - stale;
        metrics::counter!("recmesh_ranking_item_cache_total", "result" => "hit").increment(hits);
        metrics::counter!("recmesh_ranking_item_cache_total", "result" => "stale").increment(stale);
        metrics::counter!("recmesh_ranking_item_cache_total", "result" => "miss")
            .increment(missing.len() as u64);
        if !refresh.is_empty() {
            self.refresh_in_background(refresh, rid);
        }
        if missing.is_empty() {
            return (found, None);
        }
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
        if missing.is_empty() {
            (found, None)
        } else {
            (
                found,
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

#[cfg(test)]
mod tests {
    use super::*;
    use pb::ranking_server::Ranking;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../libs/algo/fixtures/lightgbm/model.txt"
    );

    fn candidate(id: &str, score: f64, sources: &[&str]) -> pb::Candidate {
        pb::Candidate {
            item_id: id.into(),
            score,
            source: sources.first().map(|s| s.to_string()).unwrap_or_default(),
            source_scores: sources.iter().map(|s| (s.to_string(), score)).collect(),
            ..Default::default()
        }
    }

    /// The lean list of whole candidates, as retrieval would send it.
    fn listed(candidates: Vec<pb::Candidate>) -> Option<pb::CandidateList> {
        Some(recmesh_mesh::lean::from_candidates(&candidates).expect("known sources"))
    }

    /// The answer's candidates, whole.
    fn whole(r: &pb::RankResponse) -> Vec<pb::Candidate> {
        Candidates::new(r.candidates.clone().unwrap_or_default(), "candidates")
            .expect("the service sends a list that checks")
            .to_candidates()
    }

    fn item(id: &str, popularity: f64) -> (String, Arc<pb::ItemFeatures>) {
        (
            id.to_owned(),
            Arc::new(pb::ItemFeatures {
                item_id: id.into(),
                popularity,
                views: 10,
                clicks: 2,
                attributes: Some(pb::ItemAttributes {
                    category: "books".into(),
                    price: 20.0,
                    in_stock: true,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        )
    }

    /// A channel to a port nobody listens on: calls are refused at once.
    fn nowhere() -> Balanced {
        Balanced::new(
            "features_addr",
            "http://127.0.0.1:1",
            &BalanceConfig::default(),
        )
        .expect("address")
    }

    #[test]
    fn defaults_are_valid() {
        let c: Config = recmesh_server::config::load(None).expect("defaults load");
        assert_eq!(c, Config::default());
    }

    #[tokio::test]
    async fn baseline_lets_popularity_reorder_close_candidates() {
        let svc = RankingService::new(Config::default(), nowhere()).expect("service");
        let features: ItemFeatureMap = [item("a", 0.0), item("b", 1.0)].into_iter().collect();
        let ranked = svc.scorer().score(
            vec![candidate("a", 1.0, &["cf"]), candidate("b", 0.9, &["cf"])],
            &[],
            &features,
            0,
        );
        // a: 0.6·1 + 0 + 0.1 = 0.70 ; b: 0.6·0.9 + 0.3 + 0.1 = 0.94
        assert_eq!(ranked[0].item_id, "b");
        assert!((ranked[0].score - 0.94).abs() < 1e-9);
        assert_eq!(
            ranked[0].attributes.as_ref().map(|a| a.category.as_str()),
            Some("books")
        );
    }

    #[tokio::test]
    async fn the_served_path_ranks_as_the_scorer_and_keeps_every_other_field() {
        let config = Config {
            model_path: FIXTURE.into(),
            ..Config::default()
        };
        let svc = RankingService::new(config, nowhere()).expect("fixture model loads");
        let mut list = vec![
            candidate("a", 0.2, &["cf"]),
            candidate("b", 0.9, &["cf", "ann"]),
            candidate("c", 0.5, &["popular"]),
        ];
        list[1].reasons = vec!["because you viewed a".into()];
        list[1].source = "cf".into();
        list[2].attributes = Some(pb::ItemAttributes {
            category: "toys".into(),
            ..Default::default()
        });
        let served = svc
            .rank(Request::new(pb::RankRequest {
                user_id: "u1".into(),
                candidates: listed(list.clone()),
                ..Default::default()
            }))
            .await
            .expect("ranked")
            .into_inner();
        // No features service: both paths score without item features.
        let direct = svc
            .scorer()
            .score(list, &[], &ItemFeatureMap::default(), now_s());
        assert_eq!(whole(&served), direct);
        assert!(served.degraded);
    }

    #[tokio::test]
    async fn a_broken_list_is_refused_naming_the_field() {
        let svc = RankingService::new(Config::default(), nowhere()).expect("service");
        let mut broken = listed(vec![
            candidate("a", 0.5, &["cf"]),
            candidate("b", 0.4, &["cf"]),
        ]);
        if let Some(l) = broken.as_mut() {
            l.scores.pop();
        }
        let err = svc
            .rank(Request::new(pb::RankRequest {
                user_id: "u1".into(),
                candidates: broken,
                ..Default::default()
            }))
            .await
            .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            err.message(),
            "candidates.scores: 1 entries for 2 candidates"
        );
    }

    #[tokio::test]
    async fn a_lightgbm_model_scores_with_the_feature_row() {
        let config = Config {
            model_path: FIXTURE.into(),
            ..Config::default()
        };
        let svc = RankingService::new(config, nowhere()).expect("fixture model loads");
        assert!(
            svc.scorer().version.starts_with("lightgbm-model-"),
            "{}",
            svc.scorer().version
        );
        let features: ItemFeatureMap = [item("a", 0.1), item("b", 0.9)].into_iter().collect();
        let ranked = svc.scorer().score(
            vec![candidate("a", 0.5, &["cf"]), candidate("b", 0.5, &["cf"])],
            &[],
            &features,
            0,
        );
        // Probabilities from the model, and the more popular item first (the
        // fixture's labels rise with item_popularity).
        assert!(ranked.iter().all(|c| (0.0..=1.0).contains(&c.score)));
        assert_eq!(ranked[0].item_id, "b");
        let scorer = svc.scorer();
        let model = scorer.model.as_ref().expect("model");
        let mut row = ranking::row(
            &candidate("b", 0.5, &["cf"]).signals(),
            item_signals(&features["b"], 0).as_ref(),
            &UserSignals::default(),
        )
        .to_vec();
        row = model.columns.iter().map(|&c| row[c]).collect();
        assert_eq!(ranked[0].score, model.gbdt.predict(&row));
    }

    #[tokio::test]
    async fn a_request_picks_a_named_model() {
        let config = Config {
            model_path: FIXTURE.into(),
            models: [("fixture-b".to_string(), FIXTURE.to_string())].into(),
            ..Config::default()
        };
        let svc = RankingService::new(config, nowhere()).expect("models load");
        let default = svc.scorer().version.to_string();
        assert!(default.starts_with("lightgbm-"));
        assert_eq!(&*svc.scorer_for("").version, default.as_str());
        assert_eq!(&*svc.scorer_for("baseline").version, BASELINE_VERSION);
        assert!(svc.scorer_for("fixture-b").version.starts_with("lightgbm-"));
        assert_eq!(
            &*svc.scorer_for("no-such-model").version,
            default.as_str(),
            "an unknown name is scored by the default"
        );
        let bad = Config {
            models: [("baseline".to_string(), FIXTURE.to_string())].into(),
            ..Config::default()
        };
        assert!(bad.validate().is_err(), "baseline is built in");
        let missing = Config {
            models: [("x".to_string(), "/no/such/model.txt".to_string())].into(),
            ..Config::default()
        };
        let err = missing.validate().expect_err("missing file").to_string();
        assert!(err.contains("models.x"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_new_model_is_swapped_in_while_requests_keep_succeeding() {
        let dir = std::env::temp_dir().join(format!("recmesh-swap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("model.txt");
        let fixture = std::fs::read_to_string(FIXTURE).expect("fixture");
        std::fs::write(&path, &fixture).expect("write");
        let config = Config {
            model_path: path.display().to_string(),
            ..Config::default()
        };
        let svc = RankingService::new(config, nowhere()).expect("service");
        let first = svc.scorer().version().to_owned();

        // Requests run the whole time (features unreachable: they still rank).
        use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let answered = Arc::new(AtomicUsize::new(0));
        // Until `answered` passes `n` (the load task runs beside this one).
        let answered_past = async |n: usize| {
            let passed = async {
                while answered.load(Relaxed) <= n {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            };
            tokio::time::timeout(Duration::from_secs(10), passed)
                .await
                .expect("the load keeps answering (its task stops at a failed request)");
        };
        let load = {
            let (svc, stop, answered) = (svc.clone(), stop.clone(), answered.clone());
            tokio::spawn(async move {
                while !stop.load(Relaxed) {
                    let r = svc
                        .rank(Request::new(pb::RankRequest {
                            user_id: "u1".into(),
                            candidates: listed(vec![
                                candidate("a", 0.5, &["cf"]),
                                candidate("b", 0.4, &["cf"]),
                            ]),
                            ..Default::default()
                        }))
                        .await
                        .expect("every request succeeds during swaps");
                    assert_eq!(whole(&r.into_inner()).len(), 2);
                    answered.fetch_add(1, Relaxed);
                    tokio::task::yield_now().await;
                }
            })
        };
        answered_past(0).await;

        // Publish a different model the way a trainer should: write, then rename.
        let tmp = dir.join(".model.txt.tmp");
        std::fs::write(&tmp, fixture.replacen("shrinkage=1", "shrinkage=1 ", 1)).expect("write");
        std::fs::rename(&tmp, &path).expect("rename");
        let swapped = svc.reload_if_changed().expect("loads").expect("swapped");
        assert_ne!(swapped, first);
        assert_eq!(svc.scorer().version(), swapped);

        // A broken model is refused and the last good one keeps serving.
        std::fs::write(&tmp, "tree\nversion=v4\n").expect("write");
        std::fs::rename(&tmp, &path).expect("rename");
        let err = svc.reload_if_changed().expect_err("refused");
        assert!(err.to_string().contains("model_path"), "{err}");
        assert_eq!(svc.scorer().version(), swapped);
        assert_eq!(
            svc.reload_if_changed().expect("unchanged"),
            None,
            "reported once"
        );

        // Requests keep succeeding after the swaps too.
        answered_past(answered.load(Relaxed)).await;
        stop.store(true, Relaxed);
        load.await.expect("every request succeeded");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn a_model_with_unknown_features_is_a_config_error() {
        let dir = std::env::temp_dir().join(format!("recmesh-rank-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("weather.txt");
        let text = std::fs::read_to_string(FIXTURE).expect("fixture").replacen(
            "feature_names=retrieval_score",
            "feature_names=weather",
            1,
        );
        std::fs::write(&path, text).expect("write");
        let config = Config {
            model_path: path.display().to_string(),
            ..Config::default()
        };
        let err = config.validate().expect_err("unknown feature");
        assert!(
            err.to_string().contains("model_path") && err.to_string().contains("`weather`"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[tokio::test]
    async fn without_features_it_still_ranks_and_says_so() {
        let svc = RankingService::new(Config::default(), nowhere()).expect("service");
        let answer = svc
            .rank(Request::new(pb::RankRequest {
                user_id: "u1".into(),
                candidates: listed(vec![
                    candidate("a", 0.5, &["cf"]),
                    candidate("b", 1.0, &["cf"]),
                ]),
                ..Default::default()
            }))
            .await
            .expect("ranks anyway")
            .into_inner();
        assert!(answer.degraded);
        assert!(
            answer.detail.starts_with("item features unavailable"),
            "{}",
            answer.detail
        );
        assert_eq!(answer.model_version, "baseline-1+no-features");
        assert_eq!(
            whole(&answer)[0].item_id,
            "b",
            "retrieval evidence alone orders them"
        );
    }

    #[tokio::test]
    async fn requests_that_share_a_failed_fetch_are_all_degraded() {
        // Two concurrent requests miss the same items: the second waits for
        // the first one's fetch, which fails (nothing listens). Neither may
        // pass off an answer without item features as a full one.
        let svc = RankingService::new(Config::default(), nowhere()).expect("service");
        let rank = || {
            svc.rank(Request::new(pb::RankRequest {
                user_id: "u1".into(),
                candidates: listed(vec![
                    candidate("a", 0.5, &["cf"]),
                    candidate("b", 1.0, &["cf"]),
                ]),
                ..Default::default()
            }))
        };
        let (first, second) = tokio::join!(rank(), rank());
        for answer in [first, second] {
            let answer = answer.expect("ranks anyway").into_inner();
            assert!(answer.degraded, "{}", answer.detail);
            assert!(
                answer.detail.contains("item features") && answer.detail.contains("unavailable"),
                "{}",
                answer.detail
            );
            assert_eq!(answer.model_version, "baseline-1+no-features");
        }
    }

    #[tokio::test]
    async fn stale_item_features_are_used_while_the_features_service_is_away() {
        // Features fetched 1.5 TTLs ago, and a features service that does
        // not answer: within `item_cache_max_stale_ms` ranking keeps using
        // them (not degraded) and tries one refresh in the background.
        let stale_for = |max_stale_ms: u64| async move {
            let config = Config {
                item_cache_max_stale_ms: max_stale_ms,
                ..Config::default()
            };
            let ttl = Duration::from_millis(config.item_cache_ttl_ms);
            let svc = RankingService::new(config, nowhere()).expect("service");
            let stored = std::time::Instant::now()
                .checked_sub(ttl.mul_f64(1.5))
                .expect("the monotonic clock goes back seconds");
            for (id, f) in [item("a", 0.9), item("b", 0.1)] {
                svc.cache.insert_stored(id, f, stored);
            }
            svc.rank(Request::new(pb::RankRequest {
                user_id: "u1".into(),
                candidates: listed(vec![
                    candidate("a", 0.5, &["cf"]),
                    candidate("b", 0.5, &["cf"]),
                ]),
                ..Default::default()
            }))
            .await
            .expect("ranks")
            .into_inner()
        };
        let answer = stale_for(60_000).await;
        assert!(!answer.degraded, "{}", answer.detail);
        assert_eq!(answer.model_version, "baseline-1");
        assert_eq!(whole(&answer)[0].item_id, "a", "the more popular");

        // Without stale use, the same entries are missing and fetched inline,
        // which fails: degraded, as before this cache served stale entries.
        let answer = stale_for(0).await;
        assert!(answer.degraded);
        assert_eq!(answer.model_version, "baseline-1+no-features");
    }

    #[test]
    fn bad_features_address_is_a_config_error() {
        let c = Config {
            features_addr: "127.0.0.1:1".into(),
            ..Config::default()
        };
        let err = c.validate().expect_err("no scheme");
        assert!(err.to_string().contains("features_addr"));
    }
}

//! Scoring: the model (learned or baseline), the feature rows it reads, and
//! what it reads of a candidate ([`RankInput`]).

use std::collections::HashMap;
use std::sync::Arc;

use recmesh_algo::gbdt::GbdtModel;
use recmesh_algo::ranking::{self, CandidateSignals, ItemSignals, UserSignals};
use recmesh_algo::scoring::{BaselineInput, BaselineWeights, baseline_scores};
use recmesh_mesh::lean::Candidates;
use recmesh_proto::v1 as pb;
use recmesh_server::config::ConfigError;

use crate::BASELINE_VERSION;

/// A loaded LightGBM model and where its features sit in a feature row.
#[derive(Debug)]
pub(crate) struct LearnedModel {
    pub(crate) gbdt: GbdtModel,
    pub(crate) columns: Vec<usize>,
}

/// Loads and checks a LightGBM model file; errors name `model_path`.
pub(crate) fn load_model(path: &str) -> Result<(LearnedModel, String), ConfigError> {
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
pub(crate) fn parse_model(
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
pub(crate) fn model_stamp(path: &str) -> Option<(std::time::SystemTime, u64)> {
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

/// Where scoring finds an item's features: by position in the call (the
/// service's [`Fetched`]) or by id (an [`ItemFeatureMap`]: the trainer,
/// tests). Scoring asks once per candidate and recent item.
pub trait ItemFeatureSource {
    /// Features of candidate `k`, whose item is `id`.
    fn candidate(&self, k: usize, id: &str) -> Option<&pb::ItemFeatures>;
    /// Features of the user's recent interaction `k`, whose item is `id`.
    fn recent(&self, k: usize, id: &str) -> Option<&pb::ItemFeatures>;
}

impl ItemFeatureSource for ItemFeatureMap {
    fn candidate(&self, _: usize, id: &str) -> Option<&pb::ItemFeatures> {
        self.get(id).map(|f| &**f)
    }

    fn recent(&self, _: usize, id: &str) -> Option<&pb::ItemFeatures> {
        self.get(id).map(|f| &**f)
    }
}

/// Item features of one `Rank` call by position: each candidate's, then
/// each recent item's, as the service looked them up. Scoring reads them
/// without hashing an id again.
#[derive(Debug, Default)]
pub struct Fetched {
    pub(crate) items: Vec<Option<Arc<pb::ItemFeatures>>>,
    pub(crate) candidates: usize,
}

impl ItemFeatureSource for Fetched {
    fn candidate(&self, k: usize, _: &str) -> Option<&pb::ItemFeatures> {
        self.items.get(k)?.as_deref()
    }

    fn recent(&self, k: usize, _: &str) -> Option<&pb::ItemFeatures> {
        self.items.get(self.candidates + k)?.as_deref()
    }
}

/// The feature rows ([`ranking::FEATURE_NAMES`] order) of `candidates`, given
/// the user's recent interactions and the fetched item features. Serving and
/// training both build rows here, so a model sees at serving time exactly
/// the features it was trained on.
pub fn feature_rows(
    candidates: &[impl RankInput],
    recent: &[pb::Interaction],
    features: &impl ItemFeatureSource,
    now_s: i64,
) -> Vec<[f64; ranking::FEATURES]> {
    let user = UserSignals::from_recent(recent.iter().enumerate().filter_map(|(k, r)| {
        let a = features.recent(k, &r.item_id)?.attributes.as_ref()?;
        Some((a.category.as_str(), a.price))
    }));
    candidates
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let item = features
                .candidate(k, c.item_id())
                .and_then(|f| item_signals(f, now_s));
            ranking::row(&c.signals(), item.as_ref(), &user)
        })
        .collect()
}

/// The model half of ranking, usable without a server: the offline
/// evaluation scores with exactly what the service serves.
#[derive(Debug, Clone)]
pub struct Scorer {
    pub(crate) model: Option<Arc<LearnedModel>>,
    pub(crate) version: Arc<str>,
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
        features: &impl ItemFeatureSource,
        now_s: i64,
    ) -> Vec<pb::Candidate> {
        let scores = self.scores(&candidates, recent, features, now_s);
        for (k, (c, s)) in candidates.iter_mut().zip(scores).enumerate() {
            c.score = s;
            if let Some(a) = fresh_attributes(features, k, &c.item_id) {
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
        features: &impl ItemFeatureSource,
        now_s: i64,
    ) -> pb::CandidateList {
        let scores = self.scores(&Listed::all(list), recent, features, now_s);
        let mut order: Vec<usize> = (0..list.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        let sorted: Vec<f64> = order.iter().map(|&k| scores[k]).collect();
        list.reordered(&order, &sorted, |k| {
            fresh_attributes(features, k, list.id(k))
        })
    }

    /// The model's score of each of `candidates`, in their order.
    pub fn scores(
        &self,
        candidates: &[impl RankInput],
        recent: &[pb::Interaction],
        features: &impl ItemFeatureSource,
        now_s: i64,
    ) -> Vec<f64> {
        match &self.model {
            Some(m) => {
                // The model's columns of every row in one buffer: the
                // model walks several rows through each tree at once.
                let width = m.columns.len();
                let full = feature_rows(candidates, recent, features, now_s);
                let mut rows = Vec::with_capacity(full.len() * width);
                for f in &full {
                    rows.extend(m.columns.iter().map(|&col| f[col]));
                }
                m.gbdt.predict_rows(&rows, width)
            }
            None => {
                let sources: std::collections::HashSet<&str, foldhash::fast::RandomState> =
                    candidates.iter().flat_map(|c| c.source_names()).collect();
                let inputs: Vec<BaselineInput> = candidates
                    .iter()
                    .enumerate()
                    .map(|(k, c)| {
                        let signals = c.signals();
                        BaselineInput {
                            retrieval_score: signals.retrieval_score,
                            popularity: features
                                .candidate(k, c.item_id())
                                .map_or(0.0, |f| f.popularity),
                            sources: signals.sources,
                        }
                    })
                    .collect();
                baseline_scores(&inputs, sources.len(), BaselineWeights::default())
            }
        }
    }
}

/// Fresh attributes (stock above all) from the features service win over
/// what retrieval knew.
pub(crate) fn fresh_attributes<'a>(
    features: &'a impl ItemFeatureSource,
    k: usize,
    id: &str,
) -> Option<&'a pb::ItemAttributes> {
    features.candidate(k, id)?.attributes.as_ref()
}

/// What scoring reads of a candidate: the generated type (the trainer, and
/// tests), or an entry of a `CandidateList` ([`Listed`], the service). Both give the same
/// signals, so the model sees at serving time what it was trained on.
pub trait RankInput {
    /// The candidate's item.
    fn item_id(&self) -> &str;
    /// Retrieval's score and its score per source.
    fn signals(&self) -> CandidateSignals;
    /// The sources that found it.
    fn source_names(&self) -> impl Iterator<Item = &str>;
}

pub(crate) fn candidate_signals(
    score: f64,
    source: impl Fn(&str) -> f64,
    sources: usize,
) -> CandidateSignals {
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
    pub(crate) list: &'a Candidates,
    pub(crate) k: usize,
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

pub(crate) fn item_signals(f: &pb::ItemFeatures, now_s: i64) -> Option<ItemSignals<'_>> {
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

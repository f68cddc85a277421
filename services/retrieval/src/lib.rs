//! Retrieval service: turns a user (or an anchor item) into a few hundred
//! candidates from several sources, each with the source and a reason.
//!
//! Sources in this embedded version, in priority order:
//! - `anchor`: item-item CF neighbours of the item being viewed;
//! - `cf`: CF neighbours of the user's recent items, weighted by event
//!   strength and recency ("because you viewed X");
//! - `popular`: popularity in the categories the user is browsing or engages
//!   with ("popular in Y"), then overall ("popular right now").
//!
//! A candidate found by several sources keeps every source's score and its
//! best reason. Candidate score = max over sources of
//! `source weight × score / best score of that source` (weights: anchor and
//! cf 1.0, category popularity 0.6, overall popularity 0.4), so the merged
//! order is personal first, popular last; ranking falls back to this order.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use recmesh_algo::rules::{HardFilters, RuleItem};
use recmesh_algo::{cooccurrence, popularity};
use recmesh_catalog::files::DataSource;
use recmesh_catalog::{Catalog, Dataset, EventKind};
use recmesh_mesh::convert::{FieldError, attributes, check_id, event_kind};
use recmesh_proto::v1::{self as pb, retrieval_server::RetrievalServer};
use recmesh_server::GrpcServer;
use recmesh_server::config::{ConfigError, ServerConfig, ServiceConfig, at_least_one};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

/// Default gRPC port of the retrieval service.
pub const DEFAULT_PORT: u16 = 50052;

/// Configuration of the retrieval service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC and admin server.
    pub server: ServerConfig,
    /// Dataset the index is built from at start.
    pub data: DataSource,
    /// CF neighbours kept per item.
    pub neighbours_per_item: usize,
    /// Strongest items per user used when counting co-occurrences (bounds
    /// the quadratic pair count of very active users).
    pub max_history_per_user: usize,
    /// Recent interactions used as CF seeds.
    pub max_seeds: usize,
    /// Popular items kept per list (overall and per category).
    pub popular_list_len: usize,
    /// Candidates returned when the request asks for 0.
    pub default_count: u32,
    /// Most candidates one request may ask for.
    pub max_count: u32,
    /// Most excluded ids one request may carry.
    pub max_exclusions: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::on_port(DEFAULT_PORT),
            data: DataSource::default(),
            // 50 neighbours per item cover a 20-seed history several times over.
            neighbours_per_item: 50,
            max_history_per_user: 100,
            max_seeds: 20,
            popular_list_len: 500,
            default_count: 200,
            max_count: 2_000,
            max_exclusions: 1_000,
        }
    }
}

impl ServiceConfig for Config {
    fn server(&self) -> &ServerConfig {
        &self.server
    }

    fn validate(&self) -> Result<(), ConfigError> {
        at_least_one(&[
            ("neighbours_per_item", self.neighbours_per_item as u64),
            ("max_history_per_user", self.max_history_per_user as u64),
            ("max_seeds", self.max_seeds as u64),
            ("popular_list_len", self.popular_list_len as u64),
            ("max_exclusions", self.max_exclusions as u64),
        ])?;
        if self.default_count == 0 || self.default_count > self.max_count {
            return Err(ConfigError::invalid(
                "default_count",
                format!("must be in 1..=max_count ({})", self.max_count),
            ));
        }
        Ok(())
    }
}

/// Everything retrieval serves from, built once from a dataset.
#[derive(Debug)]
pub struct Index {
    catalog: Catalog,
    neighbours: Vec<Vec<(u32, f32)>>,
    popular: Vec<(u32, f64)>,
    popular_by_category: HashMap<u32, Vec<(u32, f64)>>,
    version: String,
}

impl Index {
    /// Builds CF neighbours and popularity lists from `data`.
    pub fn build(data: &Dataset, config: &Config) -> Self {
        let catalog = Catalog::new(data.items.clone());
        let per_user = catalog.strongest_per_user(&data.interactions);
        let histories: Vec<cooccurrence::History> = per_user
            .into_values()
            .map(|h| h.into_iter().collect())
            .collect();
        let neighbours = cooccurrence::neighbours(
            &histories,
            catalog.len(),
            config.neighbours_per_item,
            config.max_history_per_user,
        );
        let scores = recmesh_catalog::item_scores(&catalog, &data.interactions);
        let (popular, popular_by_category) =
            popularity::top_lists(&scores, &catalog.category_of, config.popular_list_len);
        Index {
            catalog,
            neighbours,
            popular,
            popular_by_category,
            version: data.fingerprint(),
        }
    }

    fn title(&self, index: u32) -> &str {
        self.catalog
            .item(index)
            .map_or("an item", |i| i.title.as_str())
    }
}

/// Request filters after validation: the same hard filters the reranker
/// applies (`recmesh_algo::rules`), pushed down so no slot is spent on an
/// item that would be dropped later.
struct Constraints<'a> {
    filters: HardFilters<'a>,
    /// Category ids of `filters.categories`, for picking popularity lists.
    categories: Vec<u32>,
}

impl Constraints<'_> {
    fn allows(&self, index: &Index, item: u32) -> bool {
        index.catalog.item(item).is_some_and(|it| {
            let rule = RuleItem {
                id: &it.id,
                category: &it.category,
                price: it.price,
                in_stock: it.in_stock,
            };
            self.filters.check(&rule).is_none()
        })
    }
}

/// The merge weight of each source (`RetrieveRequest.source_weights`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct SourceWeights {
    anchor: f64,
    cf: f64,
    category: f64,
    popular: f64,
}

impl SourceWeights {
    fn from_request(map: &HashMap<String, f64>) -> Result<Self, FieldError> {
        let mut w = SourceWeights {
            anchor: 1.0,
            cf: 1.0,
            category: 0.6,
            popular: 0.4,
        };
        for (name, &value) in map {
            let field = format!("source_weights.{name}");
            if !(0.0..=10.0).contains(&value) {
                return Err(FieldError::new(field, "must be in 0..=10"));
            }
            match name.as_str() {
                "anchor" => w.anchor = value,
                "cf" => w.cf = value,
                "category" => w.category = value,
                "popular" => w.popular = value,
                _ => {
                    return Err(FieldError::new(
                        field,
                        "unknown source; known: anchor, cf, category, popular",
                    ));
                }
            }
        }
        Ok(w)
    }
}

/// Builds the merged candidate list, first source to find an item first.
struct Merger<'a> {
    index: &'a Index,
    constraints: &'a Constraints<'a>,
    order: Vec<u32>,
    by_item: HashMap<u32, pb::Candidate>,
}

impl<'a> Merger<'a> {
    fn new(index: &'a Index, constraints: &'a Constraints<'a>) -> Self {
        Merger {
            index,
            constraints,
            order: Vec::new(),
            by_item: HashMap::new(),
        }
    }

    /// Adds one source's results (best first) with `weight`.
    fn add(
        &mut self,
        source: &str,
        weight: f64,
        results: impl IntoIterator<Item = (u32, f64, String)>,
    ) {
        // Weight 0: the variant turned this source off.
        if weight <= 0.0 {
            return;
        }
        let results: Vec<(u32, f64, String)> = results.into_iter().collect();
        let best = results.iter().map(|r| r.1).fold(0.0f64, f64::max);
        for (item, raw, reason) in results {
            if !self.constraints.allows(self.index, item) {
                continue;
            }
            let score = if best > 0.0 { weight * raw / best } else { 0.0 };
            let candidate = self.by_item.entry(item).or_insert_with(|| {
                self.order.push(item);
                let it = self.index.catalog.item(item);
                pb::Candidate {
                    item_id: it.map(|i| i.id.clone()).unwrap_or_default(),
                    source: source.to_owned(),
                    attributes: it.map(attributes),
                    ..Default::default()
                }
            });
            let entry = candidate
                .source_scores
                .entry(source.to_owned())
                .or_insert(0.0);
            *entry = entry.max(raw);
            candidate.score = candidate.score.max(score);
            if !candidate.reasons.contains(&reason) && candidate.reasons.len() < 3 {
                candidate.reasons.push(reason);
            }
        }
    }

    fn finish(mut self, count: usize) -> Vec<pb::Candidate> {
        let mut out: Vec<pb::Candidate> = self
            .order
            .iter()
            .filter_map(|i| self.by_item.remove(i))
            .collect();
        // Stable: equal scores keep source order.
        out.sort_by(|a, b| b.score.total_cmp(&a.score));
        out.truncate(count);
        out
    }
}

/// The retrieval gRPC service.
#[derive(Debug, Clone)]
pub struct RetrievalService {
    index: Arc<Index>,
    config: Arc<Config>,
}

impl RetrievalService {
    /// A service over an index built from `data`.
    pub fn new(config: Config, data: &Dataset) -> Self {
        let index = Index::build(data, &config);
        tracing::info!(
            items = index.catalog.len(),
            categories = index.catalog.categories.len(),
            version = %index.version,
            "retrieval index built"
        );
        RetrievalService {
            index: Arc::new(index),
            config: Arc::new(config),
        }
    }

    fn count(&self, field: &str, count: u32) -> Result<usize, FieldError> {
        match count {
            0 => Ok(self.config.default_count as usize),
            n if n > self.config.max_count => Err(FieldError::new(
                field,
                format!("must be at most {}", self.config.max_count),
            )),
            n => Ok(n as usize),
        }
    }

    fn category(&self, field: &str, name: &str) -> Result<u32, FieldError> {
        self.index
            .catalog
            .category_id(name)
            .ok_or_else(|| FieldError::new(field, format!("unknown category `{name}`")))
    }

    fn constraints<'a>(
        &'a self,
        exclude: &'a [String],
        filters: Option<&pb::Filters>,
    ) -> Result<Constraints<'a>, FieldError> {
        if exclude.len() > self.config.max_exclusions {
            return Err(FieldError::new(
                "exclude_item_ids",
                format!("at most {} ids", self.config.max_exclusions),
            ));
        }
        let f = filters.cloned().unwrap_or_default();
        let categories: Vec<u32> = f
            .categories
            .iter()
            .enumerate()
            .map(|(n, c)| self.category(&format!("filters.categories[{n}]"), c))
            .collect::<Result<_, _>>()?;
        if f.min_price < 0.0
            || f.max_price < 0.0
            || (f.max_price > 0.0 && f.min_price > f.max_price)
        {
            return Err(FieldError::new(
                "filters.min_price",
                "prices must be ≥ 0 and min_price ≤ max_price",
            ));
        }
        Ok(Constraints {
            filters: HardFilters {
                excluded: exclude.iter().map(String::as_str).collect(),
                categories: categories
                    .iter()
                    .map(|&c| self.index.catalog.categories[c as usize].as_str())
                    .collect(),
                min_price: f.min_price,
                max_price: f.max_price,
                ..HardFilters::default()
            },
            categories,
        })
    }

    fn popular_in(&self, category: u32) -> impl Iterator<Item = (u32, f64, String)> + '_ {
        let name = &self.index.catalog.categories[category as usize];
        self.index
            .popular_by_category
            .get(&category)
            .into_iter()
            .flatten()
            .map(move |&(i, s)| (i, s, format!("popular in {name}")))
    }

    fn popular_overall(&self) -> impl Iterator<Item = (u32, f64, String)> + '_ {
        self.index
            .popular
            .iter()
            .map(|&(i, s)| (i, s, "popular right now".to_owned()))
    }

    /// Candidates for a user; see the crate docs for the sources.
    ///
    /// A source of weight 0 is skipped (its candidates are not added).
    pub fn retrieve(&self, req: &pb::RetrieveRequest) -> Result<pb::RetrieveResponse, FieldError> {
        check_id("user_id", &req.user_id)?;
        let count = self.count("count", req.count)?;
        let constraints = self.constraints(&req.exclude_item_ids, req.filters.as_ref())?;
        let ctx = req.context.clone().unwrap_or_default();
        let weights = SourceWeights::from_request(&req.source_weights)?;
        let index = &self.index;
        let mut merger = Merger::new(index, &constraints);

        // An anchor the index does not know yet (a brand-new item) adds no
        // candidates rather than failing the request.
        if let Some(anchor) = index.catalog.index_of(&ctx.anchor_item_id) {
            let title = index.title(anchor).to_owned();
            merger.add(
                "anchor",
                weights.anchor,
                index.neighbours[anchor as usize]
                    .iter()
                    .map(|&(i, s)| (i, f64::from(s), format!("similar to {title}"))),
            );
        }

        // Seeds: newest first, weight = event strength × 0.9^position, so the
        // latest signals count most; an item seen twice keeps its strongest.
        let mut seeds: HashMap<u32, (f64, EventKind)> = HashMap::new();
        let mut seen = std::collections::HashSet::new();
        let mut engaged_categories: HashMap<u32, f64> = HashMap::new();
        for (position, r) in req.recent.iter().take(self.config.max_seeds).enumerate() {
            let (Some(i), Some(kind)) =
                (index.catalog.index_of(&r.item_id), event_kind(r.event_type))
            else {
                continue;
            };
            let w = kind.weight() * 0.9f64.powi(position as i32);
            let seed = seeds.entry(i).or_insert((0.0, kind));
            if w > seed.0 {
                *seed = (w, kind.max(seed.1));
            }
            // Items the user just interacted with are not recommended back to
            // them by any source (issue #5 makes viewed items a configurable window).
            seen.insert(i);
            *engaged_categories
                .entry(index.catalog.category_of[i as usize])
                .or_default() += w;
        }
        let seed_list: Vec<(u32, f64)> = seeds.iter().map(|(&i, &(w, _))| (i, w)).collect();
        let cf = cooccurrence::score_from_seeds(&index.neighbours, &seed_list, count * 2);
        merger.add(
            "cf",
            weights.cf,
            cf.into_iter().filter(|c| !seen.contains(&c.item)).map(|c| {
                let verb = seeds.get(&c.because_of).map_or("viewed", |s| s.1.verb());
                (
                    c.item,
                    c.score,
                    format!("because you {verb} {}", index.title(c.because_of)),
                )
            }),
        );

        // Category popularity: the browsed category, else the filter's, else
        // the two the user engaged with most.
        let mut categories: Vec<u32> = Vec::new();
        if !ctx.category.is_empty() {
            categories.push(self.category("context.category", &ctx.category)?);
        }
        categories.extend(constraints.categories.iter().copied());
        if categories.is_empty() {
            let mut engaged: Vec<(u32, f64)> = engaged_categories.into_iter().collect();
            engaged.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            categories.extend(engaged.into_iter().take(2).map(|(c, _)| c));
        }
        for c in categories {
            merger.add(
                "popular",
                weights.category,
                self.popular_in(c).filter(|(i, _, _)| !seen.contains(i)),
            );
        }
        merger.add(
            "popular",
            weights.popular,
            self.popular_overall().filter(|(i, _, _)| !seen.contains(i)),
        );
        Ok(pb::RetrieveResponse {
            candidates: merger.finish(count),
            data_version: index.version.clone(),
        })
    }

    /// Neighbours of an item, topped up with its category's popular items.
    pub fn similar(&self, req: &pb::SimilarRequest) -> Result<pb::RetrieveResponse, Status> {
        check_id("item_id", &req.item_id)?;
        let count = self.count("count", req.count)?;
        let mut constraints = self.constraints(&req.exclude_item_ids, req.filters.as_ref())?;
        let index = &self.index;
        let anchor = index
            .catalog
            .index_of(&req.item_id)
            .ok_or_else(|| Status::not_found(format!("item_id: unknown item `{}`", req.item_id)))?;
        constraints.filters.excluded.insert(req.item_id.as_str());
        let title = index.title(anchor).to_owned();
        let mut merger = Merger::new(index, &constraints);
        merger.add(
            "cf",
            1.0,
            index.neighbours[anchor as usize]
                .iter()
                .map(|&(i, s)| (i, f64::from(s), format!("similar to {title}"))),
        );
        merger.add(
            "popular",
            0.5,
            self.popular_in(index.catalog.category_of[anchor as usize]),
        );
        Ok(pb::RetrieveResponse {
            candidates: merger.finish(count),
            data_version: index.version.clone(),
        })
    }

    /// Popular lists: overall or one category, optionally every category's too.
    pub fn popular(&self, req: &pb::PopularRequest) -> Result<pb::RetrieveResponse, FieldError> {
        let count = self.count("count", req.count)?;
        let constraints = self.constraints(&[], None)?;
        let index = &self.index;
        let mut out = Vec::new();
        let ranked = |list: Box<dyn Iterator<Item = (u32, f64, String)> + '_>,
                      out: &mut Vec<pb::Candidate>,
                      n: usize| {
            let mut merger = Merger::new(index, &constraints);
            merger.add("popular", 1.0, list);
            out.extend(merger.finish(n));
        };
        if req.category.is_empty() {
            ranked(Box::new(self.popular_overall()), &mut out, count);
            if req.per_category > 0 {
                let n = (req.per_category as usize).min(self.config.max_count as usize);
                for c in 0..index.catalog.categories.len() as u32 {
                    ranked(Box::new(self.popular_in(c)), &mut out, n);
                }
            }
        } else {
            let c = self.category("category", &req.category)?;
            ranked(Box::new(self.popular_in(c)), &mut out, count);
        }
        Ok(pb::RetrieveResponse {
            candidates: out,
            data_version: index.version.clone(),
        })
    }
}

#[tonic::async_trait]
impl pb::retrieval_server::Retrieval for RetrievalService {
    async fn retrieve(
        &self,
        request: Request<pb::RetrieveRequest>,
    ) -> Result<Response<pb::RetrieveResponse>, Status> {
        Ok(Response::new(self.retrieve(request.get_ref())?))
    }

    async fn similar(
        &self,
        request: Request<pb::SimilarRequest>,
    ) -> Result<Response<pb::RetrieveResponse>, Status> {
        Ok(Response::new(RetrievalService::similar(
            self,
            request.get_ref(),
        )?))
    }

    async fn popular(
        &self,
        request: Request<pb::PopularRequest>,
    ) -> Result<Response<pb::RetrieveResponse>, Status> {
        Ok(Response::new(RetrievalService::popular(
            self,
            request.get_ref(),
        )?))
    }
}

/// The retrieval server over `data`, ready to start or run.
pub fn server(config: Config, data: &Dataset) -> GrpcServer {
    GrpcServer::new("retrieval", config.server.clone())
        .add_service(RetrievalServer::new(RetrievalService::new(config, data)))
}

/// Loads the data, serves until `shutdown`, then drains.
pub async fn run(config: Config, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
    let data = config.data.load()?;
    server(config, &data).run(shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use recmesh_catalog::demo::{DemoSpec, generate};

    fn service() -> RetrievalService {
        let data = generate(&DemoSpec {
            items: 400,
            users: 200,
            interactions: 20_000,
            ..DemoSpec::default()
        });
        RetrievalService::new(Config::default(), &data)
    }

    fn viewed(item: &str) -> pb::Interaction {
        pb::Interaction {
            item_id: item.into(),
            event_type: pb::EventType::View as i32,
            timestamp_ms: 1,
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c: Config = recmesh_server::config::load(None).expect("defaults load");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn history_brings_cf_candidates_with_reasons() {
        let s = service();
        let seed = s
            .index
            .catalog
            .item(s.index.popular[0].0)
            .expect("item")
            .id
            .clone();
        let req = pb::RetrieveRequest {
            user_id: "u1".into(),
            recent: vec![viewed(&seed)],
            count: 50,
            ..Default::default()
        };
        let out = s.retrieve(&req).expect("ok").candidates;
        assert_eq!(out.len(), 50);
        assert_eq!(out[0].source, "cf", "personal candidates come first");
        assert!(
            out[0].reasons[0].starts_with("because you viewed"),
            "{:?}",
            out[0].reasons
        );
        assert!(
            out.iter()
                .all(|c| !c.reasons.is_empty() && c.item_id != seed)
        );
        assert!(
            out.iter()
                .all(|c| c.attributes.as_ref().is_some_and(|a| a.in_stock))
        );
        let ids: std::collections::HashSet<_> = out.iter().map(|c| &c.item_id).collect();
        assert_eq!(ids.len(), out.len(), "no duplicates");

        // A variant's source mix: popularity off leaves CF alone; CF off
        // leaves popularity alone.
        let mut only_cf = req.clone();
        only_cf.source_weights = HashMap::from([("popular".into(), 0.0), ("category".into(), 0.0)]);
        let out = s.retrieve(&only_cf).expect("ok").candidates;
        assert!(!out.is_empty() && out.iter().all(|c| c.source == "cf"));
        let mut no_cf = req;
        no_cf.source_weights = HashMap::from([("cf".into(), 0.0)]);
        let out = s.retrieve(&no_cf).expect("ok").candidates;
        assert!(!out.is_empty() && out.iter().all(|c| c.source == "popular"));
    }

    #[test]
    fn new_user_gets_popularity_and_filters_hold() {
        let s = service();
        let category = s.index.catalog.categories[0].clone();
        let req = pb::RetrieveRequest {
            user_id: "new".into(),
            count: 20,
            filters: Some(pb::Filters {
                categories: vec![category.clone()],
                ..Default::default()
            }),
            ..Default::default()
        };
        let out = s.retrieve(&req).expect("ok").candidates;
        assert!(!out.is_empty());
        assert!(out.iter().all(|c| c.source == "popular"));
        assert!(out.iter().all(|c| {
            c.attributes
                .as_ref()
                .is_some_and(|a| a.category == category)
        }));
    }

    #[test]
    fn invalid_input_names_the_field() {
        let s = service();
        let mut req = pb::RetrieveRequest {
            user_id: "u".into(),
            ..Default::default()
        };
        req.context = Some(pb::RequestContext {
            category: "nope".into(),
            ..Default::default()
        });
        assert_eq!(s.retrieve(&req).expect_err("bad").field, "context.category");
        req.context = None;
        req.source_weights = HashMap::from([("ann".into(), 1.0)]);
        assert_eq!(
            s.retrieve(&req).expect_err("bad").field,
            "source_weights.ann"
        );
        req.source_weights = HashMap::from([("cf".into(), -1.0)]);
        assert_eq!(
            s.retrieve(&req).expect_err("bad").field,
            "source_weights.cf"
        );
        req.source_weights.clear();
        req.count = 1_000_000;
        assert_eq!(s.retrieve(&req).expect_err("bad").field, "count");
        let err = s
            .similar(&pb::SimilarRequest {
                item_id: "zzz".into(),
                ..Default::default()
            })
            .expect_err("unknown");
        assert_eq!(err.code(), tonic::Code::NotFound);
    }

    #[test]
    fn popular_per_category_covers_every_category() {
        let s = service();
        let out = s
            .popular(&pb::PopularRequest {
                count: 10,
                per_category: 5,
                ..Default::default()
            })
            .expect("ok")
            .candidates;
        let categories: std::collections::HashSet<_> = out
            .iter()
            .filter_map(|c| c.attributes.as_ref().map(|a| a.category.clone()))
            .collect();
        assert_eq!(categories.len(), s.index.catalog.categories.len());
    }
}

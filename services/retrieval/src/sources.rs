//! One request's sources: validating what it asks for, planning which
//! sources run (in memory at once, `ann` and `content` as budgeted jobs),
//! and merging what they found into the answer.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use recmesh_algo::als;
use recmesh_algo::rules::HardFilters;
use recmesh_algo::{content, cooccurrence};
use recmesh_catalog::EventKind;
use recmesh_mesh::convert::{FieldError, check_id, event_kind};
use recmesh_proto::v1 as pb;
use recmesh_vector::Hit;

/// Catalog indexes of a request's seen and recent items: probed for every
/// item every source offers, so hashed with foldhash, not SipHash.
pub(crate) type ItemSet = std::collections::HashSet<u32, foldhash::fast::RandomState>;

use crate::merge::{Constraints, Merger, SourceWeights, Why};
use crate::{Index, Snapshot};

/// One source's results, best first: item, raw score, reason.
pub(crate) type Found = Vec<(u32, f64, Why)>;

/// One request's sources: the in-memory ones already run, the `ann` and
/// `content` ones as jobs.
pub(crate) struct Plan<'a> {
    pub(crate) count: usize,
    pub(crate) weights: SourceWeights,
    pub(crate) constraints: Constraints<'a>,
    /// Anchor and CF results, in merge order, with their weights.
    pub(crate) ready: Vec<(&'static str, f64, Found)>,
    /// Trending, then popularity lists (category ones first), with their
    /// source and weight.
    pub(crate) lists: Vec<(&'static str, f64, Found)>,
    pub(crate) ann: Option<AnnJob>,
    pub(crate) content: Option<ContentJob>,
    pub(crate) reports: Vec<pb::SourceReport>,
}

impl Plan<'_> {
    pub(crate) fn ready(
        &mut self,
        source: &'static str,
        weight: f64,
        started: std::time::Instant,
        found: Found,
    ) {
        self.reports.push(source_report(
            source,
            "ok",
            found.len(),
            started.elapsed(),
            String::new(),
        ));
        self.ready.push((source, weight, found));
    }

    /// Ranked lists of one source (trending, popular), with their weights.
    pub(crate) fn lists_ready(
        &mut self,
        source: &'static str,
        started: std::time::Instant,
        lists: Vec<(f64, Found)>,
    ) {
        let offered = lists.iter().map(|(_, l)| l.len()).sum();
        self.reports.push(source_report(
            source,
            "ok",
            offered,
            started.elapsed(),
            String::new(),
        ));
        self.lists
            .extend(lists.into_iter().map(|(w, l)| (source, w, l)));
    }

    pub(crate) fn off(&mut self, source: &'static str, why: &str) {
        self.reports.push(source_report(
            source,
            "off",
            0,
            std::time::Duration::ZERO,
            why.to_owned(),
        ));
    }
}

/// The vector index query of one request and the seeds that explain hits.
pub(crate) struct AnnJob {
    pub(crate) query: recmesh_vector::Query,
    pub(crate) strongest: Vec<(u32, f64, EventKind)>,
}

/// The content scan of one request: cold items like the recent ones.
pub(crate) struct ContentJob {
    pub(crate) index: Arc<Index>,
    pub(crate) profile: Vec<f32>,
    pub(crate) seen: ItemSet,
    pub(crate) limit: usize,
    /// How many of the newest cold items are scanned.
    pub(crate) pool: usize,
}

impl ContentJob {
    /// The `limit` best-matching unseen items of the pool, best first (ties
    /// by index), kept in a bounded heap rather than sorting every match.
    pub(crate) fn run(&self) -> Vec<(u32, f32)> {
        /// Ordered so the heap's top is the weakest match kept.
        struct Weakest(f32, u32);
        impl PartialEq for Weakest {
            fn eq(&self, o: &Self) -> bool {
                self.cmp(o).is_eq()
            }
        }
        impl Eq for Weakest {}
        impl PartialOrd for Weakest {
            fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
                Some(self.cmp(o))
            }
        }
        impl Ord for Weakest {
            fn cmp(&self, o: &Self) -> std::cmp::Ordering {
                o.0.total_cmp(&self.0).then(self.1.cmp(&o.1))
            }
        }
        if self.limit == 0 {
            return Vec::new();
        }
        let cold = &self.index.cold;
        let pool = if self.pool == 0 {
            cold.len()
        } else {
            self.pool.min(cold.len())
        };
        let mut best = std::collections::BinaryHeap::with_capacity(self.limit + 1);
        let rows = cold[..pool].iter().zip(self.index.cold_content(pool));
        als::similarities(&self.profile, rows, |&i, s| {
            if s <= 0.0 || self.seen.contains(&i) {
                return;
            }
            let candidate = Weakest(s, i);
            if best.len() < self.limit {
                best.push(candidate);
            } else if best.peek().is_some_and(|w| candidate < *w) {
                best.pop();
                best.push(candidate);
            }
        });
        best.into_sorted_vec()
            .into_iter()
            .map(|Weakest(s, i)| (i, s))
            .collect()
    }
}

/// How a budgeted source ended.
pub(crate) enum Ran<T> {
    Done(T, std::time::Duration),
    Late(std::time::Duration),
    Failed(String, std::time::Duration),
}

impl<T> Ran<T> {
    pub(crate) fn from_result(
        r: Result<T, impl std::fmt::Display>,
        took: std::time::Duration,
    ) -> Self {
        match r {
            Ok(v) => Ran::Done(v, took),
            Err(e) => Ran::Failed(e.to_string(), took),
        }
    }

    /// Records the outcome in `reports`; the result when there is one.
    pub(crate) fn report(
        self,
        source: &str,
        reports: &mut Vec<pb::SourceReport>,
        len: impl Fn(&T) -> usize,
    ) -> Option<T> {
        let (outcome, n, took, detail, value) = match self {
            Ran::Done(v, took) => ("ok", len(&v), took, String::new(), Some(v)),
            Ran::Late(budget) => (
                "late",
                0,
                budget,
                format!("no answer within its {} ms budget", budget.as_millis()),
                None,
            ),
            Ran::Failed(e, took) => ("error", 0, took, e, None),
        };
        if outcome != "ok" {
            tracing::warn!(source, outcome, %detail, "retrieval source dropped");
        }
        reports.push(source_report(source, outcome, n, took, detail));
        value
    }
}

/// A source's budget: `ms`, capped at three quarters of what the caller's
/// deadline leaves (the rest is for merging and the answer's way back).
pub(crate) fn source_budget(ms: u64, deadline: Option<std::time::Duration>) -> std::time::Duration {
    let budget = std::time::Duration::from_millis(ms);
    deadline.map_or(budget, |d| budget.min(d.mul_f64(0.75)))
}

/// Awaits `work` for at most `budget`.
pub(crate) async fn budgeted<T, E: std::fmt::Display>(
    budget: std::time::Duration,
    work: impl Future<Output = Result<T, E>>,
) -> Ran<T> {
    let started = std::time::Instant::now();
    match recmesh_mesh::timer::timeout(budget, work).await {
        Ok(r) => Ran::from_result(r, started.elapsed()),
        Err(_) => Ran::Late(budget),
    }
}

pub(crate) fn source_report(
    source: &str,
    outcome: &str,
    candidates: usize,
    took: std::time::Duration,
    detail: String,
) -> pb::SourceReport {
    pb::SourceReport {
        source: source.to_owned(),
        outcome: outcome.to_owned(),
        candidates: candidates.min(u32::MAX as usize) as u32,
        latency_us: took.as_micros().min(u128::from(u32::MAX)) as u32,
        detail,
    }
}

impl Snapshot {
    pub(crate) fn count(&self, field: &str, count: u32) -> Result<usize, FieldError> {
        match count {
            0 => Ok(self.config.default_count as usize),
            n if n > self.config.max_count => Err(FieldError::new(
                field,
                format!("must be at most {}", self.config.max_count),
            )),
            n => Ok(n as usize),
        }
    }

    pub(crate) fn category(&self, field: &str, name: &str) -> Result<u32, FieldError> {
        self.index
            .catalog
            .category_id(name)
            .ok_or_else(|| FieldError::new(field, format!("unknown category `{name}`")))
    }

    pub(crate) fn constraints<'a>(
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
        let mut excluded: Vec<u32> = exclude
            .iter()
            .filter_map(|id| self.index.catalog.index_of(id))
            .collect();
        excluded.sort_unstable();
        excluded.dedup();
        Ok(Constraints {
            excluded,
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

    pub(crate) fn popular_in(&self, category: u32) -> impl Iterator<Item = (u32, f64, Why)> + '_ {
        self.index
            .popular_by_category
            .get(&category)
            .into_iter()
            .flatten()
            .map(move |&(i, s)| (i, s, Why::PopularIn(category)))
    }

    pub(crate) fn popular_overall(&self) -> impl Iterator<Item = (u32, f64, Why)> + '_ {
        self.index
            .popular
            .iter()
            .map(|&(i, s)| (i, s, Why::PopularNow))
    }

    pub(crate) fn trending_in(&self, category: u32) -> Found {
        let list = self.index.trending().in_category(category);
        list.into_iter()
            .map(|(i, s)| (i, s, Why::TrendingIn(category)))
            .collect()
    }

    pub(crate) fn trending_overall(&self) -> Found {
        let list = self.index.trending().overall();
        list.into_iter()
            .map(|(i, s)| (i, s, Why::TrendingNow))
            .collect()
    }

    /// Validates `req` and runs the in-memory sources (anchor, CF,
    /// popularity); the `ann` and `content` sources come back as jobs, run
    /// under budgets by [`Snapshot::retrieve`] or inline by
    /// [`Snapshot::retrieve_blocking`].
    pub(crate) fn plan<'a>(&'a self, req: &'a pb::RetrieveRequest) -> Result<Plan<'a>, FieldError> {
        check_id("user_id", &req.user_id)?;
        let count = self.count("count", req.count)?;
        let constraints = self.constraints(&req.exclude_item_ids, req.filters.as_ref())?;
        let ctx = req.context.clone().unwrap_or_default();
        let weights = SourceWeights::from_request(&req.source_weights)?;
        let index = &self.index;
        let mut plan = Plan {
            count,
            weights,
            ready: Vec::new(),
            lists: Vec::new(),
            ann: None,
            content: None,
            reports: Vec::new(),
            constraints,
        };

        // What the user has already seen (the gateway's seen-items policy
        // over their whole history) and their recent items: no source
        // offers them, and each drops them before it cuts its list, so no
        // candidate slot is spent on them. Keys of items the catalog does
        // not know are skipped.
        if req.seen_items.len() > self.config.max_seen_items {
            return Err(FieldError::new(
                "seen_items",
                format!("at most {} item keys", self.config.max_seen_items),
            ));
        }
        let mut seen: ItemSet = req
            .seen_items
            .iter()
            .filter_map(|&k| index.catalog.index_of_key(k))
            .collect();

        // An anchor the index does not know yet (a brand-new item) adds no
        // candidates rather than failing the request.
        let started = std::time::Instant::now();
        if let Some(anchor) = index.catalog.index_of(&ctx.anchor_item_id) {
            let found: Vec<_> = index.neighbours[anchor as usize]
                .iter()
                .filter(|(i, _)| !seen.contains(i))
                .map(|&(i, s)| (i, f64::from(s), Why::SimilarTo(anchor)))
                .collect();
            plan.ready("anchor", weights.anchor, started, found);
        } else {
            plan.off("anchor", "no anchor item in the index");
        }

        // Seeds: newest first, weight = event strength × 0.9^position, so the
        // latest signals count most; an item seen twice keeps its strongest.
        let mut seeds: HashMap<u32, (f64, EventKind), foldhash::fast::RandomState> =
            HashMap::default();
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
            // Items the user just interacted with are not recommended back
            // to them by any source, whatever the policy.
            seen.insert(i);
            *engaged_categories
                .entry(index.catalog.category_of[i as usize])
                .or_default() += w;
        }
        let started = std::time::Instant::now();
        let seed_list: Vec<(u32, f64)> = seeds.iter().map(|(&i, &(w, _))| (i, w)).collect();
        let cf: Vec<_> = cooccurrence::score_from_seeds(
            &index.neighbours,
            &seed_list,
            |i| seen.contains(&i),
            count * 2,
        )
        .into_iter()
        .map(|c| {
            let kind = seeds.get(&c.because_of).map_or(EventKind::View, |s| s.1);
            (c.item, c.score, Why::Because(kind, c.because_of))
        })
        .collect();
        if seeds.is_empty() {
            plan.off("cf", "no recent items");
        } else {
            plan.ready("cf", weights.cf, started, cf);
        }

        // ANN: the user's trained vector, or one folded in from their recent
        // events when the bundle has not seen them.
        match (index.factors.as_ref(), index.ann.as_ref()) {
            _ if weights.ann <= 0.0 => plan.off("ann", "weight 0"),
            (Some(f), Some(_)) => {
                let user = match f.user_row.get(&req.user_id) {
                    Some(&row) => Some(f.trained.user(row as usize).to_vec()),
                    None if !seeds.is_empty() => {
                        let history: Vec<(u32, f32)> = seeds
                            .iter()
                            .map(|(&i, &(_, kind))| (i, kind.weight() as f32))
                            .collect();
                        Some(f.fold.user(&f.trained.items, &history))
                    }
                    None => None,
                };
                match user {
                    Some(vector) => {
                        // Explained by the strongest recent items it is closest to.
                        let mut strongest: Vec<(u32, f64, EventKind)> =
                            seeds.iter().map(|(&i, &(w, k))| (i, w, k)).collect();
                        strongest.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                        strongest.truncate(5);
                        plan.ann = Some(AnnJob {
                            query: recmesh_vector::Query {
                                vector,
                                limit: count,
                                // Filters are pushed into the index, so every slot is usable.
                                filter: self.vector_filter(&plan.constraints, &seen),
                            },
                            strongest,
                        });
                    }
                    None => plan.off("ann", "a new user with no recent items"),
                }
            }
            _ => plan.off("ann", "the bundle has no item vectors"),
        }

        // The categories the visitor states (browsed, filtered on), else
        // the two they engaged with most.
        let mut categories: Vec<u32> = Vec::new();
        if !ctx.category.is_empty() {
            categories.push(self.category("context.category", &ctx.category)?);
        }
        categories.extend(plan.constraints.categories.iter().copied());
        let stated = categories.len();
        if categories.is_empty() {
            let mut engaged: Vec<(u32, f64)> = engaged_categories.into_iter().collect();
            engaged.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            categories.extend(engaged.into_iter().take(2).map(|(c, _)| c));
        }

        // Content: cold items (no co-occurrence yet) like the recent ones,
        // or, for a visitor with no history, in the categories they state.
        if weights.content <= 0.0 {
            plan.off("content", "weight 0");
        } else if index.cold.is_empty() {
            plan.off("content", "no cold items");
        } else if seeds.is_empty() && stated == 0 {
            plan.off("content", "no recent items and no stated category");
        } else {
            let profile = if seeds.is_empty() {
                let names: Vec<[f32; content::DIM]> = categories
                    .iter()
                    .map(|&c| content::category_vector(&index.catalog.categories[c as usize]))
                    .collect();
                content::profile(names.iter().map(|v| (v.as_slice(), 1.0)))
            } else {
                content::profile(
                    seeds
                        .iter()
                        .map(|(&i, &(w, _))| (index.content_of(i), w as f32)),
                )
            };
            plan.content = Some(ContentJob {
                index: index.clone(),
                profile,
                seen: seen.clone(),
                limit: (count / 4).max(1),
                pool: self.config.content_pool,
            });
        }

        // Trending and popularity lists: in those categories, then overall.
        let unseen = |list: Found| -> Found {
            list.into_iter()
                .filter(|(i, _, _)| !seen.contains(i))
                .collect()
        };
        if weights.trending <= 0.0 {
            plan.off("trending", "weight 0");
        } else {
            let started = std::time::Instant::now();
            let mut lists: Vec<(f64, Found)> = categories
                .iter()
                .map(|&c| (weights.trending, unseen(self.trending_in(c))))
                .collect();
            // Overall trending is for a visitor with no history (cold
            // start); one with history gets their categories' trends.
            if seeds.is_empty() {
                lists.push((weights.trending, unseen(self.trending_overall())));
            }
            plan.lists_ready("trending", started, lists);
        }
        let started = std::time::Instant::now();
        let mut lists: Vec<(f64, Found)> = categories
            .iter()
            .map(|&c| (weights.category, unseen(self.popular_in(c).collect())))
            .collect();
        lists.push((weights.popular, unseen(self.popular_overall().collect())));
        plan.lists_ready("popular", started, lists);
        Ok(plan)
    }

    /// The request's filters and the user's recent items, for the index.
    pub(crate) fn vector_filter(
        &self,
        c: &Constraints<'_>,
        seen: &ItemSet,
    ) -> recmesh_vector::Filter {
        let mut exclude = c.excluded.clone();
        exclude.extend(seen.iter().copied());
        recmesh_vector::Filter {
            categories: c.categories.clone(),
            in_stock_only: true,
            min_price: c.filters.min_price,
            max_price: c.filters.max_price,
            created_since: None,
            exclude,
        }
    }

    /// Merges a plan with what its `ann` and `content` jobs returned.
    pub(crate) fn finish(
        &self,
        mut plan: Plan<'_>,
        ann: Option<Ran<Vec<Hit>>>,
        content: Option<Ran<Vec<(u32, f32)>>>,
    ) -> pb::RetrieveResponse {
        let index = &self.index;
        let mut merger = Merger::new(index, &plan.constraints);
        let mut reports = Vec::new();
        for (source, weight, found) in plan.ready.drain(..) {
            merger.add(source, weight, found);
        }
        if let (Some(ran), Some(job)) = (ann, plan.ann.as_ref()) {
            let hits = ran.report("ann", &mut reports, Vec::len);
            if let (Some(hits), Some(_)) = (hits, index.factors.as_ref()) {
                merger.nearest_to = &job.strongest;
                merger.add(
                    "ann",
                    plan.weights.ann,
                    hits.into_iter()
                        .map(|h| (h.id, f64::from(h.score), Why::Nearest(h.id))),
                );
            }
        }
        if let Some(matches) = content.and_then(|ran| ran.report("content", &mut reports, Vec::len))
        {
            merger.add(
                "content",
                plan.weights.content,
                matches.into_iter().map(|(i, s)| {
                    (
                        i,
                        f64::from(s),
                        Why::NewIn(index.catalog.category_of[i as usize]),
                    )
                }),
            );
        }
        for (source, weight, list) in plan.lists.drain(..) {
            merger.add(source, weight, list);
        }
        // Merge order: anchor, cf, ann, content, trending, popular.
        let mut sources = std::mem::take(&mut plan.reports);
        sources.extend(reports);
        let order = |s: &pb::SourceReport| {
            ["anchor", "cf", "ann", "content", "trending", "popular"]
                .iter()
                .position(|n| *n == s.source)
        };
        sources.sort_by_key(order);
        for r in &sources {
            metrics::counter!("recmesh_retrieval_source_total", "source" => r.source.clone(), "outcome" => r.outcome.clone()).increment(1);
            if r.outcome != "off" {
                metrics::histogram!("recmesh_retrieval_source_duration_seconds", "source" => r.source.clone())
                    .record(f64::from(r.latency_us) / 1e6);
            }
        }
        pb::RetrieveResponse {
            candidates: Vec::new(),
            data_version: index.version.clone(),
            sources,
            list: Some(merger.finish_list(plan.count)),
        }
    }
}

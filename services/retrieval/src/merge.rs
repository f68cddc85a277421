//! Merging what the sources found into one candidate list: request
//! constraints, source weights, reasons, and the top-k cut.

use std::collections::HashMap;

use recmesh_algo::als::{self};
use recmesh_algo::rules::HardFilters;
use recmesh_catalog::EventKind;
use recmesh_mesh::convert::{FieldError, attributes};
use recmesh_mesh::lean;
use recmesh_proto::v1::{self as pb};

use crate::index::Index;

/// Request filters after validation: the same hard filters the reranker
/// applies (`recmesh_algo::rules`), pushed down so no slot is spent on an
/// item that would be dropped later.
pub(crate) struct Constraints<'a> {
    pub(crate) filters: HardFilters<'a>,
    /// Category ids of `filters.categories`, for picking popularity lists.
    pub(crate) categories: Vec<u32>,
    /// Catalog indexes of `filters.excluded` (ids the catalog does not know
    /// cannot come up), sorted.
    pub(crate) excluded: Vec<u32>,
}

impl<'a> Constraints<'a> {
    /// Whether `item` passes the filters: [`HardFilters::check`] on the
    /// item's packed columns (the tests hold the two to the same answers).
    /// Retrieval never fills `filters.purchased` or `filters.seen` (seen
    /// items are dropped by each source before its cut), so neither is read.
    pub(crate) fn allows(&self, index: &Index, item: u32) -> bool {
        let Some(c) = index.filter_columns.get(item as usize) else {
            return false;
        };
        let f = &self.filters;
        c.in_stock
            && (self.categories.is_empty() || self.categories.contains(&c.category))
            && !(f.min_price > 0.0 && c.price < f.min_price)
            && !(f.max_price > 0.0 && c.price > f.max_price)
            && self.excluded.binary_search(&item).is_err()
    }

    /// Excludes one more item (its id and catalog index).
    pub(crate) fn exclude(&mut self, id: &'a str, at: u32) {
        self.filters.excluded.insert(id);
        if let Err(p) = self.excluded.binary_search(&at) {
            self.excluded.insert(p, at);
        }
    }
}

/// The merge weight of each source (`RetrieveRequest.source_weights`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SourceWeights {
    pub(crate) anchor: f64,
    pub(crate) cf: f64,
    pub(crate) ann: f64,
    pub(crate) content: f64,
    pub(crate) trending: f64,
    pub(crate) category: f64,
    pub(crate) popular: f64,
}

impl SourceWeights {
    pub(crate) fn from_request(map: &HashMap<String, f64>) -> Result<Self, FieldError> {
        let mut w = SourceWeights {
            anchor: 1.0,
            cf: 1.0,
            ann: 1.0,
            content: 0.5,
            // MovieLens served NDCG@10: 0.1433 without trending, 0.1465 at
            // 0.3, 0.1479 at 0.5 (docs/evaluation.md).
            trending: 0.5,
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
                "ann" => w.ann = value,
                "content" => w.content = value,
                "trending" => w.trending = value,
                "category" => w.category = value,
                "popular" => w.popular = value,
                _ => {
                    return Err(FieldError::new(
                        field,
                        "unknown source; known: anchor, cf, ann, content, trending, category, popular",
                    ));
                }
            }
        }
        Ok(w)
    }
}

/// Builds the merged candidate list, first source to find an item first.
pub(crate) struct Merger<'a> {
    pub(crate) index: &'a Index,
    pub(crate) constraints: &'a Constraints<'a>,
    /// Each item's position in `items`. foldhash: every item every source
    /// found passes through here.
    by_item: HashMap<u32, u32, foldhash::fast::RandomState>,
    /// The merged items in the order sources first found them (equal
    /// scores keep that order), with no allocation per item.
    items: Vec<(u32, Merged)>,
    /// The recent items that explain an `ann` hit ([`Why::Nearest`]).
    pub(crate) nearest_to: &'a [(u32, f64, EventKind)],
}

/// One item while sources are merged: only the winners of the cut become
/// candidates (ids, attributes and reasons are written for `count` items,
/// not for every item every source found). Held inline and small (a
/// request merges a thousand or more items): sources by their
/// [`lean::SOURCES`] code, reasons as indexes.
#[derive(Clone, Copy)]
pub(crate) struct Merged {
    pub(crate) score: f64,
    /// Best raw score per source, by source code (valid where `found` has
    /// the source's bit).
    raw: [f64; SOURCES_KEPT],
    /// Bit `1 << code` for each source that found the item.
    found: u8,
    /// Code of the first source that found it: the candidate's `source`.
    first: u8,
    /// Reasons in use in `reasons`.
    reasons_len: u8,
    reasons: [Why; REASONS_KEPT],
}

impl Merged {
    const EMPTY: Merged = Merged {
        score: 0.0,
        raw: [0.0; SOURCES_KEPT],
        found: 0,
        first: 0,
        reasons_len: 0,
        reasons: [Why::ForYourTaste; REASONS_KEPT],
    };

    /// The source that found it first, by name.
    pub(crate) fn first_source(&self) -> Option<&'static str> {
        (self.found != 0).then(|| lean::SOURCES[usize::from(self.first)])
    }

    /// Best raw score per source that found it, by source code, lowest
    /// code first.
    pub(crate) fn source_scores(&self) -> impl Iterator<Item = (u32, f64)> + '_ {
        (0..SOURCES_KEPT)
            .filter(|&c| self.found & (1 << c) != 0)
            .map(|c| (c as u32, self.raw[c]))
    }

    /// Why sources offered it, first finder first, each once.
    pub(crate) fn reasons(&self) -> &[Why] {
        &self.reasons[..usize::from(self.reasons_len)]
    }

    fn add_source(&mut self, code: usize, raw: f64) {
        let bit = 1u8 << code;
        if self.found & bit != 0 {
            self.raw[code] = self.raw[code].max(raw);
        } else {
            if self.found == 0 {
                self.first = code as u8;
            }
            self.found |= bit;
            self.raw[code] = raw.max(0.0);
        }
    }

    fn add_reason(&mut self, reason: Why) {
        let n = usize::from(self.reasons_len);
        if n < REASONS_KEPT && !self.reasons[..n].contains(&reason) {
            self.reasons[n] = reason;
            self.reasons_len += 1;
        }
    }
}

/// Reasons kept per item while merging: the three shown, and one more in
/// case a [`Why::Nearest`] turns out to repeat another.
pub(crate) const REASONS_KEPT: usize = 4;

/// Sources one item can be found by: every source a candidate list can
/// name (a bit each in `Merged::found`).
const SOURCES_KEPT: usize = lean::SOURCES.len();
const _: () = assert!(SOURCES_KEPT <= 8);

/// Why a source offered an item. Sources hand these over as indexes; only
/// the items that make the cut get their reasons written out as text
/// ([`Why::text`]), so a request formats a few dozen strings, not one per
/// item every source found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Why {
    /// "similar to {title of the item}"
    SimilarTo(u32),
    /// "because you {verb of the kind} {title of the item}"
    Because(EventKind, u32),
    /// An `ann` hit, explained by the recent item nearest to it (resolved
    /// into `Because` or `ForYourTaste` only for the items that make the
    /// cut: a dot product per recent item, per hit).
    Nearest(u32),
    /// "picked for your taste"
    ForYourTaste,
    /// "new in {category}"
    NewIn(u32),
    /// "trending in {category}"
    TrendingIn(u32),
    /// "trending now"
    TrendingNow,
    /// "popular in {category}"
    PopularIn(u32),
    /// "popular right now"
    PopularNow,
}

impl Why {
    pub(crate) fn text(self, index: &Index) -> String {
        let category = |c: u32| {
            index
                .catalog
                .categories
                .get(c as usize)
                .map_or("", String::as_str)
        };
        match self {
            Why::SimilarTo(i) => format!("similar to {}", index.title(i)),
            Why::Because(kind, i) => format!("because you {} {}", kind.verb(), index.title(i)),
            Why::Nearest(_) | Why::ForYourTaste => "picked for your taste".to_owned(),
            Why::NewIn(c) => format!("new in {}", category(c)),
            Why::TrendingIn(c) => format!("trending in {}", category(c)),
            Why::TrendingNow => "trending now".to_owned(),
            Why::PopularIn(c) => format!("popular in {}", category(c)),
            Why::PopularNow => "popular right now".to_owned(),
        }
    }
}

impl<'a> Merger<'a> {
    pub(crate) fn new(index: &'a Index, constraints: &'a Constraints<'a>) -> Self {
        Merger {
            index,
            constraints,
            by_item: HashMap::with_capacity_and_hasher(1024, Default::default()),
            items: Vec::with_capacity(1024),
            nearest_to: &[],
        }
    }

    /// Resolves a [`Why::Nearest`]: the recent item (of `nearest_to`)
    /// whose vector is closest to the hit's.
    pub(crate) fn resolve(&self, why: Why) -> Why {
        let Why::Nearest(hit) = why else {
            return why;
        };
        let Some(f) = self.index.factors.as_ref() else {
            return Why::ForYourTaste;
        };
        let item = |i: u32| f.trained.item(i as usize);
        // One SIMD dispatch for all seeds; a tie keeps the later seed.
        let mut nearest: Option<(f32, &(u32, f64, EventKind))> = None;
        let seeds = self.nearest_to.iter().map(|seed| (seed, item(seed.0)));
        als::similarities(item(hit), seeds, |seed, s| {
            if nearest.is_none_or(|(best, _)| s >= best) {
                nearest = Some((s, seed));
            }
        });
        nearest.map_or(Why::ForYourTaste, |(_, &(seed, _, kind))| {
            Why::Because(kind, seed)
        })
    }

    /// Adds one source's results (best first) with `weight`.
    pub(crate) fn add(
        &mut self,
        source: &'static str,
        weight: f64,
        results: impl IntoIterator<Item = (u32, f64, Why)>,
    ) {
        // Weight 0: the variant turned this source off.
        if weight <= 0.0 {
            return;
        }
        let Some(code) = lean::source_code(source) else {
            debug_assert!(false, "source `{source}` has no code in lean::SOURCES");
            return;
        };
        let code = code as usize;
        let results: Vec<(u32, f64, Why)> = results.into_iter().collect();
        let best = results.iter().map(|r| r.1).fold(0.0f64, f64::max);
        for (item, raw, reason) in results {
            // An item already merged passed the constraints when it was
            // first found: only new items are checked.
            let at = match self.by_item.entry(item) {
                std::collections::hash_map::Entry::Occupied(e) => *e.get() as usize,
                std::collections::hash_map::Entry::Vacant(e) => {
                    if !self.constraints.allows(self.index, item) {
                        continue;
                    }
                    e.insert(self.items.len() as u32);
                    self.items.push((item, Merged::EMPTY));
                    self.items.len() - 1
                }
            };
            let score = if best > 0.0 { weight * raw / best } else { 0.0 };
            let merged = &mut self.items[at].1;
            merged.add_source(code, raw);
            merged.score = merged.score.max(score);
            merged.add_reason(reason);
        }
    }

    /// The best `count` merged items, best first (stable: equal scores keep
    /// the order sources found them in).
    pub(crate) fn best(&self, count: usize) -> Vec<&(u32, Merged)> {
        let items = &self.items;
        let mut order: Vec<u32> = (0..items.len() as u32).collect();
        // Only the best `count` are sorted: a few hundred of a thousand or more.
        recmesh_algo::top_k(&mut order, count, |a, b| {
            let (x, y) = (&items[*a as usize].1, &items[*b as usize].1);
            y.score.total_cmp(&x.score).then(a.cmp(b))
        });
        order.iter().map(|&p| &items[p as usize]).collect()
    }

    /// An item's reasons to show: resolved, as text (positions in `list`
    /// through `written`), each text once, at most three.
    pub(crate) fn reason_texts(
        &self,
        reasons: &[Why],
        mut text: impl FnMut(Why) -> u32,
    ) -> Vec<u32> {
        let mut out = Vec::with_capacity(3);
        for why in reasons {
            let at = text(self.resolve(*why));
            // Two items may share a title: one line each way.
            if !out.contains(&at) && out.len() < 3 {
                out.push(at);
            }
        }
        out
    }

    /// The best `count` items as whole candidates (`Similar`, `Popular`,
    /// `Trending`: short lists the gateway answers with as they are).
    pub(crate) fn finish(self, count: usize) -> Vec<pb::Candidate> {
        self.best(count)
            .into_iter()
            .map(|&(item, ref m)| {
                let it = self.index.catalog.item(item);
                pb::Candidate {
                    item_id: it.map(|i| i.id.clone()).unwrap_or_default(),
                    score: m.score,
                    source: m.first_source().unwrap_or_default().to_owned(),
                    reasons: m.reasons().iter().fold(Vec::new(), |mut texts, why| {
                        // Two items may share a title: one line each way.
                        let text = self.resolve(*why).text(self.index);
                        if !texts.contains(&text) && texts.len() < 3 {
                            texts.push(text);
                        }
                        texts
                    }),
                    source_scores: m
                        .source_scores()
                        .map(|(c, v)| (lean::SOURCES[c as usize].to_owned(), v))
                        .collect(),
                    attributes: it.map(attributes),
                    exploration: false,
                }
            })
            .collect()
    }

    /// The best `count` items as the lean list `Retrieve` answers with:
    /// each distinct reason is written once for the whole list (many
    /// candidates share "because you viewed X" or "popular in Y").
    pub(crate) fn finish_list(self, count: usize) -> pb::CandidateList {
        let best = self.best(count);
        let mut list = lean::ListBuilder::with_capacity(best.len());
        let mut written: Vec<(Why, u32)> = Vec::new();
        let mut scores = Vec::with_capacity(4);
        for &(item, ref m) in best {
            let Some(it) = self.index.catalog.item(item) else {
                continue;
            };
            scores.clear();
            scores.extend(m.source_scores());
            let first_source = u32::from(m.first);
            let reasons = self.reason_texts(m.reasons(), |why| {
                match written.iter().find(|(w, _)| *w == why) {
                    Some(&(_, at)) => at,
                    None => {
                        let at = list.text(&why.text(self.index));
                        written.push((why, at));
                        at
                    }
                }
            });
            list.push(lean::Entry {
                id: &it.id,
                score: m.score,
                first_source,
                source_scores: &scores,
                reasons: &reasons,
                attributes: Some(lean::Attributes {
                    category: &it.category,
                    brand: &it.brand,
                    price: it.price,
                    in_stock: it.in_stock,
                    promoted: it.promoted,
                    created_at: it.created_at,
                }),
                exploration: false,
            });
        }
        list.finish()
    }
}

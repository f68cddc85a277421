//! Re-ranking: from a ranked list to the list a merchandiser would sign off.
//!
//! In order:
//! 1. **Hard filters** ([`HardFilters`], plus items viewed within
//!    `recently_viewed_window_s`) are never relaxed, whatever the boosts.
//! 2. **Boosts** multiply the score of promoted items and new arrivals (age
//!    below `new_arrival_days`). Scores are first scaled to 0..=1, order kept:
//!    divided by the best when none is negative (ratios kept), min-max
//!    otherwise. So a boost always raises an item, even when the model's raw
//!    scores are negative margins.
//! 3. **Exploration**: `round(count × exploration_share)` slots go to items
//!    outside the user's usual categories, or to new arrivals (from the
//!    ranker's best `exploration_pool` of them when it is set), picked by a
//!    hash of the request's seed and the item id. The same request id gives
//!    the same list, so a response can be reproduced.
//! 4. **Diversity**: greedy MMR. The next item maximises
//!    `λ·score − (1−λ)·max similarity to the items already chosen`, under
//!    per-category and per-brand caps. λ = 1 is pure score order. Similarity
//!    is the cosine of content vectors built from the attributes (one-hot
//!    category, brand and price band, so it is the share of those three that
//!    match) until the model bundle ships learned item vectors.
//!
//! Exploration items are spread evenly through the final list below its
//! first `exploration_start` share (0: through all of it; the default 1
//! puts them in the last slots).

mod rules;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};

use crate::rules::{HardFilters, Removal, RuleItem};

pub use rules::{RULE_KEYS, RerankRules};

/// Per-call tables keyed by item, category or brand: foldhash, seeded per
/// map like the standard hasher, at a fraction of SipHash's cost.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// What re-ranking needs to know about one candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct RerankItem<'a> {
    /// Id, category, price and stock, as the hard filters see them.
    pub rule: RuleItem<'a>,
    /// Brand.
    pub brand: &'a str,
    /// Promoted by merchandising.
    pub promoted: bool,
    /// Entered the catalog at, Unix seconds.
    pub created_at_s: i64,
    /// Ranking score; higher is better, any sign.
    pub score: f64,
}

/// The per-request inputs besides the items.
#[derive(Debug, Clone, Default)]
pub struct RerankRequest<'a> {
    /// Exclusions, purchases and filters.
    pub filters: HardFilters<'a>,
    /// The user's recent views as (item id, Unix seconds).
    pub recent_views: Vec<(&'a str, i64)>,
    /// Categories the user usually engages with; exploration looks outside them.
    pub usual_categories: HashSet<&'a str>,
    /// Now, Unix seconds.
    pub now_s: i64,
    /// Seed of the exploration draw (a hash of the request id).
    pub seed: u64,
    /// Length of the final list.
    pub count: usize,
}

/// Why an item is in the list beyond its retrieval reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Boost {
    /// Promoted by merchandising.
    Promoted,
    /// A new arrival.
    NewArrival,
}

/// One item of the final list.
#[derive(Debug, Clone, PartialEq)]
pub struct Placed {
    /// Index into the input items.
    pub index: usize,
    /// Score after scaling and boosts, 0..=boost.
    pub score: f64,
    /// Boosts that applied.
    pub boosts: Vec<Boost>,
    /// Chosen for exploration.
    pub explore: bool,
}

/// The final list and how many items each rule removed.
#[derive(Debug, Clone, Default)]
pub struct Reranked {
    /// In display order.
    pub items: Vec<Placed>,
    /// Removals by rule.
    pub removed: HashMap<Removal, u32>,
}

/// SplitMix64 finaliser: a well-mixed hash of a u64.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The exploration seed of a request id.
pub fn seed_of(request_id: &str) -> u64 {
    mix(crate::assign::fnv1a64(request_id.as_bytes()))
}

/// Price band: powers of two, so "similar price" means within a factor of two.
pub fn price_band(price: f64) -> i32 {
    if price > 0.0 {
        price.log2().floor() as i32
    } else {
        i32::MIN
    }
}

/// Compact per-item keys for the similarity and caps in the MMR loop.
/// [`UNKNOWN`] stands for an empty category or brand.
struct Keys {
    category: u32,
    brand: u32,
    band: i32,
}

/// Cosine of the one-hot (category, brand, price band) content vectors: the
/// share of the three that match.
/// An unknown category or brand matches nothing.
fn similarity(a: &Keys, b: &Keys) -> f64 {
    let same = u32::from(a.category == b.category && a.category != UNKNOWN)
        + u32::from(a.brand == b.brand && a.brand != UNKNOWN)
        + u32::from(a.band == b.band);
    f64::from(same) / 3.0
}

/// The similarity MMR uses, for two items given as (category, brand, price):
/// the share of category, brand and price band that match (an empty
/// category or brand matches nothing). Offline evaluation measures
/// intra-list diversity with it.
pub fn attribute_similarity(a: (&str, &str, f64), b: (&str, &str, f64)) -> f64 {
    let same = u32::from(a.0 == b.0 && !a.0.is_empty())
        + u32::from(a.1 == b.1 && !a.1.is_empty())
        + u32::from(price_band(a.2) == price_band(b.2));
    f64::from(same) / 3.0
}

/// The key of an empty category or brand: an item without a brand is not of
/// one brand with every other such item, so no cap or similarity counts it.
const UNKNOWN: u32 = u32::MAX;

fn intern<'a>(table: &mut FastMap<&'a str, u32>, key: &'a str) -> u32 {
    if key.is_empty() {
        return UNKNOWN;
    }
    let next = table.len() as u32;
    *table.entry(key).or_insert(next)
}

/// How many chosen items have each interned key (category or brand): a
/// vector indexed by the key. The MMR loop asks for every remaining item at
/// every slot, thousands of times a request, so no hashing here.
struct KeyCounts(Vec<u32>);

impl KeyCounts {
    fn new(keys: usize) -> Self {
        KeyCounts(vec![0; keys])
    }

    /// The count of `key`; [`UNKNOWN`] is never counted.
    fn get(&self, key: u32) -> u32 {
        self.0.get(key as usize).copied().unwrap_or(0)
    }

    fn add(&mut self, key: u32) {
        if let Some(n) = self.0.get_mut(key as usize) {
            *n += 1;
        }
    }
}

/// Applies `rules` to `items` (best first) for one request.
pub fn rerank(items: &[RerankItem<'_>], rules: &RerankRules, req: &RerankRequest<'_>) -> Reranked {
    let mut out = Reranked::default();
    let window = rules.recently_viewed_window_s as i64;
    let recently_viewed: FastSet<&str> = if window > 0 {
        req.recent_views
            .iter()
            .filter(|(_, ts)| req.now_s - *ts <= window)
            .map(|(id, _)| *id)
            .collect()
    } else {
        FastSet::default()
    };

    // 1. Hard filters, and duplicates.
    let mut seen: FastSet<&str> =
        FastSet::with_capacity_and_hasher(items.len(), Default::default());
    let mut survivors: Vec<usize> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let verdict = if !seen.insert(item.rule.id) {
            Some(Removal::Duplicate)
        } else if let Some(r) = req.filters.check(&item.rule) {
            Some(r)
        } else if recently_viewed.contains(item.rule.id) {
            Some(Removal::RecentlyViewed)
        } else {
            None
        };
        match verdict {
            Some(r) => *out.removed.entry(r).or_default() += 1,
            None => survivors.push(i),
        }
    }

    // 2. Scale to 0..=1 (order kept), then boost.
    let (lo, hi) = survivors
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &i| {
            let s = items[i].score;
            if s.is_finite() {
                (lo.min(s), hi.max(s))
            } else {
                (lo, hi)
            }
        });
    let new_before = req.now_s - i64::from(rules.new_arrival_days) * 86_400;
    // Per input index; only survivors' entries are ever read.
    let mut boosted: Vec<(f64, Vec<Boost>)> = vec![(0.0, Vec::new()); items.len()];
    for &i in &survivors {
        let item = &items[i];
        let base = if !item.score.is_finite() {
            0.0
        } else if lo >= 0.0 && hi > 0.0 {
            // Non-negative scores (probabilities, the baseline): keep ratios,
            // which is what the MMR trade-off weighs.
            item.score / hi
        } else if hi > lo {
            // Margins of any sign: min-max keeps the order.
            (item.score - lo) / (hi - lo)
        } else {
            1.0
        };
        let mut score = base;
        let mut boosts = Vec::new();
        if item.promoted && rules.promoted_boost > 1.0 {
            score *= rules.promoted_boost;
            boosts.push(Boost::Promoted);
        }
        if item.created_at_s >= new_before && rules.new_arrival_boost > 1.0 {
            score *= rules.new_arrival_boost;
            boosts.push(Boost::NewArrival);
        }
        boosted[i] = (score, boosts);
    }
    let score_of = |i: usize| boosted[i].0;

    // Keys for caps and similarity.
    let mut categories = FastMap::default();
    let mut brands = FastMap::default();
    let keys: Vec<Keys> = items
        .iter()
        .map(|it| Keys {
            category: intern(&mut categories, it.rule.category),
            brand: intern(&mut brands, it.brand),
            band: price_band(it.rule.price),
        })
        .collect();
    let mut per_category = KeyCounts::new(categories.len());
    let mut per_brand = KeyCounts::new(brands.len());
    let fits = |i: usize, per_category: &KeyCounts, per_brand: &KeyCounts| {
        let k = &keys[i];
        (rules.category_cap == 0
            || k.category == UNKNOWN
            || per_category.get(k.category) < rules.category_cap)
            && (rules.brand_cap == 0
                || k.brand == UNKNOWN
                || per_brand.get(k.brand) < rules.brand_cap)
    };
    let take = |i: usize, per_category: &mut KeyCounts, per_brand: &mut KeyCounts| {
        let k = &keys[i];
        per_category.add(k.category);
        per_brand.add(k.brand);
    };

    // 3. Exploration picks, by a per-request hash order over the pool.
    let slots = ((req.count as f64) * rules.exploration_share).round() as usize;
    let mut explore: Vec<usize> = Vec::new();
    if slots > 0 {
        let mut pool: Vec<usize> = survivors
            .iter()
            .copied()
            .filter(|&i| {
                let it = &items[i];
                let outside = !req.usual_categories.is_empty()
                    && !req.usual_categories.contains(it.rule.category);
                outside || it.created_at_s >= new_before
            })
            .collect();
        let best = rules.exploration_pool as usize;
        if best > 0 && pool.len() > best {
            // The ranker's best `best`; ties keep the ranking's order.
            crate::top_k(&mut pool, best, |&a, &b| {
                score_of(b).total_cmp(&score_of(a)).then(a.cmp(&b))
            });
        }
        pool.sort_by_key(|&i| mix(req.seed ^ crate::assign::fnv1a64(items[i].rule.id.as_bytes())));
        for i in pool {
            if explore.len() == slots {
                break;
            }
            if fits(i, &per_category, &per_brand) {
                take(i, &mut per_category, &mut per_brand);
                explore.push(i);
            }
        }
    }

    // 4. MMR under the caps for the remaining slots.
    let main_slots = req.count.saturating_sub(explore.len());
    let explored: HashSet<usize> = explore.iter().copied().collect();
    let mut remaining: Vec<usize> = survivors
        .iter()
        .copied()
        .filter(|i| !explored.contains(i))
        .collect();
    let mut chosen: Vec<usize> = Vec::with_capacity(main_slots);
    // max similarity of each remaining item to the chosen ones (explore included)
    let mut max_sim: Vec<f64> = vec![0.0; items.len()];
    for &i in &remaining {
        max_sim[i] = explore
            .iter()
            .map(|&e| similarity(&keys[i], &keys[e]))
            .fold(0.0, f64::max);
    }
    let lambda = rules.mmr_lambda;
    while chosen.len() < main_slots {
        let mut best: Option<(usize, f64)> = None;
        for (pos, &i) in remaining.iter().enumerate() {
            if !fits(i, &per_category, &per_brand) {
                continue;
            }
            let value = lambda * score_of(i) - (1.0 - lambda) * max_sim[i];
            // Strictly greater: ties keep the ranking's order.
            if best.is_none_or(|(_, b)| value > b) {
                best = Some((pos, value));
            }
        }
        let Some((pos, _)) = best else { break };
        let i = remaining.remove(pos);
        take(i, &mut per_category, &mut per_brand);
        for &r in &remaining {
            let sim = similarity(&keys[r], &keys[i]);
            if sim > max_sim[r] {
                max_sim[r] = sim;
            }
        }
        chosen.push(i);
    }
    // What the caps held back (items left over only because the list is
    // full are not counted).
    for &i in &remaining {
        let k = &keys[i];
        if rules.category_cap > 0
            && k.category != UNKNOWN
            && per_category.get(k.category) >= rules.category_cap
        {
            *out.removed.entry(Removal::CategoryCap).or_default() += 1;
        } else if rules.brand_cap > 0
            && k.brand != UNKNOWN
            && per_brand.get(k.brand) >= rules.brand_cap
        {
            *out.removed.entry(Removal::BrandCap).or_default() += 1;
        }
    }

    // 5. Spread exploration items evenly through the list below
    //    `exploration_start` of it.
    let total = chosen.len() + explore.len();
    let mut order: Vec<(usize, bool)> = chosen.into_iter().map(|i| (i, false)).collect();
    let n = explore.len();
    let first = ((total as f64 * rules.exploration_start).round() as usize).min(total - n);
    for (k, i) in explore.into_iter().enumerate() {
        let at = (first + (k + 1) * (total - first) / (n + 1)).min(order.len());
        order.insert(at, (i, true));
    }
    out.items = order
        .into_iter()
        .map(|(index, explore)| {
            let (score, boosts) = std::mem::take(&mut boosted[index]);
            Placed {
                index,
                score,
                boosts,
                explore,
            }
        })
        .collect();
    out
}

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
//!    outside the user's usual categories, or to new arrivals, picked by a hash
//!    of the request's seed and the item id. The same request id gives the same
//!    list, so a response can be reproduced.
//! 4. **Diversity**: greedy MMR. The next item maximises
//!    `λ·score − (1−λ)·max similarity to the items already chosen`, under
//!    per-category and per-brand caps. λ = 1 is pure score order. Similarity
//!    is the cosine of content vectors built from the attributes (one-hot
//!    category, brand and price band, so it is the share of those three that
//!    match) until the model bundle ships learned item vectors.
//!
//! Exploration items are spread evenly through the final list.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::params::ParamError;
use crate::rules::{HardFilters, Removal, RuleItem};

/// Per-call tables keyed by item, category or brand: foldhash, seeded per
/// map like the standard hasher, at a fraction of SipHash's cost.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// The re-ranking rules. Every field has a default and a validated range;
/// experiments override them with params named `rerank.<field>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RerankRules {
    /// Most items per category in the final list (0: no cap).
    pub category_cap: u32,
    /// Most items per brand in the final list (0: no cap).
    pub brand_cap: u32,
    /// Score multiplier of promoted items, 1.0..=5.0 (1: no boost).
    pub promoted_boost: f64,
    /// Score multiplier of new arrivals, 1.0..=5.0 (1: no boost).
    pub new_arrival_boost: f64,
    /// Items younger than this many days are new arrivals.
    pub new_arrival_days: u32,
    /// MMR trade-off, 0.0..=1.0: 1 is pure score order, lower values trade
    /// score for variety.
    pub mmr_lambda: f64,
    /// Share of slots for exploration, 0.0..=0.5.
    pub exploration_share: f64,
    /// Items the user viewed within this many seconds are not shown again
    /// (0: off).
    pub recently_viewed_window_s: u64,
}

impl Default for RerankRules {
    fn default() -> Self {
        RerankRules {
            // With 10 items shown, 4 per category keeps at least three
            // categories on screen; 2 per brand keeps one brand from a row.
            category_cap: 4,
            brand_cap: 2,
            // Mild: enough to lift a promoted item past near-ties, not past
            // clearly better matches.
            promoted_boost: 1.2,
            new_arrival_boost: 1.15,
            new_arrival_days: 30,
            // Mostly relevance; enough diversity to break runs of lookalikes.
            mmr_lambda: 0.8,
            // One slot in ten for discovery.
            exploration_share: 0.1,
            recently_viewed_window_s: 0,
        }
    }
}

/// Every rule name, as accepted in config files and (prefixed `rerank.`) in params.
pub const RULE_KEYS: &[&str] = &[
    "category_cap",
    "brand_cap",
    "promoted_boost",
    "new_arrival_boost",
    "new_arrival_days",
    "mmr_lambda",
    "exploration_share",
    "recently_viewed_window_s",
];

fn bad(key: &str, reason: impl Into<String>) -> ParamError {
    ParamError {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

fn in_range(key: &str, v: f64, lo: f64, hi: f64) -> Result<(), ParamError> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(bad(key, format!("{v} is not in {lo}..={hi}")))
    }
}

impl RerankRules {
    /// Checks every range; the error names the rule.
    pub fn validate(&self) -> Result<(), ParamError> {
        if self.category_cap > 100 {
            return Err(bad("category_cap", "must be at most 100"));
        }
        if self.brand_cap > 100 {
            return Err(bad("brand_cap", "must be at most 100"));
        }
        in_range("promoted_boost", self.promoted_boost, 1.0, 5.0)?;
        in_range("new_arrival_boost", self.new_arrival_boost, 1.0, 5.0)?;
        if self.new_arrival_days > 3650 {
            return Err(bad("new_arrival_days", "must be at most 3650"));
        }
        in_range("mmr_lambda", self.mmr_lambda, 0.0, 1.0)?;
        in_range("exploration_share", self.exploration_share, 0.0, 0.5)?;
        if self.recently_viewed_window_s > 90 * 86_400 {
            return Err(bad("recently_viewed_window_s", "must be at most 90 days"));
        }
        Ok(())
    }

    /// Sets one rule from its string form (`key` without the `rerank.` prefix).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ParamError> {
        let v = value.trim();
        let int = |key: &str| {
            v.parse::<u64>()
                .map_err(|_| bad(key, format!("`{value}` is not a whole number")))
        };
        let float = |key: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .ok_or_else(|| bad(key, format!("`{value}` is not a number")))
        };
        match key {
            "category_cap" => self.category_cap = int(key)?.min(u64::from(u32::MAX)) as u32,
            "brand_cap" => self.brand_cap = int(key)?.min(u64::from(u32::MAX)) as u32,
            "promoted_boost" => self.promoted_boost = float(key)?,
            "new_arrival_boost" => self.new_arrival_boost = float(key)?,
            "new_arrival_days" => self.new_arrival_days = int(key)?.min(u64::from(u32::MAX)) as u32,
            "mmr_lambda" => self.mmr_lambda = float(key)?,
            "exploration_share" => self.exploration_share = float(key)?,
            "recently_viewed_window_s" => self.recently_viewed_window_s = int(key)?,
            _ => {
                return Err(bad(
                    key,
                    format!("unknown rule; known: {}", RULE_KEYS.join(", ")),
                ));
            }
        }
        Ok(())
    }

    /// These rules with `overrides` (rule name → value) applied and validated.
    pub fn with(&self, overrides: &HashMap<String, String>) -> Result<Self, ParamError> {
        let mut rules = self.clone();
        let mut keys: Vec<&String> = overrides.keys().collect();
        keys.sort();
        for key in keys {
            rules.set(key, &overrides[key])?;
        }
        rules.validate()?;
        Ok(rules)
    }
}

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

    // 5. Spread exploration items evenly through the list.
    let total = chosen.len() + explore.len();
    let mut order: Vec<(usize, bool)> = chosen.into_iter().map(|i| (i, false)).collect();
    let n = explore.len();
    for (k, i) in explore.into_iter().enumerate() {
        let at = ((k + 1) * total / (n + 1)).min(order.len());
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded generator for the property tests (no dependency needed).
    struct Gen(u64);
    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 = mix(self.0);
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        fn chance(&mut self, p: f64) -> bool {
            (self.next() >> 11) as f64 / (1u64 << 53) as f64 > 1.0 - p
        }
    }

    const CATEGORIES: [&str; 5] = ["a", "b", "c", "d", "e"];
    const BRANDS: [&str; 10] = ["a0", "a1", "b0", "b1", "c0", "c1", "d0", "d1", "e0", "e1"];
    const NOW: i64 = 1_000_000_000;

    struct Case {
        ids: Vec<String>,
        items: Vec<(usize, usize, f64, bool, bool, i64, f64)>,
    }

    impl Case {
        fn random(g: &mut Gen, n: usize) -> Case {
            let ids = (0..n)
                .map(|i| format!("i{}", g.below(n as u64 * 2).max(i as u64 % 3)))
                .collect();
            let items = (0..n)
                .map(|_| {
                    let c = g.below(5) as usize;
                    (
                        c,
                        c * 2 + g.below(2) as usize,
                        1.0 + g.below(200) as f64,
                        g.chance(0.9),
                        g.chance(0.1),
                        NOW - g.below(120) as i64 * 86_400,
                        (g.below(10_000) as f64 / 100.0) - 20.0,
                    )
                })
                .collect();
            Case { ids, items }
        }

        fn view(&self) -> Vec<RerankItem<'_>> {
            self.ids
                .iter()
                .zip(&self.items)
                .map(
                    |(id, &(c, b, price, in_stock, promoted, created, score))| RerankItem {
                        rule: RuleItem {
                            id,
                            category: CATEGORIES[c],
                            price,
                            in_stock,
                        },
                        brand: BRANDS[b],
                        promoted,
                        created_at_s: created,
                        score,
                    },
                )
                .collect()
        }
    }

    fn request<'a>(g: &mut Gen, case: &'a Case, count: usize) -> RerankRequest<'a> {
        let pick = |g: &mut Gen| case.ids[g.below(case.ids.len() as u64) as usize].as_str();
        RerankRequest {
            filters: HardFilters {
                excluded: (0..3).map(|_| pick(g)).collect(),
                purchased: (0..3).map(|_| pick(g)).collect(),
                seen: (0..5).map(|_| crate::seen::item_key(pick(g))).collect(),
                categories: if g.chance(0.3) {
                    ["a", "b", "c"].into()
                } else {
                    HashSet::new()
                },
                min_price: if g.chance(0.3) { 20.0 } else { 0.0 },
                max_price: if g.chance(0.3) { 150.0 } else { 0.0 },
            },
            recent_views: (0..3).map(|k| (pick(g), NOW - k * 3_000)).collect(),
            usual_categories: ["a", "b"].into(),
            now_s: NOW,
            seed: g.next(),
            count,
        }
    }

    fn random_rules(g: &mut Gen) -> RerankRules {
        RerankRules {
            category_cap: g.below(5) as u32,
            brand_cap: g.below(4) as u32,
            promoted_boost: 1.0 + g.below(40) as f64 / 10.0,
            new_arrival_boost: 1.0 + g.below(40) as f64 / 10.0,
            new_arrival_days: g.below(60) as u32,
            mmr_lambda: g.below(11) as f64 / 10.0,
            exploration_share: g.below(6) as f64 / 10.0,
            recently_viewed_window_s: if g.chance(0.5) { 5_000 } else { 0 },
        }
    }

    #[test]
    fn no_filtered_item_is_ever_returned_and_caps_hold() {
        let mut g = Gen(1);
        for _ in 0..2_000 {
            let n = 1 + g.below(80) as usize;
            let case = Case::random(&mut g, n);
            let items = case.view();
            let rules = random_rules(&mut g);
            let count = 1 + g.below(30) as usize;
            let req = request(&mut g, &case, count);
            let out = rerank(&items, &rules, &req);
            assert!(out.items.len() <= req.count);
            let mut ids = HashSet::new();
            let mut per_category: HashMap<&str, u32> = HashMap::new();
            let mut per_brand: HashMap<&str, u32> = HashMap::new();
            for p in &out.items {
                let it = &items[p.index];
                assert!(ids.insert(it.rule.id), "duplicate {}", it.rule.id);
                assert_eq!(
                    req.filters.check(&it.rule),
                    None,
                    "filtered item {:?} returned",
                    it.rule
                );
                assert!(
                    !req.filters
                        .seen
                        .contains(&crate::seen::item_key(it.rule.id)),
                    "seen item {} returned",
                    it.rule.id
                );
                if rules.recently_viewed_window_s > 0 {
                    assert!(
                        !req.recent_views
                            .iter()
                            .any(|(id, ts)| *id == it.rule.id && NOW - ts <= 5_000)
                    );
                }
                *per_category.entry(it.rule.category).or_default() += 1;
                *per_brand.entry(it.brand).or_default() += 1;
            }
            if rules.category_cap > 0 {
                assert!(
                    per_category.values().all(|&n| n <= rules.category_cap),
                    "{per_category:?} {rules:?}"
                );
            }
            if rules.brand_cap > 0 {
                assert!(
                    per_brand.values().all(|&n| n <= rules.brand_cap),
                    "{per_brand:?} {rules:?}"
                );
            }
        }
    }

    #[test]
    fn lambda_one_without_boosts_caps_or_exploration_is_score_order() {
        let mut g = Gen(2);
        let plain = RerankRules {
            category_cap: 0,
            brand_cap: 0,
            promoted_boost: 1.0,
            new_arrival_boost: 1.0,
            mmr_lambda: 1.0,
            exploration_share: 0.0,
            ..RerankRules::default()
        };
        for _ in 0..1_000 {
            let n = 1 + g.below(60) as usize;
            let case = Case::random(&mut g, n);
            let items = case.view();
            let req = RerankRequest {
                now_s: NOW,
                count: 1 + g.below(30) as usize,
                ..RerankRequest::default()
            };
            let out = rerank(&items, &plain, &req);
            let mut expected: Vec<usize> = Vec::new();
            let mut seen = HashSet::new();
            for (i, it) in items.iter().enumerate() {
                // Duplicates go first (the first occurrence wins), then stock.
                if seen.insert(it.rule.id) && it.rule.in_stock {
                    expected.push(i);
                }
            }
            // Stable sort by score, best first: ties keep the ranking's order.
            expected.sort_by(|&a, &b| items[b].score.total_cmp(&items[a].score));
            expected.truncate(req.count);
            let got: Vec<usize> = out.items.iter().map(|p| p.index).collect();
            assert_eq!(got, expected);
        }
    }

    #[test]
    fn the_same_request_id_gives_the_same_list() {
        let mut g = Gen(3);
        for _ in 0..500 {
            let case = Case::random(&mut g, 40);
            let items = case.view();
            let rules = random_rules(&mut g);
            let mut req = request(&mut g, &case, 10);
            req.seed = seed_of("request-7");
            let a = rerank(&items, &rules, &req);
            let b = rerank(&items, &rules, &req);
            assert_eq!(a.items, b.items);
        }
        // And a different id explores differently (over many ids, not each).
        let case = Case::random(&mut Gen(9), 80);
        let items = case.view();
        let rules = RerankRules {
            exploration_share: 0.5,
            ..RerankRules::default()
        };
        let lists: HashSet<Vec<usize>> = (0..20)
            .map(|n| {
                let req = RerankRequest {
                    usual_categories: ["a"].into(),
                    now_s: NOW,
                    seed: seed_of(&format!("r{n}")),
                    count: 10,
                    ..RerankRequest::default()
                };
                rerank(&items, &rules, &req)
                    .items
                    .iter()
                    .map(|p| p.index)
                    .collect()
            })
            .collect();
        assert!(lists.len() > 1);
    }

    #[test]
    fn a_bigger_boost_never_moves_a_promoted_item_down() {
        let mut g = Gen(4);
        for _ in 0..1_000 {
            let case = Case::random(&mut g, 30);
            let items = case.view();
            let req = RerankRequest {
                now_s: NOW,
                count: 30,
                ..RerankRequest::default()
            };
            let at = |boost: f64| {
                let rules = RerankRules {
                    category_cap: 0,
                    brand_cap: 0,
                    promoted_boost: boost,
                    new_arrival_boost: 1.0,
                    mmr_lambda: 1.0,
                    exploration_share: 0.0,
                    ..RerankRules::default()
                };
                let out = rerank(&items, &rules, &req);
                out.items
                    .iter()
                    .enumerate()
                    .filter(|(_, p)| items[p.index].promoted)
                    .map(|(pos, p)| (p.index, pos))
                    .collect::<HashMap<usize, usize>>()
            };
            let (low, high) = (at(1.1), at(2.0));
            for (index, pos) in &high {
                assert!(pos <= &low[index], "item {index}: {} → {pos}", low[index]);
            }
        }
    }

    #[test]
    fn exploration_takes_its_share_outside_usual_categories_spread_out() {
        let case = Case::random(&mut Gen(5), 100);
        let items = case.view();
        let rules = RerankRules {
            exploration_share: 0.2,
            new_arrival_days: 0,
            ..RerankRules::default()
        };
        let req = RerankRequest {
            usual_categories: ["a", "b"].into(),
            now_s: NOW,
            seed: seed_of("x"),
            count: 10,
            ..RerankRequest::default()
        };
        let out = rerank(&items, &rules, &req);
        let explored: Vec<usize> = out
            .items
            .iter()
            .enumerate()
            .filter(|(_, p)| p.explore)
            .map(|(k, _)| k)
            .collect();
        assert_eq!(explored.len(), 2);
        assert_eq!(explored, vec![3, 6], "spread at 1/3 and 2/3 of the list");
        for p in out.items.iter().filter(|p| p.explore) {
            assert!(!["a", "b"].contains(&items[p.index].rule.category));
        }
    }

    /// An in-stock, unpromoted, old item.
    fn plain_item<'a>(
        id: &'a str,
        category: &'a str,
        brand: &'a str,
        price: f64,
        score: f64,
    ) -> RerankItem<'a> {
        RerankItem {
            rule: RuleItem {
                id,
                category,
                price,
                in_stock: true,
            },
            brand,
            promoted: false,
            created_at_s: 0,
            score,
        }
    }

    #[test]
    fn items_without_a_brand_are_not_capped_as_one_brand() {
        // Five items with no brand (a film catalog) and two of brand "b":
        // the brand cap of 2 holds back only the third "b".
        let ids = ["n1", "n2", "n3", "n4", "n5", "b1", "b2", "b3"];
        let items: Vec<RerankItem<'_>> = ids
            .iter()
            .enumerate()
            .map(|(n, id)| {
                let brand = if id.starts_with('b') { "b" } else { "" };
                plain_item(id, "films", brand, 0.0, 10.0 - n as f64)
            })
            .collect();
        let rules = RerankRules {
            category_cap: 0,
            brand_cap: 2,
            mmr_lambda: 1.0,
            exploration_share: 0.0,
            ..RerankRules::default()
        };
        let req = RerankRequest {
            now_s: NOW,
            count: 8,
            ..RerankRequest::default()
        };
        let out = rerank(&items, &rules, &req);
        let got: Vec<&str> = out.items.iter().map(|p| items[p.index].rule.id).collect();
        assert_eq!(got, ["n1", "n2", "n3", "n4", "n5", "b1", "b2"]);
        assert_eq!(out.removed.get(&Removal::BrandCap), Some(&1));
        // Nor are two unknown brands (or categories) alike to MMR and the
        // diversity metric.
        assert_eq!(
            attribute_similarity(("", "", 0.0), ("", "", 0.0)),
            1.0 / 3.0
        );
        assert_eq!(attribute_similarity(("c", "b", 0.0), ("c", "b", 0.0)), 1.0);
    }

    #[test]
    fn mmr_trades_score_for_variety() {
        // Three near-identical top items (same category, brand and price band)
        // and one different item slightly below them.
        let ids = ["x1", "x2", "x3", "y"];
        let items: Vec<RerankItem<'_>> = ids
            .iter()
            .enumerate()
            .map(|(n, id)| {
                let (category, brand) = if *id == "y" {
                    ("other", "b2")
                } else {
                    ("same", "b1")
                };
                plain_item(id, category, brand, 10.0, [1.0, 0.99, 0.98, 0.9][n])
            })
            .collect();
        let req = RerankRequest {
            now_s: NOW,
            count: 2,
            ..RerankRequest::default()
        };
        let pick = |lambda: f64| {
            let rules = RerankRules {
                category_cap: 0,
                brand_cap: 0,
                mmr_lambda: lambda,
                exploration_share: 0.0,
                ..RerankRules::default()
            };
            rerank(&items, &rules, &req)
                .items
                .iter()
                .map(|p| ids[p.index])
                .collect::<Vec<_>>()
        };
        assert_eq!(pick(1.0), vec!["x1", "x2"]);
        assert_eq!(pick(0.5), vec!["x1", "y"]);
    }

    #[test]
    fn rules_are_validated_naming_the_rule() {
        assert!(RerankRules::default().validate().is_ok());
        let over = |k: &str, v: &str| {
            RerankRules::default()
                .with(&[(k.to_string(), v.to_string())].into())
                .expect_err(k)
                .key
        };
        assert_eq!(over("mmr_lambda", "1.5"), "mmr_lambda");
        assert_eq!(over("exploration_share", "0.9"), "exploration_share");
        assert_eq!(over("promoted_boost", "abc"), "promoted_boost");
        assert_eq!(over("brand_cap", "-1"), "brand_cap");
        assert_eq!(over("mmr_lamda", "0.5"), "mmr_lamda");
        let r = RerankRules::default()
            .with(&[("mmr_lambda".to_string(), "0.5".to_string())].into())
            .expect("valid");
        assert_eq!(r.mmr_lambda, 0.5);
    }
}

//! Deterministic synthetic e-commerce data.
//!
//! Shape, not realism, is the point: categories with brands and price bands,
//! stock and promotions, power-law item popularity, users with one to three
//! taste categories and power-law activity, and browsing sessions that walk a
//! category (view → click → add to cart → purchase funnel). Sessions inside a
//! taste category are what give co-occurrence CF something true to find.
//! The same [`DemoSpec`] always yields the same data.

use crate::{Dataset, EventKind, Interaction, Item};

/// Category names of the demo shop; sizes follow a power law over this order.
const CATEGORIES: &[&str] = &[
    "electronics",
    "books",
    "fashion",
    "home",
    "sports",
    "beauty",
    "toys",
    "grocery",
    "garden",
    "automotive",
    "music",
    "pets",
    "office",
    "health",
    "jewelry",
    "games",
];

/// Brands per category: enough for brand caps to matter, few enough that
/// each brand has several items at the default size.
const BRANDS_PER_CATEGORY: u32 = 8;

/// Size and seed of a generated dataset.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemoSpec {
    /// Catalog size.
    pub items: u32,
    /// Number of users.
    pub users: u32,
    /// Number of interactions (approximate: sessions are generated whole).
    pub interactions: u64,
    /// Number of categories, 1..=16.
    pub categories: u32,
    /// Seed of the generator.
    pub seed: u64,
    /// The generated history ends here (Unix ms); fixed so data is reproducible.
    pub now_ms: i64,
}

impl Default for DemoSpec {
    fn default() -> Self {
        DemoSpec {
            // Generates in well under a second and loads fast in every service,
            // while still giving CF thousands of co-occurrences per category.
            items: 5_000,
            users: 2_000,
            interactions: 100_000,
            categories: 12,
            seed: 42,
            // 2026-01-01T00:00:00Z.
            now_ms: 1_767_225_600_000,
        }
    }
}

impl DemoSpec {
    /// Checks the sizes; the error names the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.items == 0 {
            return Err(("items", "must be at least 1".into()));
        }
        if self.users == 0 {
            return Err(("users", "must be at least 1".into()));
        }
        if self.categories == 0 || self.categories as usize > CATEGORIES.len() {
            return Err(("categories", format!("must be in 1..={}", CATEGORIES.len())));
        }
        Ok(())
    }
}

/// A small, fast, seedable generator (SplitMix64); statistical quality is
/// ample for synthetic data and it needs no dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n.max(1))) >> 64) as u64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }
}

/// Draws indices in proportion to fixed weights, by binary search over the
/// cumulative sums: O(log n) a draw, which keeps 10M interactions in seconds.
#[derive(Debug, Clone)]
struct Weighted {
    cumulative: Vec<f64>,
}

impl Weighted {
    fn new(weights: impl IntoIterator<Item = f64>) -> Self {
        let mut total = 0.0;
        let cumulative = weights
            .into_iter()
            .map(|w| {
                total += w.max(0.0);
                total
            })
            .collect();
        Weighted { cumulative }
    }

    fn draw(&self, rng: &mut Rng) -> usize {
        let total = self.cumulative.last().copied().unwrap_or(0.0);
        let x = rng.f64() * total;
        self.cumulative
            .partition_point(|&c| c <= x)
            .min(self.cumulative.len().saturating_sub(1))
    }
}

/// Generates the dataset described by `spec`.
pub fn generate(spec: &DemoSpec) -> Dataset {
    let mut rng = Rng::new(spec.seed);
    let n_cat = spec.categories.clamp(1, CATEGORIES.len() as u32) as usize;
    let now_s = spec.now_ms / 1000;
    const DAY_S: i64 = 86_400;

    // Category sizes follow 1/(rank+1)^0.7: a few big categories, a long tail.
    let category_weights = Weighted::new((0..n_cat).map(|c| 1.0 / ((c + 1) as f64).powf(0.7)));
    let mut items = Vec::with_capacity(spec.items as usize);
    let mut by_category: Vec<Vec<u32>> = vec![Vec::new(); n_cat];
    let mut popularity = Vec::with_capacity(spec.items as usize);
    for n in 0..spec.items {
        let c = category_weights.draw(&mut rng);
        // Price bands differ per category (10–60 base) with a log-normal-ish spread.
        let base = 10.0 + 50.0 * ((c * 7 % n_cat) as f64 / n_cat as f64);
        let price = (base * (0.5 + 3.0 * rng.f64() * rng.f64())).max(1.0);
        let brand = rng.below(u64::from(BRANDS_PER_CATEGORY));
        items.push(Item {
            id: format!("i{n}"),
            category: CATEGORIES[c].to_owned(),
            brand: format!("{}-brand-{brand}", CATEGORIES[c]),
            price: (price * 100.0).round() / 100.0,
            // About 7 % out of stock: enough that filters visibly matter.
            in_stock: rng.chance(0.93),
            promoted: rng.chance(0.05),
            created_at: now_s - rng.below(365) as i64 * DAY_S,
            title: format!("{} item {n}", CATEGORIES[c]),
        });
        by_category[c].push(n);
        // Power-law popularity, independent of id order.
        popularity.push(1.0 / (1.0 + rng.below(u64::from(spec.items)) as f64).powf(0.9));
    }
    // Every non-empty category gets a popularity-weighted sampler.
    let samplers: Vec<Option<Weighted>> = by_category
        .iter()
        .map(|ids| {
            (!ids.is_empty()).then(|| Weighted::new(ids.iter().map(|&i| popularity[i as usize])))
        })
        .collect();
    let live: Vec<usize> = (0..n_cat).filter(|&c| samplers[c].is_some()).collect();

    // Users: 1–3 taste categories, activity following a power law.
    let tastes: Vec<Vec<usize>> = (0..spec.users)
        .map(|_| {
            let k = 1 + rng.below(3) as usize;
            (0..k)
                .map(|_| live[rng.below(live.len() as u64) as usize])
                .collect()
        })
        .collect();
    let activity = Weighted::new((0..spec.users).map(|u| 1.0 / ((u % 997 + 1) as f64).powf(0.8)));

    let span_ms = 30 * DAY_S * 1000;
    let mut interactions = Vec::with_capacity(spec.interactions as usize + 16);
    while (interactions.len() as u64) < spec.interactions {
        let u = activity.draw(&mut rng);
        // 85 % of sessions stay in the user's tastes, the rest explore.
        let c = if rng.chance(0.85) {
            tastes[u][rng.below(tastes[u].len() as u64) as usize]
        } else {
            live[rng.below(live.len() as u64) as usize]
        };
        let Some(sampler) = &samplers[c] else {
            continue;
        };
        let mut ts = spec.now_ms - rng.below(span_ms as u64) as i64;
        let length = 1 + rng.below(6);
        for _ in 0..length {
            let item = &items[by_category[c][sampler.draw(&mut rng)] as usize];
            let mut push = |kind: EventKind, ts: i64| {
                interactions.push(Interaction {
                    user: format!("u{u}"),
                    item: item.id.clone(),
                    kind,
                    timestamp_ms: ts.min(spec.now_ms),
                });
            };
            push(EventKind::View, ts);
            // Funnel: a quarter of views click, a third of clicks add to cart,
            // 40 % of carts buy (in-stock items only).
            if rng.chance(0.25) {
                push(EventKind::Click, ts + 1_000);
                if rng.chance(0.33) {
                    push(EventKind::AddToCart, ts + 20_000);
                    if item.in_stock && rng.chance(0.4) {
                        push(EventKind::Purchase, ts + 60_000);
                    }
                }
            }
            ts += 30_000 + rng.below(270_000) as i64;
        }
    }
    interactions.sort_by_key(|e| e.timestamp_ms);
    Dataset {
        items,
        interactions,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> DemoSpec {
        DemoSpec {
            items: 300,
            users: 100,
            interactions: 5_000,
            ..DemoSpec::default()
        }
    }

    #[test]
    fn same_spec_same_data() {
        assert_eq!(generate(&small()), generate(&small()));
        let other = DemoSpec { seed: 7, ..small() };
        assert_ne!(
            generate(&small()).fingerprint(),
            generate(&other).fingerprint()
        );
    }

    #[test]
    fn shape_is_plausible() {
        let d = generate(&small());
        assert_eq!(d.items.len(), 300);
        assert!(d.interactions.len() >= 5_000);
        assert!(
            d.interactions
                .windows(2)
                .all(|w| w[0].timestamp_ms <= w[1].timestamp_ms)
        );
        let count = |k: EventKind| d.interactions.iter().filter(|e| e.kind == k).count();
        // The funnel narrows at every step.
        assert!(count(EventKind::View) > count(EventKind::Click));
        assert!(count(EventKind::Click) > count(EventKind::AddToCart));
        assert!(count(EventKind::AddToCart) > count(EventKind::Purchase));
        assert!(count(EventKind::Purchase) > 0);
        // Never a purchase of an out-of-stock item.
        let stock: std::collections::HashMap<&str, bool> = d
            .items
            .iter()
            .map(|i| (i.id.as_str(), i.in_stock))
            .collect();
        assert!(
            d.interactions
                .iter()
                .filter(|e| e.kind == EventKind::Purchase)
                .all(|e| stock[e.item.as_str()])
        );
        // Popularity is skewed: the top 10 % of items get far more than 10 % of views.
        let catalog = crate::Catalog::new(d.items.clone());
        let mut scores = crate::item_scores(&catalog, &d.interactions);
        scores.sort_by(|a, b| b.total_cmp(a));
        let top: f64 = scores[..30].iter().sum();
        let all: f64 = scores.iter().sum();
        assert!(top / all > 0.3, "top 10% share {}", top / all);
    }

    #[test]
    fn rng_below_is_in_range() {
        let mut r = Rng::new(1);
        assert!((0..10_000).all(|_| r.below(7) < 7));
    }
}

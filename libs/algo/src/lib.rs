//! Recommendation algorithms of recmesh: pure functions over plain data.
//!
//! No I/O, no async, no clocks: services feed these functions data and get
//! data back, so every algorithm is testable on small cases worked out by
//! hand, and the trainer and the services run the very same code.

#![forbid(unsafe_code)]

pub mod als;
pub mod assign;
pub mod content;
pub mod cooccurrence;
pub mod gbdt;
pub mod metrics;
pub mod params;
pub mod popularity;
pub mod ranking;
pub mod rerank;
pub mod rules;
pub mod scoring;
pub mod seen;
pub mod stats;

/// Keeps the best `k` of `v` by `order` (a total order: ties broken), sorted
/// best first: the same result as a full sort and a truncation, at the
/// cost of sorting only `k` (candidate lists keep a few hundred of a few
/// thousand).
pub fn top_k<T>(v: &mut Vec<T>, k: usize, mut order: impl FnMut(&T, &T) -> std::cmp::Ordering) {
    if k == 0 {
        v.clear();
        return;
    }
    if v.len() > k {
        v.select_nth_unstable_by(k - 1, &mut order);
        v.truncate(k);
    }
    v.sort_unstable_by(order);
}

/// What a user did with an item, in increasing order of intent.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// Saw the item's page.
    View,
    /// Clicked the item in a list.
    Click,
    /// Put the item in the cart.
    AddToCart,
    /// Bought the item.
    Purchase,
}

impl EventKind {
    /// Every kind, weakest first.
    pub const ALL: [EventKind; 4] = [
        EventKind::View,
        EventKind::Click,
        EventKind::AddToCart,
        EventKind::Purchase,
    ];

    /// Strength of the signal. Doubling per step is the usual implicit-feedback
    /// prior: a purchase says about as much as eight views.
    pub fn weight(self) -> f64 {
        match self {
            EventKind::View => 1.0,
            EventKind::Click => 2.0,
            EventKind::AddToCart => 4.0,
            EventKind::Purchase => 8.0,
        }
    }

    /// The name used in files, logs and reasons.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::View => "view",
            EventKind::Click => "click",
            EventKind::AddToCart => "add_to_cart",
            EventKind::Purchase => "purchase",
        }
    }

    /// The past-tense verb used in explanations ("because you viewed X").
    pub fn verb(self) -> &'static str {
        match self {
            EventKind::View => "viewed",
            EventKind::Click => "clicked",
            EventKind::AddToCart => "added to cart",
            EventKind::Purchase => "bought",
        }
    }

    /// Parses [`EventKind::as_str`].
    pub fn parse(s: &str) -> Option<EventKind> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn top_k_is_a_full_sort_cut_to_k() {
        // Scores with many ties, so the tie-break decides the cut.
        let all: Vec<(u32, f32)> = (0..500u32).map(|i| (i, ((i * 7919) % 13) as f32)).collect();
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        for k in [0, 1, 12, 13, 100, 499, 500, 800] {
            let mut full = all.clone();
            full.sort_by(order);
            full.truncate(k);
            let mut top = all.clone();
            super::top_k(&mut top, k, order);
            assert_eq!(top, full, "k = {k}");
        }
    }
}

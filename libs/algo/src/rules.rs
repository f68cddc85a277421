//! Re-ranking rules: hard filters and per-category caps.
//!
//! Hard filters are never relaxed, not even to fill the list: recommending an
//! out-of-stock or already-bought item costs more trust than a shorter list.
//! The gateway applies the same functions when the reranker is down.

use std::collections::{HashMap, HashSet};

/// What the filters need to know about a candidate.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleItem<'a> {
    /// Item id.
    pub id: &'a str,
    /// Category name.
    pub category: &'a str,
    /// Price.
    pub price: f64,
    /// In stock now.
    pub in_stock: bool,
}

/// The hard filters of one request.
#[derive(Debug, Clone, Default)]
pub struct HardFilters<'a> {
    /// Ids the client excluded.
    pub excluded: HashSet<&'a str>,
    /// Ids the user already bought.
    pub purchased: HashSet<&'a str>,
    /// Keys ([`crate::seen::item_key`]) of items the user has already seen,
    /// under the request's seen-items policy.
    pub seen: HashSet<u64>,
    /// Allowed categories (empty: all).
    pub categories: HashSet<&'a str>,
    /// Minimum price, inclusive (0: none).
    pub min_price: f64,
    /// Maximum price, inclusive (0: none).
    pub max_price: f64,
}

/// Why a candidate was removed; the names are metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Removal {
    /// In the request's exclusion list.
    Excluded,
    /// Already bought by the user.
    Purchased,
    /// Out of stock.
    OutOfStock,
    /// Outside the requested categories or price range.
    Filtered,
    /// Viewed by the user within the configured window.
    RecentlyViewed,
    /// Already seen by the user (the seen-items policy).
    Seen,
    /// Over the category cap.
    CategoryCap,
    /// Over the brand cap.
    BrandCap,
    /// Same item seen earlier in the list.
    Duplicate,
}

impl Removal {
    /// Metric label / response key.
    pub fn as_str(self) -> &'static str {
        match self {
            Removal::Excluded => "excluded",
            Removal::Purchased => "purchased",
            Removal::OutOfStock => "out_of_stock",
            Removal::Filtered => "filtered",
            Removal::RecentlyViewed => "recently_viewed",
            Removal::Seen => "seen",
            Removal::CategoryCap => "category_cap",
            Removal::BrandCap => "brand_cap",
            Removal::Duplicate => "duplicate",
        }
    }
}

impl HardFilters<'_> {
    /// The first hard rule `item` breaks, if any.
    pub fn check(&self, item: &RuleItem<'_>) -> Option<Removal> {
        if self.excluded.contains(item.id) {
            Some(Removal::Excluded)
        } else if self.purchased.contains(item.id) {
            Some(Removal::Purchased)
        } else if !self.seen.is_empty() && self.seen.contains(&crate::seen::item_key(item.id)) {
            Some(Removal::Seen)
        } else if !item.in_stock {
            Some(Removal::OutOfStock)
        } else if (!self.categories.is_empty() && !self.categories.contains(item.category))
            || (self.min_price > 0.0 && item.price < self.min_price)
            || (self.max_price > 0.0 && item.price > self.max_price)
        {
            Some(Removal::Filtered)
        } else {
            None
        }
    }
}

/// Walks `items` in order and keeps the first `count` that pass the hard
/// filters, at most `category_cap` per category (0: no cap), no duplicates.
/// Returns the kept indices and the removal counts.
pub fn select(
    items: &[RuleItem<'_>],
    filters: &HardFilters<'_>,
    count: usize,
    category_cap: usize,
) -> (Vec<usize>, HashMap<Removal, u32>) {
    let mut kept = Vec::with_capacity(count);
    let mut removed: HashMap<Removal, u32> = HashMap::new();
    let mut per_category: HashMap<&str, usize> = HashMap::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for (index, item) in items.iter().enumerate() {
        if kept.len() == count {
            break;
        }
        let verdict = if !seen.insert(item.id) {
            Some(Removal::Duplicate)
        } else if let Some(r) = filters.check(item) {
            Some(r)
        } else if category_cap > 0
            && per_category.get(item.category).copied().unwrap_or(0) >= category_cap
        {
            Some(Removal::CategoryCap)
        } else {
            None
        };
        match verdict {
            Some(r) => *removed.entry(r).or_default() += 1,
            None => {
                *per_category.entry(item.category).or_default() += 1;
                kept.push(index);
            }
        }
    }
    (kept, removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item<'a>(id: &'a str, category: &'a str, price: f64, in_stock: bool) -> RuleItem<'a> {
        RuleItem {
            id,
            category,
            price,
            in_stock,
        }
    }

    #[test]
    fn hard_filters_and_cap() {
        let items = [
            item("a", "x", 10.0, true),
            item("b", "x", 10.0, false), // out of stock
            item("c", "x", 10.0, true),
            item("d", "x", 10.0, true), // over the cap of 2
            item("e", "y", 10.0, true), // excluded
            item("f", "y", 10.0, true), // purchased
            item("a", "x", 10.0, true), // duplicate
            item("g", "y", 99.0, true), // too expensive
            item("s", "y", 10.0, true), // seen
            item("h", "y", 10.0, true),
        ];
        let filters = HardFilters {
            excluded: ["e"].into(),
            purchased: ["f"].into(),
            seen: [crate::seen::item_key("s")].into(),
            max_price: 50.0,
            ..HardFilters::default()
        };
        let (kept, removed) = select(&items, &filters, 10, 2);
        assert_eq!(kept, vec![0, 2, 9]);
        assert_eq!(removed[&Removal::Seen], 1);
        assert_eq!(removed[&Removal::OutOfStock], 1);
        assert_eq!(removed[&Removal::CategoryCap], 1);
        assert_eq!(removed[&Removal::Excluded], 1);
        assert_eq!(removed[&Removal::Purchased], 1);
        assert_eq!(removed[&Removal::Duplicate], 1);
        assert_eq!(removed[&Removal::Filtered], 1);
    }

    #[test]
    fn stops_at_count_and_honours_category_filter() {
        let items = [
            item("a", "x", 1.0, true),
            item("b", "y", 1.0, true),
            item("c", "y", 1.0, true),
        ];
        let filters = HardFilters {
            categories: ["y"].into(),
            ..HardFilters::default()
        };
        let (kept, _) = select(&items, &filters, 1, 0);
        assert_eq!(kept, vec![1]);
    }
}

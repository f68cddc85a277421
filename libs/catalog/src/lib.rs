//! The data recmesh serves from: catalog items and user interactions.
//!
//! Holds the domain types, a deterministic synthetic e-commerce generator for
//! demos and benchmarks ([`demo`]), and the on-disk form of a dataset
//! ([`files`]: two TSV files with a header). Services load a dataset from a
//! directory, or generate the demo one when none is configured; the generator
//! is deterministic, so services started separately agree on the same data.

#![forbid(unsafe_code)]

pub mod bundle;
pub mod demo;
pub mod files;
pub mod recbole;

use std::collections::HashMap;

pub use recmesh_algo::EventKind;

/// A catalog item.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Stable id, e.g. `i42`.
    pub id: String,
    /// Category name.
    pub category: String,
    /// Brand name.
    pub brand: String,
    /// Price in the shop's currency.
    pub price: f64,
    /// Can be bought now.
    pub in_stock: bool,
    /// Merchandising wants it shown.
    pub promoted: bool,
    /// When it entered the catalog, Unix seconds.
    pub created_at: i64,
    /// Display title.
    pub title: String,
}

/// One thing a user did with an item.
#[derive(Debug, Clone, PartialEq)]
pub struct Interaction {
    /// User id, e.g. `u7`.
    pub user: String,
    /// Item id.
    pub item: String,
    /// What they did.
    pub kind: EventKind,
    /// When, Unix milliseconds.
    pub timestamp_ms: i64,
}

/// Items plus interactions (sorted by time).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Dataset {
    /// The catalog, in id order of creation.
    pub items: Vec<Item>,
    /// Every interaction, oldest first.
    pub interactions: Vec<Interaction>,
}

impl Dataset {
    /// A dataset from rows read in any order: interactions sorted by time
    /// (stable, so ties keep their input order).
    pub fn from_rows(items: Vec<Item>, mut interactions: Vec<Interaction>) -> Dataset {
        interactions.sort_by_key(|e| e.timestamp_ms);
        Dataset {
            items,
            interactions,
        }
    }

    /// A short content hash identifying this exact data (its "version").
    pub fn fingerprint(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut feed = |s: &str| {
            h ^= recmesh_algo::assign::fnv1a64(s.as_bytes());
            h = h.rotate_left(7).wrapping_mul(0x0000_0100_0000_01b3);
        };
        for i in &self.items {
            feed(&i.id);
            feed(&i.category);
            feed(&format!("{}{}", i.price, i.in_stock));
        }
        for e in &self.interactions {
            feed(&e.user);
            feed(&e.item);
            feed(&e.timestamp_ms.to_string());
        }
        format!("{h:016x}")
    }
}

/// Items indexed by dense position, with category ids: the form the
/// algorithms (which work on `u32` indices) need.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// Items by index.
    pub items: Vec<Item>,
    /// Category names by category id, sorted.
    pub categories: Vec<String>,
    /// Category id of each item.
    pub category_of: Vec<u32>,
    index: HashMap<String, u32>,
    /// [`item_key`] → index.
    keys: HashMap<u64, u32>,
}

/// The compact key of an item id in a seen set (defined with the policy).
pub use recmesh_algo::seen::item_key;

impl Catalog {
    /// Each user's strongest event weight per catalog item (events on
    /// unknown items are skipped): the input of item-item CF, built the same
    /// way for serving (retrieval) and for evaluation (trainer).
    pub fn strongest_per_user<'a>(
        &self,
        interactions: &'a [Interaction],
    ) -> HashMap<&'a str, HashMap<u32, f64>> {
        let mut per_user: HashMap<&str, HashMap<u32, f64>> = HashMap::new();
        for e in interactions {
            if let Some(i) = self.index_of(&e.item) {
                let w = per_user
                    .entry(e.user.as_str())
                    .or_default()
                    .entry(i)
                    .or_default();
                *w = w.max(e.kind.weight());
            }
        }
        per_user
    }

    /// Indexes `items`.
    pub fn new(items: Vec<Item>) -> Self {
        let mut categories: Vec<String> = items.iter().map(|i| i.category.clone()).collect();
        categories.sort();
        categories.dedup();
        let category_id: HashMap<&str, u32> = categories
            .iter()
            .enumerate()
            .map(|(n, c)| (c.as_str(), n as u32))
            .collect();
        let category_of = items
            .iter()
            .map(|i| category_id.get(i.category.as_str()).copied().unwrap_or(0))
            .collect();
        let index = items
            .iter()
            .enumerate()
            .map(|(n, i)| (i.id.clone(), n as u32))
            .collect();
        let keys = items
            .iter()
            .enumerate()
            .map(|(n, i)| (item_key(&i.id), n as u32))
            .collect();
        Catalog {
            items,
            categories,
            category_of,
            index,
            keys,
        }
    }

    /// Index of an item id.
    pub fn index_of(&self, id: &str) -> Option<u32> {
        self.index.get(id).copied()
    }

    /// Index of the item with this [`item_key`].
    pub fn index_of_key(&self, key: u64) -> Option<u32> {
        self.keys.get(&key).copied()
    }

    /// The item at `index`.
    pub fn item(&self, index: u32) -> Option<&Item> {
        self.items.get(index as usize)
    }

    /// Category id of a category name.
    pub fn category_id(&self, name: &str) -> Option<u32> {
        self.categories
            .binary_search_by(|c| c.as_str().cmp(name))
            .ok()
            .map(|i| i as u32)
    }

    /// Number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// True when there are no items.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Weighted interaction count per item (event weights of [`EventKind::weight`]).
pub fn item_scores(catalog: &Catalog, interactions: &[Interaction]) -> Vec<f64> {
    let mut scores = vec![0.0; catalog.len()];
    for e in interactions {
        if let Some(i) = catalog.index_of(&e.item) {
            scores[i as usize] += e.kind.weight();
        }
    }
    scores
}

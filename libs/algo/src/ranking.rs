//! The ranking model's input: one row of named features per candidate.
//!
//! The names and order here are the contract between the services and any
//! model (`recmesh_algo::gbdt` loads LightGBM models whose `feature_names` are
//! a subset of these, in any order). Unknown values are NaN, which LightGBM
//! models route by their missing-value rules.

use std::collections::HashMap;

/// Number of features in a row.
pub const FEATURES: usize = 15;

/// Feature names, in row order (new ones are appended: models name theirs).
pub const FEATURE_NAMES: [&str; FEATURES] = [
    "retrieval_score",
    "cf_score",
    "anchor_score",
    "popular_score",
    "sources",
    "item_popularity",
    "item_ctr",
    "item_price",
    "item_age_days",
    "item_promoted",
    "user_category_affinity",
    "price_fit",
    "user_activity",
    "ann_score",
    "content_score",
];

/// What retrieval said about a candidate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CandidateSignals {
    /// Retrieval's merged score.
    pub retrieval_score: f64,
    /// CF source score (0 when CF did not find it).
    pub cf: f64,
    /// Anchor (item-to-item) source score.
    pub anchor: f64,
    /// Popularity source score (weighted interaction count).
    pub popular: f64,
    /// ANN source score (dot product with the user's ALS vector).
    pub ann: f64,
    /// Content source score (cosine with the user's content profile).
    pub content: f64,
    /// Sources that found it.
    pub sources: usize,
}

/// What the features service knows about the item.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemSignals<'a> {
    /// Category.
    pub category: &'a str,
    /// Popularity relative to the top item, 0..=1.
    pub popularity: f64,
    /// Clicks / views (0 without views).
    pub ctr: f64,
    /// Price.
    pub price: f64,
    /// Days since it entered the catalog.
    pub age_days: f64,
    /// Promoted.
    pub promoted: bool,
}

/// What is known about the user, from their recent items.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserSignals {
    /// Share of the user's recent items in each category.
    pub category_share: HashMap<String, f64>,
    /// Median price of the user's recent items.
    pub median_price: Option<f64>,
    /// Number of recent interactions.
    pub activity: usize,
}

impl UserSignals {
    /// Signals from the (category, price) of the user's recent items.
    pub fn from_recent<'a>(recent: impl IntoIterator<Item = (&'a str, f64)>) -> Self {
        let mut counts: HashMap<String, f64> = HashMap::new();
        let mut prices: Vec<f64> = Vec::new();
        for (category, price) in recent {
            *counts.entry(category.to_owned()).or_default() += 1.0;
            if price > 0.0 {
                prices.push(price);
            }
        }
        let total: f64 = counts.values().sum();
        prices.sort_by(f64::total_cmp);
        UserSignals {
            category_share: counts.into_iter().map(|(c, n)| (c, n / total)).collect(),
            median_price: prices.get(prices.len() / 2).copied(),
            activity: total as usize,
        }
    }
}

/// The feature row of one candidate ([`FEATURE_NAMES`] order).
pub fn row(
    c: &CandidateSignals,
    item: Option<&ItemSignals<'_>>,
    user: &UserSignals,
) -> [f64; FEATURES] {
    let nan = f64::NAN;
    let (popularity, ctr, price, age, promoted, affinity, fit) = match item {
        Some(i) => (
            i.popularity,
            i.ctr,
            i.price,
            i.age_days,
            f64::from(u8::from(i.promoted)),
            user.category_share.get(i.category).copied().unwrap_or(0.0),
            // |ln(price / usual price)|: 0 is a perfect fit, ln 2 a factor of two off.
            match user.median_price {
                Some(m) if i.price > 0.0 => (i.price / m).ln().abs(),
                _ => nan,
            },
        ),
        None => (nan, nan, nan, nan, nan, nan, nan),
    };
    [
        c.retrieval_score,
        c.cf,
        c.anchor,
        c.popular,
        c.sources as f64,
        popularity,
        ctr,
        price,
        age,
        promoted,
        affinity,
        fit,
        user.activity as f64,
        c.ann,
        c.content,
    ]
}

/// Where each of a model's features sits in a [`row`]: `None` when the model
/// asks for a feature recmesh does not produce (the name is the error).
pub fn column_map(model_features: &[String]) -> Result<Vec<usize>, String> {
    model_features
        .iter()
        .map(|name| {
            FEATURE_NAMES
                .iter()
                .position(|f| f == name)
                .ok_or_else(|| name.clone())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_signals_and_row_by_hand() {
        let user = UserSignals::from_recent([("books", 10.0), ("books", 30.0), ("toys", 20.0)]);
        assert_eq!(user.activity, 3);
        assert!((user.category_share["books"] - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(user.median_price, Some(20.0));
        let item = ItemSignals {
            category: "books",
            popularity: 0.5,
            ctr: 0.1,
            price: 40.0,
            age_days: 3.0,
            promoted: true,
        };
        let c = CandidateSignals {
            retrieval_score: 0.7,
            cf: 0.7,
            anchor: 0.0,
            popular: 0.0,
            ann: 0.4,
            content: 0.0,
            sources: 1,
        };
        let r = row(&c, Some(&item), &user);
        assert_eq!((r[13], r[14]), (0.4, 0.0));
        assert_eq!(r[0], 0.7);
        assert_eq!(r[9], 1.0);
        assert!((r[10] - 2.0 / 3.0).abs() < 1e-12);
        assert!((r[11] - 2f64.ln()).abs() < 1e-12, "twice the usual price");
        assert_eq!(r[12], 3.0);
        let unknown = row(&c, None, &UserSignals::default());
        assert!(unknown[5].is_nan() && unknown[11].is_nan());
    }

    #[test]
    fn models_may_use_a_subset_in_any_order() {
        let cols = column_map(&["price_fit".into(), "retrieval_score".into()]).expect("known");
        assert_eq!(cols, vec![11, 0]);
        assert_eq!(
            column_map(&["weather".into()]).expect_err("unknown"),
            "weather"
        );
    }
}

//! Content vectors: an item's attributes (category, brand, price band, title
//! words) hashed into a fixed number of dimensions and scaled to unit length,
//! so an item nobody has interacted with yet can still be matched against a
//! user's history and explained by what it shares with it.
//!
//! Each attribute value lands on one dimension chosen by its hash, with a
//! sign from the hash too (the "hashing trick"), weighted: category 1.0,
//! brand 0.6 (none when empty), price band 0.4, each title word
//! 0.3/√words. Two items with the same category, brand and band have cosine
//! ≥ 0.9 whatever their titles.

use crate::assign::fnv1a64;
use crate::rerank::price_band;

/// Dimensions of a content vector.
pub const DIM: usize = 64;

/// The unit-length content vector of one item.
pub fn vector(category: &str, brand: &str, price: f64, title: &str) -> [f32; DIM] {
    let mut v = [0.0f32; DIM];
    let mut put = |kind: &str, value: &str, weight: f32| {
        let h = fnv1a64(format!("{kind}\u{1f}{value}").as_bytes());
        let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
        v[(h % DIM as u64) as usize] += sign * weight;
    };
    put("category", category, 1.0);
    if !brand.is_empty() {
        put("brand", brand, 0.6);
    }
    put("band", &price_band(price).to_string(), 0.4);
    let words: Vec<String> = title
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.len() > 2)
        .map(str::to_lowercase)
        .collect();
    let w = 0.3 / (words.len().max(1) as f32).sqrt();
    for word in &words {
        put("word", word, w);
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// The content direction of a category alone: what a visitor who has
/// only said which category they browse is matched on.
pub fn category_vector(category: &str) -> [f32; DIM] {
    let mut v = [0.0f32; DIM];
    let h = fnv1a64(format!("category\u{1f}{category}").as_bytes());
    v[(h % DIM as u64) as usize] = if h >> 63 == 0 { 1.0 } else { -1.0 };
    v
}

/// The normalised weighted sum of `vectors` (a user's content profile from
/// the items they engaged with); all zero when there are none.
pub fn profile<'a>(vectors: impl IntoIterator<Item = (&'a [f32], f32)>) -> Vec<f32> {
    let mut out = vec![0.0f32; DIM];
    for (v, w) in vectors {
        for (o, x) in out.iter_mut().zip(v) {
            *o += w * x;
        }
    }
    let norm = out.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        out.iter_mut().for_each(|x| *x /= norm);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cos(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn a_category_alone_matches_its_items() {
        let books = category_vector("books");
        let a = vector("books", "acme", 12.0, "The Rust Book");
        let c = vector("garden", "hoe&co", 480.0, "Spade");
        assert!((cos(&books, &books) - 1.0).abs() < 1e-6, "unit length");
        // The category weighs 1.0 of the item's ~1.3 norm.
        assert!(cos(&books, &a) > 0.6, "{}", cos(&books, &a));
        assert!(cos(&books, &c).abs() < 0.3, "{}", cos(&books, &c));
    }

    #[test]
    fn shared_attributes_are_close_and_others_far() {
        let a = vector("books", "acme", 12.0, "The Rust Book");
        let b = vector("books", "acme", 13.0, "Gardening for all");
        let c = vector("garden", "hoe&co", 480.0, "Spade");
        assert!((cos(&a, &a) - 1.0).abs() < 1e-5, "unit length");
        assert!(
            cos(&a, &b) >= 0.9,
            "same category, brand, band: {}",
            cos(&a, &b)
        );
        assert!(cos(&a, &c).abs() < 0.3, "nothing shared: {}", cos(&a, &c));
        // Deterministic: the same attributes give the same vector.
        assert_eq!(a, vector("books", "acme", 12.0, "The Rust Book"));
    }

    #[test]
    fn profile_leans_to_the_heavier_history() {
        let books = vector("books", "acme", 12.0, "x");
        let garden = vector("garden", "hoe&co", 480.0, "y");
        let p = profile([(&books[..], 3.0), (&garden[..], 1.0)]);
        assert!(cos(&p, &books) > cos(&p, &garden));
        assert!(profile(std::iter::empty()).iter().all(|x| *x == 0.0));
    }
}

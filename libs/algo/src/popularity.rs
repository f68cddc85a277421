//! Popularity lists: items ranked by weighted interaction counts, overall and
//! per category. The fallback of last resort, and the cold-start source.

use std::collections::HashMap;

/// Items with their scores, best first.
pub type Ranked = Vec<(u32, f64)>;

/// Ranks `scores` (item index → weighted count) and keeps the top `k`, overall
/// and per category (`category[item]`). Ties break by item index so the lists
/// are deterministic.
pub fn top_lists(scores: &[f64], category: &[u32], k: usize) -> (Ranked, HashMap<u32, Ranked>) {
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    order.sort_by(|&a, &b| {
        scores[b as usize]
            .total_cmp(&scores[a as usize])
            .then(a.cmp(&b))
    });
    let overall = order
        .iter()
        .take(k)
        .map(|&i| (i, scores[i as usize]))
        .collect();
    let mut per_category: HashMap<u32, Ranked> = HashMap::new();
    for &i in &order {
        let Some(&c) = category.get(i as usize) else {
            continue;
        };
        let list = per_category.entry(c).or_default();
        if list.len() < k {
            list.push((i, scores[i as usize]));
        }
    }
    (overall, per_category)
}

/// Time-decayed (trending) scores: each event `(item, weight, unix seconds)`
/// counts `weight · 2^(−age / half_life)` at `now`, so an event one half-life
/// old counts half as much as one now. Events after `now` count fully.
pub fn decayed_scores(
    events: impl IntoIterator<Item = (u32, f64, i64)>,
    items: usize,
    now_s: i64,
    half_life_s: f64,
) -> Vec<f64> {
    let mut scores = vec![0.0; items];
    for (i, w, ts) in events {
        if let Some(s) = scores.get_mut(i as usize) {
            let age = (now_s - ts).max(0) as f64;
            *s += w * (-age / half_life_s.max(1.0)).exp2();
        }
    }
    scores
}

/// Scales scores into 0..=1 relative to the maximum (all zero stays zero).
pub fn normalise(scores: &[f64]) -> Vec<f64> {
    let max = scores.iter().copied().fold(0.0f64, f64::max);
    if max <= 0.0 {
        return vec![0.0; scores.len()];
    }
    scores.iter().map(|s| s / max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overall_and_per_category() {
        let scores = [5.0, 9.0, 1.0, 9.0];
        let category = [0, 1, 0, 0];
        let (overall, per) = top_lists(&scores, &category, 2);
        assert_eq!(overall, vec![(1, 9.0), (3, 9.0)], "tie broken by index");
        assert_eq!(per[&0], vec![(3, 9.0), (0, 5.0)]);
        assert_eq!(per[&1], vec![(1, 9.0)]);
    }

    #[test]
    fn decay_halves_per_half_life() {
        let day = 86_400;
        // Item 0: one purchase (8) a week ago; item 1: two views (1) today.
        let events = [(0, 8.0, 0), (1, 1.0, 7 * day), (1, 1.0, 7 * day)];
        let s = decayed_scores(events, 2, 7 * day, (7 * day) as f64);
        assert!((s[0] - 4.0).abs() < 1e-12, "one half-life: half of 8");
        assert!((s[1] - 2.0).abs() < 1e-12);
    }

    #[test]
    fn normalise_by_max() {
        assert_eq!(normalise(&[2.0, 4.0, 0.0]), vec![0.5, 1.0, 0.0]);
        assert_eq!(normalise(&[0.0, 0.0]), vec![0.0, 0.0]);
    }
}

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
    fn normalise_by_max() {
        assert_eq!(normalise(&[2.0, 4.0, 0.0]), vec![0.5, 1.0, 0.0]);
        assert_eq!(normalise(&[0.0, 0.0]), vec![0.0, 0.0]);
    }
}

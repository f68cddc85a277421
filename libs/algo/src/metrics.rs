//! Offline evaluation metrics for top-K recommendation lists (binary
//! relevance: an item is relevant when the user interacted with it in the
//! held-out period). Each takes one user's list, except [`coverage`].

use std::collections::HashSet;
use std::hash::Hash;

/// Share of the top `k` that is relevant (divides by `k`, the usual convention).
pub fn precision<T: Eq + Hash>(list: &[T], relevant: &HashSet<T>, k: usize) -> f64 {
    if k == 0 {
        return 0.0;
    }
    hits(list, relevant, k) as f64 / k as f64
}

/// Share of the relevant items found in the top `k`.
pub fn recall<T: Eq + Hash>(list: &[T], relevant: &HashSet<T>, k: usize) -> f64 {
    if relevant.is_empty() {
        return 0.0;
    }
    hits(list, relevant, k) as f64 / relevant.len() as f64
}

/// 1 when any of the top `k` is relevant.
pub fn hit_rate<T: Eq + Hash>(list: &[T], relevant: &HashSet<T>, k: usize) -> f64 {
    f64::from(u8::from(hits(list, relevant, k) > 0))
}

fn hits<T: Eq + Hash>(list: &[T], relevant: &HashSet<T>, k: usize) -> usize {
    list.iter().take(k).filter(|i| relevant.contains(i)).count()
}

/// Normalised discounted cumulative gain: `Σ 1/log2(rank+1)` over hits,
/// divided by the same sum for a perfect list.
pub fn ndcg<T: Eq + Hash>(list: &[T], relevant: &HashSet<T>, k: usize) -> f64 {
    let dcg: f64 = list
        .iter()
        .take(k)
        .enumerate()
        .filter(|(_, i)| relevant.contains(i))
        .map(|(r, _)| 1.0 / ((r + 2) as f64).log2())
        .sum();
    let ideal: f64 = (0..relevant.len().min(k))
        .map(|r| 1.0 / ((r + 2) as f64).log2())
        .sum();
    if ideal > 0.0 { dcg / ideal } else { 0.0 }
}

/// Average precision at `k`: the mean of precision@rank over the ranks of
/// hits, divided by `min(k, |relevant|)`.
pub fn average_precision<T: Eq + Hash>(list: &[T], relevant: &HashSet<T>, k: usize) -> f64 {
    let denom = relevant.len().min(k);
    if denom == 0 {
        return 0.0;
    }
    let mut found = 0;
    let mut sum = 0.0;
    for (r, i) in list.iter().take(k).enumerate() {
        if relevant.contains(i) {
            found += 1;
            sum += found as f64 / (r + 1) as f64;
        }
    }
    sum / denom as f64
}

/// Distinct items recommended across all lists, as a share of the catalog.
pub fn coverage<'a, T: Eq + Hash + 'a>(
    lists: impl IntoIterator<Item = &'a [T]>,
    k: usize,
    catalog: usize,
) -> f64 {
    if catalog == 0 {
        return 0.0;
    }
    let distinct: HashSet<&T> = lists.into_iter().flat_map(|l| l.iter().take(k)).collect();
    distinct.len() as f64 / catalog as f64
}

/// Intra-list diversity: mean `1 − similarity` over pairs of the top `k`.
pub fn intra_list_diversity<T>(list: &[T], k: usize, similarity: impl Fn(&T, &T) -> f64) -> f64 {
    let top = &list[..list.len().min(k)];
    let mut pairs = 0;
    let mut sum = 0.0;
    for (a, x) in top.iter().enumerate() {
        for y in &top[a + 1..] {
            sum += 1.0 - similarity(x, y);
            pairs += 1;
        }
    }
    if pairs == 0 { 0.0 } else { sum / pairs as f64 }
}

/// Novelty: mean self-information `−log2 p(item)` of the top `k`, where
/// `p` is the share of users who interacted with the item (unseen items
/// count as seen once, to stay finite).
pub fn novelty<T>(list: &[T], k: usize, share: impl Fn(&T) -> f64, users: usize) -> f64 {
    let top = &list[..list.len().min(k)];
    if top.is_empty() {
        return 0.0;
    }
    let floor = 1.0 / users.max(1) as f64;
    top.iter()
        .map(|i| -(share(i).max(floor)).log2())
        .sum::<f64>()
        / top.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[u32]) -> HashSet<u32> {
        items.iter().copied().collect()
    }

    #[test]
    fn by_hand() {
        // Hits at ranks 1 and 3 of 4; 3 relevant items in all.
        let list = [1, 9, 2, 8];
        let rel = set(&[1, 2, 3]);
        assert_eq!(precision(&list, &rel, 4), 0.5);
        assert!((recall(&list, &rel, 4) - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(hit_rate(&list, &rel, 4), 1.0);
        // DCG = 1/log2(2) + 1/log2(4) = 1.5; IDCG = 1 + 1/log2(3) + 1/log2(4) = 2.1309
        assert!((ndcg(&list, &rel, 4) - 1.5 / (1.0 + 1.0 / 3f64.log2() + 0.5)).abs() < 1e-12);
        // AP = (1/1 + 2/3) / 3
        assert!((average_precision(&list, &rel, 4) - (1.0 + 2.0 / 3.0) / 3.0).abs() < 1e-12);
        assert_eq!(ndcg(&[1, 2, 3], &rel, 3), 1.0, "a perfect list");
        assert_eq!(ndcg(&list, &set(&[]), 4), 0.0);
    }

    #[test]
    fn coverage_diversity_novelty() {
        let a = [1, 2];
        let b = [2, 3];
        assert_eq!(coverage([&a[..], &b[..]], 2, 10), 0.3);
        // Similarity 1 for equal parity: pairs (1,2)=0,(1,3)=1,(2,3)=0 → diversity 2/3.
        let ild = intra_list_diversity(&[1, 2, 3], 3, |x, y| f64::from(u8::from(x % 2 == y % 2)));
        assert!((ild - 2.0 / 3.0).abs() < 1e-12);
        // Shares 1/2 and 1/8 → self-information 1 and 3 → mean 2.
        let nov = novelty(&[1, 2], 2, |&i| if i == 1 { 0.5 } else { 0.125 }, 100);
        assert!((nov - 2.0).abs() < 1e-12);
    }
}

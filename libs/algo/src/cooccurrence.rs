//! Item-item collaborative filtering from co-occurrence in user histories.
//!
//! Two items co-occur when one user interacted with both. The similarity is
//! the cosine of their user vectors with event weights:
//! `sim(i, j) = Σ_u w(u,i)·w(u,j) / (‖w(·,i)‖ · ‖w(·,j)‖)`, where `w(u,i)` is the
//! strongest event weight of user `u` on item `i`. Cosine keeps popular items
//! from being everyone's neighbour, which raw counts would make them.

use std::collections::HashMap;

/// One user's history as (item index, weight); the weight is usually the
/// strongest event weight the user had on the item.
pub type History = Vec<(u32, f64)>;

/// How co-occurrences are weighted into a similarity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Weighting {
    /// Cosine of the event-weighted user vectors.
    Cosine,
    /// Dot product of BM25-weighted user vectors, as `implicit`'s
    /// `BM25Recommender`. Each (user, item) weight `w` becomes
    /// `w·(k1+1) / (k1·(1−b+b·len_i/avg_len) + w) · idf_u`, where
    /// `idf_u = ln(items) − ln(1 + |items of u|)`: heavy users count less,
    /// and so do items with long histories.
    Bm25 {
        /// Term-frequency saturation (implicit's `BM25Recommender`: 1.2).
        k1: f64,
        /// Length normalisation (implicit's `BM25Recommender`: 0.75).
        b: f64,
    },
}

/// Each user's strongest `max_history` items, deduplicated, in range.
fn trim(histories: &[History], item_count: usize, max_history: usize) -> Vec<History> {
    histories
        .iter()
        .map(|history| {
            let mut t: History = history
                .iter()
                .copied()
                .filter(|(i, _)| (*i as usize) < item_count)
                .collect();
            t.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            t.dedup_by_key(|(i, _)| *i);
            t.truncate(max_history);
            t
        })
        .collect()
}

/// Top-`k` neighbours of every item by cosine; see [`neighbours_weighted`].
pub fn neighbours(
    histories: &[History],
    item_count: usize,
    k: usize,
    max_history: usize,
) -> Vec<Vec<(u32, f32)>> {
    neighbours_weighted(histories, item_count, k, max_history, Weighting::Cosine)
}

/// Top-`k` neighbours of every item, strongest first, as (item, similarity).
///
/// `max_history` bounds the items taken from each user (their strongest ones):
/// pair counting is quadratic per user, and a handful of very active users
/// would otherwise dominate both run time and the result.
pub fn neighbours_weighted(
    histories: &[History],
    item_count: usize,
    k: usize,
    max_history: usize,
    weighting: Weighting,
) -> Vec<Vec<(u32, f32)>> {
    let mut trimmed = trim(histories, item_count, max_history);
    if let Weighting::Bm25 { k1, b } = weighting {
        let mut length = vec![0.0f64; item_count];
        for h in &trimmed {
            for &(i, w) in h {
                length[i as usize] += w;
            }
        }
        let used = length.iter().filter(|&&l| l > 0.0).count().max(1);
        let avg = length.iter().sum::<f64>() / used as f64;
        let n = (item_count.max(1)) as f64;
        for h in &mut trimmed {
            let idf = n.ln() - (1.0 + h.len() as f64).ln();
            for (i, w) in h.iter_mut() {
                let norm = 1.0 - b + b * length[*i as usize] / avg.max(f64::MIN_POSITIVE);
                *w = *w * (k1 + 1.0) / (k1 * norm + *w) * idf;
            }
        }
    }
    let mut norms = vec![0.0f64; item_count];
    let mut dots: Vec<HashMap<u32, f64>> = vec![HashMap::new(); item_count];
    for trimmed in &trimmed {
        for (a, &(i, wi)) in trimmed.iter().enumerate() {
            norms[i as usize] += wi * wi;
            for &(j, wj) in &trimmed[a + 1..] {
                *dots[i as usize].entry(j).or_default() += wi * wj;
                *dots[j as usize].entry(i).or_default() += wi * wj;
            }
        }
    }
    dots.into_iter()
        .enumerate()
        .map(|(i, row)| {
            let mut list: Vec<(u32, f32)> = row
                .into_iter()
                .map(|(j, dot)| match weighting {
                    Weighting::Cosine => {
                        let denom = (norms[i] * norms[j as usize]).sqrt();
                        (
                            j,
                            if denom > 0.0 {
                                (dot / denom) as f32
                            } else {
                                0.0
                            },
                        )
                    }
                    Weighting::Bm25 { .. } => (j, dot as f32),
                })
                .collect();
            list.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            list.truncate(k);
            list
        })
        .collect()
}

/// A candidate from CF with the history item that contributed most to it.
#[derive(Debug, Clone, PartialEq)]
pub struct CfCandidate {
    /// Candidate item index.
    pub item: u32,
    /// Sum over seed items of `seed weight × similarity`.
    pub score: f64,
    /// The seed item that contributed most (the "because you viewed X").
    pub because_of: u32,
}

/// Scores items by their similarity to `seeds` (item, weight), the user's
/// recent items with recency and event weights applied by the caller. Seeds
/// themselves and items `skip` says yes to (what the user already has) are
/// not returned, and are dropped before the cut. Best first, at most `limit`.
pub fn score_from_seeds(
    neighbours: &[Vec<(u32, f32)>],
    seeds: &[(u32, f64)],
    skip: impl Fn(u32) -> bool,
    limit: usize,
) -> Vec<CfCandidate> {
    // foldhash: every neighbour of every seed passes through here (SipHash
    // was 1.4% of the in-process pipeline).
    let mut acc: HashMap<u32, (f64, u32, f64), foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(1024, Default::default());
    for &(seed, weight) in seeds {
        let Some(list) = neighbours.get(seed as usize) else {
            continue;
        };
        for &(item, sim) in list {
            let contribution = weight * f64::from(sim);
            let entry = acc.entry(item).or_insert((0.0, seed, f64::MIN));
            entry.0 += contribution;
            if contribution > entry.2 {
                entry.1 = seed;
                entry.2 = contribution;
            }
        }
    }
    for &(seed, _) in seeds {
        acc.remove(&seed);
    }
    let mut out: Vec<CfCandidate> = acc
        .into_iter()
        .filter(|(item, _)| !skip(*item))
        .map(|(item, (score, because_of, _))| CfCandidate {
            item,
            score,
            because_of,
        })
        .collect();
    crate::top_k(&mut out, limit, |a, b| {
        b.score.total_cmp(&a.score).then(a.item.cmp(&b.item))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_by_hand() {
        // u0: items 0,1 (w 1,1); u1: items 0,1 (w 1,1); u2: items 0,2 (w 1,1).
        // norms: item0 = 3, item1 = 2, item2 = 1.
        // sim(0,1) = 2 / sqrt(3·2) = 0.8165; sim(0,2) = 1 / sqrt(3·1) = 0.5774;
        // sim(1,2) = 0 (never together).
        let h = vec![
            vec![(0, 1.0), (1, 1.0)],
            vec![(0, 1.0), (1, 1.0)],
            vec![(0, 1.0), (2, 1.0)],
        ];
        let n = neighbours(&h, 3, 10, 50);
        assert_eq!(n[0].len(), 2);
        assert_eq!(n[0][0].0, 1);
        assert!((n[0][0].1 - 0.8165).abs() < 1e-3);
        assert_eq!(n[0][1].0, 2);
        assert!((n[0][1].1 - 0.5774).abs() < 1e-3);
        assert_eq!(n[1], vec![(0, n[0][0].1)]);
        assert_eq!(n[2].len(), 1, "item 2 never co-occurs with item 1");
    }

    #[test]
    fn weights_and_k_are_respected() {
        // One user bought 0 and viewed 1 and 2: weights 8,1,1.
        let h = vec![vec![(0, 8.0), (1, 1.0), (2, 1.0)]];
        let n = neighbours(&h, 3, 1, 50);
        assert!(n.iter().all(|l| l.len() <= 1));
        // Cosine with a single user is 1 for every pair that co-occurs.
        assert!((n[0][0].1 - 1.0).abs() < 1e-6);
    }

    #[test]
    fn history_cap_keeps_strongest_items() {
        let h = vec![vec![(0, 1.0), (1, 8.0), (2, 4.0)]];
        let n = neighbours(&h, 3, 10, 2);
        assert!(n[0].is_empty(), "item 0 was the weakest and is dropped");
        assert_eq!(n[1], vec![(2, 1.0)]);
    }

    #[test]
    fn bm25_discounts_heavy_users() {
        // Items 0 and 1 co-occur for a light user (2 items) and items 2 and 3
        // for a heavy one (5 items). Raw co-occurrence is 1 for both pairs;
        // BM25 gives the light user's pair the larger similarity.
        let h = vec![
            vec![(0, 1.0), (1, 1.0)],
            vec![(2, 1.0), (3, 1.0), (4, 1.0), (5, 1.0), (6, 1.0)],
        ];
        let n = neighbours_weighted(&h, 10, 10, 50, Weighting::Bm25 { k1: 100.0, b: 0.8 });
        let sim = |a: usize, b: u32| n[a].iter().find(|x| x.0 == b).map_or(0.0, |x| x.1);
        assert!(sim(0, 1) > sim(2, 3), "{} vs {}", sim(0, 1), sim(2, 3));
        // idf by hand: light user ln(10) − ln(3); every item's length is 1 =
        // the average, so each weight is (k1+1)/(k1+1)·idf and the dot is idf².
        let idf = 10f64.ln() - 3f64.ln();
        assert!((f64::from(sim(0, 1)) - idf * idf).abs() < 1e-5);
    }

    #[test]
    fn seeds_explain_their_candidates() {
        let neighbours = vec![
            vec![(2, 0.9), (3, 0.25)], // seed 0
            vec![(3, 0.75), (0, 0.5)], // seed 1
            vec![],
            vec![],
        ];
        let out = score_from_seeds(&neighbours, &[(0, 1.0), (1, 1.0)], |_| false, 10);
        // item 3: 0.25 + 0.75 = 1.0, mostly from seed 1; item 2: 0.9 from
        // seed 0; item 0 is a seed and never returned.
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].item, 3);
        assert_eq!(out[0].because_of, 1);
        assert!((out[0].score - 1.0).abs() < 1e-6);
        assert_eq!(out[1].item, 2);
        assert_eq!(out[1].because_of, 0);
        // With item 3 skipped, item 2 still makes a list of one.
        let out = score_from_seeds(&neighbours, &[(0, 1.0), (1, 1.0)], |i| i == 3, 1);
        assert_eq!(out.iter().map(|c| c.item).collect::<Vec<_>>(), [2]);
    }
}

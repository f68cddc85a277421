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

/// Trending lists kept fresh from live events: the trained lists' decayed
/// scores, plus every event since, each counting `weight · 2^(−age /
/// half_life)`. Scores are kept as `log2` of their value at a fixed
/// reference time, so decay never has to be applied (it scales every score
/// alike) and no score under- or overflows however far events are from the
/// reference: an event only ever raises its item's score, and the top
/// lists are updated in place, exactly, in O(list length) per event.
#[derive(Debug, Clone)]
pub struct LiveTrending {
    half_life_s: f64,
    reference_s: i64,
    /// `log2` of each item's score at the reference (−∞: none).
    log_scores: Vec<f64>,
    len: usize,
    overall: Vec<u32>,
    by_category: HashMap<u32, Vec<u32>>,
    events: u64,
}

impl LiveTrending {
    /// Starts from trained lists whose scores are decayed to `reference_s`
    /// (items outside them start at zero), for `items` items.
    pub fn new(
        overall: &[(u32, f64)],
        by_category: &HashMap<u32, Ranked>,
        items: usize,
        reference_s: i64,
        half_life_s: f64,
        len: usize,
    ) -> Self {
        let mut log_scores = vec![f64::NEG_INFINITY; items];
        let mut keep = |list: &[(u32, f64)]| -> Vec<u32> {
            list.iter()
                .filter(|&&(i, s)| s > 0.0 && (i as usize) < items)
                .take(len)
                .map(|&(i, s)| {
                    log_scores[i as usize] = s.log2();
                    i
                })
                .collect()
        };
        let overall = keep(overall);
        let by_category = by_category.iter().map(|(&c, l)| (c, keep(l))).collect();
        let mut t = LiveTrending {
            half_life_s: half_life_s.max(1.0),
            reference_s,
            log_scores,
            len,
            overall,
            by_category,
            events: 0,
        };
        // Lists rebuilt from the scores, so they agree with them exactly.
        let scores = t.log_scores.clone();
        let order = |list: &mut Vec<u32>| {
            list.sort_by(|&a, &b| {
                scores[b as usize]
                    .total_cmp(&scores[a as usize])
                    .then(a.cmp(&b))
            });
        };
        order(&mut t.overall);
        t.by_category.values_mut().for_each(order);
        t
    }

    /// Counts one event: `item` in `category`, of `weight`, at `timestamp_s`.
    /// An unknown item or a weight ≤ 0 is ignored.
    pub fn record(&mut self, item: u32, category: u32, weight: f64, timestamp_s: i64) {
        let Some(old) = self.log_scores.get(item as usize).copied() else {
            return;
        };
        if weight <= 0.0 || !weight.is_finite() {
            return;
        }
        let add = weight.log2() + (timestamp_s - self.reference_s) as f64 / self.half_life_s;
        // log2(2^old + 2^add), without leaving the log domain.
        let (hi, lo) = if old > add { (old, add) } else { (add, old) };
        let new = hi + (lo - hi).exp2().ln_1p() / std::f64::consts::LN_2;
        self.log_scores[item as usize] = new;
        self.events += 1;
        let (len, scores) = (self.len, &self.log_scores);
        promote(&mut self.overall, item, scores, len);
        promote(
            self.by_category.entry(category).or_default(),
            item,
            scores,
            len,
        );
    }

    /// The unix second the scores are decayed to (the trained lists').
    pub fn reference_s(&self) -> i64 {
        self.reference_s
    }

    /// Events counted since the trained lists.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// The overall list, best first, scores relative to the best (1.0).
    pub fn overall(&self) -> Ranked {
        self.scored(&self.overall)
    }

    /// One category's list, best first, scores relative to its best.
    pub fn in_category(&self, category: u32) -> Ranked {
        self.by_category
            .get(&category)
            .map_or_else(Vec::new, |l| self.scored(l))
    }

    fn scored(&self, list: &[u32]) -> Ranked {
        let Some(&top) = list.first() else {
            return Vec::new();
        };
        let best = self.log_scores[top as usize];
        list.iter()
            .map(|&i| (i, (self.log_scores[i as usize] - best).exp2()))
            .collect()
    }
}

/// Moves `item` (whose score just rose) to its place in `list`, which is
/// ordered by `scores` and holds at most `len` items.
fn promote(list: &mut Vec<u32>, item: u32, scores: &[f64], len: usize) {
    if let Some(at) = list.iter().position(|&i| i == item) {
        list.remove(at);
    }
    let s = scores[item as usize];
    let at = list.partition_point(|&i| {
        let o = scores[i as usize];
        o > s || (o == s && i < item)
    });
    if at < len {
        list.insert(at, item);
        list.truncate(len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(list: &Ranked) -> Vec<u32> {
        list.iter().map(|&(i, _)| i).collect()
    }

    #[test]
    fn live_trending_adds_decayed_events_to_the_trained_scores() {
        // Trained at t=0: item 1 scores 4, item 2 scores 2 (category 0).
        let trained = vec![(1, 4.0), (2, 2.0)];
        let by_category = HashMap::from([(0, trained.clone())]);
        let mut t = LiveTrending::new(&trained, &by_category, 5, 0, 10.0, 3);
        // Item 3 (category 1), weight 1 two half-lives later: 1·2² = 4 at
        // the reference, level with item 1; the lower id goes first.
        t.record(3, 1, 1.0, 20);
        assert_eq!(ids(&t.overall()), vec![1, 3, 2]);
        let scores: Vec<f64> = t.overall().iter().map(|&(_, s)| s).collect();
        assert!((scores[1] - 1.0).abs() < 1e-12 && (scores[2] - 0.5).abs() < 1e-12);
        assert_eq!(ids(&t.in_category(1)), vec![3]);
        // Item 2 gets 1·2¹ = 2 more: 4, level too.
        t.record(2, 0, 1.0, 10);
        assert_eq!(ids(&t.overall()), vec![1, 2, 3]);
        assert_eq!(ids(&t.in_category(0)), vec![1, 2]);
        // Item 4 at weight 0.5 now (t=0): 0.5, below the 3 kept; not listed.
        t.record(4, 1, 0.5, 0);
        assert_eq!(ids(&t.overall()), vec![1, 2, 3]);
        assert_eq!(ids(&t.in_category(1)), vec![3, 4]);
        assert_eq!(t.events(), 3);
    }

    #[test]
    fn live_trending_ignores_what_it_cannot_count() {
        let mut t = LiveTrending::new(&[], &HashMap::new(), 2, 0, 60.0, 10);
        t.record(7, 0, 1.0, 0); // no such item
        t.record(0, 0, 0.0, 0); // no weight
        t.record(0, 0, f64::NAN, 0);
        assert!(t.overall().is_empty());
        assert_eq!(t.events(), 0);
    }

    #[test]
    fn live_trending_survives_events_centuries_from_the_reference() {
        // A bundle trained on 1998 data, events from today, a 1 s half-life:
        // 2^(age / half-life) is far beyond f64, the order is still exact.
        let trained = vec![(0, 3.0), (1, 1.0)];
        let mut t = LiveTrending::new(&trained, &HashMap::new(), 4, 0, 1.0, 4);
        t.record(2, 0, 1.0, 900_000_000);
        t.record(3, 0, 2.0, 900_000_000);
        let list = t.overall();
        assert_eq!(ids(&list), vec![3, 2, 0, 1]);
        assert_eq!(list[0].1, 1.0);
        assert!((list[1].1 - 0.5).abs() < 1e-12);
        assert_eq!(list[2].1, 0.0, "old scores are nothing next to today's");
    }

    #[test]
    fn live_trending_matches_decayed_scores_computed_afresh() {
        // 200 pseudo-random events over 5 items: the live lists equal the
        // top lists of `decayed_scores` over every event, at any `now`.
        let category = [0, 1, 0, 1, 1];
        let mut t = LiveTrending::new(&[], &HashMap::new(), 5, 1_000, 3_600.0, 3);
        let mut events = Vec::new();
        let mut x: u64 = 12345;
        for _ in 0..200 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let item = ((x >> 33) % 5) as u32;
            let weight = [1.0, 2.0, 4.0][((x >> 20) % 3) as usize];
            let ts = 1_000 + ((x >> 40) % 20_000) as i64;
            t.record(item, category[item as usize], weight, ts);
            events.push((item, weight, ts));
        }
        let fresh = decayed_scores(events, 5, 30_000, 3_600.0);
        let (overall, by_category) = top_lists(&fresh, &category, 3);
        assert_eq!(ids(&t.overall()), ids(&overall));
        for c in 0..2 {
            assert_eq!(
                ids(&t.in_category(c)),
                ids(&by_category[&c]),
                "category {c}"
            );
        }
    }

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

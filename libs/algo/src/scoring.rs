//! The baseline ranking formula, used until a learned model is in the bundle.
//!
//! `score = 0.6 · r̂ + 0.3 · p + 0.1 · s`, where
//! - `r̂` is the candidate's best retrieval score divided by the best retrieval
//!   score in the batch (0..=1), so sources with different scales compare;
//! - `p` is the item's popularity relative to the most popular item (0..=1);
//! - `s` is the share of retrieval sources that found the item (agreement
//!   between independent sources is evidence on its own).
//!
//! The weights favour personal relevance over popularity; they are a
//! documented prior, not a fit, and the learned ranker replaces them.

/// Formula weights (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BaselineWeights {
    /// Weight of the normalised retrieval score.
    pub retrieval: f64,
    /// Weight of the item's relative popularity.
    pub popularity: f64,
    /// Weight of the share of sources that found the item.
    pub agreement: f64,
}

impl Default for BaselineWeights {
    fn default() -> Self {
        BaselineWeights {
            retrieval: 0.6,
            popularity: 0.3,
            agreement: 0.1,
        }
    }
}

/// What the formula needs to know about one candidate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BaselineInput {
    /// Best score any retrieval source gave the item.
    pub retrieval_score: f64,
    /// Popularity in 0..=1 (0 when unknown).
    pub popularity: f64,
    /// Number of sources that found the item.
    pub sources: usize,
}

/// Scores a batch; `total_sources` is the number of sources that ran.
pub fn baseline_scores(
    inputs: &[BaselineInput],
    total_sources: usize,
    w: BaselineWeights,
) -> Vec<f64> {
    let max_r = inputs
        .iter()
        .map(|c| c.retrieval_score)
        .fold(0.0f64, f64::max);
    let total = total_sources.max(1) as f64;
    inputs
        .iter()
        .map(|c| {
            let r = if max_r > 0.0 {
                (c.retrieval_score / max_r).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let s = (c.sources as f64 / total).min(1.0);
            w.retrieval * r + w.popularity * c.popularity.clamp(0.0, 1.0) + w.agreement * s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_by_hand() {
        let inputs = [
            BaselineInput {
                retrieval_score: 2.0,
                popularity: 0.5,
                sources: 1,
            },
            BaselineInput {
                retrieval_score: 1.0,
                popularity: 1.0,
                sources: 2,
            },
        ];
        let s = baseline_scores(&inputs, 2, BaselineWeights::default());
        // 0.6·1 + 0.3·0.5 + 0.1·0.5 = 0.80 ; 0.6·0.5 + 0.3·1 + 0.1·1 = 0.70
        assert!((s[0] - 0.80).abs() < 1e-9);
        assert!((s[1] - 0.70).abs() < 1e-9);
    }

    #[test]
    fn all_zero_retrieval_scores_rank_by_popularity() {
        let inputs = [
            BaselineInput {
                retrieval_score: 0.0,
                popularity: 0.2,
                sources: 1,
            },
            BaselineInput {
                retrieval_score: 0.0,
                popularity: 0.9,
                sources: 1,
            },
        ];
        let s = baseline_scores(&inputs, 1, BaselineWeights::default());
        assert!(s[1] > s[0]);
    }
}

//! Variant params: the one schema through which an experiment changes the
//! pipeline. The experiments service validates pushed configs with it and the
//! gateway applies it, so a param that is accepted is a param that works.
//!
//! Params travel as a string map (`"retrieval.candidates" = "300"`); unknown
//! keys and out-of-range values are rejected naming the key.

use std::collections::{BTreeMap, HashMap};

use crate::rerank::RerankRules;
use crate::seen::SeenPolicy;

/// Pipeline settings one variant can change; `Default` is the control.
#[derive(Debug, Clone, PartialEq)]
pub struct VariantParams {
    /// `retrieval.candidates`: candidates retrieval returns to ranking.
    pub candidates: u32,
    /// `ranking.model`: ranking model name ("" = the service default).
    pub ranking_model: String,
    /// `rerank.<rule>`: overrides of the re-ranking rules
    /// ([`crate::rerank::RerankRules`]), by rule name, already validated.
    pub rerank: BTreeMap<String, String>,
    /// `budget.retrieval_ms`: override of the retrieval stage budget.
    pub retrieval_budget_ms: Option<u64>,
    /// `budget.ranking_ms`: override of the ranking stage budget.
    pub ranking_budget_ms: Option<u64>,
    /// `budget.rerank_ms`: override of the rerank stage budget.
    pub rerank_budget_ms: Option<u64>,
    /// `retrieval.weight.<source>`: the source mix, by source name
    /// ([`SOURCES`]); 0 turns a source off. Absent sources keep retrieval's
    /// default weight.
    pub source_weights: BTreeMap<String, f64>,
    /// `cache.ttl_ms`: how long the gateway may serve this variant's answers
    /// from its cache (0: never); `None`: the gateway's own TTL.
    pub cache_ttl_ms: Option<u64>,
    /// `seen.kinds`: event kinds that make an item seen (`all`, `none`, or a
    /// comma-separated list); `None`: the gateway's `[seen]` config.
    pub seen_kinds: Option<u8>,
    /// `seen.window_s`: seconds an item stays seen (0: forever); `None`: the
    /// gateway's `[seen]` config.
    pub seen_window_s: Option<u64>,
}

/// Retrieval's sources, as `retrieval.weight.<source>` names them.
pub const SOURCES: &[&str] = &[
    "anchor", "cf", "ann", "content", "trending", "category", "popular",
];

impl Default for VariantParams {
    fn default() -> Self {
        VariantParams {
            // A few hundred candidates: enough recall for ranking to matter,
            // few enough to score inside the ranking budget.
            candidates: 200,
            ranking_model: String::new(),
            rerank: BTreeMap::new(),
            retrieval_budget_ms: None,
            ranking_budget_ms: None,
            rerank_budget_ms: None,
            source_weights: BTreeMap::new(),
            cache_ttl_ms: None,
            seen_kinds: None,
            seen_window_s: None,
        }
    }
}

/// A param that is unknown or out of range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    /// The key.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

/// Every key [`VariantParams::apply`] accepts, for error messages and docs.
pub const KNOWN_KEYS: &[&str] = &[
    "retrieval.candidates",
    "ranking.model",
    "rerank.<rule> (category_cap, brand_cap, promoted_boost, new_arrival_boost, new_arrival_days, mmr_lambda, exploration_share, exploration_pool, exploration_start, recently_viewed_window_s)",
    "budget.retrieval_ms",
    "budget.ranking_ms",
    "budget.rerank_ms",
    "retrieval.weight.<source> (anchor, cf, category, popular; 0..=10)",
    "cache.ttl_ms",
    "seen.kinds (all, none, or a list of view, click, add_to_cart, purchase)",
    "seen.window_s (0..=31536000; 0: forever)",
];

fn ranged(key: &str, value: &str, lo: u64, hi: u64) -> Result<u64, ParamError> {
    match value.trim().parse::<u64>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        _ => Err(ParamError {
            key: key.to_owned(),
            reason: format!("`{value}` is not an integer in {lo}..={hi}"),
        }),
    }
}

impl VariantParams {
    /// `base` (the gateway's `[seen]` config) with this variant's `seen.*`.
    pub fn seen_policy(&self, base: SeenPolicy) -> SeenPolicy {
        SeenPolicy {
            kinds: self.seen_kinds.unwrap_or(base.kinds),
            window_s: self.seen_window_s.unwrap_or(base.window_s),
        }
    }

    /// `base` with this variant's `rerank.*` overrides (validated when the
    /// params were applied, so they hold).
    pub fn rerank_rules(&self, base: &RerankRules) -> RerankRules {
        let overrides: HashMap<String, String> = self.rerank.clone().into_iter().collect();
        base.with(&overrides).unwrap_or_else(|_| base.clone())
    }

    /// Applies `params` on top of `self`; the first bad key is the error.
    pub fn apply(mut self, params: &HashMap<String, String>) -> Result<Self, ParamError> {
        let mut keys: Vec<&String> = params.keys().collect();
        keys.sort();
        for key in keys {
            let value = &params[key];
            match key.as_str() {
                "retrieval.candidates" => self.candidates = ranged(key, value, 10, 2_000)? as u32,
                "ranking.model" => {
                    if value.len() > 64
                        || !value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                    {
                        return Err(ParamError {
                            key: key.clone(),
                            reason: "must be at most 64 characters of [A-Za-z0-9-_.]".into(),
                        });
                    }
                    self.ranking_model = value.clone();
                }
                k if k.starts_with("rerank.") => {
                    let rule = &k["rerank.".len()..];
                    let mut probe = RerankRules::default();
                    probe
                        .set(rule, value)
                        .and_then(|()| probe.validate())
                        .map_err(|e| ParamError {
                            key: format!("rerank.{}", e.key),
                            reason: e.reason,
                        })?;
                    self.rerank.insert(rule.to_owned(), value.clone());
                }
                // Stage budgets stay inside the 150 ms request budget.
                "budget.retrieval_ms" => {
                    self.retrieval_budget_ms = Some(ranged(key, value, 1, 150)?)
                }
                "budget.ranking_ms" => self.ranking_budget_ms = Some(ranged(key, value, 1, 150)?),
                "budget.rerank_ms" => self.rerank_budget_ms = Some(ranged(key, value, 1, 150)?),
                "cache.ttl_ms" => self.cache_ttl_ms = Some(ranged(key, value, 0, 600_000)?),
                "seen.kinds" => self.seen_kinds = Some(SeenPolicy::parse_kinds(key, value)?),
                "seen.window_s" => self.seen_window_s = Some(SeenPolicy::parse_window(key, value)?),
                k if k.starts_with("retrieval.weight.") => {
                    let source = &k["retrieval.weight.".len()..];
                    if !SOURCES.contains(&source) {
                        return Err(ParamError {
                            key: key.clone(),
                            reason: format!("unknown source; known: {}", SOURCES.join(", ")),
                        });
                    }
                    match value.trim().parse::<f64>() {
                        Ok(w) if (0.0..=10.0).contains(&w) => {
                            self.source_weights.insert(source.to_owned(), w);
                        }
                        _ => {
                            return Err(ParamError {
                                key: key.clone(),
                                reason: format!("`{value}` is not a number in 0..=10"),
                            });
                        }
                    }
                }
                _ => {
                    return Err(ParamError {
                        key: key.clone(),
                        reason: format!("unknown param; known: {}", KNOWN_KEYS.join(", ")),
                    });
                }
            }
        }
        Ok(self)
    }
}

// By hand rather than with thiserror: this crate stays free of dependencies
// beyond serde.
impl std::error::Error for ParamError {}

impl std::fmt::Display for ParamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "param `{}`: {}", self.key, self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn applies_known_keys() {
        let p = VariantParams::default()
            .apply(&map(&[
                ("retrieval.candidates", "300"),
                ("rerank.category_cap", "2"),
                ("budget.ranking_ms", "30"),
            ]))
            .expect("valid");
        assert_eq!((p.candidates, p.ranking_budget_ms), (300, Some(30)));
        assert_eq!(p.rerank_rules(&RerankRules::default()).category_cap, 2);
    }

    #[test]
    fn rejects_unknown_and_out_of_range_naming_the_key() {
        let e = VariantParams::default()
            .apply(&map(&[("retrieval.candidatez", "3")]))
            .expect_err("typo");
        assert_eq!(e.key, "retrieval.candidatez");
        let e = VariantParams::default()
            .apply(&map(&[("retrieval.candidates", "5")]))
            .expect_err("too few");
        assert_eq!(e.key, "retrieval.candidates");
        let e = VariantParams::default()
            .apply(&map(&[("rerank.mmr_lambda", "2")]))
            .expect_err("out of range");
        assert_eq!(e.key, "rerank.mmr_lambda");
        let e = VariantParams::default()
            .apply(&map(&[("rerank.nope", "1")]))
            .expect_err("unknown rule");
        assert_eq!(e.key, "rerank.nope");
        let e = VariantParams::default()
            .apply(&map(&[("budget.rerank_ms", "x")]))
            .expect_err("nan");
        assert!(e.to_string().contains("budget.rerank_ms"));
        let e = VariantParams::default()
            .apply(&map(&[("retrieval.weight.vector", "1")]))
            .expect_err("unknown source");
        assert_eq!(e.key, "retrieval.weight.vector");
        for source in SOURCES {
            let key = format!("retrieval.weight.{source}");
            let p = VariantParams::default()
                .apply(&map(&[(key.as_str(), "0.5")]))
                .expect("every retrieval source is known");
            assert_eq!(p.source_weights[*source], 0.5);
        }
        let e = VariantParams::default()
            .apply(&map(&[("retrieval.weight.cf", "11")]))
            .expect_err("too heavy");
        assert_eq!(e.key, "retrieval.weight.cf");
        let e = VariantParams::default()
            .apply(&map(&[("cache.ttl_ms", "-1")]))
            .expect_err("negative");
        assert_eq!(e.key, "cache.ttl_ms");
        let e = VariantParams::default()
            .apply(&map(&[("seen.kinds", "view,like")]))
            .expect_err("unknown kind");
        assert_eq!(e.key, "seen.kinds");
        let e = VariantParams::default()
            .apply(&map(&[("seen.window_s", "31536001")]))
            .expect_err("past a year");
        assert_eq!(e.key, "seen.window_s");
    }

    #[test]
    fn seen_params_override_the_gateway_policy() {
        let base = SeenPolicy::default();
        let p = VariantParams::default()
            .apply(&map(&[
                ("seen.kinds", "purchase,click"),
                ("seen.window_s", "600"),
            ]))
            .expect("valid");
        assert_eq!(
            p.seen_policy(base),
            SeenPolicy {
                kinds: 0b1010,
                window_s: 600
            }
        );
        assert_eq!(VariantParams::default().seen_policy(base), base);
    }

    #[test]
    fn source_mix_and_cache_ttl() {
        let p = VariantParams::default()
            .apply(&map(&[
                ("retrieval.weight.popular", "0"),
                ("retrieval.weight.cf", "2.5"),
                ("cache.ttl_ms", "0"),
            ]))
            .expect("valid");
        assert_eq!(p.source_weights["popular"], 0.0);
        assert_eq!(p.source_weights["cf"], 2.5);
        assert_eq!(p.cache_ttl_ms, Some(0));
    }
}

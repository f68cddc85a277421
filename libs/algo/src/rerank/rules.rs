//! The re-ranking rules: defaults, ranges, and overrides by name.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::params::ParamError;

/// The re-ranking rules. Every field has a default and a validated range;
/// experiments override them with params named `rerank.<field>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RerankRules {
    /// Most items per category in the final list (0: no cap).
    pub category_cap: u32,
    /// Most items per brand in the final list (0: no cap).
    pub brand_cap: u32,
    /// Score multiplier of promoted items, 1.0..=5.0 (1: no boost).
    pub promoted_boost: f64,
    /// Score multiplier of new arrivals, 1.0..=5.0 (1: no boost).
    pub new_arrival_boost: f64,
    /// Items younger than this many days are new arrivals.
    pub new_arrival_days: u32,
    /// MMR trade-off, 0.0..=1.0: 1 is pure score order, lower values trade
    /// score for variety.
    pub mmr_lambda: f64,
    /// Share of slots for exploration, 0.0..=0.5.
    pub exploration_share: f64,
    /// Exploration draws from the ranker's best this many eligible items,
    /// 0..=10000 (0: from all of them). A small pool explores among items
    /// the model already rates, a large one explores further.
    pub exploration_pool: u32,
    /// Where the exploration slots go, 0.0..=1.0: they are spread evenly
    /// over the list below this share of it (0: through the whole list,
    /// 1: the last slots).
    pub exploration_start: f64,
    /// Items the user viewed within this many seconds are not shown again
    /// (0: off).
    pub recently_viewed_window_s: u64,
}

impl Default for RerankRules {
    fn default() -> Self {
        RerankRules {
            // With 10 items shown, 4 per category keeps at least three
            // categories on screen; 2 per brand keeps one brand from a row.
            category_cap: 4,
            brand_cap: 2,
            // Mild: enough to lift a promoted item past near-ties, not past
            // clearly better matches.
            promoted_boost: 1.2,
            new_arrival_boost: 1.15,
            new_arrival_days: 30,
            // Mostly relevance; enough diversity to break runs of lookalikes.
            mmr_lambda: 0.8,
            // One slot in ten for discovery, at the end of the list: a
            // discovery slot costs least where a user looks last
            // (MovieLens-100k, docs/evaluation.md: NDCG@10 0.2231 spread
            // through the list, 0.2247 last, at the same coverage).
            exploration_share: 0.1,
            exploration_pool: 0,
            exploration_start: 1.0,
            recently_viewed_window_s: 0,
        }
    }
}

/// Every rule name, as accepted in config files and (prefixed `rerank.`) in params.
pub const RULE_KEYS: &[&str] = &[
    "category_cap",
    "brand_cap",
    "promoted_boost",
    "new_arrival_boost",
    "new_arrival_days",
    "mmr_lambda",
    "exploration_share",
    "exploration_pool",
    "exploration_start",
    "recently_viewed_window_s",
];

fn bad(key: &str, reason: impl Into<String>) -> ParamError {
    ParamError {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

fn in_range(key: &str, v: f64, lo: f64, hi: f64) -> Result<(), ParamError> {
    if (lo..=hi).contains(&v) {
        Ok(())
    } else {
        Err(bad(key, format!("{v} is not in {lo}..={hi}")))
    }
}

impl RerankRules {
    /// Checks every range; the error names the rule.
    pub fn validate(&self) -> Result<(), ParamError> {
        if self.category_cap > 100 {
            return Err(bad("category_cap", "must be at most 100"));
        }
        if self.brand_cap > 100 {
            return Err(bad("brand_cap", "must be at most 100"));
        }
        in_range("promoted_boost", self.promoted_boost, 1.0, 5.0)?;
        in_range("new_arrival_boost", self.new_arrival_boost, 1.0, 5.0)?;
        if self.new_arrival_days > 3650 {
            return Err(bad("new_arrival_days", "must be at most 3650"));
        }
        in_range("mmr_lambda", self.mmr_lambda, 0.0, 1.0)?;
        in_range("exploration_share", self.exploration_share, 0.0, 0.5)?;
        if self.exploration_pool > 10_000 {
            return Err(bad("exploration_pool", "must be at most 10000"));
        }
        in_range("exploration_start", self.exploration_start, 0.0, 1.0)?;
        if self.recently_viewed_window_s > 90 * 86_400 {
            return Err(bad("recently_viewed_window_s", "must be at most 90 days"));
        }
        Ok(())
    }

    /// Sets one rule from its string form (`key` without the `rerank.` prefix).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ParamError> {
        let v = value.trim();
        let int = |key: &str| {
            v.parse::<u64>()
                .map_err(|_| bad(key, format!("`{value}` is not a whole number")))
        };
        let float = |key: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .ok_or_else(|| bad(key, format!("`{value}` is not a number")))
        };
        match key {
            "category_cap" => self.category_cap = int(key)?.min(u64::from(u32::MAX)) as u32,
            "brand_cap" => self.brand_cap = int(key)?.min(u64::from(u32::MAX)) as u32,
            "promoted_boost" => self.promoted_boost = float(key)?,
            "new_arrival_boost" => self.new_arrival_boost = float(key)?,
            "new_arrival_days" => self.new_arrival_days = int(key)?.min(u64::from(u32::MAX)) as u32,
            "mmr_lambda" => self.mmr_lambda = float(key)?,
            "exploration_share" => self.exploration_share = float(key)?,
            "exploration_pool" => self.exploration_pool = int(key)?.min(u64::from(u32::MAX)) as u32,
            "exploration_start" => self.exploration_start = float(key)?,
            "recently_viewed_window_s" => self.recently_viewed_window_s = int(key)?,
            _ => {
                return Err(bad(
                    key,
                    format!("unknown rule; known: {}", RULE_KEYS.join(", ")),
                ));
            }
        }
        Ok(())
    }

    /// These rules with `overrides` (rule name → value) applied and validated.
    pub fn with(&self, overrides: &HashMap<String, String>) -> Result<Self, ParamError> {
        let mut rules = self.clone();
        let mut keys: Vec<&String> = overrides.keys().collect();
        keys.sort();
        for key in keys {
            rules.set(key, &overrides[key])?;
        }
        rules.validate()?;
        Ok(rules)
    }
}

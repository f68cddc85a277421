//! The scenario file: rate, duration, user and call mix, catalog, SLO.

use serde::{Deserialize, Serialize};

/// A load-test scenario (TOML; see `loadtest/scenarios/default.toml`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// Requests per second, offered at a constant rate.
    pub rate: f64,
    /// Measured seconds.
    pub duration_s: f64,
    /// Seconds sent before the measurement, not counted.
    pub warmup_s: f64,
    /// Seed of the user, item and call draws.
    pub seed: u64,
    /// Every `Recommend` sends `cache-control: no-cache`, which makes the
    /// gateway skip its response cache: the whole pipeline runs for every
    /// call, as for a user the cache has not seen (assigned from the pushed
    /// rules, as production is; `debug` would also call the experiments
    /// service). Off, a repeat user within the cache TTL is answered from
    /// the cache, and the report says how often.
    pub bypass_cache: bool,
    /// Who calls.
    pub users: Users,
    /// What they call.
    pub calls: Calls,
    /// The catalog the ids are drawn from.
    pub catalog: Catalog,
    /// The verdict's thresholds.
    pub slo: Slo,
}

/// Shares of requests by user kind.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Users {
    /// Ids never seen (no history).
    pub cold: f64,
    /// Any of the `population` demo users.
    pub active: f64,
    /// The first `power_users` demo users.
    pub power: f64,
    /// Demo users u0 .. u{population-1}.
    pub population: u32,
    /// How many of them are power users.
    pub power_users: u32,
}

/// Shares of requests by call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Calls {
    /// `Recommend`.
    pub recommend: f64,
    /// `SimilarItems`.
    pub similar: f64,
    /// `Trending`.
    pub trending: f64,
    /// `Track` (a view).
    pub track: f64,
}

/// The catalog.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Catalog {
    /// Item ids i0 .. i{items-1}.
    pub items: u32,
}

/// The service-level objective.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Slo {
    /// Highest accepted p99 latency, ms.
    pub p99_ms: f64,
    /// Highest accepted share of failed calls.
    pub max_error_rate: f64,
    /// Highest accepted share of degraded answers (a stage fell back); 1
    /// (the default) does not check it.
    pub max_degraded_rate: f64,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            rate: 200.0,
            duration_s: 30.0,
            warmup_s: 5.0,
            seed: 1,
            bypass_cache: false,
            users: Users::default(),
            calls: Calls::default(),
            catalog: Catalog::default(),
            slo: Slo::default(),
        }
    }
}

impl Default for Users {
    fn default() -> Self {
        Users {
            cold: 0.2,
            active: 0.7,
            power: 0.1,
            population: 2_000,
            power_users: 20,
        }
    }
}

impl Default for Calls {
    fn default() -> Self {
        Calls {
            recommend: 0.85,
            similar: 0.05,
            trending: 0.05,
            track: 0.05,
        }
    }
}

impl Default for Catalog {
    fn default() -> Self {
        Catalog { items: 5_000 }
    }
}

impl Default for Slo {
    fn default() -> Self {
        Slo {
            p99_ms: 200.0,
            max_error_rate: 0.001,
            max_degraded_rate: 1.0,
        }
    }
}

impl Scenario {
    /// Reads a scenario file.
    pub fn from_file(path: &std::path::Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let s: Scenario =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        s.validate()?;
        Ok(s)
    }

    /// Checks every value, naming the key.
    pub fn validate(&self) -> anyhow::Result<()> {
        let positive = |key: &str, v: f64| {
            anyhow::ensure!(
                v.is_finite() && v > 0.0,
                "scenario: `{key}` must be above 0"
            );
            Ok(())
        };
        positive("rate", self.rate)?;
        positive("duration_s", self.duration_s)?;
        anyhow::ensure!(
            self.warmup_s.is_finite() && self.warmup_s >= 0.0,
            "scenario: `warmup_s` must be 0 or more"
        );
        anyhow::ensure!(
            self.rate <= 100_000.0,
            "scenario: `rate` must be at most 100000"
        );
        let shares = |section: &str, values: &[(&str, f64)]| {
            for (k, v) in values {
                anyhow::ensure!(
                    v.is_finite() && (0.0..=1.0).contains(v),
                    "scenario: `{section}.{k}` must be in 0..=1"
                );
            }
            let sum: f64 = values.iter().map(|(_, v)| v).sum();
            anyhow::ensure!(
                (sum - 1.0).abs() < 1e-6,
                "scenario: the `{section}` shares must add up to 1 (they add up to {sum})"
            );
            Ok(())
        };
        let u = &self.users;
        shares(
            "users",
            &[("cold", u.cold), ("active", u.active), ("power", u.power)],
        )?;
        let c = &self.calls;
        shares(
            "calls",
            &[
                ("recommend", c.recommend),
                ("similar", c.similar),
                ("trending", c.trending),
                ("track", c.track),
            ],
        )?;
        anyhow::ensure!(
            u.population > 0,
            "scenario: `users.population` must be above 0"
        );
        anyhow::ensure!(
            u.power_users > 0 && u.power_users <= u.population,
            "scenario: `users.power_users` must be in 1..=population"
        );
        anyhow::ensure!(
            self.catalog.items > 0,
            "scenario: `catalog.items` must be above 0"
        );
        positive("slo.p99_ms", self.slo.p99_ms)?;
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.slo.max_error_rate),
            "scenario: `slo.max_error_rate` must be in 0..=1"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.slo.max_degraded_rate),
            "scenario: `slo.max_degraded_rate` must be in 0..=1"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_scenarios_are_valid() {
        for name in ["default", "ci"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("scenarios")
                .join(format!("{name}.toml"));
            Scenario::from_file(&path).expect("valid");
        }
        assert_eq!(
            Scenario::from_file(
                &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/default.toml")
            )
            .expect("valid"),
            Scenario::default(),
            "the default scenario file is the built-in default"
        );
    }

    #[test]
    fn bad_scenarios_name_the_key() {
        let bad = |f: &dyn Fn(&mut Scenario)| {
            let mut s = Scenario::default();
            f(&mut s);
            s.validate().expect_err("invalid").to_string()
        };
        assert!(bad(&|s| s.rate = 0.0).contains("`rate`"));
        assert!(bad(&|s| s.calls.track = 0.5).contains("`calls` shares must add up to 1"));
        assert!(bad(&|s| s.users.cold = -0.1).contains("`users.cold`"));
        assert!(bad(&|s| s.users.power_users = 0).contains("`users.power_users`"));
        assert!(bad(&|s| s.slo.max_error_rate = 2.0).contains("`slo.max_error_rate`"));
        let err = toml::from_str::<Scenario>("rat = 5")
            .expect_err("typo")
            .to_string();
        assert!(err.contains("rat"), "{err}");
    }
}

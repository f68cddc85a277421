//! Statistics of A/B results.
//!
//! - [`ratio`]: per-user ratio metrics compared with the delta method, and
//!   CUPED;
//! - [`sequential`]: always-valid p-values and intervals (mSPRT) for
//!   anything looked at continuously;
//! - [`srm`]: the sample-ratio-mismatch check;
//! - here: the normal distribution, and the impression-level
//!   two-proportion z-test with the guardrail rule it used to drive (kept
//!   for the labelled impression-level figures and for the simulator's
//!   comparison with the old behaviour).

pub mod ratio;
pub mod sequential;
pub mod srm;

/// The complementary error function, Chebyshev fit with fractional error
/// below 1.2e-7 everywhere (Numerical Recipes, 2nd ed., §6.2, `erfcc`).
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// The standard normal CDF.
pub fn normal_cdf(z: f64) -> f64 {
    0.5 * erfc(-z / std::f64::consts::SQRT_2)
}

/// 97.5th percentile of the standard normal: the half-width factor of a 95%
/// interval.
pub const Z_95: f64 = 1.959_963_984_540_054;

/// A variant's proportion against control's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    /// Control's proportion.
    pub control: f64,
    /// The variant's proportion.
    pub variant: f64,
    /// (variant − control) / control; 0 when control is 0.
    pub lift: f64,
    /// The pooled two-proportion z statistic.
    pub z: f64,
    /// Two-sided p-value of "the proportions are equal".
    pub p_value: f64,
    /// 95% confidence interval of variant − control (unpooled standard error).
    pub diff_ci: (f64, f64),
}

/// Compares `x1` successes in `n1` trials (variant) with `x0` in `n0`
/// (control). `None` when either has no trials.
pub fn two_proportion(x0: u64, n0: u64, x1: u64, n1: u64) -> Option<Comparison> {
    if n0 == 0 || n1 == 0 {
        return None;
    }
    let (n0f, n1f) = (n0 as f64, n1 as f64);
    let (p0, p1) = (x0 as f64 / n0f, x1 as f64 / n1f);
    let pooled = (x0 + x1) as f64 / (n0f + n1f);
    let se_pooled = (pooled * (1.0 - pooled) * (1.0 / n0f + 1.0 / n1f)).sqrt();
    let z = if se_pooled > 0.0 {
        (p1 - p0) / se_pooled
    } else {
        0.0
    };
    let se = (p0 * (1.0 - p0) / n0f + p1 * (1.0 - p1) / n1f).sqrt();
    let diff = p1 - p0;
    Some(Comparison {
        control: p0,
        variant: p1,
        lift: if p0 > 0.0 { diff / p0 } else { 0.0 },
        z,
        p_value: (2.0 * (1.0 - normal_cdf(z.abs()))).clamp(0.0, 1.0),
        diff_ci: (diff - Z_95 * se, diff + Z_95 * se),
    })
}

/// A guardrail on one metric.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guardrail {
    /// Largest accepted relative drop against control (0.05 = 5%).
    pub max_relative_drop: f64,
    /// Trials each arm needs before the rule can fire.
    pub min_sample: u64,
    /// Significance level (0.05).
    pub alpha: f64,
}

/// True when the variant is significantly worse than control by more than
/// the accepted drop, with enough trials in both arms.
pub fn guardrail_breached(g: &Guardrail, x0: u64, n0: u64, x1: u64, n1: u64) -> bool {
    if n0 < g.min_sample || n1 < g.min_sample {
        return false;
    }
    let Some(c) = two_proportion(x0, n0, x1, n1) else {
        return false;
    };
    c.variant < c.control * (1.0 - g.max_relative_drop) && c.p_value < g.alpha
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_cdf_matches_tables() {
        // Standard normal table values.
        for (z, want) in [
            (0.0, 0.5),
            (1.0, 0.841_344_746),
            (1.959_964, 0.975),
            (-1.644_854, 0.05),
            (3.0, 0.998_650_102),
        ] {
            assert!(
                (normal_cdf(z) - want).abs() < 2e-7,
                "Φ({z}) = {}",
                normal_cdf(z)
            );
        }
    }

    #[test]
    fn two_proportion_by_hand() {
        // 100/1000 vs 130/1000: pooled p = 0.115,
        // se = sqrt(0.115 * 0.885 * 0.002) = 0.014267, z = 0.03 / se = 2.1028,
        // p = 2 (1 − Φ(2.1028)) = 0.03548. Unpooled se =
        // sqrt(0.09/1000 + 0.1131/1000) = 0.014251: CI 0.03 ± 0.027932.
        let c = two_proportion(100, 1000, 130, 1000).expect("trials");
        assert!((c.lift - 0.3).abs() < 1e-12);
        assert!((c.z - 2.1028).abs() < 1e-3, "{}", c.z);
        assert!((c.p_value - 0.03548).abs() < 2e-4, "{}", c.p_value);
        assert!((c.diff_ci.0 - 0.002068).abs() < 1e-5, "{:?}", c.diff_ci);
        assert!((c.diff_ci.1 - 0.057932).abs() < 1e-5, "{:?}", c.diff_ci);
        assert!(two_proportion(0, 0, 1, 1).is_none());
        let same = two_proportion(50, 500, 50, 500).expect("trials");
        assert_eq!((same.z, same.lift), (0.0, 0.0));
        assert!((same.p_value - 1.0).abs() < 1e-6);
    }

    #[test]
    fn guardrail_needs_size_drop_and_significance() {
        let g = Guardrail {
            max_relative_drop: 0.05,
            min_sample: 1000,
            alpha: 0.05,
        };
        // 10% vs 8%: a 20% drop, z ≈ −4.9 at 5,000 each.
        assert!(guardrail_breached(&g, 500, 5000, 400, 5000));
        // The same rates below the minimum sample: quiet.
        assert!(!guardrail_breached(&g, 50, 500, 40, 500));
        // Significant but smaller than the accepted drop (10% vs 9.6%).
        assert!(!guardrail_breached(&g, 20_000, 200_000, 19_200, 200_000));
        // Better than control: quiet however significant.
        assert!(!guardrail_breached(&g, 400, 5000, 500, 5000));
    }
}

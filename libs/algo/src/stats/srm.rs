//! Sample-ratio mismatch: Pearson's chi-square goodness-of-fit test of the
//! users seen per arm against the configured weights.
//!
//! A mismatch means assignment or exposure logging is broken (a variant
//! that crashes before logging, a cache that answers one arm more often, a
//! bot filter that hits one arm): no comparison between the arms can be
//! trusted until it is explained. The usual threshold is p < 0.001, strict
//! because the check runs at every look.

/// The p-value below which the split is flagged.
pub const SRM_ALPHA: f64 = 0.001;

/// The outcome of the test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Srm {
    /// Σ (observed − expected)² / expected.
    pub chi_square: f64,
    /// Degrees of freedom: arms with weight − 1.
    pub df: usize,
    /// P(χ²(df) ≥ chi_square).
    pub p_value: f64,
}

impl Srm {
    /// True when the split is unlikely under the weights (p < [`SRM_ALPHA`]).
    pub fn flagged(&self) -> bool {
        self.p_value < SRM_ALPHA
    }
}

/// Tests `observed` users per arm against `weights` (any positive scale).
/// Arms with weight 0 are left out. `None` with fewer than two weighted
/// arms or no users in them.
pub fn srm(observed: &[u64], weights: &[f64]) -> Option<Srm> {
    let arms: Vec<(f64, f64)> = observed
        .iter()
        .zip(weights)
        .filter(|&(_, &w)| w > 0.0)
        .map(|(&o, &w)| (o as f64, w))
        .collect();
    let total: f64 = arms.iter().map(|a| a.0).sum();
    let weight: f64 = arms.iter().map(|a| a.1).sum();
    if arms.len() < 2 || total <= 0.0 {
        return None;
    }
    let chi_square = arms
        .iter()
        .map(|&(o, w)| {
            let e = total * w / weight;
            (o - e) * (o - e) / e
        })
        .sum();
    let df = arms.len() - 1;
    Some(Srm {
        chi_square,
        df,
        p_value: chi_square_sf(chi_square, df),
    })
}

/// P(χ²(df) ≥ x): the upper regularized gamma function Q(df/2, x/2).
pub fn chi_square_sf(x: f64, df: usize) -> f64 {
    if x <= 0.0 {
        return 1.0;
    }
    gamma_q(df as f64 / 2.0, x / 2.0)
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, n = 9; relative error below 1e-15).
fn ln_gamma(x: f64) -> f64 {
    const G: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1 − x) = π / sin(πx).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = G[0];
    let t = x + 7.5;
    for (i, g) in G.iter().enumerate().skip(1) {
        a += g / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

/// Q(a, x) = Γ(a, x)/Γ(a): the series for x < a + 1, the continued
/// fraction otherwise (Numerical Recipes, 3rd ed., §6.2).
fn gamma_q(a: f64, x: f64) -> f64 {
    let prefix = (-x + a * x.ln() - ln_gamma(a)).exp();
    if x < a + 1.0 {
        let (mut sum, mut term, mut ap) = (1.0 / a, 1.0 / a, a);
        for _ in 0..1_000 {
            ap += 1.0;
            term *= x / ap;
            sum += term;
            if term.abs() < sum.abs() * 1e-15 {
                break;
            }
        }
        (1.0 - sum * prefix).clamp(0.0, 1.0)
    } else {
        // Modified Lentz.
        let tiny = 1e-300;
        let mut b = x + 1.0 - a;
        let mut c = 1.0 / tiny;
        let mut d = 1.0 / b;
        let mut h = d;
        for i in 1..1_000 {
            let an = -(i as f64) * (i as f64 - a);
            b += 2.0;
            d = an * d + b;
            if d.abs() < tiny {
                d = tiny;
            }
            c = b + an / c;
            if c.abs() < tiny {
                c = tiny;
            }
            d = 1.0 / d;
            let delta = d * c;
            h *= delta;
            if (delta - 1.0).abs() < 1e-15 {
                break;
            }
        }
        (prefix * h).clamp(0.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chi_square_by_hand() {
        // 5,200 and 4,800 users under 1:1: expected 5,000 each,
        // χ² = 2 · 200²/5,000 = 16 on 1 df, p = erfc(√8) = 6.334e-5.
        let s = srm(&[5_200, 4_800], &[1.0, 1.0]).expect("two arms");
        assert!((s.chi_square - 16.0).abs() < 1e-12);
        assert_eq!(s.df, 1);
        assert!((s.p_value - 6.334_248e-5).abs() < 1e-9, "{}", s.p_value);
        assert!(s.flagged());
        // 100, 120, 80 under equal weights: χ² = (0 + 400 + 400)/100 = 8
        // on 2 df, whose survival function is e^(−x/2) = e^−4 = 0.0183156.
        let s = srm(&[100, 120, 80], &[2.0, 2.0, 2.0]).expect("three arms");
        assert!((s.chi_square - 8.0).abs() < 1e-12);
        assert!((s.p_value - 0.018_315_64).abs() < 1e-8, "{}", s.p_value);
        assert!(!s.flagged());
        // 3:1 weights met exactly: χ² = 0, p = 1.
        let s = srm(&[300, 100], &[3.0, 1.0]).expect("two arms");
        assert_eq!((s.chi_square, s.p_value), (0.0, 1.0));
    }

    #[test]
    fn survival_function_matches_tables() {
        // χ² critical values: 3.841 (1 df), 5.991 (2 df), 11.070 (5 df)
        // at 0.05; 10.828 (1 df) at 0.001.
        for (x, df, want) in [
            (3.841_459, 1, 0.05),
            (5.991_465, 2, 0.05),
            (11.070_498, 5, 0.05),
            (10.827_566, 1, 0.001),
            (0.454_936, 1, 0.5),
        ] {
            let p = chi_square_sf(x, df);
            assert!((p - want).abs() < want * 1e-5, "Q({x}, {df}) = {p}");
        }
    }

    #[test]
    fn weightless_or_empty_arms_give_no_test() {
        assert!(srm(&[10, 0], &[1.0, 0.0]).is_none());
        assert!(srm(&[0, 0], &[1.0, 1.0]).is_none());
        // A zero-weight arm is left out of the test.
        let s = srm(&[50, 50, 7], &[1.0, 1.0, 0.0]).expect("two weighted arms");
        assert_eq!(s.df, 1);
    }
}

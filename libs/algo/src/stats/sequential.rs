//! Always-valid inference: the mixture sequential probability ratio test
//! (mSPRT) of Johari, Koomen, Pekelis and Walsh, "Always Valid Inference:
//! Continuous Monitoring of A/B Tests" (2021), the test behind Optimizely's
//! stats engine.
//!
//! The statistic is an estimate θ̂ (here a log lift) with variance V, about
//! normal. Against H₀: θ = 0 and a normal mixture θ ~ N(0, τ²) the
//! likelihood ratio is
//! Λ = sqrt(V / (V + τ²)) · exp(τ²·θ̂² / (2V(V + τ²))).
//! By Ville's inequality the chance that Λ ever reaches 1/α under H₀,
//! however often it is looked at, is at most α. So p = min over looks of
//! min(1, 1/Λ) is a p-value valid at any stopping time, and the confidence
//! interval θ̂ ± sqrt(V(V + τ²)/τ² · (ln((V + τ²)/V) − 2 ln α)), intersected
//! over looks, covers θ at every look at once with probability 1 − α.
//!
//! τ is the size of effect the test finds fastest: a small τ needs many
//! users before it says anything, a large one is slow on small effects.
//! Rather than guess, [`TAUS`] mixes τ over 1% to 100% with equal weights.
//! An average of mixture ratios is itself a mixture ratio (the prior is a
//! mixture of normals), so it is as valid as each, and it is within a factor
//! of `TAUS.len()` of the best single τ for any effect. Its interval has no
//! closed form; [`mixture_half_width`] finds it by bisection.

/// ln Λ for estimate `theta` with variance `v` and mixture variance `tau2`.
pub fn log_likelihood_ratio(theta: f64, v: f64, tau2: f64) -> f64 {
    0.5 * (v / (v + tau2)).ln() + tau2 * theta * theta / (2.0 * v * (v + tau2))
}

/// Half-width of the always-valid (1 − `alpha`) interval at one look.
pub fn half_width(v: f64, tau2: f64, alpha: f64) -> f64 {
    (v * (v + tau2) / tau2 * (((v + tau2) / v).ln() - 2.0 * alpha.ln())).sqrt()
}

/// The mixture scales of the always-valid tests in recmesh: effects from
/// 1% to 100% on the log scale.
pub const TAUS: [f64; 7] = [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0];

/// ln of the equal-weight average of Λ over the scales `taus` (not squared).
pub fn mixture_log_lr(theta: f64, v: f64, taus: &[f64]) -> f64 {
    let logs = taus.iter().map(|t| log_likelihood_ratio(theta, v, t * t));
    let max = logs.clone().fold(f64::NEG_INFINITY, f64::max);
    max + (logs.map(|l| (l - max).exp()).sum::<f64>() / taus.len() as f64).ln()
}

/// Half-width of the always-valid (1 − `alpha`) interval of the mixture
/// over `taus` at one look: the distance d where the mixture ratio reaches
/// 1/α. Λ grows with |d| in every component, so bisection finds it; it is
/// at most the smallest single-τ half-width at α / `taus.len()`.
pub fn mixture_half_width(v: f64, taus: &[f64], alpha: f64) -> f64 {
    let target = -alpha.ln();
    let k = taus.len() as f64;
    let mut hi = taus
        .iter()
        .map(|t| half_width(v, t * t, alpha / k))
        .fold(f64::INFINITY, f64::min);
    let mut lo = 0.0;
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if mixture_log_lr(mid, v, taus) < target {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo <= 1e-12 * hi.max(1e-300) {
            break;
        }
    }
    hi
}

/// The running state of one comparison under continuous monitoring.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlwaysValid {
    /// The always-valid p-value: the smallest min(1, 1/Λ) seen so far.
    pub p_value: f64,
    /// The always-valid confidence interval of θ: the intersection of
    /// every look's interval. Starts unbounded.
    pub ci: (f64, f64),
    /// Looks taken with a usable estimate.
    pub looks: u64,
}

impl Default for AlwaysValid {
    fn default() -> Self {
        AlwaysValid {
            p_value: 1.0,
            ci: (f64::NEG_INFINITY, f64::INFINITY),
            looks: 0,
        }
    }
}

impl AlwaysValid {
    /// Takes one look at estimate `theta` with variance `v`, mixing over
    /// the scales `taus`. A look without a finite positive variance changes
    /// nothing.
    pub fn look(&mut self, theta: f64, v: f64, taus: &[f64], alpha: f64) {
        if !(v.is_finite() && v > 0.0 && theta.is_finite()) || taus.is_empty() {
            return;
        }
        self.looks += 1;
        let p = (-mixture_log_lr(theta, v, taus)).exp().min(1.0);
        self.p_value = self.p_value.min(p);
        let h = mixture_half_width(v, taus, alpha);
        self.ci = (self.ci.0.max(theta - h), self.ci.1.min(theta + h));
    }

    /// True once the test has rejected "no difference" at `alpha`: the
    /// result can be acted on now, and would stay valid if watched longer.
    pub fn can_stop(&self, alpha: f64) -> bool {
        self.p_value < alpha
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boundary_by_hand() {
        // V = 0.01, τ = 0.1, α = 0.05: V(V + τ²)/τ² = 0.02,
        // ln((V + τ²)/V) = ln 2 = 0.693147, −2 ln 0.05 = 5.991465, so the
        // half-width is sqrt(0.02 · 6.684612) = 0.365640 and Λ there is
        // exactly 1/α = 20.
        let (v, tau2, alpha) = (0.01, 0.01, 0.05);
        let h = half_width(v, tau2, alpha);
        assert!((h - 0.365_640).abs() < 1e-6, "{h}");
        let lambda = log_likelihood_ratio(h, v, tau2).exp();
        assert!((lambda - 20.0).abs() < 1e-9, "{lambda}");
        // At θ̂ = 0 the ratio is sqrt(V/(V+τ²)) = 1/√2: no evidence.
        assert!((log_likelihood_ratio(0.0, v, tau2) - 0.5f64.ln() * 0.5).abs() < 1e-12);
    }

    #[test]
    fn a_mixture_of_one_scale_is_the_closed_form() {
        let h = mixture_half_width(0.01, &[0.1], 0.05);
        assert!((h - 0.365_640).abs() < 1e-6, "{h}");
        assert!(
            (mixture_log_lr(0.3, 0.01, &[0.1]) - log_likelihood_ratio(0.3, 0.01, 0.01)).abs()
                < 1e-12
        );
    }

    #[test]
    fn mixture_by_hand() {
        // V = 0.01, scales 0.1 and 1 at θ̂ = 0.3:
        // Λ(τ = 0.1) = sqrt(1/2) · exp(0.01 · 0.09 / (2 · 0.01 · 0.02)) = 0.707107 · 9.487736
        //            = 6.708842;
        // Λ(τ = 1)   = sqrt(0.01/1.01) · exp(0.09 / (2 · 0.01 · 1.01))
        //            = 0.099504 · 86.094 = 8.566723.
        // The mixture is their mean, 7.637783.
        let l = mixture_log_lr(0.3, 0.01, &[0.1, 1.0]).exp();
        assert!((l - 7.637_783).abs() < 1e-5, "{l}");
        // Its half-width is where the mean reaches 20, between the two
        // single-scale ones at α = 0.05 and at α/2.
        let taus = [0.1, 1.0];
        let h = mixture_half_width(0.01, &taus, 0.05);
        assert!((mixture_log_lr(h, 0.01, &taus).exp() - 20.0).abs() < 1e-6);
        let single = |t: f64, a: f64| half_width(0.01, t * t, a);
        assert!(h <= single(0.1, 0.025).min(single(1.0, 0.025)) + 1e-12);
        assert!(h >= single(0.1, 0.05).min(single(1.0, 0.05)));
    }

    #[test]
    fn p_value_is_a_running_minimum_and_the_interval_an_intersection() {
        let (tau2, alpha) = (&[0.1][..], 0.05);
        let mut s = AlwaysValid::default();
        s.look(0.5, 0.01, tau2, alpha);
        // Past the boundary (0.3656): p = 1/Λ < 0.05.
        assert!(s.can_stop(alpha), "{}", s.p_value);
        let first = s;
        // A later look back at 0 does not raise p, and narrows the interval
        // from above only as far as that look's own interval.
        s.look(0.0, 0.01, tau2, alpha);
        assert_eq!(s.p_value, first.p_value);
        assert_eq!(s.ci.0, first.ci.0);
        assert!((s.ci.1 - 0.365_640).abs() < 1e-6, "{:?}", s.ci);
        assert_eq!(s.looks, 2);
        // Unusable looks are ignored.
        s.look(1.0, 0.0, tau2, alpha);
        s.look(f64::NAN, 0.01, tau2, alpha);
        assert_eq!(s.looks, 2);
        assert!(!AlwaysValid::default().can_stop(alpha));
    }
}

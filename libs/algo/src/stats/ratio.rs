//! Ratio metrics over users (clicks per impression, conversions per
//! impression), compared between arms with the delta method, and CUPED.
//!
//! The unit of analysis is the user, the unit the experiment randomises.
//! A user contributes `x` (clicks) over `y` (impressions) and a covariate
//! `c` (their engagement before their first exposure). The metric is
//! R = Σx / Σy; its variance by the delta method is
//! Var(R̂) = (s²ₓ − 2R·sₓᵧ + R²·s²ᵧ) / (n·ȳ²), with sample variances and
//! covariances (n − 1 in the denominator). Sums hold integer counts, exact
//! in `f64` far past any real experiment, so a user's old contribution can
//! be taken out and their new one put in without drift.

use super::{Z_95, normal_cdf};

/// Sums over the users of one arm.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct RatioSums {
    /// Users.
    pub n: f64,
    /// Σx, Σy, Σc.
    pub x: f64,
    pub y: f64,
    pub c: f64,
    /// Σx², Σy², Σc².
    pub xx: f64,
    pub yy: f64,
    pub cc: f64,
    /// Σxy, Σxc, Σyc.
    pub xy: f64,
    pub xc: f64,
    pub yc: f64,
}

impl RatioSums {
    /// Adds one user.
    pub fn add(&mut self, x: f64, y: f64, c: f64) {
        self.apply(x, y, c, 1.0);
    }

    /// Takes out a user added before with the same values.
    pub fn remove(&mut self, x: f64, y: f64, c: f64) {
        self.apply(x, y, c, -1.0);
    }

    fn apply(&mut self, x: f64, y: f64, c: f64, sign: f64) {
        self.n += sign;
        self.x += sign * x;
        self.y += sign * y;
        self.c += sign * c;
        self.xx += sign * x * x;
        self.yy += sign * y * y;
        self.cc += sign * c * c;
        self.xy += sign * x * y;
        self.xc += sign * x * c;
        self.yc += sign * y * c;
    }

    /// Σx / Σy; 0 without denominator.
    pub fn ratio(&self) -> f64 {
        if self.y > 0.0 { self.x / self.y } else { 0.0 }
    }

    /// Sample covariance from Σab, Σa and Σb.
    fn cov(&self, ab: f64, a: f64, b: f64) -> f64 {
        (ab - a * b / self.n) / (self.n - 1.0)
    }

    /// Var of the linearised metric L = (x − R·y) / ȳ over users.
    fn var_linear(&self) -> f64 {
        let r = self.ratio();
        let mean_y = self.y / self.n;
        let v = self.cov(self.xx, self.x, self.x) - 2.0 * r * self.cov(self.xy, self.x, self.y)
            + r * r * self.cov(self.yy, self.y, self.y);
        (v / (mean_y * mean_y)).max(0.0)
    }

    /// Cov(L, c).
    fn cov_linear_c(&self) -> f64 {
        let r = self.ratio();
        let mean_y = self.y / self.n;
        (self.cov(self.xc, self.x, self.c) - r * self.cov(self.yc, self.y, self.c)) / mean_y
    }

    fn var_c(&self) -> f64 {
        self.cov(self.cc, self.c, self.c).max(0.0)
    }

    fn usable(&self) -> bool {
        self.n >= 2.0 && self.y > 0.0
    }

    /// The delta-method variance of R̂; `None` below two users or without
    /// impressions.
    pub fn variance(&self) -> Option<f64> {
        self.usable().then(|| self.var_linear() / self.n)
    }
}

/// A variant's ratio metric against control's, per user.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RatioComparison {
    /// Control's and the variant's R̂ (CUPED-adjusted in [`cuped`]).
    pub control: f64,
    pub variant: f64,
    /// variant − control.
    pub diff: f64,
    /// Its standard error.
    pub se: f64,
    /// (variant − control) / control; 0 when control is 0.
    pub lift: f64,
    /// Two-sided fixed-horizon p-value of "no difference" (Wald test).
    pub p_value: f64,
    /// 95% fixed-horizon confidence interval of `diff`.
    pub diff_ci: (f64, f64),
    /// ln(variant / control) and its delta-method variance, for the
    /// sequential test; `None` when either ratio is 0.
    pub log_lift: Option<(f64, f64)>,
}

fn comparison(r0: f64, v0: f64, r1: f64, v1: f64) -> RatioComparison {
    let diff = r1 - r0;
    let se = (v0 + v1).sqrt();
    let z = if se > 0.0 { diff / se } else { 0.0 };
    RatioComparison {
        control: r0,
        variant: r1,
        diff,
        se,
        lift: if r0 > 0.0 { diff / r0 } else { 0.0 },
        p_value: (2.0 * (1.0 - normal_cdf(z.abs()))).clamp(0.0, 1.0),
        diff_ci: (diff - Z_95 * se, diff + Z_95 * se),
        log_lift: (r0 > 0.0 && r1 > 0.0).then(|| ((r1 / r0).ln(), v1 / (r1 * r1) + v0 / (r0 * r0))),
    }
}

/// Compares the variant's users with control's; `None` when either arm
/// has fewer than two users or no impressions.
pub fn compare(control: &RatioSums, variant: &RatioSums) -> Option<RatioComparison> {
    let v0 = control.variance()?;
    let v1 = variant.variance()?;
    Some(comparison(control.ratio(), v0, variant.ratio(), v1))
}

/// A CUPED-adjusted comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cuped {
    /// The comparison of the adjusted ratios.
    pub comparison: RatioComparison,
    /// The regression coefficient of the linearised metric on the
    /// covariate, pooled over both arms.
    pub theta: f64,
    /// 1 − Var(adjusted diff) / Var(unadjusted diff): the share of the
    /// variance the covariate removed.
    pub variance_reduction: f64,
}

/// CUPED for a ratio metric (Deng et al. 2013, with the linearisation of
/// Deng, Knoblich and Lu 2018): each arm's R̂ is adjusted by
/// −θ·(c̄_arm − c̄_pooled), θ = pooled Cov(L, c) / pooled Var(c), and its
/// variance becomes (Var L − 2θ·Cov(L, c) + θ²·Var c) / n. `None` as
/// [`compare`], or when the covariate does not vary.
pub fn cuped(control: &RatioSums, variant: &RatioSums) -> Option<Cuped> {
    if !control.usable() || !variant.usable() {
        return None;
    }
    let (n0, n1) = (control.n, variant.n);
    let var_c = n0 * control.var_c() + n1 * variant.var_c();
    if var_c <= 0.0 {
        return None;
    }
    let theta = (n0 * control.cov_linear_c() + n1 * variant.cov_linear_c()) / var_c;
    let pooled_c = (control.c + variant.c) / (n0 + n1);
    let adjusted = |s: &RatioSums| {
        let r = s.ratio() - theta * (s.c / s.n - pooled_c);
        let v = (s.var_linear() - 2.0 * theta * s.cov_linear_c() + theta * theta * s.var_c())
            .max(0.0)
            / s.n;
        (r, v)
    };
    let (r0, v0) = adjusted(control);
    let (r1, v1) = adjusted(variant);
    let plain = control.var_linear() / n0 + variant.var_linear() / n1;
    Some(Cuped {
        comparison: comparison(r0, v0, r1, v1),
        theta,
        variance_reduction: if plain > 0.0 {
            1.0 - (v0 + v1) / plain
        } else {
            0.0
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums(users: &[(f64, f64, f64)]) -> RatioSums {
        let mut s = RatioSums::default();
        for &(x, y, c) in users {
            s.add(x, y, c);
        }
        s
    }

    #[test]
    fn delta_method_variance_by_hand() {
        // Users (clicks, impressions) = (1, 2), (1, 4), (2, 2): R = 4/8 = 0.5,
        // x̄ = 4/3, ȳ = 8/3. s²ₓ = (1/9 + 1/9 + 4/9)/2 = 1/3,
        // s²ᵧ = (4/9 + 16/9 + 4/9)/2 = 4/3, sₓᵧ = (2/9 − 4/9 − 4/9)/2 = −1/3.
        // Var(R̂) = (1/3 + 2·0.5/3 + 0.25·4/3) / (3 · 64/9) = 1 / (64/3)
        // = 3/64 = 0.046875.
        let s = sums(&[(1.0, 2.0, 0.0), (1.0, 4.0, 0.0), (2.0, 2.0, 0.0)]);
        assert_eq!(s.ratio(), 0.5);
        let v = s.variance().expect("three users");
        assert!((v - 0.046875).abs() < 1e-12, "{v}");
        // One user is not enough for a variance.
        assert!(sums(&[(1.0, 2.0, 0.0)]).variance().is_none());
    }

    #[test]
    fn removing_a_user_restores_the_sums() {
        let mut s = sums(&[(1.0, 2.0, 3.0), (0.0, 5.0, 1.0)]);
        let before = s;
        s.add(4.0, 7.0, 2.0);
        s.remove(4.0, 7.0, 2.0);
        assert_eq!(s, before);
    }

    #[test]
    fn compare_by_hand() {
        // Control as above (R 0.5, Var 3/64); the variant's users (1, 4),
        // (1, 4), (1, 4): R = 0.25 and no spread, Var 0. diff = −0.25,
        // se = sqrt(3/64) = 0.216506, z = −1.154701, p = 0.248213.
        let c = sums(&[(1.0, 2.0, 0.0), (1.0, 4.0, 0.0), (2.0, 2.0, 0.0)]);
        let v = sums(&[(1.0, 4.0, 0.0), (1.0, 4.0, 0.0), (1.0, 4.0, 0.0)]);
        let cmp = compare(&c, &v).expect("usable");
        assert!((cmp.diff + 0.25).abs() < 1e-12);
        assert!((cmp.lift + 0.5).abs() < 1e-12);
        assert!((cmp.se - 0.216_506).abs() < 1e-6, "{}", cmp.se);
        assert!((cmp.p_value - 0.248_213).abs() < 1e-5, "{}", cmp.p_value);
        let (log_lift, log_var) = cmp.log_lift.expect("both positive");
        assert!((log_lift - 0.5f64.ln()).abs() < 1e-12);
        // Var1/R1² + Var0/R0² = 0 + (3/64)/0.25 = 0.1875.
        assert!((log_var - 0.1875).abs() < 1e-12);
    }

    #[test]
    fn cuped_by_hand() {
        // One impression per user, so L = (x − R)/1 and the adjustment is
        // the textbook one. Control x = 0, 1, 1, 2 with c = 0, 1, 1, 2;
        // variant x = 1, 2, 2, 3 with c = 0, 1, 1, 2: x = c + arm effect,
        // the covariate explains every bit of the spread. θ = 1, c̄ equal
        // in both arms, so the adjusted diff stays 1 and its variance is 0.
        let c = sums(&[
            (0.0, 1.0, 0.0),
            (1.0, 1.0, 1.0),
            (1.0, 1.0, 1.0),
            (2.0, 1.0, 2.0),
        ]);
        let v = sums(&[
            (1.0, 1.0, 0.0),
            (2.0, 1.0, 1.0),
            (2.0, 1.0, 1.0),
            (3.0, 1.0, 2.0),
        ]);
        let k = cuped(&c, &v).expect("covariate varies");
        assert!((k.theta - 1.0).abs() < 1e-12, "{}", k.theta);
        assert!((k.comparison.diff - 1.0).abs() < 1e-12);
        assert!(k.comparison.se.abs() < 1e-9);
        assert!((k.variance_reduction - 1.0).abs() < 1e-9);
        // A covariate unrelated to x removes nothing: c = 1, 0, 0, 1
        // has Cov(x, c) = 0 in both arms.
        let c = sums(&[
            (0.0, 1.0, 1.0),
            (1.0, 1.0, 0.0),
            (1.0, 1.0, 0.0),
            (2.0, 1.0, 1.0),
        ]);
        let v = sums(&[
            (1.0, 1.0, 1.0),
            (2.0, 1.0, 0.0),
            (2.0, 1.0, 0.0),
            (3.0, 1.0, 1.0),
        ]);
        let k = cuped(&c, &v).expect("covariate varies");
        assert!(k.theta.abs() < 1e-12);
        assert!(k.variance_reduction.abs() < 1e-12);
        // A constant covariate cannot adjust anything.
        let flat = sums(&[(0.0, 1.0, 3.0), (1.0, 1.0, 3.0)]);
        assert!(cuped(&flat, &flat).is_none());
    }
}

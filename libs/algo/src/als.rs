//! Implicit-feedback matrix factorisation: alternating least squares with
//! confidence weighting, solved by a few conjugate-gradient steps per row.
//! This is the method of Hu, Koren & Volinsky (2008), with the CG solver of
//! Takács et al. that the `implicit` library uses.
//!
//! Each observed (user, item, strength r) gets preference 1 and confidence
//! `1 + α·r`; every unobserved pair has preference 0 and confidence 1. With
//! `Y` the item factors, a user's factors solve
//! `(YᵀY + Yᵀ(Cᵤ − I)Y + λI) xᵤ = Yᵀ Cᵤ pᵤ`. `YᵀY` is computed once per
//! half-iteration, so a row costs O(nnz(u)·f + steps·f²). CG starts from
//! the previous solution, so 3 steps per row suffice. Rows are solved in
//! parallel on `threads` OS threads, each owning a disjoint slice of the
//! factor matrix, with the row solver compiled for the widest SIMD the CPU
//! has (run-time dispatch through `pulp`: AVX2 and FMA on most x86-64).

/// Settings of a training run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AlsParams {
    /// Latent factors per user and item.
    pub factors: usize,
    /// Alternations of user and item solves.
    pub iterations: usize,
    /// L2 regularisation λ.
    pub regularization: f32,
    /// Confidence scale α.
    pub alpha: f32,
    /// CG steps per row and half-iteration.
    pub cg_steps: usize,
    /// Worker threads (at least 1).
    pub threads: usize,
    /// Seed of the initial factors.
    pub seed: u64,
}

impl Default for AlsParams {
    fn default() -> Self {
        // implicit's defaults, except factors (64 suits catalogues of this size).
        AlsParams {
            factors: 64,
            iterations: 15,
            regularization: 0.01,
            alpha: 1.0,
            cg_steps: 3,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            seed: 42,
        }
    }
}

/// A sparse matrix in compressed-row form: row `r`'s entries are
/// `indices[indptr[r]..indptr[r+1]]` with `values` at the same positions.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Csr {
    /// Row starts, `rows + 1` long.
    pub indptr: Vec<usize>,
    /// Column of each entry.
    pub indices: Vec<u32>,
    /// Strength of each entry.
    pub values: Vec<f32>,
}

impl Csr {
    /// Builds the matrix from (row, column, value) triples; duplicates keep the
    /// largest value.
    pub fn from_triples(rows: usize, triples: &[(u32, u32, f32)]) -> Csr {
        let mut sorted: Vec<(u32, u32, f32)> = triples
            .iter()
            .copied()
            .filter(|t| (t.0 as usize) < rows)
            .collect();
        sorted.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)).then(b.2.total_cmp(&a.2)));
        sorted.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        let mut indptr = vec![0usize; rows + 1];
        for t in &sorted {
            indptr[t.0 as usize + 1] += 1;
        }
        for r in 0..rows {
            indptr[r + 1] += indptr[r];
        }
        Csr {
            indptr,
            indices: sorted.iter().map(|t| t.1).collect(),
            values: sorted.iter().map(|t| t.2).collect(),
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.indptr.len().saturating_sub(1)
    }

    /// The transpose, with `cols` rows.
    pub fn transpose(&self, cols: usize) -> Csr {
        let mut triples = Vec::with_capacity(self.indices.len());
        for r in 0..self.rows() {
            for k in self.indptr[r]..self.indptr[r + 1] {
                triples.push((self.indices[k], r as u32, self.values[k]));
            }
        }
        Csr::from_triples(cols, &triples)
    }
}

/// Trained factors, row-major (`factors` floats per row).
#[derive(Debug, Clone, PartialEq)]
pub struct AlsModel {
    /// Factors per row.
    pub factors: usize,
    /// User factors.
    pub users: Vec<f32>,
    /// Item factors.
    pub items: Vec<f32>,
}

/// Dot product with eight independent partial sums: a single running sum
/// forces strict left-to-right order and keeps the compiler from using SIMD
/// lanes (measured: docs/evaluation.md, "ALS training time").
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

/// The `k` rows of the row-major `items` (`factors` columns) with the
/// largest dot product with `query`, skipping `exclude`; best first, ties by
/// index. Exact (brute force): O(items · factors).
pub fn nearest(
    items: &[f32],
    factors: usize,
    query: &[f32],
    k: usize,
    exclude: impl Fn(u32) -> bool,
) -> Vec<(u32, f32)> {
    let f = factors.max(1);
    let mut scored: Vec<(u32, f32)> = items
        .chunks_exact(f)
        .enumerate()
        .map(|(i, row)| (i as u32, row))
        .filter(|&(i, _)| !exclude(i))
        .map(|(i, row)| (i, dot(query, row)))
        .collect();
    crate::top_k(&mut scored, k, |a, b| {
        b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
    });
    scored
}

/// Dot product of two factor rows.
pub fn similarity(a: &[f32], b: &[f32]) -> f32 {
    dot(a, b)
}

/// `f(key, query · row)` for each `(key, row)` of `rows`, in their order,
/// on the widest SIMD this CPU has (chosen once for the whole scan: a scan
/// of thousands of 64-float rows is where [`similarity`]'s portable loop
/// showed in the profile). Equal to [`similarity`] up to rounding.
pub fn similarities<'a, K>(
    query: &[f32],
    rows: impl Iterator<Item = (K, &'a [f32])>,
    f: impl FnMut(K, f32),
) {
    struct Scan<'q, I, F>(&'q [f32], I, F);
    impl<'q, 'a, K, I, F> pulp::WithSimd for Scan<'q, I, F>
    where
        I: Iterator<Item = (K, &'a [f32])>,
        F: FnMut(K, f32),
    {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, simd: S) {
            let Scan(query, rows, mut f) = self;
            for (key, row) in rows {
                f(key, dot_simd(simd, query, row));
            }
        }
    }
    pulp::Arch::new().dispatch(Scan(query, rows, f));
}

/// [`dot`] on `S`'s vector registers, with fused multiply-adds where the
/// CPU has them; inlined into [`pulp::Arch::dispatch`]'s per-CPU copies.
#[inline(always)]
fn dot_simd<S: pulp::Simd>(simd: S, a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (va, ta) = S::as_simd_f32s(&a[..n]);
    let (vb, tb) = S::as_simd_f32s(&b[..n]);
    // Two accumulators, so consecutive multiply-adds do not wait on each other.
    let (mut acc0, mut acc1) = (simd.splat_f32s(0.0), simd.splat_f32s(0.0));
    let (pa, pb) = (va.chunks_exact(2), vb.chunks_exact(2));
    let (ra, rb) = (pa.remainder(), pb.remainder());
    for (x, y) in pa.zip(pb) {
        acc0 = simd.mul_add_e_f32s(x[0], y[0], acc0);
        acc1 = simd.mul_add_e_f32s(x[1], y[1], acc1);
    }
    for (x, y) in ra.iter().zip(rb) {
        acc0 = simd.mul_add_e_f32s(*x, *y, acc0);
    }
    let mut sum = simd.reduce_sum_f32s(simd.add_f32s(acc0, acc1));
    for (x, y) in ta.iter().zip(tb) {
        sum += x * y;
    }
    sum
}

/// `YᵀY + λI` for the row-major `y` with `f` columns, on the widest SIMD
/// this CPU has.
fn gramian(y: &[f32], f: usize, reg: f32) -> Vec<f32> {
    struct Gramian<'a>(&'a [f32], usize, f32);
    impl pulp::WithSimd for Gramian<'_> {
        type Output = Vec<f32>;
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _simd: S) -> Vec<f32> {
            gramian_body(self.0, self.1, self.2)
        }
    }
    pulp::Arch::new().dispatch(Gramian(y, f, reg))
}

#[inline(always)]
fn gramian_body(y: &[f32], f: usize, reg: f32) -> Vec<f32> {
    let mut g = vec![0.0f32; f * f];
    for row in y.chunks_exact(f) {
        for a in 0..f {
            let ra = row[a];
            if ra == 0.0 {
                continue;
            }
            // The upper triangle only (columns a..f); mirrored below.
            let out = &mut g[a * f + a..(a + 1) * f];
            for (o, rb) in out.iter_mut().zip(&row[a..]) {
                *o += ra * rb;
            }
        }
    }
    for a in 0..f {
        g[a * f + a] += reg;
        for b in a + 1..f {
            g[b * f + a] = g[a * f + b];
        }
    }
    g
}

/// `r`, `p` and `Ap` of one conjugate-gradient solve, reused across rows.
struct Scratch {
    r: Vec<f32>,
    p: Vec<f32>,
    ap: Vec<f32>,
}

impl Scratch {
    fn new(f: usize) -> Self {
        Scratch {
            r: vec![0.0; f],
            p: vec![0.0; f],
            ap: vec![0.0; f],
        }
    }
}

/// `steps` CG steps on one row: `(YᵀY + λI + Σ (cᵢ − 1) yᵢyᵢᵀ) x = Σ cᵢ yᵢ`
/// over the row's `(item, strength)` entries, starting from `xu`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn solve_row<S: pulp::Simd>(
    simd: S,
    xu: &mut [f32],
    y: &[f32],
    yty: &[f32],
    entries: impl Iterator<Item = (u32, f32)> + Clone,
    alpha: f32,
    steps: usize,
    s: &mut Scratch,
) {
    let f = xu.len();
    let Scratch { r, p: pv, ap } = s;
    // r = b − A·x
    for (a, ra) in r.iter_mut().enumerate() {
        *ra = -dot_simd(simd, &yty[a * f..(a + 1) * f], xu);
    }
    for (i, v) in entries.clone() {
        let yi = &y[i as usize * f..][..f];
        let conf = 1.0 + alpha * v;
        let coef = conf - (conf - 1.0) * dot_simd(simd, yi, xu);
        for (ra, yv) in r.iter_mut().zip(yi) {
            *ra += coef * yv;
        }
    }
    pv.copy_from_slice(r);
    let mut rs_old = dot_simd(simd, r, r);
    for _ in 0..steps {
        if rs_old < 1e-20 {
            break;
        }
        // Ap = YtY·p + Σ (c − 1)(yᵢ·p) yᵢ
        for (a, apa) in ap.iter_mut().enumerate() {
            *apa = dot_simd(simd, &yty[a * f..(a + 1) * f], pv);
        }
        for (i, v) in entries.clone() {
            let yi = &y[i as usize * f..][..f];
            let coef = alpha * v * dot_simd(simd, yi, pv);
            for (apa, yv) in ap.iter_mut().zip(yi) {
                *apa += coef * yv;
            }
        }
        let step = rs_old / dot_simd(simd, pv, ap);
        for a in 0..f {
            xu[a] += step * pv[a];
            r[a] -= step * ap[a];
        }
        let rs_new = dot_simd(simd, r, r);
        for a in 0..f {
            pv[a] = r[a] + (rs_new / rs_old) * pv[a];
        }
        rs_old = rs_new;
    }
}

/// A thread's share of the rows, solved with the row loop compiled for the
/// widest SIMD this CPU has (detected at run time; AVX2 and FMA on x86-64
/// since 2013, plain code elsewhere) and everything below it inlined.
struct SolveRows<'a> {
    xs: &'a mut [f32],
    first: usize,
    y: &'a [f32],
    yty: &'a [f32],
    m: &'a Csr,
    p: &'a AlsParams,
}

impl pulp::WithSimd for SolveRows<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        let f = self.p.factors;
        let m = self.m;
        let mut scratch = Scratch::new(f);
        for (local, xu) in self.xs.chunks_exact_mut(f).enumerate() {
            let u = self.first + local;
            let entries = m.indptr[u]..m.indptr[u + 1];
            let row = entries.map(|k| (m.indices[k], m.values[k]));
            solve_row(
                simd,
                xu,
                self.y,
                self.yty,
                row,
                self.p.alpha,
                self.p.cg_steps,
                &mut scratch,
            );
        }
    }
}

/// Solves every row of `x` against fixed `y` (see the module docs).
fn solve_rows(x: &mut [f32], y: &[f32], m: &Csr, p: &AlsParams) {
    let f = p.factors;
    let yty = gramian(y, f, p.regularization);
    let threads = p.threads.max(1);
    let rows = m.rows();
    let per = rows.div_ceil(threads).max(1);
    let arch = pulp::Arch::new();
    std::thread::scope(|scope| {
        for (chunk, xs) in x.chunks_mut(per * f).enumerate() {
            let yty = &yty;
            scope.spawn(move || {
                arch.dispatch(SolveRows {
                    xs,
                    first: chunk * per,
                    y,
                    yty,
                    m,
                    p,
                })
            });
        }
    });
}

/// What serving needs to place a user the model has not seen (or whose
/// newest events it has not seen) among the trained item factors.
#[derive(Debug, Clone, PartialEq)]
pub struct FoldIn {
    /// Factors per row.
    pub factors: usize,
    /// `YᵀY + λI` of the item factors.
    pub gramian: Vec<f32>,
    /// Confidence scale α the items were trained with.
    pub alpha: f32,
}

impl FoldIn {
    /// Precomputes `YᵀY + λI` for the row-major item factors `items`.
    pub fn new(items: &[f32], factors: usize, regularization: f32, alpha: f32) -> Self {
        FoldIn {
            factors,
            gramian: gramian(items, factors, regularization),
            alpha,
        }
    }

    /// A user's factors from their `(item, strength)` history, solved against
    /// the fixed item factors `items` exactly as training solves a user row
    /// (CG from zero, `factors` steps: exact up to rounding). Items outside
    /// `items` are ignored.
    pub fn user(&self, items: &[f32], history: &[(u32, f32)]) -> Vec<f32> {
        let f = self.factors;
        let n = (items.len() / f.max(1)) as u32;
        let mut x = vec![0.0f32; f];
        struct Solve<'a> {
            fold: &'a FoldIn,
            x: &'a mut [f32],
            items: &'a [f32],
            history: &'a [(u32, f32)],
            n: u32,
        }
        impl pulp::WithSimd for Solve<'_> {
            type Output = ();
            #[inline(always)]
            fn with_simd<S: pulp::Simd>(self, simd: S) {
                let (f, n) = (self.fold.factors, self.n);
                let row = self.history.iter().copied().filter(|&(i, _)| i < n);
                solve_row(
                    simd,
                    self.x,
                    self.items,
                    &self.fold.gramian,
                    row,
                    self.fold.alpha,
                    f,
                    &mut Scratch::new(f),
                );
            }
        }
        pulp::Arch::new().dispatch(Solve {
            fold: self,
            x: &mut x,
            items,
            history,
            n,
        });
        x
    }
}

/// Trains user and item factors on `user_items` (users × items strengths).
pub fn train(user_items: &Csr, items: usize, p: &AlsParams) -> AlsModel {
    train_with(user_items, items, p, |_| {})
}

/// [`train`], calling `done(n)` after iteration `n` (1-based), for progress.
pub fn train_with(
    user_items: &Csr,
    items: usize,
    p: &AlsParams,
    mut done: impl FnMut(usize),
) -> AlsModel {
    let f = p.factors.max(1);
    let p = AlsParams { factors: f, ..*p };
    let users = user_items.rows();
    let item_users = user_items.transpose(items);
    // Small random start (SplitMix64), scaled like implicit's.
    let mut state = p.seed;
    let mut init = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
            })
            .collect()
    };
    let mut x = init(users * f);
    let mut y = init(items * f);
    for n in 1..=p.iterations {
        solve_rows(&mut x, &y, user_items, &p);
        solve_rows(&mut y, &x, &item_users, &p);
        done(n);
    }
    AlsModel {
        factors: f,
        users: x,
        items: y,
    }
}

impl AlsModel {
    /// A user's factors.
    pub fn user(&self, u: usize) -> &[f32] {
        &self.users[u * self.factors..(u + 1) * self.factors]
    }

    /// An item's factors.
    pub fn item(&self, i: usize) -> &[f32] {
        &self.items[i * self.factors..(i + 1) * self.factors]
    }

    /// The `k` best items for user `u` not in `exclude`, best first.
    pub fn recommend(&self, u: usize, k: usize, exclude: impl Fn(u32) -> bool) -> Vec<(u32, f32)> {
        nearest(&self.items, self.factors, self.user(u), k, exclude)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_simd_kernels_agree_with_plain_arithmetic() {
        struct Dot<'a>(&'a [f32], &'a [f32]);
        impl pulp::WithSimd for Dot<'_> {
            type Output = f32;
            #[inline(always)]
            fn with_simd<S: pulp::Simd>(self, simd: S) -> f32 {
                dot_simd(simd, self.0, self.1)
            }
        }
        let mut x: u64 = 3;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        // Every length around the register widths (4, 8, 16 lanes) and their
        // remainders.
        for n in 0..70 {
            let a: Vec<f32> = (0..n).map(|_| next()).collect();
            let b: Vec<f32> = (0..n).map(|_| next()).collect();
            let exact: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            let simd = pulp::Arch::new().dispatch(Dot(&a, &b));
            assert!(
                (f64::from(simd) - exact).abs() < 1e-5,
                "n {n}: {simd} vs {exact}"
            );
            assert!((f64::from(dot(&a, &b)) - exact).abs() < 1e-5, "n {n}");
            let mut scanned = Vec::new();
            similarities(
                &a,
                [(0, b.as_slice()), (1, a.as_slice())].into_iter(),
                |k, s| scanned.push((k, s)),
            );
            assert_eq!(scanned.len(), 2);
            assert_eq!(scanned[0], (0, simd), "n {n}");
            assert!((scanned[1].1 - dot(&a, &a)).abs() < 1e-4, "n {n}");
        }
        // The Gramian (upper triangle mirrored) against the definition.
        let f = 5;
        let y: Vec<f32> = (0..7 * f).map(|_| next()).collect();
        let g = gramian(&y, f, 0.25);
        for a in 0..f {
            for b in 0..f {
                let want: f32 = y.chunks_exact(f).map(|r| r[a] * r[b]).sum::<f32>()
                    + if a == b { 0.25 } else { 0.0 };
                assert!((g[a * f + b] - want).abs() < 1e-5, "({a}, {b})");
            }
        }
    }

    #[test]
    fn csr_and_transpose() {
        let m = Csr::from_triples(2, &[(1, 0, 2.0), (0, 2, 1.0), (0, 1, 3.0), (0, 1, 5.0)]);
        assert_eq!(m.indptr, vec![0, 2, 3]);
        assert_eq!(m.indices, vec![1, 2, 0]);
        assert_eq!(
            m.values,
            vec![5.0, 1.0, 2.0],
            "a duplicate keeps the largest"
        );
        let t = m.transpose(3);
        assert_eq!(t.indptr, vec![0, 1, 2, 3]);
        assert_eq!(t.indices, vec![1, 0, 0]);
    }

    /// Two taste groups over disjoint item halves; each user has seen all of
    /// their group's items but one. With rank 2, all the model can learn is
    /// the groups, so that unseen item of the user's own group must come
    /// first. (With many factors ALS would also learn each user's exact
    /// pattern, and rightly score the unseen item low.)
    #[test]
    fn recovers_the_missing_item_of_each_taste_group() {
        let (users, items) = (40usize, 20usize);
        let mut triples = Vec::new();
        for u in 0..users {
            let group = u % 2;
            let held_out = (group * 10 + u % 10) as u32;
            for i in (group * 10)..(group * 10 + 10) {
                if i as u32 != held_out {
                    triples.push((u as u32, i as u32, 1.0));
                }
            }
        }
        let m = Csr::from_triples(users, &triples);
        let params = AlsParams {
            factors: 2,
            iterations: 10,
            alpha: 10.0,
            regularization: 0.1,
            threads: 2,
            ..AlsParams::default()
        };
        let model = train(&m, items, &params);
        for u in 0..users {
            let seen: std::collections::HashSet<u32> = m.indices[m.indptr[u]..m.indptr[u + 1]]
                .iter()
                .copied()
                .collect();
            let top = model.recommend(u, 1, |i| seen.contains(&i));
            assert_eq!(top[0].0 as usize, (u % 2) * 10 + u % 10, "user {u}");
        }
        // Threads change the schedule, not the result.
        let one = train(
            &m,
            items,
            &AlsParams {
                threads: 1,
                ..params
            },
        );
        assert_eq!(one.users, model.users);

        // A user the model never saw, folded in from a group-1 history
        // missing item 13: the exact least-squares solve puts 13 first.
        let fold = FoldIn::new(&model.items, 2, params.regularization, params.alpha);
        let history: Vec<(u32, f32)> = (10..20).filter(|&i| i != 13).map(|i| (i, 1.0)).collect();
        let x = fold.user(&model.items, &history);
        let best = (0..items as u32)
            .filter(|i| !history.iter().any(|h| h.0 == *i))
            .max_by(|&a, &b| {
                dot(&x, model.item(a as usize)).total_cmp(&dot(&x, model.item(b as usize)))
            });
        assert_eq!(best, Some(13));
        // Unknown items are ignored; no history is the zero vector.
        assert_eq!(fold.user(&model.items, &[(999, 1.0)]), vec![0.0, 0.0]);
    }
}

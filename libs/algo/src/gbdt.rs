//! Gradient-boosted trees, evaluated natively, loaded from LightGBM's text
//! model format (what data scientists already export with
//! `booster.save_model("model.txt")`).
//!
//! Evaluation follows LightGBM's `Tree::NumericalDecision` exactly: a NaN goes
//! to the default side when the split's missing type is NaN, and is otherwise
//! treated as 0. A value within ±1e-35 of zero goes to the default side when
//! the missing type is Zero. Otherwise a value `<= threshold` goes left. The
//! raw score is the sum of the trees' leaf values (LightGBM writes them with
//! shrinkage applied); `binary` models map it through the sigmoid. The
//! fixture test checks this against LightGBM's own predictions.

/// A model that could not be loaded; names the line and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelError {
    /// 1-based line of the model text (0: the model as a whole).
    pub line: usize,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for ModelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line == 0 {
            write!(f, "model: {}", self.reason)
        } else {
            write!(f, "model line {}: {}", self.line, self.reason)
        }
    }
}

impl std::error::Error for ModelError {}

/// How the raw score becomes a prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// `binary sigmoid:s`: probability `1 / (1 + exp(-s·raw))`.
    Binary {
        /// The sigmoid's slope.
        sigmoid: f64,
    },
    /// Regression, ranking objectives (`lambdarank`, `rank_xendcg`): the raw score.
    Raw,
}

/// One tree in LightGBM's array form.
#[derive(Debug, Clone, PartialEq)]
struct Tree {
    split_feature: Vec<usize>,
    threshold: Vec<f64>,
    decision_type: Vec<u8>,
    left: Vec<i32>,
    right: Vec<i32>,
    leaf_value: Vec<f64>,
}

/// `kZeroThreshold` in LightGBM.
const ZERO_THRESHOLD: f64 = 1e-35;
const DEFAULT_LEFT_MASK: u8 = 2;
const CATEGORICAL_MASK: u8 = 1;
const MISSING_ZERO: u8 = 1;
const MISSING_NAN: u8 = 2;

impl Tree {
    /// Splits on the longest path from the root to a leaf, or None when
    /// the children do not form a tree (a split reached twice: a loop).
    fn depth(&self) -> Option<u32> {
        if self.split_feature.is_empty() {
            return Some(0);
        }
        let mut reached = vec![false; self.split_feature.len()];
        let (mut stack, mut deepest) = (vec![(0i32, 1u32)], 0);
        while let Some((node, d)) = stack.pop() {
            let n = node as usize;
            if std::mem::replace(&mut reached[n], true) {
                return None;
            }
            deepest = deepest.max(d);
            for c in [self.left[n], self.right[n]] {
                if c >= 0 {
                    stack.push((c, d + 1));
                }
            }
        }
        Some(deepest)
    }

    #[cfg(test)]
    fn leaf(&self, x: &[f64]) -> f64 {
        if self.split_feature.is_empty() {
            return self.leaf_value.first().copied().unwrap_or(0.0);
        }
        let mut node: i32 = 0;
        while node >= 0 {
            let n = node as usize;
            let mut v = x.get(self.split_feature[n]).copied().unwrap_or(f64::NAN);
            let dt = self.decision_type[n];
            let missing = (dt >> 2) & 3;
            if v.is_nan() && missing != MISSING_NAN {
                v = 0.0;
            }
            let to_default = (missing == MISSING_ZERO
                && (-ZERO_THRESHOLD..=ZERO_THRESHOLD).contains(&v))
                || (missing == MISSING_NAN && v.is_nan());
            node = if to_default {
                if dt & DEFAULT_LEFT_MASK != 0 {
                    self.left[n]
                } else {
                    self.right[n]
                }
            } else if v <= self.threshold[n] {
                self.left[n]
            } else {
                self.right[n]
            };
        }
        self.leaf_value[(!node) as usize]
    }
}

/// One split of a [`Forest`]: what [`Tree`] holds in six arrays, in one
/// 24-byte record, children as positions in the whole forest.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Node {
    threshold: f64,
    feature: u32,
    /// LightGBM's missing type (0 none, 1 zero, 2 NaN).
    missing: u8,
    default_left: bool,
    /// A split's position in `Forest::nodes`, or `!leaf` (a position in
    /// `Forest::leaves`).
    left: i32,
    right: i32,
}

impl Node {
    /// The child `v` goes to, as `Tree::leaf` decides it.
    #[inline(always)]
    fn child(&self, v: f64) -> i32 {
        let left = match self.missing {
            MISSING_NAN if v.is_nan() => self.default_left,
            MISSING_ZERO => {
                let v = if v.is_nan() { 0.0 } else { v };
                if (-ZERO_THRESHOLD..=ZERO_THRESHOLD).contains(&v) {
                    self.default_left
                } else {
                    v <= self.threshold
                }
            }
            // NaN is treated as 0 when the missing type is none.
            _ => (if v.is_nan() { 0.0 } else { v }) <= self.threshold,
        };
        if left { self.left } else { self.right }
    }
}

/// Every tree's splits in one array and every leaf in another, each tree
/// entered at its root and walked at most its depth: what evaluation reads,
/// laid out so several rows can walk the same tree side by side.
#[derive(Debug, Clone, PartialEq)]
struct Forest {
    nodes: Vec<Node>,
    leaves: Vec<f64>,
    /// Each tree's root (a split, or `!leaf` for a tree without splits)
    /// and its depth in splits.
    roots: Vec<(i32, u32)>,
    /// One more than the highest feature any split reads.
    width: usize,
}

/// Rows walked side by side by [`GbdtModel::predict_rows`]: their walks
/// are independent, so the processor overlaps them (8 measured slower than
/// 4 in `rank_bench`: too many values live at once).
const LANES: usize = 4;

impl Forest {
    /// The forest of `trees`, or the position of a tree whose children do
    /// not form a tree (a split reached twice: its walk would not end).
    fn new(trees: &[Tree]) -> Result<Self, usize> {
        let mut f = Forest {
            nodes: Vec::new(),
            leaves: Vec::new(),
            roots: Vec::with_capacity(trees.len()),
            width: 0,
        };
        for (at_tree, t) in trees.iter().enumerate() {
            let (nb, lb) = (f.nodes.len() as i32, f.leaves.len() as i32);
            let at = |c: i32| if c >= 0 { nb + c } else { !(lb + !c) };
            if t.split_feature.is_empty() {
                f.roots.push((!lb, 0));
                f.leaves.push(t.leaf_value.first().copied().unwrap_or(0.0));
                continue;
            }
            for n in 0..t.split_feature.len() {
                let dt = t.decision_type[n];
                f.width = f.width.max(t.split_feature[n] + 1);
                f.nodes.push(Node {
                    threshold: t.threshold[n],
                    feature: t.split_feature[n] as u32,
                    missing: (dt >> 2) & 3,
                    default_left: dt & DEFAULT_LEFT_MASK != 0,
                    left: at(t.left[n]),
                    right: at(t.right[n]),
                });
            }
            f.leaves.extend_from_slice(&t.leaf_value);
            f.roots.push((nb, t.depth().ok_or(at_tree)?));
        }
        Ok(f)
    }

    /// The sum of the leaves `x` reaches (at least `width` features).
    fn raw(&self, x: &[f64]) -> f64 {
        let mut sum = 0.0;
        for &(root, _) in &self.roots {
            let mut node = root;
            while node >= 0 {
                let n = &self.nodes[node as usize];
                node = n.child(x[n.feature as usize]);
            }
            sum += self.leaves[!node as usize];
        }
        sum
    }

    /// [`Forest::raw`] of [`LANES`] rows at once, tree by tree.
    fn raw_lanes(&self, x: [&[f64]; LANES]) -> [f64; LANES] {
        let mut sum = [0.0; LANES];
        for &(root, depth) in &self.roots {
            let mut node = [root; LANES];
            for _ in 0..depth {
                for l in 0..LANES {
                    if node[l] >= 0 {
                        let n = &self.nodes[node[l] as usize];
                        node[l] = n.child(x[l][n.feature as usize]);
                    }
                }
            }
            for l in 0..LANES {
                sum[l] += self.leaves[!node[l] as usize];
            }
        }
        sum
    }
}

/// A loaded model.
#[derive(Debug, Clone, PartialEq)]
pub struct GbdtModel {
    /// Input features in order; rows passed to [`GbdtModel::predict`] follow it.
    pub feature_names: Vec<String>,
    /// How the raw score becomes a prediction.
    pub objective: Objective,
    trees: Vec<Tree>,
    forest: Forest,
}

fn parse_list<T: std::str::FromStr>(
    line: usize,
    key: &str,
    value: &str,
) -> Result<Vec<T>, ModelError> {
    value
        .split_whitespace()
        .map(|v| {
            v.parse().map_err(|_| ModelError {
                line,
                reason: format!("`{key}`: `{v}` does not parse"),
            })
        })
        .collect()
}

impl GbdtModel {
    /// Parses LightGBM's text format.
    pub fn from_lightgbm(text: &str) -> Result<Self, ModelError> {
        let err = |line: usize, reason: String| ModelError { line, reason };
        let mut feature_names: Option<Vec<String>> = None;
        let mut objective = Objective::Raw;
        let mut trees: Vec<Tree> = Vec::new();
        let mut current: Option<(usize, Tree, usize)> = None; // (start line, tree, num_leaves)
        let finish =
            |t: Option<(usize, Tree, usize)>, trees: &mut Vec<Tree>| -> Result<(), ModelError> {
                if let Some((line, tree, leaves)) = t {
                    let inner = leaves.saturating_sub(1);
                    let ok = tree.leaf_value.len() == leaves
                        && tree.split_feature.len() == inner
                        && tree.threshold.len() == inner
                        && tree.decision_type.len() == inner
                        && tree.left.len() == inner
                        && tree.right.len() == inner;
                    if !ok {
                        return Err(ModelError {
                            line,
                            reason: format!("tree arrays do not match num_leaves={leaves}"),
                        });
                    }
                    let bad_child = tree.left.iter().chain(&tree.right).any(|&c| {
                        if c >= 0 {
                            c as usize >= inner
                        } else {
                            (!c) as usize >= leaves
                        }
                    });
                    if bad_child {
                        return Err(ModelError {
                            line,
                            reason: "a child index points outside the tree".into(),
                        });
                    }
                    trees.push(tree);
                }
                Ok(())
            };
        for (n, raw) in text.lines().enumerate() {
            let line = n + 1;
            let raw = raw.trim();
            if raw.starts_with("Tree=") {
                finish(current.take(), &mut trees)?;
                current = Some((
                    line,
                    Tree {
                        split_feature: vec![],
                        threshold: vec![],
                        decision_type: vec![],
                        left: vec![],
                        right: vec![],
                        leaf_value: vec![],
                    },
                    0,
                ));
                continue;
            }
            if raw == "end of trees" {
                finish(current.take(), &mut trees)?;
                break;
            }
            let Some((key, value)) = raw.split_once('=') else {
                continue;
            };
            match (&mut current, key) {
                (None, "feature_names") => {
                    feature_names = Some(value.split_whitespace().map(str::to_owned).collect());
                }
                (None, "objective") => {
                    let mut parts = value.split_whitespace();
                    objective = match parts.next() {
                        Some("binary") => {
                            let sigmoid = parts
                                .find_map(|p| p.strip_prefix("sigmoid:"))
                                .map_or(Ok(1.0), |s| s.parse::<f64>())
                                .map_err(|_| err(line, format!("bad sigmoid in `{value}`")))?;
                            Objective::Binary { sigmoid }
                        }
                        Some(
                            "regression" | "lambdarank" | "rank_xendcg" | "huber" | "fair"
                            | "quantile",
                        ) => Objective::Raw,
                        other => {
                            return Err(err(
                                line,
                                format!(
                                    "objective `{}` is not supported (binary, regression, lambdarank, rank_xendcg)",
                                    other.unwrap_or("")
                                ),
                            ));
                        }
                    };
                }
                (None, "num_class") if value.trim() != "1" => {
                    return Err(err(line, "multiclass models are not supported".into()));
                }
                (Some((_, tree, leaves)), k) => match k {
                    "num_leaves" => {
                        *leaves = value
                            .trim()
                            .parse()
                            .map_err(|_| err(line, "bad num_leaves".into()))?;
                    }
                    "num_cat" if value.trim() != "0" => {
                        return Err(err(
                            line,
                            "categorical splits are not supported; encode categories as numbers"
                                .into(),
                        ));
                    }
                    "is_linear" if value.trim() != "0" => {
                        return Err(err(line, "linear trees are not supported".into()));
                    }
                    "split_feature" => tree.split_feature = parse_list(line, k, value)?,
                    "threshold" => tree.threshold = parse_list(line, k, value)?,
                    "decision_type" => {
                        tree.decision_type = parse_list(line, k, value)?;
                        if tree.decision_type.iter().any(|d| d & CATEGORICAL_MASK != 0) {
                            return Err(err(line, "categorical splits are not supported".into()));
                        }
                    }
                    "left_child" => tree.left = parse_list(line, k, value)?,
                    "right_child" => tree.right = parse_list(line, k, value)?,
                    "leaf_value" => tree.leaf_value = parse_list(line, k, value)?,
                    _ => {}
                },
                _ => {}
            }
        }
        finish(current.take(), &mut trees)?;
        let feature_names =
            feature_names.ok_or_else(|| err(0, "no `feature_names` line".into()))?;
        if trees.is_empty() {
            return Err(err(0, "no trees".into()));
        }
        if let Some(f) = trees
            .iter()
            .flat_map(|t| &t.split_feature)
            .find(|&&f| f >= feature_names.len())
        {
            return Err(err(
                0,
                format!(
                    "a split uses feature {f}, but only {} are named",
                    feature_names.len()
                ),
            ));
        }
        let forest = Forest::new(&trees).map_err(|t| {
            err(
                0,
                format!("tree {t}: a split is reached twice (its children do not form a tree)"),
            )
        })?;
        Ok(GbdtModel {
            feature_names,
            objective,
            forest,
            trees,
        })
    }

    /// Number of trees.
    pub fn trees(&self) -> usize {
        self.trees.len()
    }

    /// The raw score of one row (features in [`GbdtModel::feature_names`]
    /// order; missing ones at the end are NaN).
    pub fn predict_raw(&self, row: &[f64]) -> f64 {
        if row.len() >= self.forest.width {
            self.forest.raw(row)
        } else {
            let mut full = row.to_vec();
            full.resize(self.forest.width, f64::NAN);
            self.forest.raw(&full)
        }
    }

    /// The prediction of one row: a probability for binary models, else the raw score.
    pub fn predict(&self, row: &[f64]) -> f64 {
        self.link(self.predict_raw(row))
    }

    fn link(&self, raw: f64) -> f64 {
        match self.objective {
            Objective::Binary { sigmoid } => 1.0 / (1.0 + (-sigmoid * raw).exp()),
            Objective::Raw => raw,
        }
    }

    /// [`GbdtModel::predict`] of each row of `rows`, `width` values a row
    /// one after another, equal to predicting them one by one. Rows are
    /// walked through each tree several at a time, which is faster than one
    /// by one when there are more than a few.
    pub fn predict_rows(&self, rows: &[f64], width: usize) -> Vec<f64> {
        if width == 0 {
            return Vec::new();
        }
        if width < self.forest.width {
            return rows.chunks(width).map(|r| self.predict(r)).collect();
        }
        let mut out = Vec::with_capacity(rows.len() / width);
        let mut chunks = rows.chunks_exact(width * LANES);
        for c in &mut chunks {
            let lanes = std::array::from_fn(|l| &c[l * width..(l + 1) * width]);
            out.extend(self.forest.raw_lanes(lanes).map(|r| self.link(r)));
        }
        out.extend(
            chunks
                .remainder()
                .chunks_exact(width)
                .map(|r| self.link(self.forest.raw(r))),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = include_str!("../fixtures/lightgbm/model.txt");
    const EXPECTED: &str = include_str!("../fixtures/lightgbm/expected.tsv");

    #[test]
    fn scores_identically_to_lightgbm_on_the_fixture() {
        let model = GbdtModel::from_lightgbm(MODEL).expect("fixture loads");
        assert_eq!(model.trees(), 40);
        assert_eq!(model.objective, Objective::Binary { sigmoid: 1.0 });
        let mut lines = EXPECTED.lines();
        let header: Vec<&str> = lines.next().expect("header").split('\t').collect();
        assert_eq!(
            &header[..model.feature_names.len()],
            model.feature_names.as_slice()
        );
        let mut rows = 0;
        let mut nan_rows = 0;
        for line in lines {
            let values: Vec<f64> = line
                .split('\t')
                .map(|v| v.parse().expect("number"))
                .collect();
            let (row, expected) = values.split_at(model.feature_names.len());
            nan_rows += usize::from(row.iter().any(|v| v.is_nan()));
            let raw = model.predict_raw(row);
            // Summation in the same order as LightGBM: equal to the last bit or two.
            assert!(
                (raw - expected[0]).abs() <= 1e-12,
                "raw {raw} vs {}",
                expected[0]
            );
            assert!((model.predict(row) - expected[1]).abs() <= 1e-12);
            rows += 1;
        }
        assert_eq!(rows, 300);
        assert!(nan_rows > 50, "the fixture exercises missing values");
    }

    #[test]
    fn broken_models_name_the_line() {
        let cut = MODEL.replacen("leaf_value=", "leaf_value=x ", 1);
        let e = GbdtModel::from_lightgbm(&cut).expect_err("bad number");
        assert!(e.line > 0 && e.reason.contains("leaf_value"), "{e}");
        let e = GbdtModel::from_lightgbm("tree\nversion=v4\n").expect_err("empty");
        assert!(e.reason.contains("feature_names"), "{e}");
        let multi = MODEL.replacen(
            "objective=binary sigmoid:1",
            "objective=multiclass num_class:3",
            1,
        );
        assert!(
            GbdtModel::from_lightgbm(&multi)
                .expect_err("multiclass")
                .reason
                .contains("multiclass")
        );
    }

    #[test]
    fn decisions_follow_lightgbm_for_missing_values() {
        // One split on feature 0 at 0.5; leaves -1 (left) and +1 (right).
        let tree = |decision_type: u8| Tree {
            split_feature: vec![0],
            threshold: vec![0.5],
            decision_type: vec![decision_type],
            left: vec![-1],
            right: vec![-2],
            leaf_value: vec![-1.0, 1.0],
        };
        // Missing type None: NaN is treated as 0 → left.
        assert_eq!(tree(0).leaf(&[f64::NAN]), -1.0);
        // Missing type NaN, default right: NaN → right; 0 → left by value.
        assert_eq!(tree(MISSING_NAN << 2).leaf(&[f64::NAN]), 1.0);
        assert_eq!(tree(MISSING_NAN << 2).leaf(&[0.0]), -1.0);
        // Missing type Zero, default right: 0 → right even though 0 <= 0.5.
        assert_eq!(tree(MISSING_ZERO << 2).leaf(&[0.0]), 1.0);
        assert_eq!(
            tree((MISSING_ZERO << 2) | DEFAULT_LEFT_MASK).leaf(&[0.0]),
            -1.0
        );
        assert_eq!(tree(0).leaf(&[0.7]), 1.0);
        // The forest decides every case as the tree does.
        for dt in [
            0,
            MISSING_NAN << 2,
            MISSING_ZERO << 2,
            (MISSING_ZERO << 2) | 2,
            (MISSING_NAN << 2) | 2,
        ] {
            let t = tree(dt);
            let f = Forest::new(std::slice::from_ref(&t)).expect("one split");
            for v in [f64::NAN, 0.0, -0.0, 1e-36, 0.5, 0.7, -3.0] {
                assert_eq!(f.raw(&[v]), t.leaf(&[v]), "decision type {dt}, value {v}");
            }
        }
    }

    #[test]
    fn rows_predicted_together_equal_rows_predicted_alone() {
        let model = GbdtModel::from_lightgbm(MODEL).expect("fixture loads");
        let width = model.feature_names.len();
        let rows: Vec<f64> = EXPECTED
            .lines()
            .skip(1)
            .flat_map(|line| {
                line.split('\t')
                    .take(width)
                    .map(|v| v.parse::<f64>().expect("number"))
                    .collect::<Vec<_>>()
            })
            .collect();
        // 300 rows: whole groups of four and a remainder; then 1 and 3 rows.
        for n in [300, 299, 1, 3] {
            let rows = &rows[..n * width];
            let alone: Vec<f64> = rows.chunks(width).map(|r| model.predict(r)).collect();
            assert_eq!(model.predict_rows(rows, width), alone, "{n} rows");
        }
        // The trees as parsed give the same sums as the forest.
        for r in rows.chunks(width).take(50) {
            let by_tree: f64 = model.trees.iter().map(|t| t.leaf(r)).sum();
            assert_eq!(model.predict_raw(r), by_tree);
        }
        // A row without its last features reads them as missing.
        let short = &rows[..width - 1];
        let mut padded = short.to_vec();
        padded.push(f64::NAN);
        assert_eq!(model.predict(short), model.predict(&padded));
    }

    #[test]
    fn a_split_reached_twice_is_refused() {
        let looped = MODEL.replacen("left_child=2 ", "left_child=0 ", 1);
        assert_ne!(
            looped, MODEL,
            "the fixture's first tree starts left_child=2"
        );
        let e = GbdtModel::from_lightgbm(&looped).expect_err("a loop");
        assert!(e.reason.contains("reached twice"), "{e}");
    }
}

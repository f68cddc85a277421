//! Training the ranking model: gradient-boosted trees (logistic loss,
//! forust-ml) on the validation period, exported as a LightGBM text model,
//! the format the ranking service loads.
//!
//! Training rows are what ranking sees when it serves: for every user with
//! new items in validation, retrieval (fitted on the training period only)
//! proposes candidates. Each candidate gets the ranking service's own feature
//! row (`recmesh_ranking::feature_rows`), labelled 1 when the user engaged
//! with it in validation.
//!
//! Export: forust sends `v < split` left, LightGBM `v <= threshold`, so the
//! threshold is the largest double below the split. Missing values (NaN)
//! follow forust's missing child, written as LightGBM's NaN missing type with
//! the matching default side. forust's base score is folded into the first
//! tree's leaves, summed in the same order, so the raw scores are equal.

use std::fmt::Write as _;

use forust_ml::GradientBooster;
use forust_ml::data::Matrix;
use forust_ml::objective::ObjectiveType;
use recmesh_algo::ranking::{self, FEATURE_NAMES};

use crate::served::ServedStages;
use crate::split::Split;

/// Training rows and labels (row-major), plus counts for the log.
#[derive(Debug, Default)]
pub struct TrainingSet {
    /// One feature row per candidate.
    pub rows: Vec<[f64; ranking::FEATURES]>,
    /// 1.0 when the user engaged with the candidate in validation.
    pub labels: Vec<f64>,
    /// Users that contributed rows.
    pub users: usize,
}

/// Most validation users the ranker learns from. Each costs one served
/// retrieval; 5,000 users give about a million candidate rows, plenty for
/// 100 shallow trees over 15 features, and keep the step to minutes at 1M
/// items (docs/evaluation.md). MovieLens-100k and the demo shop have fewer.
pub const MAX_USERS: usize = 5_000;

/// Builds the training rows from the validation period of `split`, from at
/// most `max_users` of its users (a fixed pseudo-random sample: the users
/// whose name hashes lowest).
pub fn training_set(split: &Split, max_users: usize) -> TrainingSet {
    let train = &split.train_only;
    // Candidates as served: the user's seen set (their whole training
    // history under the default policy) is never a candidate.
    let stages = ServedStages::new(train);
    let mut set = TrainingSet::default();
    let mut users: Vec<&String> = split.valid.keys().collect();
    if users.len() > max_users {
        users.sort_by_key(|u| (recmesh_algo::assign::fnv1a64(u.as_bytes()), *u));
        users.truncate(max_users);
    }
    users.sort();
    for user in users {
        let relevant = &split.valid[user];
        let Ok(c) = stages.candidates(user) else {
            continue;
        };
        let rows = recmesh_ranking::feature_rows(
            &recmesh_ranking::Listed::all(&c.list),
            &c.profile.recent,
            &c.features,
            stages.now_s,
        );
        for (id, row) in c.list.ids().zip(rows) {
            set.labels.push(f64::from(u8::from(relevant.contains(id))));
            set.rows.push(row);
        }
        set.users += 1;
    }
    set
}

/// Boosting settings.
#[derive(Debug, Clone, Copy)]
pub struct RankerParams {
    /// Trees.
    pub trees: usize,
    /// Shrinkage per tree.
    pub learning_rate: f32,
    /// Depth of each tree.
    pub max_depth: usize,
}

impl Default for RankerParams {
    fn default() -> Self {
        // Small and shallow: a few hundred thousand rows of 13 features, where
        // deep trees would only fit noise.
        RankerParams {
            trees: 100,
            learning_rate: 0.1,
            max_depth: 4,
        }
    }
}

/// Trains the booster on `set`.
pub fn train(set: &TrainingSet, params: RankerParams) -> anyhow::Result<GradientBooster> {
    anyhow::ensure!(
        !set.rows.is_empty(),
        "no training rows: no user has new items in validation"
    );
    let n = set.rows.len();
    // forust wants column-major data.
    let mut columns = vec![0.0; n * FEATURE_NAMES.len()];
    for (r, row) in set.rows.iter().enumerate() {
        for (c, v) in row.iter().enumerate() {
            columns[c * n + r] = *v;
        }
    }
    let matrix = Matrix::new(&columns, n, FEATURE_NAMES.len());
    let mut booster = GradientBooster::default()
        .set_objective_type(ObjectiveType::LogLoss)
        .set_iterations(params.trees)
        .set_learning_rate(params.learning_rate)
        .set_max_depth(params.max_depth)
        .set_seed(7);
    booster
        .fit_unweighted(&matrix, &set.labels, None)
        .map_err(|e| anyhow::anyhow!("training the ranker: {e}"))?;
    Ok(booster)
}

/// The booster as a LightGBM text model over [`FEATURE_NAMES`].
pub fn to_lightgbm_text(booster: &GradientBooster) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "tree\nversion=v4\nnum_class=1\nnum_tree_per_iteration=1\nlabel_index=0\nmax_feature_idx={}\nobjective=binary sigmoid:1\nfeature_names={}\n",
        FEATURE_NAMES.len() - 1,
        FEATURE_NAMES.join(" ")
    );
    for (t, tree) in booster.trees.iter().enumerate() {
        let nodes = &tree.nodes;
        // forust index → LightGBM child code (internal k, or !leaf).
        let mut code = vec![0i32; nodes.len()];
        let (mut internal, mut leaves) = (0i32, 0i32);
        for (i, node) in nodes.iter().enumerate() {
            if node.is_leaf {
                code[i] = !leaves;
                leaves += 1;
            } else {
                code[i] = internal;
                internal += 1;
            }
        }
        let base = if t == 0 { booster.base_score } else { 0.0 };
        let (mut feature, mut threshold, mut decision, mut left, mut right, mut value) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        for node in nodes {
            if node.is_leaf {
                value.push(format!("{:?}", base + f64::from(node.weight_value)));
            } else {
                feature.push(node.split_feature.to_string());
                threshold.push(format!("{:?}", node.split_value.next_down()));
                // NaN missing type (2 << 2), default left when forust sends missing left.
                let default_left = node.missing_node == node.left_child;
                decision.push((8 | if default_left { 2 } else { 0 }).to_string());
                left.push(code[node.left_child].to_string());
                right.push(code[node.right_child].to_string());
            }
        }
        let _ = writeln!(
            out,
            "Tree={t}\nnum_leaves={leaves}\nnum_cat=0\nsplit_feature={}\nthreshold={}\ndecision_type={}\nleft_child={}\nright_child={}\nleaf_value={}\nis_linear=0\nshrinkage=1\n",
            feature.join(" "),
            threshold.join(" "),
            decision.join(" "),
            left.join(" "),
            right.join(" "),
            value.join(" ")
        );
    }
    out.push_str("end of trees\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use recmesh_algo::gbdt::GbdtModel;

    #[test]
    fn the_exported_model_scores_exactly_like_forust() {
        // Rows with NaNs and exact split-value ties, label from a few features.
        let mut set = TrainingSet::default();
        let mut x: u64 = 1;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 11) as f64 / (1u64 << 53) as f64
        };
        for _ in 0..3_000 {
            let mut row = [0.0; ranking::FEATURES];
            for v in row.iter_mut() {
                *v = (next() * 20.0).round() / 20.0;
            }
            if next() < 0.3 {
                row[11] = f64::NAN;
            }
            let z = 2.0 * row[0] + row[5] - row[11].max(0.0) - 1.0;
            set.labels
                .push(f64::from(u8::from(next() < 1.0 / (1.0 + (-3.0 * z).exp()))));
            set.rows.push(row);
        }
        let booster = train(
            &set,
            RankerParams {
                trees: 30,
                learning_rate: 0.2,
                max_depth: 4,
            },
        )
        .expect("trains");
        let model = GbdtModel::from_lightgbm(&to_lightgbm_text(&booster)).expect("loads");
        let n = set.rows.len();
        let mut columns = vec![0.0; n * ranking::FEATURES];
        for (r, row) in set.rows.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                columns[c * n + r] = *v;
            }
        }
        let theirs = booster.predict(&Matrix::new(&columns, n, ranking::FEATURES), false);
        for (row, expected) in set.rows.iter().zip(theirs) {
            assert_eq!(model.predict_raw(row), expected, "{row:?}");
        }
    }
}

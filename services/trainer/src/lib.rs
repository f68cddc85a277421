//! The trainer: offline evaluation of recmesh's models and of the pipeline as
//! served, on interaction logs.
//!
//! This version evaluates, on a temporal split:
//! - `popularity`: the most interacted items of the training period;
//! - `item-cf`: co-occurrence CF (cosine, and BM25-weighted) from the
//!   user's whole history;
//! - `trending`: popularity with a 7-day half-life;
//! - `als`: implicit-feedback ALS (`recmesh_algo::als`) on the same data;
//! - the **served pipeline**, with the services' own code:
//!   `RetrievalService::retrieve` → ranking's `Scorer::score` (item features
//!   from the features service's `Store`) → `RerankerService::rerank`, with
//!   the reranker's rules as configured, and variants with MMR and
//!   exploration switched off.
//!
//! Every report names its protocol, the data fingerprint and the seed. The
//! models are fitted on train + validation and evaluated on test; nothing is
//! tuned yet (the validation period is kept out of test either way).
//! `recmesh-trainer bundle` trains every model on the whole dataset and
//! publishes the model bundle the services load ([`publish`]).

#![forbid(unsafe_code)]

pub mod ann_bench;
pub mod grpc;
pub mod parquet_input;
pub mod progress;
pub mod publish;
pub mod ranker;
pub mod served;
pub mod split;

use std::collections::{HashMap, HashSet};

use recmesh_algo::cooccurrence;
use recmesh_algo::metrics;
use recmesh_algo::rerank::{RerankRules, attribute_similarity};
use recmesh_catalog::Catalog;
use serde::Serialize;

pub use split::{Protocol, Split};

/// Users by how much history they have in the training period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Segment {
    /// At most 5 interactions.
    Cold,
    /// 6 to 99.
    Active,
    /// 100 or more.
    Power,
}

impl Segment {
    /// The segment of a user with `n` training interactions.
    pub fn of(n: usize) -> Segment {
        match n {
            0..=5 => Segment::Cold,
            6..=99 => Segment::Active,
            _ => Segment::Power,
        }
    }
}

/// Metrics of one model, averaged over test users.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModelReport {
    /// Model name.
    pub model: String,
    /// Users evaluated.
    pub users: usize,
    /// Precision@K.
    pub precision: f64,
    /// Recall@K.
    pub recall: f64,
    /// NDCG@K.
    pub ndcg: f64,
    /// MAP@K.
    pub map: f64,
    /// HitRate@K.
    pub hit_rate: f64,
    /// Distinct items recommended / catalog size.
    pub coverage: f64,
    /// Mean intra-list diversity (1 − attribute similarity).
    pub diversity: f64,
    /// Mean self-information of recommended items.
    pub novelty: f64,
    /// Share of the top-K slots holding an item the user interacted with in
    /// training (what a seen-items policy keeps at 0).
    pub seen_share: f64,
    /// NDCG@K by user segment (users, NDCG).
    pub ndcg_by_segment: Vec<(Segment, usize, f64)>,
}

/// A whole evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Split protocol.
    pub protocol: String,
    /// Fingerprint of the full dataset.
    pub data_fingerprint: String,
    /// Seed (exploration draws).
    pub seed: u64,
    /// K of every @K metric.
    pub k: usize,
    /// One row per model.
    pub models: Vec<ModelReport>,
    /// How the learned ranker was trained, when it was.
    pub ranker: Option<TrainedRanker>,
}

impl Report {
    /// The report as a Markdown table.
    pub fn markdown(&self) -> String {
        let k = self.k;
        let mut out = format!(
            "protocol: {}, data {}, seed {}, K = {k}\n\n| model | users | P@{k} | R@{k} | NDCG@{k} | MAP@{k} | HR@{k} | coverage | diversity | novelty | seen | NDCG@{k} cold / active / power |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
            self.protocol, self.data_fingerprint, self.seed
        );
        if let Some(r) = &self.ranker {
            out = out.replacen(
                "\n\n",
                &format!(
                    "\nlearned ranker: {} trees, logistic loss, trained on the validation period: {} rows ({} positive) from {} users\n\n",
                    r.trees, r.rows, r.positives, r.users
                ),
                1,
            );
        }
        for m in &self.models {
            let seg = |s: Segment| {
                m.ndcg_by_segment
                    .iter()
                    .find(|x| x.0 == s)
                    .map_or("–".to_owned(), |x| format!("{:.4} ({})", x.2, x.1))
            };
            out.push_str(&format!(
                "| {} | {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.4} | {:.2} | {:.1}% | {} / {} / {} |\n",
                m.model,
                m.users,
                m.precision,
                m.recall,
                m.ndcg,
                m.map,
                m.hit_rate,
                m.coverage,
                m.diversity,
                m.novelty,
                100.0 * m.seen_share,
                seg(Segment::Cold),
                seg(Segment::Active),
                seg(Segment::Power)
            ));
        }
        out
    }
}

/// Everything fitted on the training data that the models share.
struct Fitted<'a> {
    split: &'a Split,
    catalog: Catalog,
    /// Items each user interacted with in training (never recommended back).
    seen: HashMap<&'a str, HashSet<&'a str>>,
    /// Share of training users who interacted with each item.
    user_share: HashMap<&'a str, f64>,
    users: usize,
}

impl<'a> Fitted<'a> {
    fn new(split: &'a Split) -> Self {
        let catalog = Catalog::new(split.train.items.clone());
        let mut seen: HashMap<&str, HashSet<&str>> = HashMap::new();
        for e in &split.train.interactions {
            seen.entry(e.user.as_str())
                .or_default()
                .insert(e.item.as_str());
        }
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for items in seen.values() {
            for i in items {
                *counts.entry(*i).or_default() += 1;
            }
        }
        let users = seen.len();
        let user_share = counts
            .into_iter()
            .map(|(i, n)| (i, n as f64 / users.max(1) as f64))
            .collect();
        Fitted {
            split,
            catalog,
            seen,
            user_share,
            users,
        }
    }

    fn similarity(&self, a: &str, b: &str) -> f64 {
        let attrs = |id: &str| {
            self.catalog
                .index_of(id)
                .and_then(|i| self.catalog.item(i))
                .map(|it| (it.category.as_str(), it.brand.as_str(), it.price))
        };
        match (attrs(a), attrs(b)) {
            (Some(x), Some(y)) => attribute_similarity(x, y),
            _ => 0.0,
        }
    }

    /// Scores lists from `recommend(user) -> ids` into a report row.
    fn evaluate(
        &self,
        model: &str,
        k: usize,
        mut recommend: impl FnMut(&str) -> Vec<String>,
    ) -> ModelReport {
        let mut r = ModelReport {
            model: model.to_owned(),
            ..ModelReport::default()
        };
        let mut lists: Vec<Vec<String>> = Vec::new();
        let mut by_segment: HashMap<Segment, (usize, f64)> = HashMap::new();
        let mut users: Vec<&String> = self.split.test.keys().collect();
        users.sort();
        for user in users {
            let relevant: HashSet<String> = self.split.test[user].clone();
            let list = recommend(user);
            let ndcg = metrics::ndcg(&list, &relevant, k);
            r.precision += metrics::precision(&list, &relevant, k);
            r.recall += metrics::recall(&list, &relevant, k);
            r.ndcg += ndcg;
            r.map += metrics::average_precision(&list, &relevant, k);
            r.hit_rate += metrics::hit_rate(&list, &relevant, k);
            r.diversity += metrics::intra_list_diversity(&list, k, |a, b| self.similarity(a, b));
            r.novelty += metrics::novelty(
                &list,
                k,
                |i| self.user_share.get(i.as_str()).copied().unwrap_or(0.0),
                self.users,
            );
            let had = self.seen.get(user.as_str());
            r.seen_share += list
                .iter()
                .take(k)
                .filter(|i| had.is_some_and(|h| h.contains(i.as_str())))
                .count() as f64
                / k as f64;
            let history = had.map_or(0, HashSet::len);
            let seg = by_segment.entry(Segment::of(history)).or_default();
            seg.0 += 1;
            seg.1 += ndcg;
            r.users += 1;
            lists.push(list);
        }
        let n = r.users.max(1) as f64;
        for v in [
            &mut r.precision,
            &mut r.recall,
            &mut r.ndcg,
            &mut r.map,
            &mut r.hit_rate,
            &mut r.diversity,
            &mut r.novelty,
            &mut r.seen_share,
        ] {
            *v /= n;
        }
        r.coverage = metrics::coverage(lists.iter().map(Vec::as_slice), k, self.catalog.len());
        let mut segments: Vec<(Segment, usize, f64)> = by_segment
            .into_iter()
            .map(|(s, (users, sum))| (s, users, sum / users.max(1) as f64))
            .collect();
        segments.sort_by_key(|s| s.0);
        r.ndcg_by_segment = segments;
        r
    }
}

/// How the served pipeline is evaluated.
#[derive(Debug, Clone)]
pub struct ServedVariant {
    /// Row name.
    pub name: String,
    /// Reranker rules.
    pub rules: RerankRules,
    /// Rank with the ranker trained on the validation period (else the baseline).
    pub learned: bool,
}

/// The served-pipeline rows over the default rules (see [`variants_with`]).
pub fn default_variants() -> Vec<ServedVariant> {
    variants_with(&RerankRules::default(), "")
}

/// The served-pipeline rows over `served` rules (the re-ranking service's
/// configuration): the baseline ranker, then the learned ranker as
/// configured, with MMR off, with MMR and exploration off, and with every
/// rule off (the ranker's own order: what the rules cost is the
/// difference). `label` names any change from the defaults in each row.
pub fn variants_with(served: &RerankRules, label: &str) -> Vec<ServedVariant> {
    let (lambda, share) = (served.mmr_lambda, served.exploration_share);
    let label = if label.is_empty() {
        String::new()
    } else {
        format!(", {label}")
    };
    vec![
        ServedVariant {
            name: format!("served, baseline ranker (MMR λ {lambda}, explore {share}{label})"),
            rules: served.clone(),
            learned: false,
        },
        ServedVariant {
            name: format!("served, learned ranker (MMR λ {lambda}, explore {share}{label})"),
            rules: served.clone(),
            learned: true,
        },
        ServedVariant {
            name: format!("served, learned ranker, MMR off (λ 1), explore {share}{label}"),
            rules: RerankRules {
                mmr_lambda: 1.0,
                ..served.clone()
            },
            learned: true,
        },
        ServedVariant {
            name: format!("served, learned ranker, MMR and exploration off{label}"),
            rules: RerankRules {
                mmr_lambda: 1.0,
                exploration_share: 0.0,
                ..served.clone()
            },
            learned: true,
        },
        ServedVariant {
            name: "served, learned ranker, every re-ranking rule off".to_owned(),
            rules: RerankRules {
                category_cap: 0,
                brand_cap: 0,
                promoted_boost: 1.0,
                new_arrival_boost: 1.0,
                mmr_lambda: 1.0,
                exploration_share: 0.0,
                ..served.clone()
            },
            learned: true,
        },
    ]
}

/// The ranker trained on the validation period, as LightGBM text, with how
/// it was trained.
#[derive(Debug, Clone, Serialize)]
pub struct TrainedRanker {
    /// The model, in LightGBM's text format.
    #[serde(skip)]
    pub model_text: String,
    /// Training rows.
    pub rows: usize,
    /// Positive rows.
    pub positives: usize,
    /// Users contributing rows.
    pub users: usize,
    /// Trees.
    pub trees: usize,
}

/// Trains the ranker on the validation period of `split`.
pub fn train_ranker(split: &Split) -> anyhow::Result<TrainedRanker> {
    let set = ranker::training_set(split, ranker::MAX_USERS);
    let params = ranker::RankerParams::default();
    let booster = ranker::train(&set, params)?;
    Ok(TrainedRanker {
        model_text: ranker::to_lightgbm_text(&booster),
        rows: set.rows.len(),
        positives: set.labels.iter().filter(|&&l| l > 0.0).count(),
        users: set.users,
        trees: params.trees,
    })
}

/// Scores lists produced elsewhere (user → ranked item ids), e.g. by another
/// library on the exported split, with the same metric code and users.
pub fn evaluate_lists(
    split: &Split,
    k: usize,
    lists: &[(String, HashMap<String, Vec<String>>)],
) -> Vec<ModelReport> {
    let fitted = Fitted::new(split);
    lists
        .iter()
        .map(|(name, by_user)| {
            fitted.evaluate(name, k, |u| by_user.get(u).cloned().unwrap_or_default())
        })
        .collect()
}

/// The training interactions as a users × items strength matrix for ALS,
/// with the user names by row and the item ids by column.
pub fn interaction_matrix(
    train: &recmesh_catalog::Dataset,
) -> (recmesh_algo::als::Csr, Vec<String>, Vec<String>) {
    let catalog = Catalog::new(train.items.clone());
    let (matrix, users) =
        recmesh_catalog::bundle::interaction_matrix(&catalog, &train.interactions);
    let items = catalog.items.iter().map(|i| i.id.clone()).collect();
    (matrix, users, items)
}

/// Evaluates every model on `split` at `k`; variants with `learned` rank
/// with `ranker`.
pub fn evaluate(
    split: &Split,
    k: usize,
    seed: u64,
    variants: &[ServedVariant],
    ranker: Option<&TrainedRanker>,
) -> anyhow::Result<Report> {
    let fitted = Fitted::new(split);
    let train = &split.train;
    let mut models = Vec::new();

    // Popularity.
    let scores = recmesh_catalog::item_scores(&fitted.catalog, &train.interactions);
    let mut popular: Vec<u32> = (0..scores.len() as u32).collect();
    popular.sort_by(|&a, &b| {
        scores[b as usize]
            .total_cmp(&scores[a as usize])
            .then(a.cmp(&b))
    });
    let popular_ids: Vec<&str> = popular
        .iter()
        .filter_map(|&i| fitted.catalog.item(i).map(|it| it.id.as_str()))
        .collect();
    let top_popular = |user: &str, n: usize, skip: &HashSet<String>| -> Vec<String> {
        let seen = fitted.seen.get(user);
        popular_ids
            .iter()
            .filter(|id| !seen.is_some_and(|s| s.contains(*id)) && !skip.contains(**id))
            .take(n)
            .map(|id| (*id).to_owned())
            .collect()
    };
    models.push(fitted.evaluate("popularity", k, |u| top_popular(u, k, &HashSet::new())));

    // Item-item CF (cosine), seeded with the user's whole training history.
    let per_user = fitted.catalog.strongest_per_user(&train.interactions);
    let histories: Vec<cooccurrence::History> = per_user
        .values()
        .map(|h| h.iter().map(|(&i, &w)| (i, w)).collect())
        .collect();
    // A user's CF list from given neighbours, topped up with popularity.
    let cf_list = |neighbours: &[Vec<(u32, f32)>], u: &str| -> Vec<String> {
        let seeds: Vec<(u32, f64)> = per_user
            .get(u)
            .map(|h| h.iter().map(|(&i, &w)| (i, w)).collect())
            .unwrap_or_default();
        let mut list: Vec<String> =
            cooccurrence::score_from_seeds(neighbours, &seeds, |_| false, k)
                .into_iter()
                .filter_map(|c| fitted.catalog.item(c.item).map(|it| it.id.clone()))
                .collect();
        if list.len() < k {
            let have: HashSet<String> = list.iter().cloned().collect();
            list.extend(top_popular(u, k - list.len(), &have));
        }
        list
    };
    let cosine = cooccurrence::neighbours(&histories, fitted.catalog.len(), 50, 200);
    models.push(fitted.evaluate("item-cf (cosine)", k, |u| cf_list(&cosine, u)));
    // BM25 weighting with implicit's BM25Recommender defaults (K1 1.2, B 0.75;
    // 100 and 0.8 are the defaults of its bm25_weight function, not of the
    // recommender).
    let bm25 = cooccurrence::neighbours_weighted(
        &histories,
        fitted.catalog.len(),
        50,
        200,
        cooccurrence::Weighting::Bm25 { k1: 1.2, b: 0.75 },
    );
    models.push(fitted.evaluate("item-cf (bm25)", k, |u| cf_list(&bm25, u)));

    // Trending: popularity with a 7-day half-life, as of the end of training.
    let end_s = train
        .interactions
        .last()
        .map_or(0, |e| e.timestamp_ms / 1000);
    let trending = recmesh_algo::popularity::decayed_scores(
        train.interactions.iter().filter_map(|e| {
            Some((
                fitted.catalog.index_of(&e.item)?,
                e.kind.weight(),
                e.timestamp_ms / 1000,
            ))
        }),
        fitted.catalog.len(),
        end_s,
        7.0 * 86_400.0,
    );
    let mut trending_order: Vec<u32> = (0..trending.len() as u32).collect();
    trending_order.sort_by(|&a, &b| {
        trending[b as usize]
            .total_cmp(&trending[a as usize])
            .then(a.cmp(&b))
    });
    models.push(fitted.evaluate("trending (7-day half-life)", k, |u| {
        let seen = fitted.seen.get(u);
        trending_order
            .iter()
            .filter_map(|&i| fitted.catalog.item(i))
            .filter(|it| !seen.is_some_and(|s| s.contains(it.id.as_str())))
            .take(k)
            .map(|it| it.id.clone())
            .collect()
    }));

    // Implicit ALS on the same training data (event weights as strengths).
    let user_index: HashMap<&str, u32> = {
        let mut names: Vec<&str> = per_user.keys().copied().collect();
        names.sort_unstable();
        names
            .into_iter()
            .enumerate()
            .map(|(n, u)| (u, n as u32))
            .collect()
    };
    let triples: Vec<(u32, u32, f32)> = per_user
        .iter()
        .flat_map(|(u, h)| h.iter().map(|(&i, &w)| (user_index[u], i, w as f32)))
        .collect();
    let matrix = recmesh_algo::als::Csr::from_triples(user_index.len(), &triples);
    let als_params = recmesh_algo::als::AlsParams::default();
    let started = std::time::Instant::now();
    let als = recmesh_algo::als::train(&matrix, fitted.catalog.len(), &als_params);
    let als_seconds = started.elapsed().as_secs_f64();
    let name = format!(
        "als ({} factors, {} it, trained in {als_seconds:.1}s on {} threads)",
        als_params.factors, als_params.iterations, als_params.threads
    );
    models.push(fitted.evaluate(&name, k, |u| {
        let Some(&row) = user_index.get(u) else {
            return top_popular(u, k, &HashSet::new());
        };
        let seen = &per_user[u];
        als.recommend(row as usize, k, |i| seen.contains_key(&i))
            .into_iter()
            .filter_map(|(i, _)| fitted.catalog.item(i).map(|it| it.id.clone()))
            .collect()
    }));

    // The served pipeline, with the services' own code.
    let stages = served::ServedStages::new(train);
    let baseline = recmesh_ranking::Scorer::new("")?;
    let learned = ranker
        .map(|r| recmesh_ranking::Scorer::from_lightgbm_text(&r.model_text, "ranker"))
        .transpose()?;
    for variant in variants {
        let reranker = recmesh_reranker::RerankerService::new(recmesh_reranker::Config {
            rules: variant.rules.clone(),
            max_ids: 5_000,
            ..Default::default()
        });
        let scorer = match (variant.learned, &learned) {
            (false, _) => &baseline,
            (true, Some(l)) => l,
            (true, None) => continue,
        };
        let row = fitted.evaluate(&variant.name, k, |u| {
            stages
                .list(u, k, &format!("{seed}:{u}"), scorer, &reranker)
                .unwrap_or_default()
        });
        models.push(row);
    }

    Ok(Report {
        protocol: split.protocol.describe(),
        data_fingerprint: split.fingerprint.clone(),
        seed,
        k,
        models,
        ranker: ranker.cloned(),
    })
}

/// What [`in_process_throughput`] measured.
#[derive(Debug, Clone)]
pub struct InProcess {
    /// Pipelines run.
    pub requests: usize,
    /// Wall time.
    pub elapsed: std::time::Duration,
    /// Per-request latencies, sorted.
    pub latencies: Vec<std::time::Duration>,
}

/// The serving pipeline called in process, with no gRPC between the stages:
/// the same code as the services (feature store, retrieval, baseline
/// ranking, re-ranking with the default rules) on `data`, `requests` users
/// u0.. spread over `threads` threads. The baseline the mesh's throughput is
/// compared with.
pub fn in_process_throughput(
    data: &recmesh_catalog::Dataset,
    requests: usize,
    threads: usize,
) -> anyhow::Result<InProcess> {
    let stages = served::ServedStages::new(data);
    let scorer = recmesh_ranking::Scorer::new("")?;
    let reranker = recmesh_reranker::RerankerService::new(recmesh_reranker::Config::default());
    let users = data
        .interactions
        .iter()
        .map(|e| e.user.as_str())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>();
    anyhow::ensure!(!users.is_empty(), "no users in the data");
    let threads = threads.max(1);
    let started = std::time::Instant::now();
    let latencies = std::thread::scope(|scope| -> anyhow::Result<Vec<std::time::Duration>> {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (stages, scorer, reranker, users) = (&stages, &scorer, &reranker, &users);
                scope.spawn(move || -> anyhow::Result<Vec<std::time::Duration>> {
                    let mut out = Vec::new();
                    for n in (t..requests).step_by(threads) {
                        let user = users[n % users.len()];
                        let begun = std::time::Instant::now();
                        let answer = stages.list(user, 10, &format!("{n}"), scorer, reranker)?;
                        std::hint::black_box(answer);
                        out.push(begun.elapsed());
                    }
                    Ok(out)
                })
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            all.extend(
                h.join()
                    .map_err(|_| anyhow::anyhow!("a pipeline thread panicked"))??,
            );
        }
        Ok(all)
    })?;
    let elapsed = started.elapsed();
    let mut latencies = latencies;
    latencies.sort();
    Ok(InProcess {
        requests: latencies.len(),
        elapsed,
        latencies,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use recmesh_catalog::demo::{DemoSpec, generate};

    #[test]
    fn the_in_process_pipeline_runs_every_request() {
        let data = generate(&DemoSpec {
            items: 300,
            users: 50,
            interactions: 3_000,
            ..DemoSpec::default()
        });
        let r = in_process_throughput(&data, 40, 2).expect("runs");
        assert_eq!((r.requests, r.latencies.len()), (40, 40));
        assert!(r.latencies.windows(2).all(|w| w[0] <= w[1]), "sorted");
    }

    #[test]
    fn the_ranker_learns_from_a_fixed_sample_of_at_most_max_users() {
        let data = generate(&DemoSpec {
            items: 300,
            users: 120,
            interactions: 6_000,
            ..DemoSpec::default()
        });
        let split = Split::new(&data, Protocol::PerUserTemporal);
        let all = ranker::training_set(&split, usize::MAX);
        let some = ranker::training_set(&split, 30);
        assert!(all.users > 30, "{} users", all.users);
        assert_eq!(some.users, 30);
        assert!(some.rows.len() < all.rows.len());
        let again = ranker::training_set(&split, 30);
        assert_eq!(again.labels, some.labels, "the same sample each time");
    }

    #[test]
    fn every_model_beats_nothing_and_the_served_rows_differ_in_diversity() {
        let data = generate(&DemoSpec {
            items: 400,
            users: 150,
            interactions: 12_000,
            ..DemoSpec::default()
        });
        let split = Split::new(&data, Protocol::PerUserTemporal);
        let ranker = train_ranker(&split).expect("trains");
        assert!(ranker.rows > 1_000 && ranker.positives > 0);
        let report =
            evaluate(&split, 10, 1, &default_variants(), Some(&ranker)).expect("evaluates");
        assert_eq!(report.models.len(), 10);
        for m in &report.models {
            assert!(m.users > 100, "{}: {} users", m.model, m.users);
            assert!(m.ndcg > 0.0 && m.ndcg <= 1.0, "{}: {}", m.model, m.ndcg);
            assert!(m.coverage > 0.0 && m.coverage <= 1.0);
        }
        let served = &report.models[6];
        let no_mmr = &report.models[8];
        assert!(
            served.diversity > no_mmr.diversity,
            "MMR and exploration raise diversity: {} vs {}",
            served.diversity,
            no_mmr.diversity
        );
        assert!(report.markdown().contains("| popularity |"));
    }
}

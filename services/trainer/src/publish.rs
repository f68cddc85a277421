//! Making the model bundle the services load: every model trained on the
//! whole dataset, the ranker on the validation period of the per-user split,
//! and (optionally) the offline evaluation of the same recipe in the
//! manifest's metrics.

use recmesh_catalog::Dataset;
use recmesh_catalog::bundle::{BuildParams, Bundle, Step};

use crate::progress::Progress;
use crate::{Protocol, Split, default_variants, evaluate, train_ranker};

/// What goes into a bundle.
#[derive(Debug, Clone, Copy)]
pub struct BundleOptions {
    /// CF, lists, content and ALS settings.
    pub build: BuildParams,
    /// Train the learned ranker (otherwise ranking keeps the baseline).
    pub ranker: bool,
    /// Evaluate the recipe on the per-user split at this K and record the
    /// served pipeline's figures in the manifest.
    pub evaluate_k: Option<usize>,
}

/// Builds a bundle from `data`, reporting each step to `progress`.
pub fn make_bundle(
    data: &Dataset,
    opts: &BundleOptions,
    progress: &mut Progress,
) -> anyhow::Result<Bundle> {
    let mut bundle = Bundle::build(data, &opts.build, |step| match step {
        Step::Neighbours => progress.start("co-occurrence neighbours", 0),
        Step::Lists => progress.start("popularity, trending", 0),
        Step::Content => progress.start("content vectors", 0),
        Step::Als(0, total) => progress.start("ALS", total as u64),
        Step::Als(n, _) => progress.set(n as u64),
    });
    if opts.ranker || opts.evaluate_k.is_some() {
        progress.start("ranker (validation period)", 0);
        let split = Split::new(data, Protocol::PerUserTemporal);
        let ranker = train_ranker(&split)?;
        let p = &mut bundle.manifest.parameters;
        p.insert("ranker.rows".into(), ranker.rows.into());
        p.insert("ranker.users".into(), ranker.users.into());
        p.insert("ranker.trees".into(), ranker.trees.into());
        if let Some(k) = opts.evaluate_k {
            progress.start("offline evaluation", 0);
            let report = evaluate(&split, k, 42, &default_variants(), Some(&ranker))?;
            p.insert("evaluation.protocol".into(), report.protocol.clone().into());
            // The served default (learned ranker, MMR, exploration) is the
            // first learned variant.
            if let Some(m) = report
                .models
                .iter()
                .find(|m| m.model.starts_with("served, learned ranker (MMR"))
            {
                let metrics = &mut bundle.manifest.metrics;
                for (name, value) in [
                    ("precision", m.precision),
                    ("recall", m.recall),
                    ("ndcg", m.ndcg),
                    ("map", m.map),
                    ("hit_rate", m.hit_rate),
                ] {
                    metrics.insert(format!("served.{name}@{k}"), value);
                }
                metrics.insert("served.coverage".into(), m.coverage);
                metrics.insert("served.diversity".into(), m.diversity);
            }
        }
        if opts.ranker {
            bundle.ranker = Some(ranker.model_text);
        }
    }
    progress.finish();
    Ok(bundle)
}

/// Publishes `bundle` under `root` with the vector index of its item
/// vectors built in (`ann/`, see `recmesh_vector::bundle`).
pub fn publish(
    bundle: &mut Bundle,
    root: &std::path::Path,
    ann: &recmesh_vector::HnswParams,
) -> anyhow::Result<std::path::PathBuf> {
    Ok(bundle.publish_with(root, |tmp, b| {
        recmesh_vector::bundle::write(tmp, b, ann, |_| {})
    })?)
}

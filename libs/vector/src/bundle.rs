//! The vector index inside a model bundle: the trainer builds the
//! in-process shard (HNSW graph and all) into `ann/` while it writes the
//! bundle, and retrieval opens a private copy of it to serve.

use std::collections::BTreeMap;
use std::path::Path;

use recmesh_catalog::bundle::{self, Bundle, Manifest};

use crate::edge::EdgeIndex;
use crate::mips::{self, Mips};
use crate::{HnswParams, Point, VectorError};

/// The shard's directory inside a bundle.
pub const ANN_DIR: &str = "ann";

/// Manifest parameter: the largest item norm the shard's vectors were
/// augmented to ([`mips`]); a shard without it ranks by cosine.
pub const MAX_NORM: &str = "ann.mips_max_norm";

/// The largest norm among the bundle's item vectors.
pub fn max_norm(b: &Bundle) -> f32 {
    b.factors.as_ref().map_or(0.0, |f| {
        mips::max_norm(f.items.chunks_exact(f.factors.max(1)))
    })
}

/// The bundle's ALS item vectors as points, with the payload filters use.
/// Empty when the bundle has no vectors.
pub fn points(b: &Bundle) -> impl Iterator<Item = Point> + '_ {
    let f = b.factors.as_ref();
    let dim = f.map_or(0, |f| f.factors);
    let n = if dim == 0 { 0 } else { b.catalog.len() };
    (0..n).filter_map(move |i| {
        let it = b.catalog.item(i as u32)?;
        let vector = f?.items.get(i * dim..(i + 1) * dim)?.to_vec();
        Some(Point {
            id: i as u32,
            vector,
            category: b.catalog.category_of[i],
            in_stock: it.in_stock,
            price: it.price,
            created_at: it.created_at,
        })
    })
}

/// Builds the shard of `b`'s item vectors into `dir/ann` (nothing when it
/// has none) and returns the parameters to record in the manifest.
/// `progress` is [`EdgeIndex::build`]'s.
pub fn write(
    dir: &Path,
    b: &Bundle,
    params: &HnswParams,
    progress: impl FnMut(Option<usize>),
) -> Result<BTreeMap<String, serde_json::Value>, String> {
    let Some(f) = b.factors.as_ref().filter(|f| f.factors > 0) else {
        return Ok(BTreeMap::new());
    };
    let norm = max_norm(b);
    let (stored, indexed) = EdgeIndex::build(
        &dir.join(ANN_DIR),
        f.factors + 1,
        params,
        None,
        points(b).map(|mut p| {
            p.vector = mips::augment(&p.vector, norm);
            p
        }),
        progress,
    )
    .map_err(|e| format!("vector index: {e}"))?;
    Ok(BTreeMap::from([
        ("ann.backend".to_owned(), "edge".into()),
        (MAX_NORM.to_owned(), norm.into()),
        ("ann.m".to_owned(), params.m.into()),
        ("ann.ef_construct".to_owned(), params.ef_construct.into()),
        ("ann.quantize".to_owned(), params.quantize.into()),
        ("ann.on_disk".to_owned(), params.on_disk.into()),
        ("ann.full_scan_kb".to_owned(), params.full_scan_kb.into()),
        ("ann.points".to_owned(), stored.into()),
        ("ann.indexed".to_owned(), indexed.into()),
    ]))
}

/// Whether the bundle with this manifest ships a shard this code serves:
/// `Ok(false)` when it has none, an error saying why when its shard ranks
/// by cosine (a bundle from a trainer before [`mips`]).
pub fn has_shard(manifest: &Manifest) -> Result<bool, String> {
    let prefix = format!("{ANN_DIR}/");
    if !manifest.files.keys().any(|k| k.starts_with(&prefix)) {
        return Ok(false);
    }
    shard_max_norm(manifest).map(|_| true)
}

fn shard_max_norm(manifest: &Manifest) -> Result<f32, String> {
    match manifest.parameters.get(MAX_NORM).and_then(|v| v.as_f64()) {
        Some(n) if n.is_finite() && n >= 0.0 => Ok(n as f32),
        _ => Err(format!(
            "its vector index (ann/) has no `{MAX_NORM}`: it ranks by cosine, not by the dot product ALS is trained for"
        )),
    }
}

/// Checks the shard of the bundle in `bundle_dir` against its manifest and
/// opens a private copy of it in `work_dir` (the bundle stays as
/// published; the copy goes when the index does).
pub fn open(
    bundle_dir: &Path,
    manifest: &Manifest,
    work_dir: &Path,
    ef: usize,
) -> Result<Mips<EdgeIndex>, VectorError> {
    let norm = shard_max_norm(manifest).map_err(|e| VectorError::backend("edge", e))?;
    bundle::check_files(bundle_dir, manifest, &format!("{ANN_DIR}/"))
        .map_err(|e| VectorError::backend("edge", e))?;
    let index = EdgeIndex::open_copy(&bundle_dir.join(ANN_DIR), work_dir, ef)?;
    Ok(Mips::new(index, norm))
}

#[cfg(test)]
mod tests {
    use super::*;
    use recmesh_catalog::bundle::FileEntry;

    fn manifest(files: &[&str], max_norm: Option<f64>) -> Manifest {
        Manifest {
            format: 1,
            version: "v1-test".to_owned(),
            created_ms: 0,
            data_fingerprint: String::new(),
            items: 0,
            users: 0,
            interactions: 0,
            parameters: max_norm
                .map(|n| (MAX_NORM.to_owned(), n.into()))
                .into_iter()
                .collect(),
            metrics: BTreeMap::new(),
            files: files
                .iter()
                .map(|f| ((*f).to_owned(), FileEntry::of(b"")))
                .collect(),
        }
    }

    #[test]
    fn only_a_shard_augmented_for_the_dot_product_is_served() {
        let shard = ["catalog.json", "ann/edge_config.json"];
        assert_eq!(has_shard(&manifest(&["catalog.json"], None)), Ok(false));
        assert_eq!(has_shard(&manifest(&shard, Some(2.5))), Ok(true));
        // Bundles from before the augmentation record no norm: cosine.
        let old = has_shard(&manifest(&shard, None)).expect_err("a cosine shard");
        assert!(old.contains("ranks by cosine"), "{old}");
        assert!(has_shard(&manifest(&shard, Some(-1.0))).is_err());
    }
}

//! The vector index inside a model bundle: the trainer builds the
//! in-process shard (HNSW graph and all) into `ann/` while it writes the
//! bundle, and retrieval opens a private copy of it to serve.

use std::collections::BTreeMap;
use std::path::Path;

use recmesh_catalog::bundle::{self, Bundle, Manifest};

use crate::edge::EdgeIndex;
use crate::mips::{Mips, MipsParams};
use crate::{HnswParams, Point, VectorError, VectorIndex};

/// The shard's directory inside a bundle.
pub const ANN_DIR: &str = "ann";

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
    let (stored, indexed) = EdgeIndex::build(
        &dir.join(ANN_DIR),
        f.factors,
        params,
        None,
        points(b),
        progress,
    )
    .map_err(|e| format!("vector index: {e}"))?;
    Ok(BTreeMap::from([
        ("ann.backend".to_owned(), "edge".into()),
        ("ann.m".to_owned(), params.m.into()),
        ("ann.ef_construct".to_owned(), params.ef_construct.into()),
        ("ann.quantize".to_owned(), params.quantize.into()),
        ("ann.on_disk".to_owned(), params.on_disk.into()),
        ("ann.full_scan_kb".to_owned(), params.full_scan_kb.into()),
        ("ann.points".to_owned(), stored.into()),
        ("ann.indexed".to_owned(), indexed.into()),
    ]))
}

/// True when Qdrant's planner would read every point of this bundle's shard
/// for a filtered search anyway: `items` vectors of `dim` floats take no
/// more than the shard's `full_scan_kb` (Qdrant's `full_scan_threshold`;
/// every search retrieval sends is filtered, by stock at least). False for a
/// manifest that does not say (a bundle from before the key).
pub fn scanned_whole(manifest: &Manifest, items: usize, dim: usize) -> bool {
    manifest
        .parameters
        .get("ann.full_scan_kb")
        .and_then(serde_json::Value::as_u64)
        .is_some_and(|kb| (items as u64) * (dim as u64) * 4 <= kb * 1024)
}

/// Checks the shard files of the bundle in `bundle_dir` against its
/// manifest (sizes and hashes), without opening the shard: a bundle is
/// refused when its shard is damaged even where it is not searched.
pub fn check(bundle_dir: &Path, manifest: &Manifest) -> Result<(), VectorError> {
    bundle::check_files(bundle_dir, manifest, &format!("{ANN_DIR}/"))
        .map_err(|e| VectorError::backend("edge", e))
}

/// True when the bundle in a directory with this manifest ships a shard.
pub fn has_shard(manifest: &Manifest) -> bool {
    let prefix = format!("{ANN_DIR}/");
    manifest.files.keys().any(|k| k.starts_with(&prefix))
}

/// Checks the shard of bundle `b` (loaded from `bundle_dir`) against its
/// manifest and opens a private copy of it in `work_dir` (the bundle stays
/// as published; the copy goes when the index does), searched by dot
/// product.
pub fn open(
    bundle_dir: &Path,
    b: &Bundle,
    work_dir: &Path,
    ef: usize,
    mips: MipsParams,
) -> Result<Mips<EdgeIndex>, VectorError> {
    check(bundle_dir, &b.manifest)?;
    let index = EdgeIndex::open_copy(&bundle_dir.join(ANN_DIR), work_dir, ef)?;
    let dim = b.factors.as_ref().map_or(0, |f| f.factors);
    if index.dim() != dim {
        return Err(VectorError::backend(
            "edge",
            format!(
                "the bundle's vector index (ann/) holds {}-dimension vectors, its ALS factors {dim}: publish the bundle again with this trainer",
                index.dim()
            ),
        ));
    }
    Ok(Mips::new(index, points(b), mips))
}

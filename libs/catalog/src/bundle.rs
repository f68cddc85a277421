//! The model bundle: everything the trainer learned that retrieval and
//! ranking serve from, as one versioned directory.
//!
//! ```text
//! <root>/
//!   current -> v1763800000000-3f2a9c1d        (symlink, swapped atomically)
//!   v1763800000000-3f2a9c1d/
//!     manifest.json     version, created, data fingerprint, parameters,
//!                       metrics, and every file's size and FNV-1a hash
//!     items.tsv         the catalog (same format as a dataset's items.tsv)
//!     neighbours.bin    item-item CF: per item, u32 n, then n × (u32, f32)
//!     lists.tsv         popularity and trending lists, overall and per category
//!     content.f32       content vectors (recmesh_algo::content), items × 64
//!     item_factors.f32  ALS item factors, items × factors   (when trained)
//!     user_factors.f32  ALS user factors, users × factors   (when trained)
//!     users.txt         the user id of each user_factors row
//!     ranker.txt        the learned ranker, LightGBM text   (when trained)
//! ```
//!
//! All numbers are little-endian. [`Bundle::publish`] writes a new version
//! into a temporary directory, fsyncs it, renames it into place and only
//! then points `current` at it, so a reader sees a whole bundle or the
//! previous one, never half of one. [`Bundle::load`] checks every file
//! against the manifest before anything is used.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use recmesh_algo::als::{self, AlsParams};
use recmesh_algo::assign::fnv1a64;
use recmesh_algo::popularity::{self, Ranked};
use recmesh_algo::{content, cooccurrence};
use serde::{Deserialize, Serialize};

use crate::files::{self, RowPolicy, Skipped};
use crate::{Catalog, Dataset, Interaction};

/// Format of the directory this code writes and reads.
pub const FORMAT: u32 = 1;
/// The symlink naming the bundle to serve.
pub const CURRENT: &str = "current";
/// Bundles kept after a publish (the newest ones; older ones are removed).
pub const KEEP: usize = 3;

const MANIFEST: &str = "manifest.json";
const NEIGHBOURS: &str = "neighbours.bin";
const LISTS: &str = "lists.tsv";
const CONTENT: &str = "content.f32";
const ITEM_FACTORS: &str = "item_factors.f32";
const USER_FACTORS: &str = "user_factors.f32";
const USERS: &str = "users.txt";
const RANKER: &str = "ranker.txt";

/// A bundle could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is not what the manifest says, or does not parse.
    #[error("{path}: {reason}; publish a new bundle (recmesh-trainer bundle)")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The catalog did not parse.
    #[error(transparent)]
    Data(#[from] files::DataError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        path: path.to_owned(),
        source,
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> BundleError {
    BundleError::Corrupt {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// How a bundle is built from a dataset.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BuildParams {
    /// CF neighbours kept per item.
    pub neighbours_per_item: usize,
    /// Strongest items per user used when counting co-occurrences.
    pub max_history_per_user: usize,
    /// Items kept per popularity or trending list.
    pub list_len: usize,
    /// Half-life of the trending lists' time decay, in days.
    pub trending_half_life_days: f64,
    /// ALS settings; `factors == 0` leaves the vectors out.
    pub als: AlsParams,
}

impl Default for BuildParams {
    fn default() -> Self {
        BuildParams {
            neighbours_per_item: 50,
            max_history_per_user: 100,
            list_len: 500,
            trending_half_life_days: 7.0,
            als: AlsParams::default(),
        }
    }
}

/// One file's size and FNV-1a hash, as the manifest records them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Bytes.
    pub bytes: u64,
    /// FNV-1a 64 of the bytes, hex.
    pub fnv1a64: String,
}

impl FileEntry {
    /// The entry of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        FileEntry {
            bytes: bytes.len() as u64,
            fnv1a64: format!("{:016x}", fnv1a64(bytes)),
        }
    }
}

/// What a bundle is: `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Directory format ([`FORMAT`]).
    pub format: u32,
    /// `v<created_ms>-<fingerprint>`; sorts by creation.
    pub version: String,
    /// When it was built, Unix milliseconds.
    pub created_ms: i64,
    /// Fingerprint of the dataset it was built from.
    pub data_fingerprint: String,
    /// Catalog items.
    pub items: usize,
    /// Users with trained factors.
    pub users: usize,
    /// Interactions it was built from.
    pub interactions: usize,
    /// How it was built (CF, lists, ALS, ranker settings).
    pub parameters: BTreeMap<String, serde_json::Value>,
    /// Offline quality figures, when the trainer evaluated before publishing.
    pub metrics: BTreeMap<String, f64>,
    /// Every file but the manifest.
    pub files: BTreeMap<String, FileEntry>,
}

impl Manifest {
    /// Reads `dir/manifest.json` (without checking the files).
    pub fn read(dir: &Path) -> Result<Manifest, BundleError> {
        let path = dir.join(MANIFEST);
        let text = std::fs::read(&path).map_err(io(&path))?;
        serde_json::from_slice(&text)
            .map_err(|e| corrupt(&path, format!("not a bundle manifest: {e}")))
    }
}

/// Popularity-like lists: overall and per category id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lists {
    /// Best first, over the whole catalog.
    pub overall: Ranked,
    /// Best first, per category id of the bundle's catalog.
    pub by_category: HashMap<u32, Ranked>,
}

/// Trained ALS factors.
#[derive(Debug, Clone, PartialEq)]
pub struct Factors {
    /// Factors per row.
    pub factors: usize,
    /// Item factors, in catalog order.
    pub items: Vec<f32>,
    /// User ids, in the order of `users`' rows.
    pub user_ids: Vec<String>,
    /// User factors.
    pub users: Vec<f32>,
    /// λ and α of training, for folding in new users.
    pub regularization: f32,
    /// Confidence scale α.
    pub alpha: f32,
}

impl Factors {
    /// Row of user `u`.
    pub fn user(&self, u: usize) -> &[f32] {
        &self.users[u * self.factors..(u + 1) * self.factors]
    }

    /// Row of item `i` (catalog order).
    pub fn item(&self, i: usize) -> &[f32] {
        &self.items[i * self.factors..(i + 1) * self.factors]
    }
}

/// A loaded (or freshly built) bundle.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// What it is.
    pub manifest: Manifest,
    /// The catalog.
    pub catalog: Catalog,
    /// CF neighbours per item, best first.
    pub neighbours: Vec<Vec<(u32, f32)>>,
    /// Weighted interaction counts.
    pub popular: Lists,
    /// Time-decayed counts as of the newest interaction.
    pub trending: Lists,
    /// Content vectors, `content::DIM` per item.
    pub content: Vec<f32>,
    /// ALS factors, when trained.
    pub factors: Option<Factors>,
    /// The learned ranker (LightGBM text), when trained.
    pub ranker: Option<String>,
}

/// Each user's strongest event per item as a users × items matrix, with
/// the user ids by row: the input of ALS, for serving and evaluation alike.
pub fn interaction_matrix(
    catalog: &Catalog,
    interactions: &[Interaction],
) -> (als::Csr, Vec<String>) {
    let mut users: Vec<&str> = interactions.iter().map(|e| e.user.as_str()).collect();
    users.sort_unstable();
    users.dedup();
    let index: HashMap<&str, u32> = users
        .iter()
        .enumerate()
        .map(|(n, u)| (*u, n as u32))
        .collect();
    let triples: Vec<(u32, u32, f32)> = interactions
        .iter()
        .filter_map(|e| {
            Some((
                index[e.user.as_str()],
                catalog.index_of(&e.item)?,
                e.kind.weight() as f32,
            ))
        })
        .collect();
    (
        als::Csr::from_triples(users.len(), &triples),
        users.into_iter().map(str::to_owned).collect(),
    )
}

/// A step of [`Bundle::build`], reported as it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Item-item co-occurrence neighbours.
    Neighbours,
    /// Popularity and trending lists.
    Lists,
    /// Content vectors.
    Content,
    /// ALS: `Als(0, total)` as it starts, then `Als(n, total)` after
    /// iteration `n`.
    Als(usize, usize),
}

impl Bundle {
    /// The trending lists' clock: the unix second their scores are decayed
    /// to and the half-life in seconds (bundles from before these were
    /// recorded: their creation time and 7 days).
    pub fn trending_clock(&self) -> (i64, f64) {
        let p = &self.manifest.parameters;
        let reference = p
            .get("trending_reference_s")
            .and_then(serde_json::Value::as_i64)
            .unwrap_or(self.manifest.created_ms / 1000);
        let half_life_days = p
            .get("trending_half_life_days")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(7.0);
        (reference, half_life_days * 86_400.0)
    }

    /// Builds every part but the ranker from `data`; `step` hears of each
    /// step as it starts.
    pub fn build(data: &Dataset, params: &BuildParams, mut step: impl FnMut(Step)) -> Bundle {
        let catalog = Catalog::new(data.items.clone());
        step(Step::Neighbours);
        let per_user = catalog.strongest_per_user(&data.interactions);
        let histories: Vec<cooccurrence::History> = per_user
            .into_values()
            .map(|h| h.into_iter().collect())
            .collect();
        let neighbours = cooccurrence::neighbours(
            &histories,
            catalog.len(),
            params.neighbours_per_item,
            params.max_history_per_user,
        );
        drop(histories);

        step(Step::Lists);
        let scores = crate::item_scores(&catalog, &data.interactions);
        let (overall, by_category) =
            popularity::top_lists(&scores, &catalog.category_of, params.list_len);
        let popular = Lists {
            overall,
            by_category,
        };
        let now_s = data
            .interactions
            .last()
            .map_or(0, |e| e.timestamp_ms / 1000);
        let decayed = popularity::decayed_scores(
            data.interactions.iter().filter_map(|e| {
                Some((
                    catalog.index_of(&e.item)?,
                    e.kind.weight(),
                    e.timestamp_ms / 1000,
                ))
            }),
            catalog.len(),
            now_s,
            params.trending_half_life_days * 86_400.0,
        );
        let (overall, by_category) =
            popularity::top_lists(&decayed, &catalog.category_of, params.list_len);
        let trending = Lists {
            overall,
            by_category,
        };

        step(Step::Content);
        let content: Vec<f32> = catalog
            .items
            .iter()
            .flat_map(|i| content::vector(&i.category, &i.brand, i.price, &i.title))
            .collect();

        let factors = (params.als.factors > 0).then(|| {
            let (matrix, user_ids) = interaction_matrix(&catalog, &data.interactions);
            step(Step::Als(0, params.als.iterations));
            let model = als::train_with(&matrix, catalog.len(), &params.als, |n| {
                step(Step::Als(n, params.als.iterations));
            });
            Factors {
                factors: model.factors,
                items: model.items,
                user_ids,
                users: model.users,
                regularization: params.als.regularization,
                alpha: params.als.alpha,
            }
        });
        let created_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let fingerprint = data.fingerprint();
        let parameters = BTreeMap::from([
            (
                "neighbours_per_item".into(),
                params.neighbours_per_item.into(),
            ),
            (
                "max_history_per_user".into(),
                params.max_history_per_user.into(),
            ),
            ("list_len".into(), params.list_len.into()),
            (
                "trending_half_life_days".into(),
                params.trending_half_life_days.into(),
            ),
            // The time the trending scores are decayed to: the newest event.
            ("trending_reference_s".into(), now_s.into()),
            ("als.factors".into(), params.als.factors.into()),
            ("als.iterations".into(), params.als.iterations.into()),
            (
                "als.regularization".into(),
                f64::from(params.als.regularization).into(),
            ),
            ("als.alpha".into(), f64::from(params.als.alpha).into()),
            ("content.dim".into(), content::DIM.into()),
        ]);
        Bundle {
            manifest: Manifest {
                format: FORMAT,
                version: format!("v{created_ms}-{}", &fingerprint[..8.min(fingerprint.len())]),
                created_ms,
                data_fingerprint: fingerprint,
                items: catalog.len(),
                users: factors.as_ref().map_or(0, |f| f.user_ids.len()),
                interactions: data.interactions.len(),
                parameters,
                metrics: BTreeMap::new(),
                files: BTreeMap::new(),
            },
            catalog,
            neighbours,
            popular,
            trending,
            content,
            factors,
            ranker: None,
        }
    }

    /// The content vector of item `i`.
    pub fn content_of(&self, i: u32) -> &[f32] {
        &self.content[i as usize * content::DIM..][..content::DIM]
    }

    fn files(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut out = vec![
            (
                files::ITEMS_FILE,
                files::items_tsv(&self.catalog.items).into_bytes(),
            ),
            (NEIGHBOURS, encode_neighbours(&self.neighbours)),
            (LISTS, self.lists_tsv().into_bytes()),
            (CONTENT, encode_f32(&self.content)),
        ];
        if let Some(f) = &self.factors {
            out.push((ITEM_FACTORS, encode_f32(&f.items)));
            out.push((USER_FACTORS, encode_f32(&f.users)));
            let mut users = f.user_ids.join("\n");
            users.push('\n');
            out.push((USERS, users.into_bytes()));
        }
        if let Some(r) = &self.ranker {
            out.push((RANKER, r.clone().into_bytes()));
        }
        out
    }

    fn lists_tsv(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::from("list\tcategory\titem_id\tscore\n");
        for (name, lists) in [("popular", &self.popular), ("trending", &self.trending)] {
            let mut put = |category: &str, list: &Ranked| {
                for &(i, s) in list {
                    let id = self.catalog.item(i).map_or("", |it| it.id.as_str());
                    let _ = writeln!(out, "{name}\t{category}\t{id}\t{s}");
                }
            };
            put("", &lists.overall);
            let mut ids: Vec<&u32> = lists.by_category.keys().collect();
            ids.sort();
            for c in ids {
                put(&self.catalog.categories[*c as usize], &lists.by_category[c]);
            }
        }
        out
    }

    /// Writes this bundle under `root` as a new version and points
    /// `current` at it (see the module docs); keeps the newest [`KEEP`].
    /// Returns the bundle's directory.
    pub fn publish(&mut self, root: &Path) -> Result<PathBuf, BundleError> {
        self.publish_with(root, |_, _| Ok(BTreeMap::new()))
    }

    /// [`Bundle::publish`], with `extra` writing more parts into the new
    /// version's directory before it is published (the vector index shard):
    /// every file it writes is listed in the manifest with its size and
    /// hash, and the parameters it returns are added to the manifest's.
    pub fn publish_with(
        &mut self,
        root: &Path,
        extra: impl FnOnce(&Path, &Bundle) -> Result<BTreeMap<String, serde_json::Value>, String>,
    ) -> Result<PathBuf, BundleError> {
        std::fs::create_dir_all(root).map_err(io(root))?;
        let version = self.manifest.version.clone();
        let tmp = root.join(format!(".tmp-{version}-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(io(&tmp))?;
        self.manifest.files.clear();
        for (name, bytes) in self.files() {
            let path = tmp.join(name);
            write_synced(&path, &bytes)?;
            self.manifest
                .files
                .insert(name.to_owned(), FileEntry::of(&bytes));
        }
        let params = extra(&tmp, self).map_err(|e| corrupt(&tmp, e))?;
        self.manifest.parameters.extend(params);
        let extra_files = list_files(&tmp, &tmp, &self.manifest.files)?;
        self.manifest.files.extend(extra_files);
        let manifest = serde_json::to_vec_pretty(&self.manifest)
            .map_err(|e| corrupt(&tmp.join(MANIFEST), e.to_string()))?;
        write_synced(&tmp.join(MANIFEST), &manifest)?;
        sync_dir(&tmp)?;
        let dir = root.join(&version);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
        // Point `current` at it: a new symlink, renamed over the old one.
        let link = root.join(format!(".{CURRENT}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&version, &link).map_err(io(&link))?;
        std::fs::rename(&link, root.join(CURRENT)).map_err(io(root))?;
        sync_dir(root)?;
        prune(root, &version)?;
        Ok(dir)
    }

    /// Reads and checks the bundle in `dir`.
    pub fn load(dir: &Path) -> Result<Bundle, BundleError> {
        let manifest_path = dir.join(MANIFEST);
        let manifest = Manifest::read(dir)?;
        if manifest.format != FORMAT {
            return Err(corrupt(
                &manifest_path,
                format!(
                    "format {} (this build reads format {FORMAT})",
                    manifest.format
                ),
            ));
        }
        let read = |name: &str| -> Result<Option<Vec<u8>>, BundleError> {
            let path = dir.join(name);
            let Some(entry) = manifest.files.get(name) else {
                return Ok(None);
            };
            read_checked(&path, entry).map(Some)
        };
        let need = |name: &str| -> Result<Vec<u8>, BundleError> {
            read(name)?.ok_or_else(|| corrupt(&dir.join(name), "missing from the manifest"))
        };
        need(files::ITEMS_FILE)?;
        let items = files::read_items(
            &dir.join(files::ITEMS_FILE),
            RowPolicy::Fail,
            &mut Skipped::default(),
        )?;
        let catalog = Catalog::new(items);
        let n = catalog.len();
        let neighbours = decode_neighbours(&need(NEIGHBOURS)?, n)
            .map_err(|r| corrupt(&dir.join(NEIGHBOURS), r))?;
        let (popular, trending) =
            parse_lists(&need(LISTS)?, &catalog).map_err(|r| corrupt(&dir.join(LISTS), r))?;
        let content = decode_f32(&need(CONTENT)?, n * content::DIM)
            .map_err(|r| corrupt(&dir.join(CONTENT), r))?;
        let factors = match (read(ITEM_FACTORS)?, read(USER_FACTORS)?, read(USERS)?) {
            (Some(items), Some(users), Some(ids)) => {
                let f = manifest
                    .parameters
                    .get("als.factors")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(0) as usize;
                let param = |name: &str| {
                    manifest
                        .parameters
                        .get(name)
                        .and_then(serde_json::Value::as_f64)
                        .unwrap_or(0.0) as f32
                };
                let user_ids: Vec<String> = String::from_utf8_lossy(&ids)
                    .lines()
                    .map(str::to_owned)
                    .collect();
                Some(Factors {
                    factors: f,
                    items: decode_f32(&items, n * f)
                        .map_err(|r| corrupt(&dir.join(ITEM_FACTORS), r))?,
                    users: decode_f32(&users, user_ids.len() * f)
                        .map_err(|r| corrupt(&dir.join(USER_FACTORS), r))?,
                    user_ids,
                    regularization: param("als.regularization"),
                    alpha: param("als.alpha"),
                })
            }
            (None, None, None) => None,
            _ => return Err(corrupt(dir, "ALS factors are only partly listed")),
        };
        let ranker = read(RANKER)?
            .map(|b| String::from_utf8(b).map_err(|_| corrupt(&dir.join(RANKER), "not UTF-8")))
            .transpose()?;
        Ok(Bundle {
            manifest,
            catalog,
            neighbours,
            popular,
            trending,
            content,
            factors,
            ranker,
        })
    }
}

/// Every file under `dir` (relative to `root`, `/`-separated) that is not
/// in `known`, with its size and hash, fsynced; the manifest left out.
fn list_files(
    root: &Path,
    dir: &Path,
    known: &BTreeMap<String, FileEntry>,
) -> Result<Vec<(String, FileEntry)>, BundleError> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let path = entry.map_err(io(dir))?.path();
        if path.is_dir() {
            out.extend(list_files(root, &path, known)?);
            sync_dir(&path)?;
            continue;
        }
        let name = path
            .strip_prefix(root)
            .map_err(|_| corrupt(&path, "outside the bundle"))?
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect::<Vec<_>>()
            .join("/");
        if name == MANIFEST || known.contains_key(&name) {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(io(&path))?;
        out.push((name, FileEntry::of(&bytes)));
    }
    Ok(out)
}

/// Checks every file the manifest lists under `prefix` (e.g. `ann/`)
/// against its size and hash; the first that differs is named.
pub fn check_files(dir: &Path, manifest: &Manifest, prefix: &str) -> Result<(), BundleError> {
    for (name, entry) in manifest.files.range(prefix.to_owned()..) {
        if !name.starts_with(prefix) {
            break;
        }
        read_checked(&dir.join(name), entry)?;
    }
    Ok(())
}

/// Reads `path` and checks it against its manifest entry; a file that
/// differs is named with both sizes and hashes.
fn read_checked(path: &Path, entry: &FileEntry) -> Result<Vec<u8>, BundleError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let found = FileEntry::of(&bytes);
    if found != *entry {
        return Err(corrupt(
            path,
            format!(
                "{} bytes with hash {}; the manifest says {} bytes with hash {}",
                found.bytes, found.fnv1a64, entry.bytes, entry.fnv1a64
            ),
        ));
    }
    Ok(bytes)
}

/// The directory `root/current` points at, if any.
pub fn current(root: &Path) -> Option<PathBuf> {
    let target = std::fs::read_link(root.join(CURRENT)).ok()?;
    Some(root.join(target))
}

/// Path of the ranker file inside the current bundle, through the
/// `current` link (so it follows every publish).
pub fn current_ranker(root: &Path) -> PathBuf {
    root.join(CURRENT).join(RANKER)
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), BundleError> {
    let mut f = std::fs::File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), BundleError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Removes all but the newest [`KEEP`] versions (never `serving`).
fn prune(root: &Path, serving: &str) -> Result<(), BundleError> {
    let mut versions: Vec<String> = std::fs::read_dir(root)
        .map_err(io(root))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with('v'))
        .collect();
    // Same-length millisecond stamps sort by time.
    versions.sort_by(|a, b| a.len().cmp(&b.len()).then(a.cmp(b)));
    let old = versions.len().saturating_sub(KEEP);
    for v in versions.into_iter().take(old).filter(|v| v != serving) {
        let dir = root.join(&v);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            tracing::warn!(dir = %dir.display(), error = %e, "old bundle not removed");
        }
    }
    Ok(())
}

fn encode_f32(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn decode_f32(bytes: &[u8], expected: usize) -> Result<Vec<f32>, String> {
    if bytes.len() != expected * 4 {
        return Err(format!(
            "{} bytes, expected {} floats ({} bytes)",
            bytes.len(),
            expected,
            expected * 4
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn encode_neighbours(neighbours: &[Vec<(u32, f32)>]) -> Vec<u8> {
    let mut out = Vec::new();
    for list in neighbours {
        out.extend((list.len() as u32).to_le_bytes());
        for &(i, s) in list {
            out.extend(i.to_le_bytes());
            out.extend(s.to_le_bytes());
        }
    }
    out
}

fn decode_neighbours(bytes: &[u8], items: usize) -> Result<Vec<Vec<(u32, f32)>>, String> {
    let mut words = bytes.chunks_exact(4).map(|c| [c[0], c[1], c[2], c[3]]);
    if !bytes.len().is_multiple_of(4) {
        return Err("length is not a multiple of 4".into());
    }
    let mut out = Vec::with_capacity(items);
    for item in 0..items {
        let n = words
            .next()
            .map(u32::from_le_bytes)
            .ok_or_else(|| format!("ends before item {item}"))?;
        let mut list = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let (Some(i), Some(s)) = (words.next(), words.next()) else {
                return Err(format!("ends inside item {item}'s list"));
            };
            let i = u32::from_le_bytes(i);
            if i as usize >= items {
                return Err(format!(
                    "item {item} has neighbour {i}, outside the catalog"
                ));
            }
            list.push((i, f32::from_le_bytes(s)));
        }
        out.push(list);
    }
    if words.next().is_some() {
        return Err("bytes left after the last item".into());
    }
    Ok(out)
}

fn parse_lists(bytes: &[u8], catalog: &Catalog) -> Result<(Lists, Lists), String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
    let (mut popular, mut trending) = (Lists::default(), Lists::default());
    for (n, line) in text.lines().enumerate().skip(1) {
        let at = |reason: &str| format!("line {}: {reason}", n + 1);
        let f: Vec<&str> = line.split('\t').collect();
        let [list, category, item, score] = f[..] else {
            return Err(at("expected list, category, item_id, score"));
        };
        let lists = match list {
            "popular" => &mut popular,
            "trending" => &mut trending,
            _ => return Err(at(&format!("unknown list `{list}`"))),
        };
        let i = catalog
            .index_of(item)
            .ok_or_else(|| at(&format!("item `{item}` is not in items.tsv")))?;
        let s: f64 = score
            .parse()
            .map_err(|_| at(&format!("`{score}` is not a number")))?;
        if category.is_empty() {
            lists.overall.push((i, s));
        } else {
            let c = catalog
                .category_id(category)
                .ok_or_else(|| at(&format!("category `{category}` has no item")))?;
            lists.by_category.entry(c).or_default().push((i, s));
        }
    }
    Ok((popular, trending))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo::{DemoSpec, generate};

    fn small() -> Dataset {
        generate(&DemoSpec {
            items: 60,
            users: 40,
            interactions: 1_500,
            ..DemoSpec::default()
        })
    }

    fn params() -> BuildParams {
        BuildParams {
            als: AlsParams {
                factors: 8,
                iterations: 3,
                threads: 1,
                ..AlsParams::default()
            },
            ..BuildParams::default()
        }
    }

    fn root(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("recmesh-bundle-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn publish_then_load_gives_back_every_part() {
        let data = small();
        let mut steps = Vec::new();
        let mut b = Bundle::build(&data, &params(), |s| steps.push(s));
        assert_eq!(steps.first(), Some(&Step::Neighbours));
        assert_eq!(steps.last(), Some(&Step::Als(3, 3)));
        b.ranker = Some("tree\n".into());
        b.manifest.metrics.insert("ndcg@10".into(), 0.25);
        let root = root("roundtrip");
        let dir = b.publish(&root).expect("publish");
        assert_eq!(current(&root), Some(dir.clone()));
        let back = Bundle::load(&dir).expect("load");
        assert_eq!(back.manifest, b.manifest);
        assert_eq!(back.catalog.items, b.catalog.items);
        assert_eq!(back.neighbours, b.neighbours);
        assert_eq!(back.popular, b.popular);
        assert_eq!(back.trending, b.trending);
        assert_eq!(back.content, b.content);
        assert_eq!(back.factors, b.factors);
        assert_eq!(back.ranker.as_deref(), Some("tree\n"));
        assert_eq!(
            std::fs::read_to_string(current_ranker(&root)).expect("ranker via current"),
            "tree\n"
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn a_damaged_file_is_refused_with_its_name() {
        let mut b = Bundle::build(&small(), &params(), |_| {});
        let root = root("damaged");
        let dir = b.publish(&root).expect("publish");
        let path = dir.join(NEIGHBOURS);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[5] ^= 0xff;
        std::fs::write(&path, bytes).expect("write");
        let err = Bundle::load(&dir).expect_err("damaged").to_string();
        assert!(
            err.contains("neighbours.bin") && err.contains("manifest says"),
            "{err}"
        );
        std::fs::write(dir.join(MANIFEST), "{").expect("write");
        let err = Bundle::load(&dir).expect_err("no manifest").to_string();
        assert!(err.contains("manifest.json"), "{err}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn publishing_moves_current_and_keeps_the_newest() {
        let data = small();
        let root = root("keep");
        let mut dirs = Vec::new();
        for n in 0..KEEP + 2 {
            let mut b = Bundle::build(
                &data,
                &BuildParams {
                    als: AlsParams {
                        factors: 0,
                        ..AlsParams::default()
                    },
                    ..params()
                },
                |_| {},
            );
            // Distinct versions even within one millisecond.
            b.manifest.version = format!("v{:013}-test", 1_000 + n);
            dirs.push(b.publish(&root).expect("publish"));
            assert_eq!(current(&root).as_ref(), dirs.last());
        }
        let kept: Vec<bool> = dirs.iter().map(|d| d.exists()).collect();
        assert_eq!(kept, [false, false, true, true, true]);
        let b = Bundle::load(dirs.last().expect("one")).expect("load");
        assert!(b.factors.is_none() && b.ranker.is_none());
        let _ = std::fs::remove_dir_all(&root);
    }
}

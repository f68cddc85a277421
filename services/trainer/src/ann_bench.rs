//! `recmesh-trainer ann-bench`: the vector index measured the way retrieval
//! uses it. Item vectors come from ALS trained on the dataset, queries are
//! real user vectors from the same model (they sit far from any single
//! item, the hard case for HNSW), and every HNSW answer is compared with
//! the exact one. One query at a time on one thread, so QPS is per core.

use std::path::{Path, PathBuf};
use std::time::Instant;

use recmesh_algo::als;
use recmesh_catalog::Dataset;
use recmesh_catalog::bundle::{Bundle, Factors, Lists, Manifest};
use recmesh_vector::edge::EdgeIndex;
use recmesh_vector::exact::ExactIndex;
use recmesh_vector::mips::{Mips, MipsParams};
use recmesh_vector::remote::QdrantConfig;
use recmesh_vector::{Filter, HnswParams, Query, VectorIndex, bundle as ann};
use serde::Serialize;

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Where the shard is built (reused when it holds one built with the
    /// same settings and `reuse` is set).
    pub dir: PathBuf,
    /// Reuse a shard already built in `dir`.
    pub reuse: bool,
    /// HNSW settings (ef is swept with `efs`).
    pub params: HnswParams,
    /// Search-time ef values to sweep.
    pub efs: Vec<usize>,
    /// ACORN's selectivity cut-off for the second filtered pass of each ef
    /// (`None`: only the plain filtered pass).
    pub acorn: Option<f64>,
    /// Dot-product search settings of every pass (the served ones).
    pub mips: MipsParams,
    /// Head sizes and fetch factors swept at the first ef, unfiltered.
    pub sweep: Vec<MipsParams>,
    /// Queries (distinct users).
    pub queries: usize,
    /// Hits per query (recall@k).
    pub k: usize,
    /// ALS settings.
    pub als: als::AlsParams,
    /// A Qdrant server (gRPC URL) to run the same passes against, beside
    /// qdrant-edge: the `qdrant` backend as retrieval opens it (the same
    /// HNSW settings and dot-product split), one query at a time over
    /// loopback gRPC.
    pub qdrant_url: Option<String>,
}

/// The server passes: upload, wait for the server's index, then each ef
/// unfiltered and filtered. Returns (upload and index seconds, passes).
fn server_passes(
    url: &str,
    bundle: &Bundle,
    opts: &BenchOptions,
    plain: &[Query],
    filtered: &[Query],
) -> anyhow::Result<(f64, Vec<(usize, Pass)>)> {
    use recmesh_vector::VectorIndex;
    use recmesh_vector::remote::QdrantIndex;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let dim = bundle.factors.as_ref().map_or(0, |f| f.factors);
    let t = Instant::now();
    let index = rt.block_on(async {
        let index = QdrantIndex::connect(index_config(url, bundle, dim), dim, &opts.params).await?;
        // A fresh collection each run: an earlier one may hold other vectors.
        index.delete_collection().await?;
        let index = QdrantIndex::connect(index_config(url, bundle, dim), dim, &opts.params).await?;
        index.upsert(ann::points(bundle).collect()).await?;
        let indexed = index
            .wait_indexed(std::time::Duration::from_secs(3_600))
            .await?;
        eprintln!("qdrant server: {indexed} vectors indexed");
        Ok::<_, anyhow::Error>(index)
    })?;
    let upload_s = t.elapsed().as_secs_f64();
    eprintln!("qdrant server: uploaded and indexed in {upload_s:.1}s");
    let mut mips = Mips::new(index, ann::points(bundle), opts.mips);
    let mut passes = Vec::new();
    for &ef in &opts.efs {
        mips.inner_mut().set_ef(ef);
        let name = format!("Qdrant server (gRPC), HNSW, ef {ef}");
        let search = |m: &Mips<QdrantIndex>, q: &Query| -> anyhow::Result<Vec<u32>> {
            Ok(rt
                .block_on(m.search(q.clone()))?
                .iter()
                .map(|h| h.id)
                .collect())
        };
        passes.push((0, timed(&name, plain, |q| search(&mips, q))?));
        passes.push((
            1,
            timed(&format!("{name}, filtered"), filtered, |q| search(&mips, q))?,
        ));
    }
    Ok((upload_s, passes))
}

/// The benchmark's collection: named after the catalog size and dimension.
fn index_config(url: &str, bundle: &Bundle, dim: usize) -> QdrantConfig {
    let mut config = QdrantConfig::new(url, format!("annbench-{}-{dim}", bundle.catalog.len()));
    config.search_timeout = std::time::Duration::from_secs(10);
    config.call_timeout = std::time::Duration::from_secs(120);
    config
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was run.
    pub mode: String,
    /// Recall@k against the exact answer's ids (1 for the exact runs).
    pub recall: f64,
    /// Recall@k with ties counted: a hit scoring at least the exact
    /// answer's k-th score (within 1e-5) is as good as the id it displaced
    /// (items with the same interactions have the same vector, so the
    /// exact top k is one of several).
    pub recall_ties: f64,
    /// Single-query latency, µs.
    pub p50_us: f64,
    /// Single-query latency, µs.
    pub p99_us: f64,
    /// Queries per second on one thread.
    pub qps: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Items indexed.
    pub items: usize,
    /// Vector dimension.
    pub dim: usize,
    /// HNSW m, ef_construct, quantization, on-disk vectors.
    pub m: usize,
    /// HNSW ef_construct.
    pub ef_construct: usize,
    /// int8 quantization.
    pub quantize: bool,
    /// Vectors on disk.
    pub on_disk: bool,
    /// Filtered queries matching at most this many KB of vectors are
    /// scanned exactly.
    pub full_scan_kb: usize,
    /// Longest item vectors scanned exactly by dot product (every pass
    /// but the sweep).
    pub mips_head: usize,
    /// Index hits fetched per result, for rescoring.
    pub mips_fetch: usize,
    /// ALS training time, s.
    pub als_s: f64,
    /// Load and HNSW build time, s (0 when reused).
    pub build_s: f64,
    /// Opening the finished shard, s.
    pub open_s: f64,
    /// Uploading the vectors to the Qdrant server and waiting for its
    /// index, s (`None`: no server).
    pub server_upload_s: Option<f64>,
    /// Resident memory the opened index added once every query ran, bytes
    /// per item: anonymous (heap) plus file-backed (mmapped shard pages,
    /// which the kernel may evict and read back).
    pub resident_bytes_per_item: f64,
    /// Its anonymous part.
    pub resident_anon_bytes_per_item: f64,
    /// Its file-backed part.
    pub resident_file_bytes_per_item: f64,
    /// Shard size on disk, bytes per item.
    pub disk_bytes_per_item: f64,
    /// recall@k.
    pub k: usize,
    /// Queries.
    pub queries: usize,
    /// Results.
    pub rows: Vec<Row>,
}

/// Resident memory of this process: anonymous and file-backed, bytes.
fn rss_bytes() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("RssAnon:"), field("RssFile:"))
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .map(|e| {
                let p = e.path();
                if p.is_dir() {
                    dir_bytes(&p)
                } else {
                    e.metadata().map_or(0, |m| m.len())
                }
            })
            .sum()
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A fingerprint of the item vectors (ALS is deterministic for a seed,
/// so equal data and settings give equal vectors).
fn vectors_fingerprint(v: &[f32]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.len().hash(&mut h);
    for x in v {
        x.to_bits().hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

/// One timed pass: each query's answer and latency.
struct Pass {
    mode: String,
    answers: Vec<Vec<u32>>,
    times_us: Vec<f64>,
    total_s: f64,
}

/// Times `run` over every query.
fn timed(
    mode: &str,
    queries: &[Query],
    mut run: impl FnMut(&Query) -> anyhow::Result<Vec<u32>>,
) -> anyhow::Result<Pass> {
    let mut times_us = Vec::with_capacity(queries.len());
    let mut answers = Vec::with_capacity(queries.len());
    let started = Instant::now();
    for q in queries {
        let t = Instant::now();
        let ids = run(q)?;
        times_us.push(t.elapsed().as_secs_f64() * 1e6);
        answers.push(ids);
    }
    eprintln!("  {mode}: done");
    Ok(Pass {
        mode: mode.to_owned(),
        answers,
        times_us,
        total_s: started.elapsed().as_secs_f64(),
    })
}

/// The row of a pass, its recall against `truth` (exact passes: none);
/// `score` is the exact similarity of a query and an item.
fn row(
    mut pass: Pass,
    truth: Option<&[Vec<u32>]>,
    queries: &[Query],
    score: &dyn Fn(&Query, u32) -> f32,
) -> Row {
    pass.times_us.sort_by(f64::total_cmp);
    let (mut found, mut tied, mut wanted) = (0usize, 0usize, 0usize);
    for ((got, want), q) in pass.answers.iter().zip(truth.unwrap_or(&[])).zip(queries) {
        wanted += want.len();
        found += want.iter().filter(|id| got.contains(id)).count();
        let kth = want
            .iter()
            .map(|&id| score(q, id))
            .fold(f32::INFINITY, f32::min);
        tied += got
            .iter()
            .filter(|&&id| score(q, id) >= kth - 1e-5)
            .count()
            .min(want.len());
    }
    let share = |n: usize| {
        if wanted == 0 {
            1.0
        } else {
            n as f64 / wanted as f64
        }
    };
    let (recall, recall_ties) = (share(found), share(tied));
    let row = Row {
        mode: pass.mode,
        recall,
        recall_ties,
        p50_us: percentile(&pass.times_us, 0.5),
        p99_us: percentile(&pass.times_us, 0.99),
        qps: pass.answers.len() as f64 / pass.total_s.max(1e-9),
    };
    eprintln!(
        "{:<52} recall@k {:.4} (ties {:.4})  p50 {:>8.0} µs  p99 {:>8.0} µs  {:>8.0} QPS",
        row.mode, row.recall, row.recall_ties, row.p50_us, row.p99_us, row.qps
    );
    row
}

/// Trains ALS on `data`, builds (or reuses) the shard, and measures.
pub fn run(data: &Dataset, opts: &BenchOptions) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(opts.k > 0, "--k: must be at least 1");
    anyhow::ensure!(opts.queries > 0, "--queries: must be at least 1");
    let catalog = recmesh_catalog::Catalog::new(data.items.clone());
    let started = Instant::now();
    let (matrix, user_ids) =
        recmesh_catalog::bundle::interaction_matrix(&catalog, &data.interactions);
    let model = als::train(&matrix, catalog.len(), &opts.als);
    let als_s = started.elapsed().as_secs_f64();
    eprintln!(
        "ALS: {} items × {} users × {} factors in {als_s:.1}s",
        catalog.len(),
        user_ids.len(),
        model.factors
    );
    let dim = model.factors;
    // A bundle in memory, for the same points retrieval would index.
    let bundle = Bundle {
        manifest: Manifest {
            format: 0,
            version: String::new(),
            created_ms: 0,
            data_fingerprint: String::new(),
            items: catalog.len(),
            users: user_ids.len(),
            interactions: data.interactions.len(),
            parameters: Default::default(),
            metrics: Default::default(),
            files: Default::default(),
        },
        catalog,
        neighbours: Vec::new(),
        popular: Lists::default(),
        trending: Lists::default(),
        content: Vec::new(),
        factors: Some(Factors {
            factors: dim,
            items: model.items.clone(),
            user_ids: user_ids.clone(),
            users: model.users.clone(),
            regularization: opts.als.regularization,
            alpha: opts.als.alpha,
        }),
        ranker: None,
    };
    let items = bundle.catalog.len();

    let shard = opts.dir.join(ann::ANN_DIR);
    // What the shard was built from: reused only when it is the same.
    let stamp = serde_json::json!({
        "items": items,
        "dim": dim,
        "m": opts.params.m,
        "ef_construct": opts.params.ef_construct,
        "quantize": opts.params.quantize,
        "on_disk": opts.params.on_disk,
        "full_scan_kb": opts.params.full_scan_kb,
        "vectors": vectors_fingerprint(&model.items),
    });
    let stamp_path = opts.dir.join("bench-stamp.json");
    let built_from = std::fs::read(&stamp_path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let mut build_s = 0.0;
    let reusable = shard.join("edge_config.json").exists() && built_from.as_ref() == Some(&stamp);
    if opts.reuse && !reusable {
        eprintln!(
            "--reuse: the shard in {} was not built from these vectors and settings; rebuilding",
            opts.dir.display()
        );
    }
    if !(opts.reuse && reusable) {
        if opts.dir.exists() {
            std::fs::remove_dir_all(&opts.dir)?;
        }
        std::fs::create_dir_all(&opts.dir)?;
        let t = Instant::now();
        ann::write(&opts.dir, &bundle, &opts.params, |p| match p {
            Some(n) if n % 100_000 == 0 => eprintln!("  {n} points loaded"),
            Some(_) => {}
            None => eprintln!("  building the HNSW graph"),
        })
        .map_err(anyhow::Error::msg)?;
        build_s = t.elapsed().as_secs_f64();
        std::fs::write(&stamp_path, serde_json::to_vec_pretty(&stamp)?)?;
        eprintln!("shard built in {build_s:.1}s");
    }
    let disk = dir_bytes(&shard);

    // Queries: real users' vectors, spread over the user list.
    let step = (user_ids.len() / opts.queries).max(1);
    let users: Vec<usize> = (0..user_ids.len())
        .step_by(step)
        .take(opts.queries)
        .collect();
    let query = |u: usize, filter: Filter| Query {
        vector: model.user(u).to_vec(),
        limit: opts.k,
        filter,
    };
    let plain: Vec<Query> = users.iter().map(|&u| query(u, Filter::default())).collect();
    // Filtered: in stock and one category (cycled), as a browsing page
    // asks; "wide": three categories, a filter too broad for the exact
    // scan of matching points, which the graph walk answers.
    let categories = bundle.catalog.categories.len().max(1) as u32;
    let filtered_by = |width: u32| -> Vec<Query> {
        users
            .iter()
            .enumerate()
            .map(|(n, &u)| {
                query(
                    u,
                    Filter {
                        categories: (0..width.min(categories))
                            .map(|k| (n as u32 + k) % categories)
                            .collect(),
                        in_stock_only: true,
                        ..Filter::default()
                    },
                )
            })
            .collect()
    };
    let filtered = filtered_by(1);
    let wide = filtered_by(3);

    // Every index pass first, before any large buffer is allocated and
    // freed (the allocator could hand it to the index and hide its
    // memory): the resident figure is what opening the index and answering
    // every query added (run with --reuse, so no graph build ran in this
    // process either). Recall is computed once the exact answers exist.
    let (anon_before, file_before) = rss_bytes();
    let t = Instant::now();
    let work = opts.dir.join("serving");
    // Kept for the sweep: the longest head any pass uses.
    let longest = opts
        .sweep
        .iter()
        .map(|p| p.head)
        .fold(opts.mips.head, usize::max);
    let mut index = Mips::new(
        EdgeIndex::open_copy(&shard, &work, opts.params.ef)?,
        ann::points(&bundle),
        MipsParams {
            head: longest,
            ..opts.mips
        },
    );
    index.set_params(opts.mips);
    let open_s = t.elapsed().as_secs_f64();
    // (pass, which exact answers it is compared with: 0 plain, 1
    // filtered, 2 wide)
    let mut passes: Vec<(usize, Pass)> = Vec::new();
    let search = |index: &Mips<EdgeIndex>, q: &Query| -> anyhow::Result<Vec<u32>> {
        Ok(index.search_blocking(q)?.iter().map(|h| h.id).collect())
    };
    for &ef in &opts.efs {
        index.inner_mut().set_ef(ef);
        index.inner_mut().set_acorn(None);
        let name = format!("qdrant-edge HNSW, ef {ef}");
        passes.push((0, timed(&name, &plain, |q| search(&index, q))?));
        for (truth, label, queries) in [(1, "filtered", &filtered), (2, "wide filter", &wide)] {
            index.inner_mut().set_acorn(None);
            passes.push((
                truth,
                timed(&format!("{name}, {label}"), queries, |q| search(&index, q))?,
            ));
            if let Some(acorn) = opts.acorn {
                index.inner_mut().set_acorn(Some(acorn));
                passes.push((
                    truth,
                    timed(
                        &format!("{name}, {label}, ACORN ≤ {acorn}"),
                        queries,
                        |q| search(&index, q),
                    )?,
                ));
            }
        }
    }
    if let Some(&ef) = opts.efs.first() {
        index.inner_mut().set_ef(ef);
        index.inner_mut().set_acorn(None);
        for &p in &opts.sweep {
            index.set_params(p);
            let name = format!(
                "qdrant-edge HNSW, ef {ef}, head {}, fetch {}×",
                p.head, p.fetch
            );
            passes.push((0, timed(&name, &plain, |q| search(&index, q))?));
        }
        index.set_params(opts.mips);
    }
    let engine_exact = timed("qdrant-edge exact scan (cosine, rescored)", &plain, |q| {
        Ok(index
            .search_with(q, EdgeIndex::search_exact)?
            .iter()
            .map(|h| h.id)
            .collect())
    })?;
    let engine_exact_filtered = timed(
        "qdrant-edge exact scan (cosine, rescored), filtered",
        &filtered,
        |q| {
            Ok(index
                .search_with(q, EdgeIndex::search_exact)?
                .iter()
                .map(|h| h.id)
                .collect())
        },
    )?;
    let (anon_after, file_after) = rss_bytes();
    let anon = anon_after.saturating_sub(anon_before);
    let file = file_after.saturating_sub(file_before);
    drop(index);
    let mut server_upload_s = None;
    if let Some(url) = &opts.qdrant_url {
        let (upload_s, server) = server_passes(url, &bundle, opts, &plain, &filtered)?;
        server_upload_s = Some(upload_s);
        passes.extend(server);
    }

    // Brute force: recmesh's own scan (what served ANN before the index),
    // the exact answers recall is measured against.
    let exact = ExactIndex::by_dot_product(dim);
    exact.upsert_now(ann::points(&bundle).collect())?;
    let scan = |q: &Query| -> anyhow::Result<Vec<u32>> {
        Ok(exact.search_blocking(q)?.iter().map(|h| h.id).collect())
    };
    let brute = timed("brute force (recmesh scan)", &plain, scan)?;
    let brute_filtered = timed("brute force, filtered", &filtered, scan)?;
    let brute_wide = timed("brute force, wide filter", &wide, scan)?;
    let truths = [
        brute.answers.clone(),
        brute_filtered.answers.clone(),
        brute_wide.answers.clone(),
    ];
    drop(exact);
    let score = |q: &Query, id: u32| recmesh_vector::dot(&q.vector, model.item(id as usize));
    let workloads = [&plain, &filtered, &wide];
    let mut rows = vec![
        row(brute, None, &plain, &score),
        row(brute_filtered, None, &filtered, &score),
        row(brute_wide, None, &wide, &score),
        row(engine_exact, Some(&truths[0]), &plain, &score),
        row(engine_exact_filtered, Some(&truths[1]), &filtered, &score),
    ];
    for (truth, pass) in passes {
        rows.push(row(pass, Some(&truths[truth]), workloads[truth], &score));
    }
    Ok(BenchReport {
        items,
        dim,
        m: opts.params.m,
        ef_construct: opts.params.ef_construct,
        quantize: opts.params.quantize,
        on_disk: opts.params.on_disk,
        full_scan_kb: opts.params.full_scan_kb,
        mips_head: opts.mips.head,
        mips_fetch: opts.mips.fetch,
        als_s,
        build_s,
        open_s,
        server_upload_s,
        resident_bytes_per_item: (anon + file) as f64 / items.max(1) as f64,
        resident_anon_bytes_per_item: anon as f64 / items.max(1) as f64,
        resident_file_bytes_per_item: file as f64 / items.max(1) as f64,
        disk_bytes_per_item: disk as f64 / items.max(1) as f64,
        k: opts.k,
        queries: plain.len(),
        rows,
    })
}

impl BenchReport {
    /// The report as a Markdown table with its settings.
    pub fn markdown(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!(
            "{} items × {} dims; HNSW m {}, ef_construct {}, int8 {}, on-disk vectors {}, exact below {} KB of matching vectors; dot product: head {}, fetch {}×; ALS {:.1}s, build {:.1}s, open {:.2}s; resident {:.0} B/item ({:.2} KiB: {:.0} anonymous, {:.0} file-backed), disk {:.0} B/item; {} user queries, recall@{}\n\n| mode | recall@{} | with ties | p50 µs | p99 µs | QPS (1 thread) |\n|---|---|---|---|---|---|\n",
            self.items,
            self.dim,
            self.m,
            self.ef_construct,
            self.quantize,
            self.on_disk,
            self.full_scan_kb,
            self.mips_head,
            self.mips_fetch,
            self.als_s,
            self.build_s,
            self.open_s,
            self.resident_bytes_per_item,
            self.resident_bytes_per_item / 1024.0,
            self.resident_anon_bytes_per_item,
            self.resident_file_bytes_per_item,
            self.disk_bytes_per_item,
            self.queries,
            self.k,
            self.k
        );
        if let Some(s) = self.server_upload_s {
            out = out.replacen(
                "\n\n",
                &format!("; Qdrant server: upload and index {s:.1}s\n\n"),
                1,
            );
        }
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {:.4} | {:.4} | {:.0} | {:.0} | {:.0} |",
                r.mode, r.recall, r.recall_ties, r.p50_us, r.p99_us, r.qps
            );
        }
        out
    }
}

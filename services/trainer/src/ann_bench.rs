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
use recmesh_vector::{Filter, HnswParams, Query, bundle as ann};
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
    /// Queries (distinct users).
    pub queries: usize,
    /// Hits per query (recall@k).
    pub k: usize,
    /// ALS settings.
    pub als: als::AlsParams,
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// What was run.
    pub mode: String,
    /// Recall@k against the exact answer (1 for the exact runs).
    pub recall: f64,
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
    /// ALS training time, s.
    pub als_s: f64,
    /// Load and HNSW build time, s (0 when reused).
    pub build_s: f64,
    /// Opening the finished shard, s.
    pub open_s: f64,
    /// Resident memory the opened index added, bytes per item.
    pub resident_bytes_per_item: f64,
    /// Shard size on disk, bytes per item.
    pub disk_bytes_per_item: f64,
    /// recall@k.
    pub k: usize,
    /// Queries.
    pub queries: usize,
    /// Results.
    pub rows: Vec<Row>,
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
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

/// Times `run` over every query; returns the row and each query's ids.
fn measure(
    mode: &str,
    queries: &[Query],
    truth: Option<&[Vec<u32>]>,
    mut run: impl FnMut(&Query) -> anyhow::Result<Vec<u32>>,
) -> anyhow::Result<(Row, Vec<Vec<u32>>)> {
    let mut times = Vec::with_capacity(queries.len());
    let mut answers = Vec::with_capacity(queries.len());
    let started = Instant::now();
    for q in queries {
        let t = Instant::now();
        let ids = run(q)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
        answers.push(ids);
    }
    let total = started.elapsed().as_secs_f64();
    times.sort_by(f64::total_cmp);
    let recall = truth.map_or(1.0, |truth| {
        let (mut found, mut wanted) = (0usize, 0usize);
        for (got, want) in answers.iter().zip(truth) {
            wanted += want.len();
            found += want.iter().filter(|id| got.contains(id)).count();
        }
        if wanted == 0 {
            1.0
        } else {
            found as f64 / wanted as f64
        }
    });
    let row = Row {
        mode: mode.to_owned(),
        recall,
        p50_us: percentile(&times, 0.5),
        p99_us: percentile(&times, 0.99),
        qps: queries.len() as f64 / total.max(1e-9),
    };
    eprintln!(
        "{:<44} recall@k {:.4}  p50 {:>8.0} µs  p99 {:>8.0} µs  {:>8.0} QPS",
        row.mode, row.recall, row.p50_us, row.p99_us, row.qps
    );
    Ok((row, answers))
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
    let mut build_s = 0.0;
    if !(opts.reuse && shard.join("edge_config.json").exists()) {
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
    // Filtered: one category (cycled) and in stock, as a browsing page asks.
    let categories = bundle.catalog.categories.len().max(1) as u32;
    let filtered: Vec<Query> = users
        .iter()
        .enumerate()
        .map(|(n, &u)| {
            query(
                u,
                Filter {
                    categories: vec![n as u32 % categories],
                    in_stock_only: true,
                    ..Filter::default()
                },
            )
        })
        .collect();

    // The index first, while no large buffer has been freed that its
    // allocations could reuse: the resident figure is what opening it and
    // answering a first pass of queries added (run with --reuse, so no
    // graph build ran in this process either).
    let before = rss_bytes();
    let t = Instant::now();
    let work = opts.dir.join("serving");
    let mut index = EdgeIndex::open_copy(&shard, &work, opts.params.ef)?;
    let open_s = t.elapsed().as_secs_f64();
    for q in &plain {
        index.search_now(q)?;
    }
    let resident = rss_bytes().saturating_sub(before);

    // Brute force: recmesh's own scan (what served ANN before the index).
    let mut rows = Vec::new();
    let exact = ExactIndex::new(dim);
    exact.upsert_now(ann::points(&bundle).collect())?;
    let (row, truth) = measure("brute force (recmesh scan)", &plain, None, |q| {
        Ok(exact.search_now(q)?.iter().map(|h| h.id).collect())
    })?;
    rows.push(row);
    let (row, truth_filtered) = measure("brute force, filtered", &filtered, None, |q| {
        Ok(exact.search_now(q)?.iter().map(|h| h.id).collect())
    })?;
    rows.push(row);
    drop(exact);

    let (row, _) = measure("qdrant-edge exact scan", &plain, Some(&truth), |q| {
        Ok(index.search_exact(q)?.iter().map(|h| h.id).collect())
    })?;
    rows.push(row);
    for &ef in &opts.efs {
        index.set_ef(ef);
        let (row, _) = measure(
            &format!("qdrant-edge HNSW, ef {ef}"),
            &plain,
            Some(&truth),
            |q| Ok(index.search_now(q)?.iter().map(|h| h.id).collect()),
        )?;
        rows.push(row);
        let (row, _) = measure(
            &format!("qdrant-edge HNSW, ef {ef}, filtered"),
            &filtered,
            Some(&truth_filtered),
            |q| Ok(index.search_now(q)?.iter().map(|h| h.id).collect()),
        )?;
        rows.push(row);
    }
    drop(index);
    Ok(BenchReport {
        items,
        dim,
        m: opts.params.m,
        ef_construct: opts.params.ef_construct,
        quantize: opts.params.quantize,
        on_disk: opts.params.on_disk,
        als_s,
        build_s,
        open_s,
        resident_bytes_per_item: resident as f64 / items.max(1) as f64,
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
            "{} items × {} dims; HNSW m {}, ef_construct {}, int8 {}, on-disk vectors {}; ALS {:.1}s, build {:.1}s, open {:.2}s; resident {:.0} B/item ({:.2} KiB), disk {:.0} B/item; {} user queries, recall@{}\n\n| mode | recall@{} | p50 µs | p99 µs | QPS (1 thread) |\n|---|---|---|---|---|\n",
            self.items,
            self.dim,
            self.m,
            self.ef_construct,
            self.quantize,
            self.on_disk,
            self.als_s,
            self.build_s,
            self.open_s,
            self.resident_bytes_per_item,
            self.resident_bytes_per_item / 1024.0,
            self.disk_bytes_per_item,
            self.queries,
            self.k,
            self.k
        );
        for r in &self.rows {
            let _ = writeln!(
                out,
                "| {} | {:.4} | {:.0} | {:.0} | {:.0} |",
                r.mode, r.recall, r.p50_us, r.p99_us, r.qps
            );
        }
        out
    }
}

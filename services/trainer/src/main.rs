//! `recmesh-trainer`: recmesh's batch job. Trains the ranking model, evaluates
//! the models and the served pipeline offline, and exchanges splits and lists
//! with other libraries for side-by-side comparisons.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use recmesh_catalog::Dataset;
use recmesh_catalog::demo::DemoSpec;
use recmesh_catalog::files::{RowPolicy, Skipped};
use recmesh_trainer::{Protocol, Report, Split, evaluate, variants_with};
use recmesh_vector::HnswParams;

#[derive(Parser)]
#[command(
    name = "recmesh-trainer",
    version,
    about = "recmesh's batch job: training and offline evaluation"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum SplitArg {
    /// Each user's last 20% by time is test (compare models with this).
    PerUser,
    /// The last 10% of all interactions by time is test (leak-free check).
    Global,
}

/// Where the interactions come from and how they are split.
#[derive(Args)]
struct Input {
    /// RecBole atomic files directory (e.g. data/ml-100k from
    /// services/trainer/scripts/fetch-movielens.sh).
    #[arg(long, conflicts_with = "data")]
    recbole: Option<PathBuf>,
    /// Dataset name inside --recbole (file stem).
    #[arg(long, default_value = "ml-100k")]
    name: String,
    /// Directory with items.tsv and interactions.tsv (default: demo data).
    #[arg(long, conflicts_with = "parquet")]
    data: Option<PathBuf>,
    /// Directory with items.parquet and interactions.parquet (the same
    /// columns as the TSV files, by name).
    #[arg(long, conflicts_with = "recbole")]
    parquet: Option<PathBuf>,
    /// Demo data size when neither --recbole nor --data is given.
    #[arg(long, default_value_t = DemoSpec::default().interactions)]
    demo_interactions: u64,
    /// Demo catalog size.
    #[arg(long, default_value_t = DemoSpec::default().items)]
    demo_items: u32,
    /// Demo users.
    #[arg(long, default_value_t = DemoSpec::default().users)]
    demo_users: u32,
    /// Event logs the features service wrote (its embedded event file, or
    /// the output of `export-events`), added to the interactions:
    /// deduplicated by event id; events on items outside the catalog are
    /// skipped and counted.
    #[arg(long, num_args = 1..)]
    events: Vec<PathBuf>,
    /// Split protocol.
    #[arg(long, value_enum, default_value = "per-user")]
    split: SplitArg,
    /// K of every @K metric.
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Malformed input rows: stop at the first (naming file, line and
    /// column), or skip and count them.
    #[arg(long, value_enum, default_value = "fail")]
    bad_rows: BadRows,
}

/// The vector index built into the bundle (retrieval's ANN source).
#[derive(Args, Clone, Copy)]
struct AnnArgs {
    /// HNSW links per node.
    #[arg(long, default_value_t = HnswParams::default().m)]
    ann_m: usize,
    /// HNSW candidate list while building.
    #[arg(long, default_value_t = HnswParams::default().ef_construct)]
    ann_ef_construct: usize,
    /// Keep int8-quantized vectors in RAM and the full ones on disk.
    #[arg(long)]
    ann_quantize: bool,
    /// Keep the full vectors on disk (memory-mapped).
    #[arg(long)]
    ann_on_disk: bool,
    /// Filtered queries matching at most this many KB of vectors scan the
    /// matching points exactly instead of walking the graph.
    #[arg(long, default_value_t = HnswParams::default().full_scan_kb)]
    ann_full_scan_kb: usize,
}

impl AnnArgs {
    fn params(&self, ef: usize) -> anyhow::Result<HnswParams> {
        anyhow::ensure!(self.ann_m >= 4, "--ann-m: must be at least 4");
        anyhow::ensure!(
            self.ann_ef_construct >= 4,
            "--ann-ef-construct: must be at least 4"
        );
        Ok(HnswParams {
            m: self.ann_m,
            ef_construct: self.ann_ef_construct,
            ef,
            quantize: self.ann_quantize,
            on_disk: self.ann_on_disk,
            full_scan_kb: self.ann_full_scan_kb,
            ..HnswParams::default()
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum BadRows {
    /// Stop at the first malformed row.
    Fail,
    /// Skip malformed rows and report how many, and the first.
    Skip,
}

impl Input {
    /// The dataset and its split (for evaluation and exports).
    fn load(&self) -> anyhow::Result<(Dataset, Split)> {
        let started = Instant::now();
        let dataset = self.read()?;
        let protocol = match self.split {
            SplitArg::PerUser => Protocol::PerUserTemporal,
            SplitArg::Global => Protocol::GlobalTemporal,
        };
        let split = Split::new(&dataset, protocol);
        eprintln!(
            "{} items, {} interactions; {} test users ({:.1}s)",
            dataset.items.len(),
            dataset.interactions.len(),
            split.test.len(),
            started.elapsed().as_secs_f64()
        );
        Ok((dataset, split))
    }

    /// The dataset alone (the bundle trains on all of it).
    fn read(&self) -> anyhow::Result<Dataset> {
        anyhow::ensure!((1..=1000).contains(&self.k), "--k: must be in 1..=1000");
        let policy = match self.bad_rows {
            BadRows::Fail => RowPolicy::Fail,
            BadRows::Skip => RowPolicy::Skip,
        };
        let (mut dataset, skipped) = match (&self.recbole, &self.data, &self.parquet) {
            (Some(dir), _, _) => recmesh_catalog::recbole::read_with(dir, &self.name, policy)?,
            (None, Some(dir), _) => recmesh_catalog::files::read_dir_with(dir, policy)?,
            (None, None, Some(dir)) => recmesh_trainer::parquet_input::read_dir(dir, policy)?,
            (None, None, None) => (
                recmesh_catalog::demo::generate(&DemoSpec {
                    items: self.demo_items,
                    users: self.demo_users,
                    interactions: self.demo_interactions,
                    ..DemoSpec::default()
                }),
                Skipped::default(),
            ),
        };
        if let Some(first) = &skipped.first {
            eprintln!(
                "skipped {} malformed rows; the first: {first}",
                skipped.count
            );
        }
        if !self.events.is_empty() {
            let added = add_events(&mut dataset, &self.events)?;
            eprintln!(
                "event logs: {} events added, {} duplicates, {} on items outside the catalog",
                added.added, added.duplicates, added.unknown_items
            );
        }
        Ok(dataset)
    }
}

/// What [`add_events`] did.
struct Added {
    added: usize,
    duplicates: usize,
    unknown_items: usize,
}

/// Appends the events of the event files to the dataset's interactions.
fn add_events(dataset: &mut Dataset, files: &[PathBuf]) -> anyhow::Result<Added> {
    let catalog: std::collections::HashSet<&str> =
        dataset.items.iter().map(|i| i.id.as_str()).collect();
    let mut seen = std::collections::HashSet::new();
    let mut added = Added {
        added: 0,
        duplicates: 0,
        unknown_items: 0,
    };
    let mut new = Vec::new();
    for path in files {
        let events = recmesh_features::log::read_events(path)
            .map_err(|e| anyhow::anyhow!("--events: {e}"))?;
        for e in events {
            if !seen.insert(e.event_id.clone()) {
                added.duplicates += 1;
            } else if !catalog.contains(e.item.as_str()) {
                added.unknown_items += 1;
            } else {
                added.added += 1;
                new.push(recmesh_catalog::Interaction {
                    user: e.user,
                    item: e.item,
                    kind: e.kind,
                    timestamp_ms: e.timestamp_ms,
                });
            }
        }
    }
    dataset.interactions.extend(new);
    dataset.interactions.sort_by_key(|e| e.timestamp_ms);
    Ok(added)
}

#[derive(Subcommand)]
enum Command {
    /// Copy the features service's Redis event stream into an event file
    /// through a consumer group (each event once per group), for `--events`.
    ExportEvents {
        /// Redis of the features service.
        #[arg(long)]
        redis: String,
        /// The features service's `redis.key_prefix`.
        #[arg(long, default_value = "rm")]
        key_prefix: String,
        /// Consumer group.
        #[arg(long, default_value = "trainer")]
        group: String,
        /// Event file to append to.
        #[arg(long)]
        out: PathBuf,
        /// Keep following the stream (a long-running consumer).
        #[arg(long)]
        follow: bool,
    },
    /// Train every model on the whole dataset and publish the model bundle
    /// retrieval and ranking serve (swapped in while they run): CF
    /// neighbours, popularity and trending lists, content vectors, ALS
    /// factors, and the ranker (learned on the validation period).
    Bundle {
        #[command(flatten)]
        input: Input,
        /// Bundle root: the bundle goes to OUT/<version>, OUT/current points
        /// at it (the services' `bundle_dir`).
        #[arg(long)]
        out: PathBuf,
        /// ALS latent factors (0: no ALS vectors, no ANN source).
        #[arg(long, default_value_t = 64)]
        factors: usize,
        /// ALS iterations.
        #[arg(long, default_value_t = 15)]
        iterations: usize,
        /// ALS threads.
        #[arg(long, default_value_t = std::thread::available_parallelism().map_or(1, |n| n.get()))]
        threads: usize,
        /// Leave the learned ranker out (ranking serves the baseline).
        #[arg(long)]
        no_ranker: bool,
        /// Also evaluate the recipe on the per-user split and record the
        /// served pipeline's figures in the manifest.
        #[arg(long)]
        eval: bool,
        /// No progress bars or step lines (CI).
        #[arg(long)]
        quiet: bool,
        #[command(flatten)]
        ann: AnnArgs,
    },
    /// Measure the vector index as retrieval uses it: ALS item vectors,
    /// real user vectors as queries, recall@k of HNSW against the exact
    /// search, single-thread latency and QPS, filtered queries, build time,
    /// resident memory per item (docs/ann.md).
    AnnBench {
        #[command(flatten)]
        input: Input,
        #[command(flatten)]
        ann: AnnArgs,
        /// Where the shard is built.
        #[arg(long, default_value = "target/ann-bench")]
        dir: PathBuf,
        /// Reuse the shard already built in --dir.
        #[arg(long)]
        reuse: bool,
        /// Search-time ef values to sweep.
        #[arg(long, value_delimiter = ',', default_value = "64,128,256")]
        ef: Vec<usize>,
        /// Also run the filtered queries with ACORN at this selectivity
        /// cut-off (0..=1); a negative value skips that pass.
        #[arg(long, default_value_t = 0.4, allow_negative_numbers = true)]
        acorn: f64,
        /// Longest item vectors scanned exactly by dot product (the
        /// rest are found by cosine and rescored).
        #[arg(long, default_value_t = recmesh_vector::mips::MipsParams::default().head)]
        head: usize,
        /// Index hits fetched per result, for rescoring.
        #[arg(long, default_value_t = recmesh_vector::mips::MipsParams::default().fetch)]
        fetch: usize,
        /// Also run unfiltered passes at the first ef for each of these
        /// head sizes...
        #[arg(long, value_delimiter = ',')]
        sweep_head: Vec<usize>,
        /// ...with each of these fetch factors.
        #[arg(long, value_delimiter = ',')]
        sweep_fetch: Vec<usize>,
        /// User queries.
        #[arg(long, default_value_t = 1000)]
        queries: usize,
        /// Hits per query: recall@K.
        #[arg(long, default_value_t = 100)]
        top: usize,
        /// ALS latent factors.
        #[arg(long, default_value_t = 64)]
        factors: usize,
        /// ALS iterations.
        #[arg(long, default_value_t = 15)]
        iterations: usize,
        /// Also write the report as JSON and Markdown here (FILE.json, FILE.md).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Also run the passes against this Qdrant server (gRPC URL, e.g.
        /// http://127.0.0.1:6334), beside qdrant-edge's.
        #[arg(long)]
        qdrant_url: Option<String>,
    },
    /// Train the ranker on the validation period, then evaluate popularity,
    /// item-CF, ALS and the served pipeline (baseline and learned ranker, MMR
    /// and exploration on and off) on test.
    Eval {
        #[command(flatten)]
        input: Input,
        /// Seed of the exploration draws.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Also write report.json, report.md and the learned ranker (ranker.txt) here.
        #[arg(long)]
        out: Option<PathBuf>,
        /// A re-ranking rule for the served rows, as the re-ranking service
        /// takes it (`brand_cap=0`, `exploration_share=0.05`); repeatable.
        #[arg(long = "rule", value_name = "KEY=VALUE")]
        rules: Vec<String>,
        /// Also evaluate the pipeline through the real `Recommend` RPC: start
        /// a mesh (`recmesh up`, from beside this binary or RECMESH_BIN) on
        /// the split's training data with the served rows' bundle, ask it for
        /// every test user with no client exclusions, and add its row. The
        /// split is first shifted in time to end now (the mesh runs on the
        /// wall clock).
        #[arg(long, conflicts_with = "rules")]
        grpc: bool,
        /// With --grpc: ask the mesh at this address instead of starting
        /// one; it must serve what --grpc-dir holds (`recmesh up --data-dir
        /// DIR/data --bundle DIR/bundles --experiments DIR/experiments.toml`).
        #[arg(long, requires = "grpc")]
        gateway: Option<String>,
        /// With --grpc: where the training data and bundle the mesh serves
        /// are written (default: a folder in the temp dir).
        #[arg(long, requires = "grpc")]
        grpc_dir: Option<PathBuf>,
    },
    /// Write the split's training interactions (train.tsv: user, item,
    /// strength) and its test users (test_users.txt), for another library
    /// to train on; and, for tuning, the training period without
    /// validation (train_only.tsv) and each validation user's items
    /// (valid.tsv: `user<TAB>item,item,...`).
    ExportSplit {
        #[command(flatten)]
        input: Input,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Score top-K lists made elsewhere on the same split, with recmesh's
    /// metric code. Each file: one line per user, `user<TAB>item,item,...`;
    /// the model name is the file stem.
    ScoreLists {
        #[command(flatten)]
        input: Input,
        /// List files.
        #[arg(long, required = true, num_args = 1..)]
        lists: Vec<PathBuf>,
    },
    /// Time recmesh's ALS on the split's training data.
    AlsTime {
        #[command(flatten)]
        input: Input,
        /// Latent factors.
        #[arg(long, default_value_t = 64)]
        factors: usize,
        /// Iterations.
        #[arg(long, default_value_t = 15)]
        iterations: usize,
        /// Threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
}

fn main() -> std::process::ExitCode {
    recmesh_server::exit_code(run(Cli::parse()))
}

/// The `--grpc` row: the served pipeline through the real `Recommend` RPC.
fn served_over_grpc(
    split: &Split,
    ranker: &recmesh_trainer::TrainedRanker,
    k: usize,
    seed: u64,
    gateway: Option<String>,
    dir: PathBuf,
) -> anyhow::Result<recmesh_trainer::ModelReport> {
    use recmesh_trainer::grpc;
    let started = Instant::now();
    let (mesh, gateway) = match gateway {
        Some(g) => (None, g),
        None => {
            let (data, root) = grpc::prepare(split, Some(ranker), &dir)?;
            eprintln!(
                "--grpc: training data and bundle written to {} ({:.1}s); starting recmesh up",
                dir.display(),
                started.elapsed().as_secs_f64()
            );
            let mesh = grpc::MeshProcess::start(&data, &root)?;
            let g = mesh.gateway.clone();
            (Some(mesh), g)
        }
    };
    let mut users: Vec<String> = split.test.keys().cloned().collect();
    users.sort();
    let asked = Instant::now();
    let answers = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(grpc::recommend_all(&gateway, &users, k, seed))?;
    drop(mesh);
    eprintln!(
        "--grpc: {} Recommend calls to {gateway} in {:.1}s: {} degraded, {} cached",
        users.len(),
        asked.elapsed().as_secs_f64(),
        answers.degraded,
        answers.cached
    );
    let name = "served over gRPC (recmesh up, Recommend, no client exclusions)".to_owned();
    let mut rows = recmesh_trainer::evaluate_lists(split, k, &[(name, answers.lists)]);
    rows.pop()
        .ok_or_else(|| anyhow::anyhow!("--grpc: nothing evaluated"))
}

fn print_report(report: &Report) {
    println!("{}", report.markdown());
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::ExportEvents {
            redis,
            key_prefix,
            group,
            out,
            follow,
        } => {
            let export = recmesh_features::redis::Export {
                url: redis,
                key_prefix,
                group,
                consumer: format!("trainer-{}", std::process::id()),
                out,
                follow,
            };
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let written = runtime.block_on(recmesh_features::redis::export_stream(&export))?;
            eprintln!("exported {written} events to {}", export.out.display());
            Ok(())
        }
        Command::Bundle {
            input,
            out,
            factors,
            iterations,
            threads,
            no_ranker,
            eval,
            quiet,
            ann,
        } => {
            let ann = ann.params(HnswParams::default().ef)?;
            let started = Instant::now();
            let data = input.read()?;
            eprintln!(
                "{} items, {} interactions ({:.1}s)",
                data.items.len(),
                data.interactions.len(),
                started.elapsed().as_secs_f64()
            );
            let options = recmesh_trainer::publish::BundleOptions {
                build: recmesh_catalog::bundle::BuildParams {
                    als: recmesh_algo::als::AlsParams {
                        factors,
                        iterations,
                        threads: threads.max(1),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                ranker: !no_ranker,
                evaluate_k: eval.then_some(input.k),
            };
            let mut progress = recmesh_trainer::progress::Progress::new(quiet);
            let mut bundle = recmesh_trainer::publish::make_bundle(&data, &options, &mut progress)?;
            progress.start("write, vector index, publish", 0);
            let dir = recmesh_trainer::publish::publish(&mut bundle, &out, &ann)?;
            let table = progress.table();
            if !quiet {
                eprintln!("\n{table}");
            }
            println!(
                "published {} ({} items, {} users with vectors, ranker: {}) in {:.1}s",
                dir.display(),
                bundle.manifest.items,
                bundle.manifest.users,
                if bundle.ranker.is_some() {
                    "learned"
                } else {
                    "baseline"
                },
                started.elapsed().as_secs_f64()
            );
            for (name, value) in &bundle.manifest.metrics {
                println!("  {name} = {value:.4}");
            }
            Ok(())
        }
        Command::Eval {
            input,
            seed,
            out,
            rules,
            grpc,
            gateway,
            grpc_dir,
        } => {
            let started = Instant::now();
            let mut overrides = HashMap::new();
            for rule in &rules {
                let (key, value) = rule.split_once('=').ok_or_else(|| {
                    anyhow::anyhow!("--rule `{rule}`: expected KEY=VALUE, e.g. brand_cap=0")
                })?;
                overrides.insert(key.trim().to_owned(), value.trim().to_owned());
            }
            let served = recmesh_algo::rerank::RerankRules::default()
                .with(&overrides)
                .map_err(|e| anyhow::anyhow!("--rule: {e}"))?;
            let variants = variants_with(&served, &rules.join(", "));
            let (_, mut split) = input.load()?;
            if grpc {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)?
                    .as_millis() as i64;
                let delta = recmesh_trainer::grpc::shift_to_now(&mut split, now);
                eprintln!(
                    "--grpc: the split shifted by {:.1} days to end now",
                    delta as f64 / 86_400_000.0
                );
            }
            let ranker = recmesh_trainer::train_ranker(&split)?;
            eprintln!(
                "ranker trained on {} rows from {} users ({:.1}s)",
                ranker.rows,
                ranker.users,
                started.elapsed().as_secs_f64()
            );
            let mut report = evaluate(&split, input.k, seed, &variants, Some(&ranker))?;
            if grpc {
                let row = served_over_grpc(
                    &split,
                    &ranker,
                    input.k,
                    seed,
                    gateway,
                    grpc_dir.unwrap_or_else(|| {
                        std::env::temp_dir()
                            .join(format!("recmesh-eval-grpc-{}", split.fingerprint))
                    }),
                )?;
                report.models.push(row);
            }
            print_report(&report);
            eprintln!("evaluated in {:.1}s", started.elapsed().as_secs_f64());
            if let Some(dir) = out {
                std::fs::create_dir_all(&dir)?;
                std::fs::write(dir.join("report.md"), report.markdown())?;
                std::fs::write(
                    dir.join("report.json"),
                    serde_json::to_string_pretty(&report)?,
                )?;
                // The learned ranker, loadable by the ranking service (`model_path`,
                // `recmesh up --ranking-model`).
                std::fs::write(dir.join("ranker.txt"), &ranker.model_text)?;
            }
            Ok(())
        }
        Command::AnnBench {
            input,
            ann,
            dir,
            reuse,
            ef,
            acorn,
            head,
            fetch,
            sweep_head,
            sweep_fetch,
            queries,
            top,
            factors,
            iterations,
            report,
            qdrant_url,
        } => {
            let mips = |head, fetch| recmesh_vector::mips::MipsParams { head, fetch };
            let data = input.read()?;
            let opts = recmesh_trainer::ann_bench::BenchOptions {
                dir,
                reuse,
                params: ann.params(ef.first().copied().unwrap_or(128))?,
                efs: ef,
                acorn: (acorn >= 0.0).then_some(acorn),
                mips: mips(head, fetch.max(1)),
                sweep: sweep_head
                    .iter()
                    .flat_map(|&h| sweep_fetch.iter().map(move |&f| mips(h, f.max(1))))
                    .collect(),
                queries,
                k: top,
                als: recmesh_algo::als::AlsParams {
                    factors,
                    iterations,
                    ..Default::default()
                },
                qdrant_url,
            };
            let r = recmesh_trainer::ann_bench::run(&data, &opts)?;
            let md = r.markdown();
            println!("{md}");
            if let Some(path) = report {
                std::fs::write(path.with_extension("json"), serde_json::to_vec_pretty(&r)?)?;
                std::fs::write(path.with_extension("md"), md)?;
            }
            Ok(())
        }
        Command::ExportSplit { input, out } => {
            let (_, split) = input.load()?;
            std::fs::create_dir_all(&out)?;
            let mut train = String::from("user\titem\tstrength\n");
            for e in &split.train.interactions {
                train.push_str(&format!("{}\t{}\t{}\n", e.user, e.item, e.kind.weight()));
            }
            std::fs::write(out.join("train.tsv"), train)?;
            // For tuning on the validation period: the training period
            // alone, and each validation user's items.
            let mut train_only = String::from("user\titem\tstrength\n");
            for e in &split.train_only.interactions {
                train_only.push_str(&format!("{}\t{}\t{}\n", e.user, e.item, e.kind.weight()));
            }
            std::fs::write(out.join("train_only.tsv"), train_only)?;
            let mut valid: Vec<(&String, Vec<&str>)> = split
                .valid
                .iter()
                .map(|(u, items)| {
                    let mut items: Vec<&str> = items.iter().map(String::as_str).collect();
                    items.sort();
                    (u, items)
                })
                .collect();
            valid.sort();
            let valid: String = valid
                .iter()
                .map(|(u, items)| format!("{u}\t{}\n", items.join(",")))
                .collect();
            std::fs::write(out.join("valid.tsv"), valid)?;
            let mut users: Vec<&String> = split.test.keys().collect();
            users.sort();
            let users: Vec<&str> = users.into_iter().map(String::as_str).collect();
            std::fs::write(out.join("test_users.txt"), users.join("\n") + "\n")?;
            eprintln!(
                "wrote {} training interactions and {} test users to {}",
                split.train.interactions.len(),
                users.len(),
                out.display()
            );
            Ok(())
        }
        Command::ScoreLists { input, lists } => {
            let (_, split) = input.load()?;
            let mut named = Vec::new();
            for path in &lists {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                let mut by_user: HashMap<String, Vec<String>> = HashMap::new();
                for (n, line) in text.lines().enumerate() {
                    let Some((user, items)) = line.split_once('\t') else {
                        anyhow::bail!(
                            "{}:{}: expected `user<TAB>item,item,...`",
                            path.display(),
                            n + 1
                        );
                    };
                    by_user.insert(
                        user.to_owned(),
                        items
                            .split(',')
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect(),
                    );
                }
                let name = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("lists")
                    .to_owned();
                named.push((name, by_user));
            }
            let report = Report {
                protocol: split.protocol.describe(),
                data_fingerprint: split.fingerprint.clone(),
                seed: 0,
                k: input.k,
                models: recmesh_trainer::evaluate_lists(&split, input.k, &named),
                ranker: None,
            };
            print_report(&report);
            Ok(())
        }
        Command::AlsTime {
            input,
            factors,
            iterations,
            threads,
        } => {
            let (_, split) = input.load()?;
            let (matrix, users, items) = recmesh_trainer::interaction_matrix(&split.train);
            let params = recmesh_algo::als::AlsParams {
                factors,
                iterations,
                threads,
                ..Default::default()
            };
            let started = Instant::now();
            let model = recmesh_algo::als::train(&matrix, items.len(), &params);
            let seconds = started.elapsed().as_secs_f64();
            println!(
                "recmesh ALS: {} users x {} items, {} non-zeros, {factors} factors, {iterations} iterations, {threads} threads: {seconds:.2}s",
                users.len(),
                items.len(),
                matrix.indices.len()
            );
            std::hint::black_box(model);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_logs_add_each_event_once_and_only_catalog_items() {
        let mut data = recmesh_catalog::demo::generate(&DemoSpec {
            items: 5,
            users: 2,
            interactions: 10,
            ..DemoSpec::default()
        });
        let before = data.interactions.len();
        let dir =
            std::env::temp_dir().join(format!("recmesh-trainer-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("events.tsv");
        std::fs::write(
            &path,
            format!(
                "{}e1\tu9\ti1\tpurchase\t1700000000000\ne1\tu9\ti1\tpurchase\t1700000000000\n\
                 e2\tu9\tnot-in-catalog\tview\t1700000000001\ne3\tu9\ti2\tview",
                recmesh_features::log::HEADER
            ),
        )
        .expect("write");
        let added = add_events(&mut data, &[path]).expect("read");
        assert_eq!(
            (added.added, added.duplicates, added.unknown_items),
            (1, 1, 1)
        );
        assert_eq!(
            data.interactions.len(),
            before + 1,
            "the torn last line is not read"
        );
        assert!(
            data.interactions
                .iter()
                .any(|e| e.user == "u9" && e.item == "i1")
        );
        let err = add_events(&mut data, &[dir.join("missing.tsv")])
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("--events: "), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! `recmesh`: run the whole mesh (`up`), call it (`recommend`, `similar`,
//! `trending`, `track`), or write demo data (`gen-data`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand};
use recmesh::{PortPlan, client};
use recmesh_catalog::Dataset;
use recmesh_catalog::bundle;
use recmesh_catalog::demo::DemoSpec;
use recmesh_catalog::files::{DataSource, write_dir};
use recmesh_proto::v1 as pb;

#[derive(Parser)]
#[command(
    name = "recmesh",
    version,
    about = "recmesh: a recommendation serving mesh"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct AdminTarget {
    /// Experiments service address.
    #[arg(
        long,
        env = "RECMESH_EXPERIMENTS",
        default_value = "http://127.0.0.1:50055",
        global = true
    )]
    experiments: String,
    /// Admin bearer token (the service's admin_token).
    #[arg(
        long,
        env = "RECMESH_ADMIN_TOKEN",
        default_value = "",
        hide_env_values = true,
        global = true
    )]
    token: String,
}

#[derive(Subcommand, Clone)]
enum ExperimentAction {
    /// Every experiment with its variants.
    List,
    /// Create or replace the experiments of a TOML file (`[[experiments]]`).
    Put {
        /// The file.
        file: PathBuf,
    },
    /// Set a status: draft, running, paused or stopped.
    Status {
        /// Experiment id.
        id: String,
        /// New status.
        status: String,
    },
    /// Delete an experiment.
    Delete {
        /// Experiment id.
        id: String,
    },
    /// Per-variant impressions, clicks, conversions, lift and p-values.
    Results {
        /// Experiment id.
        id: String,
    },
}

#[derive(clap::Args, Clone)]
struct DemoArgs {
    /// Load items.tsv and interactions.tsv from this directory instead of
    /// generating demo data.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Demo catalog size.
    #[arg(long, default_value_t = DemoSpec::default().items)]
    items: u32,
    /// Demo users.
    #[arg(long, default_value_t = DemoSpec::default().users)]
    users: u32,
    /// Demo interactions.
    #[arg(long, default_value_t = DemoSpec::default().interactions)]
    interactions: u64,
    /// Demo generator seed.
    #[arg(long, default_value_t = DemoSpec::default().seed)]
    seed: u64,
}

impl DemoArgs {
    /// The dataset these arguments name: `--data-dir`, else the demo.
    fn source(&self) -> DataSource {
        DataSource {
            dir: self
                .data_dir
                .as_ref()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
            demo: self.spec(),
        }
    }

    fn spec(&self) -> DemoSpec {
        DemoSpec {
            items: self.items,
            users: self.users,
            interactions: self.interactions,
            seed: self.seed,
            ..DemoSpec::default()
        }
    }
}

#[derive(clap::Args)]
struct Target {
    /// Gateway address.
    #[arg(
        long,
        env = "RECMESH_GATEWAY",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    gateway: String,
}

#[derive(Subcommand)]
enum Command {
    /// Start all six services on loopback with embedded defaults and demo data.
    Up {
        #[command(flatten)]
        demo: DemoArgs,
        /// Gateway port; the stages take the next five ports, admin ports are
        /// 1000 above each. 0 picks free ports.
        #[arg(long, default_value_t = PortPlan::DEFAULT.base)]
        port: u16,
        /// LightGBM text model for the ranking service (default: the
        /// bundle's ranker).
        #[arg(long)]
        ranking_model: Option<PathBuf>,
        /// Model bundle root to serve (`recmesh-trainer bundle --out DIR`);
        /// bundles published there later are swapped in while the mesh
        /// runs. Default: `bundles` in the state folder, trained at start
        /// when it holds no bundle for this data.
        #[arg(long, conflicts_with = "no_train")]
        bundle: Option<PathBuf>,
        /// Train nothing: retrieval builds CF and lists from the data at
        /// start (no ALS) and ranking serves the baseline formula.
        #[arg(long)]
        no_train: bool,
        /// Event log of the features service (default: `events.tsv` in
        /// --data-dir, or in a temp folder named after the demo data). Events
        /// tracked in one run are replayed at the next start.
        #[arg(long)]
        events: Option<PathBuf>,
        /// Keep features and the event log in this Redis
        /// (`redis://host:port`) instead of in memory.
        #[arg(long, conflicts_with = "events")]
        redis: Option<String>,
        /// Experiments file served at the first start (when the state
        /// folder holds no saved experiments); default: the built-in demo
        /// experiment `candidate-count`. An empty file serves none.
        #[arg(long)]
        experiments: Option<PathBuf>,
    },
    /// Recommendations for a user.
    Recommend {
        /// User id (demo users are u0, u1, ...; any new id is a cold-start user).
        #[arg(long)]
        user: String,
        /// Items wanted.
        #[arg(long, default_value_t = 10)]
        count: u32,
        /// Category being browsed.
        #[arg(long)]
        category: Option<String>,
        /// Item being viewed (product page).
        #[arg(long)]
        anchor: Option<String>,
        /// Item ids to leave out, comma-separated.
        #[arg(long, value_delimiter = ',')]
        exclude: Vec<String>,
        /// Bypass the response cache.
        #[arg(long)]
        debug: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Items similar to an item.
    Similar {
        /// Item id.
        #[arg(long)]
        item: String,
        #[arg(long, default_value_t = 10)]
        count: u32,
        #[command(flatten)]
        target: Target,
    },
    /// Popular items, overall or in one category.
    Trending {
        /// Category (default: the whole catalog).
        #[arg(long)]
        category: Option<String>,
        #[arg(long, default_value_t = 10)]
        count: u32,
        #[command(flatten)]
        target: Target,
    },
    /// Record an event.
    Track {
        #[arg(long)]
        user: String,
        #[arg(long)]
        item: String,
        /// view, click, add_to_cart or purchase.
        #[arg(long, default_value = "view")]
        event: String,
        /// Unique event id (default: generated).
        #[arg(long)]
        event_id: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// The experiments admin API, as an A/B platform uses it.
    Experiments {
        #[command(subcommand)]
        action: ExperimentAction,
        #[command(flatten)]
        admin: AdminTarget,
    },
    /// Synthetic traffic: demo users u0.. ask for recommendations and click
    /// with a position-biased model that favours each user's first-shown
    /// category; then the experiment's results.
    Simulate {
        /// Users u0 .. u{users-1}.
        #[arg(long, default_value_t = 500)]
        users: u32,
        /// Recommendations per user.
        #[arg(long, default_value_t = 4)]
        rounds: u32,
        /// Seed of the click draws.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Users of this variant click less (a simulated CTR drop)...
        #[arg(long)]
        drop_variant: Option<String>,
        /// ...by this share, 0..1.
        #[arg(long, default_value_t = 0.3)]
        drop: f64,
        /// Print this experiment's results at the end.
        #[arg(long)]
        experiment: Option<String>,
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        admin: AdminTarget,
    },
    /// The proof of the experiment statistics, offline: many simulated
    /// A/A, A/B and broken-split experiments through the real results code
    /// (per-user tests, always-valid guardrail, SRM, CUPED) beside the old
    /// impression-level rule. Prints Markdown tables (docs/experiments.md).
    AbSim {
        /// Experiments per A/A and A/B scenario.
        #[arg(long, default_value_t = 1_000)]
        runs: usize,
        /// Experiments per SRM row.
        #[arg(long, default_value_t = 200)]
        srm_runs: usize,
        /// Users per experiment.
        #[arg(long, default_value_t = 10_000)]
        users: usize,
        /// Results polls over each experiment's horizon.
        #[arg(long, default_value_t = 200)]
        looks: usize,
        /// The A/B variant's relative CTR change, e.g. -0.1.
        #[arg(long, default_value_t = -0.1, allow_hyphen_values = true)]
        effect: f64,
        /// Users per experiment of the SRM rows, comma-separated.
        #[arg(long, default_value = "5000,10000,20000,40000", value_delimiter = ',')]
        srm_users: Vec<usize>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Threads (default: the machine's cores).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// The serving pipeline called in process (no gRPC): the baseline the
    /// mesh's throughput is compared with.
    BenchInProcess {
        #[command(flatten)]
        demo: DemoArgs,
        /// Pipelines to run.
        #[arg(long, default_value_t = 20_000)]
        requests: usize,
        /// Threads.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// Measure Recommend latency against a running gateway (closed loop).
    Bench {
        /// Requests to send.
        #[arg(long, default_value_t = 2_000)]
        requests: usize,
        /// Concurrent workers.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Users to cycle through (u0..).
        #[arg(long, default_value_t = DemoSpec::default().users)]
        users: u32,
        #[command(flatten)]
        target: Target,
    },
    /// Freshness: Track a view for a new user, then Recommend until a
    /// history-based candidate appears; p50/p99 of both.
    Freshness {
        /// New users to try, one after another.
        #[arg(long, default_value_t = 300)]
        samples: usize,
        #[command(flatten)]
        target: Target,
    },
    /// Write the demo dataset as TSV files.
    GenData {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        demo: DemoArgs,
    },
}

fn event_type(name: &str) -> anyhow::Result<pb::EventType> {
    let kind = recmesh_catalog::EventKind::parse(name).ok_or_else(|| {
        anyhow::anyhow!("--event: `{name}` is not one of view, click, add_to_cart, purchase")
    })?;
    Ok(recmesh_mesh::convert::event_type(kind))
}

fn status_error(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    recmesh_server::exit_code(run(Cli::parse()).await)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up {
            demo,
            port,
            ranking_model,
            no_train,
            bundle,
            events,
            redis,
            experiments,
        } => {
            let models = Models {
                ranking_model,
                bundle,
                no_train,
            };
            up(demo, port, models, events, redis, experiments).await
        }
        Command::Recommend {
            user,
            count,
            category,
            anchor,
            exclude,
            debug,
            target,
        } => {
            let mut c = client::connect(&target.gateway).await?;
            let r = c
                .recommend(pb::RecommendRequest {
                    user_id: user,
                    context: Some(pb::RequestContext {
                        category: category.unwrap_or_default(),
                        anchor_item_id: anchor.unwrap_or_default(),
                        page: "cli".into(),
                        device: "terminal".into(),
                    }),
                    count,
                    exclude_item_ids: exclude,
                    filters: None,
                    debug,
                })
                .await
                .map_err(status_error)?;
            print!("{}", client::render(r.get_ref()));
            Ok(())
        }
        Command::Similar {
            item,
            count,
            target,
        } => {
            let mut c = client::connect(&target.gateway).await?;
            let r = c
                .similar_items(pb::SimilarItemsRequest {
                    item_id: item,
                    count,
                    ..Default::default()
                })
                .await
                .map_err(status_error)?;
            print!("{}", client::render(r.get_ref()));
            Ok(())
        }
        Command::Trending {
            category,
            count,
            target,
        } => {
            let mut c = client::connect(&target.gateway).await?;
            let r = c
                .trending(pb::TrendingRequest {
                    category: category.unwrap_or_default(),
                    count,
                })
                .await
                .map_err(status_error)?;
            print!("{}", client::render(r.get_ref()));
            Ok(())
        }
        Command::Track {
            user,
            item,
            event,
            event_id,
            target,
        } => {
            let event_type = event_type(&event)?;
            let mut c = client::connect(&target.gateway).await?;
            let event_id = event_id.unwrap_or_else(recmesh_server::layers::new_request_id);
            let r = c
                .track(pb::TrackRequest {
                    event_id: event_id.clone(),
                    user_id: user.clone(),
                    item_id: item.clone(),
                    event_type: event_type as i32,
                    timestamp_ms: 0,
                })
                .await
                .map_err(status_error)?;
            let r = r.get_ref();
            if r.applied || r.buffered {
                println!("recorded {event} of {item} by {user} (event {event_id})");
                if r.buffered {
                    println!(
                        "  the feature store is unreachable: the event is buffered on disk and applied when it is back"
                    );
                }
                if r.new_item {
                    println!("  {item} is not in the catalog yet: counted as a new item");
                }
            } else {
                println!("event {event_id} was already recorded; nothing applied twice");
            }
            Ok(())
        }
        Command::BenchInProcess {
            demo,
            requests,
            threads,
        } => {
            let source = demo.source();
            let data = source.load()?;
            let built = Instant::now();
            let r = recmesh_trainer::in_process_throughput(&data, requests, threads)?;
            let q = |p: f64| {
                let i = ((r.latencies.len() as f64 - 1.0) * p).round() as usize;
                r.latencies.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
            };
            println!(
                "{} pipelines on {threads} threads in {:.1}s (stages built and run in {:.1}s): {:.0}/s; per pipeline p50 {:.2} ms, p99 {:.2} ms",
                r.requests,
                r.elapsed.as_secs_f64(),
                built.elapsed().as_secs_f64(),
                r.requests as f64 / r.elapsed.as_secs_f64(),
                q(0.5),
                q(0.99)
            );
            Ok(())
        }
        Command::Experiments { action, admin } => {
            let mut a = recmesh::ab::Admin::connect(&admin.experiments, &admin.token).await?;
            match action {
                ExperimentAction::List => {
                    for e in a.list().await? {
                        print!("{}", recmesh::ab::render_experiment(&e));
                    }
                }
                ExperimentAction::Put { file } => {
                    let text = std::fs::read_to_string(&file)
                        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
                    for (id, version) in a.put_file(&text).await? {
                        println!("{id}: accepted as version {version}");
                    }
                }
                ExperimentAction::Status { id, status } => {
                    print!(
                        "{}",
                        recmesh::ab::render_experiment(&a.set_status(&id, &status).await?)
                    );
                }
                ExperimentAction::Delete { id } => {
                    a.delete(&id).await?;
                    println!("{id}: deleted");
                }
                ExperimentAction::Results { id } => {
                    print!("{}", recmesh::ab::render_results(&a.results(&id).await?));
                }
            }
            Ok(())
        }
        Command::AbSim {
            runs,
            srm_runs,
            users,
            looks,
            effect,
            srm_users,
            seed,
            threads,
        } => {
            anyhow::ensure!(
                runs > 0 && srm_runs > 0,
                "--runs, --srm-runs: must be at least 1"
            );
            anyhow::ensure!(users >= 2, "--users: must be at least 2");
            anyhow::ensure!(looks >= 1, "--looks: must be at least 1");
            anyhow::ensure!(
                effect > -1.0 && effect.is_finite(),
                "--effect: must be above -1 (-0.1 is a 10% drop)"
            );
            let suite = recmesh_experiments::simulation::Suite {
                runs,
                srm_runs,
                users,
                looks,
                effect,
                srm_users,
                seed,
                threads: threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            };
            let started = std::time::Instant::now();
            let report = suite
                .run(|what| eprintln!("ab-sim: {what} ({:.0} s)", started.elapsed().as_secs_f64()));
            print!("{report}");
            eprintln!("ab-sim: done in {:.0} s", started.elapsed().as_secs_f64());
            Ok(())
        }
        Command::Simulate {
            users,
            rounds,
            seed,
            drop_variant,
            drop,
            experiment,
            target,
            admin,
        } => {
            anyhow::ensure!((0.0..1.0).contains(&drop), "--drop: must be in 0..1");
            let spec = recmesh::ab::SimSpec {
                users,
                rounds,
                seed,
                drop: drop_variant.map(|v| (v, drop)),
            };
            let report = recmesh::ab::simulate(&target.gateway, &spec).await?;
            println!(
                "{} recommendations, {} clicks, {} purchases, {} errors",
                report.recommends, report.clicks, report.purchases, report.errors
            );
            for e in &report.first_errors {
                println!("  error: {e}");
            }
            let mut by: Vec<_> = report.by_variant.iter().collect();
            by.sort();
            for ((e, v), n) in by {
                println!("  {e} = {v}: {n} answers");
            }
            if let Some(id) = experiment {
                // The results attribute clicks 2 s after they happen.
                tokio::time::sleep(std::time::Duration::from_millis(3_000)).await;
                let mut a = recmesh::ab::Admin::connect(&admin.experiments, &admin.token).await?;
                print!("\n{}", recmesh::ab::render_results(&a.results(&id).await?));
            }
            Ok(())
        }
        Command::Bench {
            requests,
            concurrency,
            users,
            target,
        } => {
            let mut report =
                recmesh::bench::run(&target.gateway, requests, concurrency, users).await?;
            print!("{}", report.render());
            Ok(())
        }
        Command::Freshness { samples, target } => {
            let mut report = recmesh::bench::freshness(&target.gateway, samples).await?;
            print!("{}", report.render());
            Ok(())
        }
        Command::GenData { out, demo } => {
            let started = Instant::now();
            let data = recmesh_catalog::demo::generate(&demo.spec());
            write_dir(&data, &out)?;
            println!(
                "wrote {} items and {} interactions to {} in {:.1}s",
                data.items.len(),
                data.interactions.len(),
                out.display(),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
    }
}

/// Where `up` gets its models.
#[derive(Clone)]
struct Models {
    ranking_model: Option<PathBuf>,
    bundle: Option<PathBuf>,
    no_train: bool,
}

/// Catalogs above this size get no ALS vectors from `up`: the ANN source
/// scans every item (exact search) until the HNSW index (issue #4) lands.
const UP_MAX_ALS_ITEMS: usize = 200_000;

/// The bundle root `up` serves: `--bundle`, or `state_dir/bundles` with a
/// bundle trained now unless one for this data is there.
fn bundle_for_up(data: &Dataset, state_dir: &Path, models: &Models) -> anyhow::Result<PathBuf> {
    if let Some(root) = &models.bundle {
        let dir = bundle::current(root).ok_or_else(|| {
            anyhow::anyhow!(
                "--bundle: no bundle at {}/{}; publish one with `recmesh-trainer bundle --out {}`",
                root.display(),
                bundle::CURRENT,
                root.display()
            )
        })?;
        eprintln!("model bundle: {}", dir.display());
        return Ok(root.clone());
    }
    let root = state_dir.join("bundles");
    let fingerprint = data.fingerprint();
    if let Some(dir) = bundle::current(&root) {
        match bundle::Manifest::read(&dir) {
            Ok(m) if m.data_fingerprint == fingerprint => {
                eprintln!("model bundle: {} (built for this data)", dir.display());
                return Ok(root);
            }
            Ok(_) => eprintln!(
                "model bundle: {} was built from other data; training a new one",
                dir.display()
            ),
            Err(e) => eprintln!("model bundle: {e}; training a new one"),
        }
    }
    let mut build = bundle::BuildParams::default();
    if data.items.len() > UP_MAX_ALS_ITEMS {
        eprintln!(
            "model bundle: {} items: no ALS vectors (their HNSW index over more than {UP_MAX_ALS_ITEMS} items takes minutes to build; publish one with `recmesh-trainer bundle` and serve it with --bundle)",
            data.items.len()
        );
        build.als.factors = 0;
    }
    let options = recmesh_trainer::publish::BundleOptions {
        build,
        ranker: true,
        evaluate_k: None,
    };
    let started = Instant::now();
    let mut progress = recmesh_trainer::progress::Progress::new(false);
    let mut b = recmesh_trainer::publish::make_bundle(data, &options, &mut progress)?;
    let dir = recmesh_trainer::publish::publish(&mut b, &root, &Default::default())?;
    eprintln!(
        "model bundle: trained and published {} ({:.1}s)",
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(root)
}

async fn up(
    demo: DemoArgs,
    port: u16,
    models: Models,
    events: Option<PathBuf>,
    redis: Option<String>,
    experiments: Option<PathBuf>,
) -> anyhow::Result<()> {
    recmesh_server::telemetry::init_tracing();
    let source = demo.source();
    let started = Instant::now();
    let data = Arc::new(source.load()?);
    let what = if source.dir.is_empty() {
        "demo data"
    } else {
        source.dir.as_str()
    };
    eprintln!(
        "loaded {what}: {} items, {} interactions ({:.1}s)",
        data.items.len(),
        data.interactions.len(),
        started.elapsed().as_secs_f64()
    );
    let mut stages = recmesh::StageConfigs {
        // Each service on its own runtime, as six processes would run.
        threads: recmesh::Threads::PerService,
        ..Default::default()
    };
    let state_dir = demo
        .data_dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("recmesh-{}", data.fingerprint())));
    if let Some(url) = redis {
        stages.features.backend = recmesh_features::Backend::Redis;
        stages.features.redis.url = url;
        stages.features.redis.buffer_path = state_dir.join("features-buffer.tsv");
        eprintln!("features: redis at {}", stages.features.redis.url);
    } else {
        stages.features.event_log.path = events.unwrap_or_else(|| state_dir.join("events.tsv"));
        stages.features.event_log.exposures_path = stages
            .features
            .event_log
            .path
            .with_file_name("exposures.jsonl");
        eprintln!(
            "features: in memory, event log {}",
            stages.features.event_log.path.display()
        );
    }
    stages.experiments.state_dir = state_dir.join("experiments").display().to_string();
    if let Some(file) = &experiments {
        stages.experiments.experiments_file = file.display().to_string();
    }
    eprintln!("experiments: state in {}", stages.experiments.state_dir);
    if !models.no_train {
        let (data, state, task_models) = (data.clone(), state_dir.clone(), models.clone());
        let root = tokio::task::spawn_blocking(move || bundle_for_up(&data, &state, &task_models))
            .await??;
        stages.retrieval.bundle_dir = root.display().to_string();
        stages.ranking.bundle_dir = root.display().to_string();
    }
    if let Some(model) = &models.ranking_model {
        stages.ranking.model_path = model.display().to_string();
    }
    let mesh = recmesh::start(data, PortPlan { base: port }, stages, |_| {})
        .await
        .map_err(|e| match e {
            recmesh::UpError::Serve(recmesh_server::ServeError::Bind { .. }) => {
                anyhow::anyhow!("{e}. Another mesh may be running: stop it, or pass --port.")
            }
            e => e.into(),
        })?;
    let gw = mesh.gateway_addr();
    println!(
        "\nrecmesh is up ({:.1}s). Services (gRPC, admin):",
        started.elapsed().as_secs_f64()
    );
    println!(
        "  {:<12} {:<18} http://{}/metrics",
        "gateway", mesh.gateway.grpc_addr, mesh.gateway.admin_addr
    );
    for h in mesh.stages.all() {
        println!(
            "  {:<12} {:<18} http://{}/metrics",
            h.name, h.grpc_addr, h.admin_addr
        );
    }
    let flag = if port == PortPlan::DEFAULT.base {
        String::new()
    } else {
        format!(" --gateway http://{gw}")
    };
    println!("\nTry, in another terminal:");
    println!("  cargo run --release -p recmesh -- recommend --user u42{flag}");
    println!(
        "  cargo run --release -p recmesh -- track --user u42 --item i7 --event purchase{flag}"
    );
    println!("  cargo run --release -p recmesh -- trending --category books{flag}");
    println!(
        "  grpcurl -plaintext -d '{{\"user_id\":\"u42\",\"count\":5}}' {gw} recmesh.v1.Gateway/Recommend"
    );
    println!("\nCtrl-C stops the mesh.");
    recmesh_server::shutdown_signal().await;
    mesh.shutdown().await?;
    eprintln!("recmesh stopped");
    Ok(())
}

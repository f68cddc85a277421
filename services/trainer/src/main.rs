//! `recmesh-trainer`: offline evaluation of recmesh's models and of the
//! served pipeline.

use std::path::PathBuf;
use std::time::Instant;

use clap::{Parser, Subcommand, ValueEnum};
use recmesh_catalog::demo::DemoSpec;
use recmesh_trainer::{Protocol, Split, default_variants, evaluate};

#[derive(Parser)]
#[command(
    name = "recmesh-trainer",
    version,
    about = "recmesh's batch job: offline evaluation"
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

#[derive(Subcommand)]
enum Command {
    /// Train the ranker on the validation period, then evaluate popularity,
    /// item-CF and the served pipeline (baseline and learned ranker, MMR and
    /// exploration on and off) on test.
    Eval {
        /// RecBole atomic files directory (e.g. data/ml-100k from
        /// services/trainer/scripts/fetch-movielens.sh).
        #[arg(long, conflicts_with = "data")]
        recbole: Option<PathBuf>,
        /// Dataset name inside --recbole (file stem).
        #[arg(long, default_value = "ml-100k")]
        name: String,
        /// Directory with items.tsv and interactions.tsv (default: the demo data).
        #[arg(long)]
        data: Option<PathBuf>,
        /// Split protocol.
        #[arg(long, value_enum, default_value = "per-user")]
        split: SplitArg,
        /// K of every @K metric.
        #[arg(long, default_value_t = 10)]
        k: usize,
        /// Seed of the exploration draws.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Also write report.json and report.md here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    recmesh_server::exit_code(run(Cli::parse()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Eval {
            recbole,
            name,
            data,
            split,
            k,
            seed,
            out,
        } => {
            anyhow::ensure!((1..=1000).contains(&k), "--k: must be in 1..=1000");
            let started = Instant::now();
            let dataset = match (recbole, data) {
                (Some(dir), _) => recmesh_catalog::recbole::read(&dir, &name)?,
                (None, Some(dir)) => recmesh_catalog::files::read_dir(&dir)?,
                (None, None) => recmesh_catalog::demo::generate(&DemoSpec::default()),
            };
            let protocol = match split {
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
            let ranker = recmesh_trainer::train_ranker(&split)?;
            eprintln!(
                "ranker trained on {} rows from {} users ({:.1}s)",
                ranker.rows,
                ranker.users,
                started.elapsed().as_secs_f64()
            );
            let report = evaluate(&split, k, seed, &default_variants(), Some(&ranker))?;
            let table = report.markdown();
            println!("{table}");
            eprintln!("evaluated in {:.1}s", started.elapsed().as_secs_f64());
            if let Some(dir) = out {
                std::fs::create_dir_all(&dir)?;
                std::fs::write(dir.join("report.md"), &table)?;
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
    }
}

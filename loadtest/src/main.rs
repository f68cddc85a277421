//! `recmesh-loadtest`: open-loop load against the gateway, with an SLO
//! verdict (exit code 1 on a breach) and JSON + HTML reports.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use recmesh_loadtest::{Scenario, connect, html, run, step};

#[derive(Parser)]
#[command(
    name = "recmesh-loadtest",
    about = "Open-loop load test of the recmesh gateway with an SLO verdict"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Common {
    /// Scenario file (default: the built-in default scenario, the same as
    /// loadtest/scenarios/default.toml).
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Gateway address.
    #[arg(
        long,
        env = "RECMESH_GATEWAY",
        default_value = "http://127.0.0.1:50051"
    )]
    gateway: String,
    /// Override the scenario's measured duration, seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Override the scenario's warm-up, seconds.
    #[arg(long)]
    warmup: Option<f64>,
    /// Directory for report.json and report.html.
    #[arg(long, default_value = "loadtest-report")]
    out: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// One run at a constant rate; exit code 1 when the SLO is not met.
    Run {
        #[command(flatten)]
        common: Common,
        /// Override the scenario's rate, requests per second.
        #[arg(long)]
        rate: Option<f64>,
    },
    /// Runs at rising rates until the SLO breaks; reports the highest rate
    /// that held it.
    Step {
        #[command(flatten)]
        common: Common,
        /// First rate.
        #[arg(long, default_value_t = 100.0)]
        from: f64,
        /// Increment.
        #[arg(long, default_value_t = 100.0)]
        step: f64,
        /// Last rate tried.
        #[arg(long, default_value_t = 2000.0)]
        to: f64,
    },
}

fn scenario(c: &Common) -> anyhow::Result<Scenario> {
    let mut s = match &c.scenario {
        Some(p) => Scenario::from_file(p)?,
        None => Scenario::default(),
    };
    if let Some(d) = c.duration {
        s.duration_s = d;
    }
    if let Some(w) = c.warmup {
        s.warmup_s = w;
    }
    s.validate()?;
    Ok(s)
}

fn write(dir: &std::path::Path, name: &str, body: &str) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    let path = dir.join(name);
    std::fs::write(&path, body).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(path)
}

async fn main_result(cli: Cli) -> anyhow::Result<bool> {
    match cli.command {
        Command::Run { common, rate } => {
            let mut s = scenario(&common)?;
            if let Some(r) = rate {
                s.rate = r;
            }
            s.validate()?;
            let clients = connect(&common.gateway).await?;
            eprintln!(
                "load: {:.0}/s for {} s after {} s of warm-up against {}",
                s.rate, s.duration_s, s.warmup_s, common.gateway
            );
            let report = run(&clients, &s).await?;
            print!("{}", report.text());
            let json = write(
                &common.out,
                "report.json",
                &serde_json::to_string_pretty(&report)?,
            )?;
            let page = write(&common.out, "report.html", &html::report(&report))?;
            println!("\nwrote {} and {}", json.display(), page.display());
            Ok(report.verdict.pass)
        }
        Command::Step {
            common,
            from,
            step: inc,
            to,
        } => {
            let s = scenario(&common)?;
            let clients = connect(&common.gateway).await?;
            let reports = step(&clients, &s, from, inc, to).await?;
            let best = reports
                .iter()
                .filter(|r| r.verdict.pass)
                .map(|r| r.offered_rate)
                .fold(None, |a: Option<f64>, b| Some(a.map_or(b, |a| a.max(b))));
            match best {
                Some(b) => println!("highest rate that held the SLO: {b:.0}/s"),
                None => println!("no rate held the SLO (first step: {from:.0}/s)"),
            }
            let json = write(
                &common.out,
                "steps.json",
                &serde_json::to_string_pretty(&reports)?,
            )?;
            let page = write(&common.out, "steps.html", &html::steps(&reports))?;
            println!("wrote {} and {}", json.display(), page.display());
            Ok(best.is_some())
        }
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match main_result(Cli::parse()).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

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
    /// Every Recommend sends `cache-control: no-cache`, so the gateway's
    /// response cache never answers (sets the scenario's `bypass_cache`).
    #[arg(long)]
    bypass_cache: bool,
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
    /// The fault-injection suite: starts the six service binaries and
    /// redis-server as processes, then injects one fault at a time under
    /// load and writes the table (faults.md, faults.json).
    Faults(FaultArgs),
}

#[derive(Args, Clone)]
struct FaultArgs {
    /// Directory of the service binaries (default: beside this one).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Scratch directory for state and logs.
    #[arg(long, default_value = "target/faults")]
    work_dir: PathBuf,
    /// Scenario file for the call mix and users (rate and duration are set here).
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Steady load, requests per second.
    #[arg(long, default_value_t = 40.0)]
    rate: f64,
    /// Total rate during the overload fault (default: 3 × --rate).
    #[arg(long)]
    overload_rate: Option<f64>,
    /// Seconds of load before each fault.
    #[arg(long, default_value_t = 2.0)]
    lead: f64,
    /// Seconds each fault lasts.
    #[arg(long, default_value_t = 3.0)]
    fault: f64,
    /// Seconds of load after the fault is lifted.
    #[arg(long, default_value_t = 6.0)]
    recover: f64,
    /// Seconds of the same load on the fresh mesh before the first row,
    /// reported on its own (every cache starts empty there; 0: none).
    #[arg(long, default_value_t = 5.0)]
    warmup: f64,
    /// Latency added to retrieval's traffic in the latency fault, ms.
    #[arg(long, default_value_t = 50)]
    latency_ms: u64,
    /// Demo catalog items (every service generates the same demo data).
    #[arg(long, default_value_t = 1500)]
    items: u32,
    /// Demo users.
    #[arg(long, default_value_t = 400)]
    users: u32,
    /// Demo interactions.
    #[arg(long, default_value_t = 30000)]
    interactions: u64,
    /// Extra environment, KEY=VALUE for every service or SERVICE:KEY=VALUE
    /// for one, e.g. gateway:RECMESH_BUDGETS__REQUEST_MS=300 (repeatable).
    #[arg(long = "env")]
    env: Vec<String>,
    /// Run only these scenarios (repeatable), e.g. --only "kill-9 retrieval".
    #[arg(long)]
    only: Vec<String>,
    /// Goal: `Recommend`'s p99 in each fault's run, ms. Set FAULTS_TRACE=1
    /// to print every failed or degraded call after each fault is lifted.
    #[arg(long, default_value_t = 200.0)]
    p99_ms: f64,
    /// Goal: recovery after the fault is lifted, ms.
    #[arg(long, default_value_t = 5000)]
    recovery_ms: u64,
    /// Directory for faults.md and faults.json.
    #[arg(long, default_value = "loadtest-report")]
    out: PathBuf,
}

fn fault_spec(a: &FaultArgs) -> anyhow::Result<recmesh_loadtest::faults::Spec> {
    let scenario = match &a.scenario {
        Some(p) => Scenario::from_file(p)?,
        None => Scenario::default(),
    };
    let mut env = Vec::new();
    for kv in &a.env {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--env {kv:?}: expected [SERVICE:]KEY=VALUE"))?;
        let (service, k) = match k.split_once(':') {
            Some((service, k)) => (Some(service.to_owned()), k),
            None => (None, k),
        };
        env.push((service, k.to_owned(), v.to_owned()));
    }
    anyhow::ensure!(a.rate > 0.0, "--rate must be above 0");
    anyhow::ensure!(
        a.lead > 0.0 && a.fault > 0.0 && a.recover > 0.0,
        "--lead, --fault and --recover must be above 0"
    );
    anyhow::ensure!(a.warmup >= 0.0, "--warmup must be 0 or more");
    Ok(recmesh_loadtest::faults::Spec {
        bin_dir: recmesh_loadtest::faults::bin_dir(a.bin_dir.as_deref())?,
        work_dir: a.work_dir.clone(),
        rate: a.rate,
        overload_rate: a.overload_rate.unwrap_or(3.0 * a.rate),
        lead_s: a.lead,
        fault_s: a.fault,
        recover_s: a.recover,
        latency_ms: a.latency_ms,
        demo: (a.items, a.users, a.interactions),
        env,
        only: a.only.clone(),
        scenario,
        warmup_s: a.warmup,
    })
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
    s.bypass_cache |= c.bypass_cache;
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
        Command::Faults(a) => {
            let spec = fault_spec(&a)?;
            let suite = recmesh_loadtest::faults::run(&spec).await?;
            let table = recmesh_loadtest::faults::markdown(&suite, &spec);
            print!("\n{table}");
            let md = write(&a.out, "faults.md", &table)?;
            let rows = suite.rows;
            let json = write(&a.out, "faults.json", &serde_json::to_string_pretty(&rows)?)?;
            if let Some(w) = &suite.warmup {
                write(&a.out, "warmup.json", &serde_json::to_string_pretty(w)?)?;
            }
            println!("\nwrote {} and {}", md.display(), json.display());
            let breaches = recmesh_loadtest::faults::breaches(&rows, a.p99_ms, a.recovery_ms);
            if breaches.is_empty() {
                println!(
                    "goals: PASS (p99 ≤ {} ms, recovery ≤ {} ms, no failed Recommend, no lost event)",
                    a.p99_ms, a.recovery_ms
                );
            } else {
                println!("goals: FAIL");
                for b in &breaches {
                    println!("  {b}");
                }
            }
            // The same recovery check, charging each row only with what its
            // fault can cause: tells a slow recovery from the load's
            // background of late answers. Reported; the goals above decide.
            let misses = recmesh_loadtest::faults::fault_recovery_misses(&rows, a.recovery_ms);
            if misses.is_empty() {
                println!(
                    "faulted stages: every one recovered within {} ms (its last fallback or failure)",
                    a.recovery_ms
                );
            } else {
                println!(
                    "faulted stages: {} not recovered within {} ms",
                    misses.len(),
                    a.recovery_ms
                );
                for m in &misses {
                    println!("  {m}");
                }
            }
            Ok(breaches.is_empty())
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

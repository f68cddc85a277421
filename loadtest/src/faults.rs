//! The fault-injection suite: the six service binaries as separate
//! processes (features on a real `redis-server`, retrieval behind a TCP
//! proxy that can add latency), steady open-loop load, and one fault at a
//! time: kill -9 and restart of each stage, SIGSTOP/SIGCONT of each, Redis
//! down and back, added network latency, overload, and SIGTERM to the
//! gateway. Each scenario is measured separately: failed `Recommend`s, p99,
//! time to recover after the fault is lifted, acknowledged events lost,
//! and calls in flight at the gateway's SIGTERM that failed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

use crate::report::Bad;
use crate::{Report, Scenario};

type Client = recmesh_proto::v1::gateway_client::GatewayClient<tonic::transport::Channel>;

/// What the suite runs and against which binaries.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Directory holding `recmesh-gateway`, `recmesh-retrieval`, ….
    pub bin_dir: PathBuf,
    /// Scratch directory (state, logs, Redis data).
    pub work_dir: PathBuf,
    /// Steady load, requests per second.
    pub rate: f64,
    /// Rate during the overload scenario (total, steady load included).
    pub overload_rate: f64,
    /// Seconds of load before the fault.
    pub lead_s: f64,
    /// Seconds the fault lasts.
    pub fault_s: f64,
    /// Seconds of load after the fault is lifted.
    pub recover_s: f64,
    /// Added latency in the latency scenario, ms.
    pub latency_ms: u64,
    /// Demo catalog every service generates at start (`items`, `users`,
    /// `interactions`).
    pub demo: (u32, u32, u64),
    /// Extra environment: (service, or every service when `None`; key; value).
    pub env: Vec<(Option<String>, String, String)>,
    /// Scenario names to run (empty: all).
    pub only: Vec<String>,
    /// The load's scenario (mix, users, SLO); rate and duration are set here.
    pub scenario: Scenario,
    /// Seconds of the same load on the fresh mesh before the first row (0:
    /// none), reported as [`WarmUp`].
    pub warmup_s: f64,
}

/// The load on the fresh mesh before the first row. Every cache starts
/// empty at once there (the gateway's answers, ranking's item features,
/// the features service's reads), which no row after it sees: without it,
/// whichever row ran first carried that cost. Reported beside the table;
/// a cold start is not one of the faults, so the goals do not judge it.
#[derive(Debug, Clone, Serialize)]
pub struct WarmUp {
    /// Seconds of load.
    pub seconds: f64,
    /// `Recommend`s sent.
    pub recommends: u64,
    /// Calls that failed (any call, any status but OK).
    pub failed: u64,
    /// Share of answers degraded.
    pub degraded_rate: f64,
    /// p99 of `Recommend`, ms.
    pub recommend_p99_ms: f64,
    /// p99 of every call sent in the first second, ms: the cold start.
    pub first_second_p99_ms: f64,
}

/// What the suite measured: the warm-up, then one row per scenario.
#[derive(Debug, Clone, Serialize)]
pub struct Suite {
    /// The warm-up before the first row (`None` with `warmup_s` 0).
    pub warmup: Option<WarmUp>,
    /// One row per scenario, in order.
    pub rows: Vec<Row>,
}

/// One scenario's row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Scenario.
    pub fault: String,
    /// `Recommend`s sent.
    pub recommends: u64,
    /// `Recommend`s that failed (any status but OK).
    pub failed_recommends: u64,
    /// Other calls that failed, by call.
    pub failed_other: BTreeMap<String, u64>,
    /// Share of answers degraded (fallbacks).
    pub degraded_rate: f64,
    /// p99 of `Recommend`, ms: the call the 200 ms promise is about.
    pub recommend_p99_ms: f64,
    /// p99 of every call, ms (a `Track` that cannot be stored fails at its
    /// own 200 ms budget, so this one can exceed 200 ms when `Recommend`'s
    /// does not).
    pub p99_ms: f64,
    /// Share of `Recommend` answers from the gateway's response cache (0
    /// with the suite's default, the cache off).
    pub cache_hit_rate: f64,
    /// From lifting the fault to the last failed or degraded call, ms (0:
    /// nothing bad after it). `None`: still bad at the end of the run.
    pub recovery_ms: Option<u64>,
    /// From lifting the fault until the share of failed or degraded calls,
    /// from then to the end of the run, is no higher than before the fault
    /// (in 100 ms steps, at least 1 s of the run left). The same as
    /// `recovery_ms` when nothing was degraded before the fault; the
    /// measure that means something when the load alone degrades a few
    /// answers. `None`: not within the run.
    pub recovery_to_lead_ms: Option<u64>,
    /// As `recovery_ms`, counting only what the fault itself can cause: a
    /// failed call, or an answer degraded by the faulted stage or by a
    /// stage that calls it ([`fault_fallbacks`]; a degraded answer whose
    /// stages are not recorded counts too). A late answer of another
    /// stage (a `features:anonymous` while the re-ranker restarts) is the
    /// load's background and counts in `recovery_ms` only. `None` in the
    /// baseline, which has no fault.
    pub fault_recovery_ms: Option<u64>,
    /// From the restart command to the restarted process answering its
    /// health check, ms (rows that restart a process). Part of both
    /// recovery figures, which count from the command: the share of them
    /// that is the process's own start, not the mesh finding it again.
    pub restart_ms: Option<u64>,
    /// `Track`s acknowledged.
    pub events_acked: u64,
    /// Acknowledged events not found in the store afterwards.
    pub events_lost: u64,
    /// Events stored beyond those acknowledged (a `Track` that timed out
    /// at the client after the store had it: at-least-once, not a loss).
    pub events_unacked_stored: u64,
    /// Failed calls by status.
    pub failed_by_code: BTreeMap<String, u64>,
    /// Fallbacks after the fault was lifted, by `stage:fallback`.
    pub fallbacks_after: BTreeMap<String, u64>,
    /// Calls sent before the gateway's SIGTERM that failed (SIGTERM only).
    pub inflight_failed: Option<u64>,
}

const STAGES: [&str; 5] = [
    "retrieval",
    "ranking",
    "reranker",
    "experiments",
    "features",
];

/// The names of every scenario, in the order they run.
pub fn scenario_names() -> Vec<String> {
    // First the mesh under the same load with no fault: what the rows
    // below are compared with.
    let mut names = vec!["baseline".to_owned()];
    for s in STAGES {
        names.push(format!("kill-9 {s}"));
    }
    for s in STAGES {
        names.push(format!("sigstop {s}"));
    }
    names.extend(
        [
            "redis down",
            "latency retrieval",
            "overload",
            "sigterm gateway",
        ]
        .map(String::from),
    );
    names
}

/// A port free now, below Linux's default ephemeral range (32768–60999):
/// a port the kernel hands out (`bind(0)`) can be taken by an outgoing
/// connection before the service binds it, and was ("ranking exited during
/// start: Address already in use"). Each process starts at its own offset.
fn free_port() -> anyhow::Result<u16> {
    const FIRST: u16 = 20_000;
    const SPAN: u16 = 12_000;
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let offset = (std::process::id() % u32::from(SPAN)) as u16;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % SPAN;
        let port = FIRST + (offset + n) % SPAN;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port in {FIRST}..{}", FIRST + SPAN)
}

/// A service process.
struct Node {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    admin: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("{}", self.log.display()))?;
        let child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> anyhow::Result<u32> {
        self.child
            .as_ref()
            .and_then(Child::id)
            .with_context(|| format!("{} is not running", self.name))
    }

    async fn signal(&self, sig: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid()?.to_string())
            .status()
            .await?;
        anyhow::ensure!(status.success(), "kill -{sig} {} failed", self.name);
        Ok(())
    }

    async fn kill9(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Waits for the process to exit (after SIGTERM), at most `limit`.
    async fn exited(&mut self, limit: Duration) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            tokio::time::timeout(limit, child.wait())
                .await
                .with_context(|| format!("{} did not exit", self.name))??;
        }
        Ok(())
    }

    /// Waits until `/readyz` answers 200 (the admin port of a recmesh
    /// service), or for Redis until its port accepts.
    /// Starts the process again and waits (at most `limit_s`) until it is
    /// ready; returns how long that took.
    async fn restart(&mut self, limit_s: u64) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.start()?;
        self.ready(Duration::from_secs(limit_s)).await?;
        Ok(started.elapsed())
    }

    async fn ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + limit;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                anyhow::bail!(
                    "{} exited during start ({status}); see {}",
                    self.name,
                    self.log.display()
                );
            }
            if probe(self.admin, self.name == "redis").await {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < until,
                "{} not ready within {:?}; see {}",
                self.name,
                limit,
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn probe(port: u16, tcp_only: bool) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if tcp_only {
        return true;
    }
    let req = "GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut out)).await;
    out.starts_with(b"HTTP/1.1 200")
}

/// A TCP proxy that delays every chunk by the current `delay_ms`.
async fn latency_proxy(upstream: u16, delay_ms: Arc<AtomicU64>) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let delay = delay_ms.clone();
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                    return;
                };
                // Without this, Nagle's algorithm holds small gRPC frames
                // back until the peer's delayed ACK (up to 40 ms): the proxy
                // itself would be the fault.
                if client.set_nodelay(true).is_err() || server.set_nodelay(true).is_err() {
                    return;
                }
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let a = tokio::spawn(pump(cr, sw, delay.clone()));
                let b = tokio::spawn(pump(sr, cw, delay));
                let _ = tokio::join!(a, b);
            });
        }
    });
    Ok(port)
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay_ms: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let d = delay_ms.load(Ordering::Relaxed);
        if d > 0 {
            tokio::time::sleep(Duration::from_millis(d)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The running mesh: six services, Redis, the retrieval proxy.
struct Mesh {
    nodes: Vec<Node>,
    gateway_port: u16,
    redis_port: u16,
    delay_ms: Arc<AtomicU64>,
}

impl Mesh {
    fn node(&mut self, name: &str) -> anyhow::Result<&mut Node> {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name}"))
    }

    async fn start(spec: &Spec) -> anyhow::Result<Mesh> {
        std::fs::create_dir_all(&spec.work_dir)?;
        let dir = |p: &str| spec.work_dir.join(p).display().to_string();
        let redis_port = free_port()?;
        let redis_dir = spec.work_dir.join("redis");
        std::fs::create_dir_all(&redis_dir)?;
        // Every write fsynced, so what Redis acknowledged survives its kill -9.
        let mut nodes = vec![Node {
            name: "redis",
            program: "redis-server".into(),
            args: [
                "--port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--dir",
                &redis_dir.display().to_string(),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ]
            .map(String::from)
            .to_vec(),
            env: Vec::new(),
            admin: redis_port,
            log: spec.work_dir.join("redis.log"),
            child: None,
        }];
        let mut ports = BTreeMap::new();
        for name in STAGES.iter().chain(&["gateway"]) {
            ports.insert(*name, (free_port()?, free_port()?));
        }
        let delay_ms = Arc::new(AtomicU64::new(0));
        let retrieval_proxy = latency_proxy(ports["retrieval"].0, delay_ms.clone()).await?;
        let uri = |name: &str| format!("http://127.0.0.1:{}", ports[name].0);
        let (items, users, interactions) = spec.demo;
        for name in STAGES.iter().chain(&["gateway"]) {
            let (grpc, admin) = ports[name];
            let mut env: Vec<(String, String)> = vec![
                (
                    "RECMESH_SERVER__GRPC_ADDR".into(),
                    format!("127.0.0.1:{grpc}"),
                ),
                (
                    "RECMESH_SERVER__ADMIN_ADDR".into(),
                    format!("127.0.0.1:{admin}"),
                ),
                ("RECMESH_LOG".into(), "warn".into()),
            ];
            let mut set = |k: &str, v: String| env.push((k.to_owned(), v));
            if matches!(*name, "retrieval" | "features" | "gateway") {
                set("RECMESH_DATA__DEMO__ITEMS", items.to_string());
                set("RECMESH_DATA__DEMO__USERS", users.to_string());
                set("RECMESH_DATA__DEMO__INTERACTIONS", interactions.to_string());
            }
            match *name {
                "retrieval" | "ranking" | "experiments" => {
                    set("RECMESH_FEATURES_ADDR", uri("features"));
                }
                _ => {}
            }
            match *name {
                "features" => {
                    set("RECMESH_BACKEND", "redis".into());
                    set(
                        "RECMESH_REDIS__URL",
                        format!("redis://127.0.0.1:{redis_port}"),
                    );
                    set("RECMESH_REDIS__BUFFER_PATH", dir("features-buffer.tsv"));
                    set("RECMESH_EVENT_LOG__PATH", dir("events.tsv"));
                    set("RECMESH_EVENT_LOG__EXPOSURES_PATH", dir("exposures.jsonl"));
                }
                "experiments" => set("RECMESH_STATE_DIR", dir("experiments")),
                "gateway" => {
                    set(
                        "RECMESH_UPSTREAMS__RETRIEVAL",
                        format!("http://127.0.0.1:{retrieval_proxy}"),
                    );
                    for up in ["ranking", "reranker", "experiments", "features"] {
                        set(
                            &format!("RECMESH_UPSTREAMS__{}", up.to_uppercase()),
                            uri(up),
                        );
                    }
                    // Every answer computed: a cached one would hide faults.
                    set("RECMESH_CACHE__TTL_MS", "0".into());
                }
                _ => {}
            }
            env.extend(
                spec.env
                    .iter()
                    .filter(|(only, _, _)| only.as_deref().is_none_or(|o| o == *name))
                    .map(|(_, k, v)| (k.clone(), v.clone())),
            );
            nodes.push(Node {
                name,
                program: spec.bin_dir.join(format!("recmesh-{name}")),
                args: Vec::new(),
                env,
                admin,
                log: spec.work_dir.join(format!("{name}.log")),
                child: None,
            });
        }
        let mut mesh = Mesh {
            nodes,
            gateway_port: ports["gateway"].0,
            redis_port,
            delay_ms,
        };
        for n in &mut mesh.nodes {
            n.start()?;
            if n.name == "redis" {
                n.ready(Duration::from_secs(10)).await?;
            }
        }
        for n in &mut mesh.nodes {
            n.ready(Duration::from_secs(120)).await?;
        }
        Ok(mesh)
    }

    /// Events in the feature store's Redis stream.
    async fn stored_events(&self) -> anyhow::Result<u64> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.redis_port.to_string(), "XLEN", "rm:events"])
            .output()
            .await
            .context("redis-cli")?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.trim()
            .parse()
            .with_context(|| format!("redis-cli XLEN answered {text:?}"))
    }
}

/// The fault of one scenario: applied at `lead`, lifted at `lead + fault`.
async fn inject(mesh: &mut Mesh, name: &str, spec: &Spec, t0: Instant) -> anyhow::Result<Injected> {
    let lead = Duration::from_secs_f64(spec.lead_s);
    let fault = Duration::from_secs_f64(spec.fault_s);
    tokio::time::sleep_until((t0 + lead).into()).await;
    let mut sigterm_at = None;
    let (verb, target) = name.split_once(' ').unwrap_or((name, ""));
    match (verb, target) {
        ("kill-9", stage) => mesh.node(stage)?.kill9().await?,
        ("sigstop", stage) => mesh.node(stage)?.signal("STOP").await?,
        ("redis", _) => mesh.node("redis")?.kill9().await?,
        ("latency", _) => mesh.delay_ms.store(spec.latency_ms, Ordering::Relaxed),
        ("overload" | "baseline", _) => {}
        ("sigterm", _) => {
            sigterm_at = Some(t0.elapsed());
            let gw = mesh.node("gateway")?;
            gw.signal("TERM").await?;
            gw.exited(Duration::from_secs(30)).await?;
        }
        _ => anyhow::bail!("unknown scenario {name}"),
    }
    tokio::time::sleep_until((t0 + lead + fault).into()).await;
    let lifted = t0.elapsed();
    let mut restart = None;
    match (verb, target) {
        ("kill-9", stage) => restart = Some(mesh.node(stage)?.restart(120).await?),
        ("sigstop", stage) => mesh.node(stage)?.signal("CONT").await?,
        ("redis", _) => restart = Some(mesh.node("redis")?.restart(30).await?),
        ("latency", _) => mesh.delay_ms.store(0, Ordering::Relaxed),
        ("sigterm", _) => restart = Some(mesh.node("gateway")?.restart(120).await?),
        _ => {}
    }
    Ok(Injected {
        lifted,
        sigterm_at,
        restart,
    })
}

/// When [`inject`] lifted its fault, sent SIGTERM, and how long a restart
/// took to be ready (all from the start of the row's load).
struct Injected {
    lifted: Duration,
    sigterm_at: Option<Duration>,
    restart: Option<Duration>,
}

/// Clients of the mesh's gateway and the suite's load for `duration_s`.
async fn load(
    mesh: &Mesh,
    spec: &Spec,
    duration_s: f64,
) -> anyhow::Result<(Vec<Client>, Scenario)> {
    let gateway = format!("http://127.0.0.1:{}", mesh.gateway_port);
    let clients = crate::connect(&gateway).await?;
    let mut s = spec.scenario.clone();
    s.rate = spec.rate;
    s.catalog.items = spec.demo.0;
    s.warmup_s = 0.0;
    s.duration_s = duration_s;
    Ok((clients, s))
}

async fn warm_up(mesh: &Mesh, spec: &Spec) -> anyhow::Result<WarmUp> {
    let (clients, s) = load(mesh, spec, spec.warmup_s).await?;
    let report: Report = crate::run(&clients, &s).await?;
    let (recommends, _) = recommends_sent_failed(&report);
    Ok(WarmUp {
        seconds: spec.warmup_s,
        recommends,
        failed: report.bad.iter().filter(|b| b.code != "OK").count() as u64,
        degraded_rate: report.degraded_rate,
        recommend_p99_ms: report.per_call.get("recommend").map_or(0.0, |p| p.p99),
        first_second_p99_ms: report.timeline.first().map_or(0.0, |sec| sec.p99),
    })
}

async fn one(mesh: &mut Mesh, name: &str, spec: &Spec) -> anyhow::Result<Row> {
    let (clients, s) = load(mesh, spec, spec.lead_s + spec.fault_s + spec.recover_s).await?;
    let events_before = mesh.stored_events().await?;
    let t0 = Instant::now();
    if std::env::var_os("FAULTS_TRACE").is_some() {
        // The row's start on the wall clock, to line the trace up with the
        // services' logs (ms since the Unix epoch).
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        eprintln!("TRACE row {name} starts at {wall}");
    }
    let load = {
        let (clients, s) = (clients.clone(), s.clone());
        tokio::spawn(async move { crate::run(&clients, &s).await })
    };
    let extra = (name == "overload" && spec.overload_rate > spec.rate).then(|| {
        let mut o = s.clone();
        o.rate = spec.overload_rate - spec.rate;
        o.duration_s = spec.fault_s;
        o.seed = s.seed.wrapping_add(1);
        let lead = Duration::from_secs_f64(spec.lead_s);
        let clients = clients.clone();
        tokio::spawn(async move {
            tokio::time::sleep(lead).await;
            crate::run(&clients, &o).await
        })
    });
    let injected = inject(mesh, name, spec, t0).await;
    let report: Report = load.await.context("load task")??;
    if let Some(extra) = extra {
        extra.await.context("overload task")??;
    }
    let Injected {
        lifted,
        sigterm_at,
        restart,
    } = injected?;

    // Events buffered while Redis was down are replayed once it is back.
    let acked = report.ok_by_call.get("track").copied().unwrap_or(0);
    let mut stored = 0;
    for _ in 0..50 {
        stored = mesh.stored_events().await?.saturating_sub(events_before);
        if stored >= acked {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lifted_ms = lifted.as_millis() as u64;
    let fault_ms = (spec.lead_s * 1000.0) as u64;
    let end_ms = (s.duration_s * 1000.0) as u64;
    let recovery_ms = last_bad_to_recovery(
        report.bad.iter().filter(|b| b.at_ms >= fault_ms),
        lifted_ms,
        end_ms,
    );
    let fault_recovery_ms = fault_fallbacks(name).and_then(|own| {
        last_bad_to_recovery(
            report
                .bad
                .iter()
                .filter(|b| b.at_ms >= fault_ms && caused_by(b, own)),
            lifted_ms,
            end_ms,
        )
    });
    if std::env::var_os("FAULTS_TRACE").is_some() {
        // Each second's latency, to see where in the row a p99 comes from.
        for sec in &report.timeline {
            eprintln!(
                "TRACE second {} count {} p50 {:.1} p99 {:.1} errors {}",
                sec.t, sec.count, sec.p50, sec.p99, sec.errors
            );
        }
        // Failures whenever they came; degraded answers after the lift.
        for b in report
            .bad
            .iter()
            .filter(|b| b.at_ms >= lifted_ms || b.code != "OK")
        {
            eprintln!(
                "TRACE {} {} {:?} {}",
                b.at_ms, b.code, b.fallbacks, b.message
            );
        }
    }
    let bad_at: Vec<u64> = report.bad.iter().map(|b| b.at_ms).collect();
    let recovery_to_lead_ms = back_to_lead_rate(&bad_at, fault_ms, lifted_ms, end_ms, s.rate);
    let mut failed_other = BTreeMap::new();
    for b in report
        .bad
        .iter()
        .filter(|b| b.code != "OK" && b.call != "recommend")
    {
        *failed_other.entry(b.call.to_owned()).or_default() += 1;
    }
    let (recommends, failed_recommends) = recommends_sent_failed(&report);
    Ok(Row {
        fault: name.to_owned(),
        recommends,
        failed_recommends,
        failed_other,
        degraded_rate: report.degraded_rate,
        recommend_p99_ms: report.per_call.get("recommend").map_or(0.0, |p| p.p99),
        p99_ms: report.latency.p99,
        cache_hit_rate: report.cache_hit_rate,
        recovery_ms,
        recovery_to_lead_ms,
        fault_recovery_ms,
        restart_ms: restart.map(|d| d.as_millis() as u64),
        events_acked: acked,
        events_lost: acked.saturating_sub(stored),
        events_unacked_stored: stored.saturating_sub(acked),
        failed_by_code: report.bad.iter().filter(|b| b.code != "OK").fold(
            BTreeMap::new(),
            |mut m, b| {
                *m.entry(b.code.to_owned()).or_default() += 1;
                m
            },
        ),
        fallbacks_after: report
            .bad
            .iter()
            .filter(|b| b.at_ms >= lifted_ms)
            .flat_map(|b| b.fallbacks.iter().cloned())
            .fold(BTreeMap::new(), |mut m, f| {
                *m.entry(f).or_default() += 1;
                m
            }),
        inflight_failed: sigterm_at.map(|at| inflight_failed(&report.bad, at)),
    })
}

/// `Recommend`s sent in `report`, and how many of them failed.
fn recommends_sent_failed(report: &Report) -> (u64, u64) {
    let failed = report
        .bad
        .iter()
        .filter(|b| b.code != "OK" && b.call == "recommend")
        .count() as u64;
    let ok = report.ok_by_call.get("recommend").copied().unwrap_or(0);
    (ok + failed, failed)
}

/// From the lift to the last of `bad` (ms; 0 when there is none), or
/// `None` when one came in the run's last 500 ms: still bad at the end.
fn last_bad_to_recovery<'a>(
    bad: impl Iterator<Item = &'a Bad>,
    lifted_ms: u64,
    end_ms: u64,
) -> Option<u64> {
    match bad.map(|b| b.at_ms).max() {
        None => Some(0),
        Some(t) if t + 500 >= end_ms => None,
        Some(t) => Some(t.saturating_sub(lifted_ms)),
    }
}

/// Every `stage:fallback` prefix of the gateway's stage reports
/// (`recmesh_gateway` stage names).
const ANY_STAGE: &[&str] = &["assign:", "features:", "retrieval:", "ranking:", "rerank:"];

/// The fallbacks a fault can cause (`stage:` or `stage:fallback`
/// prefixes): those of the stage it stops or slows, and of a stage whose
/// own call goes to it (ranking asks features for item features, so a
/// features or Redis fault also shows as `ranking:without_features`).
/// Overload and the gateway's SIGTERM reach every stage. `None` for the
/// baseline, which injects nothing.
pub fn fault_fallbacks(fault: &str) -> Option<&'static [&'static str]> {
    const FEATURES: &[&str] = &["features:", "ranking:without_features"];
    let own: &'static [&'static str] = match fault.rsplit(' ').next()? {
        "retrieval" => &["retrieval:"],
        "ranking" => &["ranking:"],
        "reranker" => &["rerank:"],
        "experiments" => &["assign:"],
        "features" => FEATURES,
        _ if fault == "redis down" => FEATURES,
        _ if fault == "baseline" => return None,
        _ => ANY_STAGE,
    };
    Some(own)
}

/// Whether `bad` is the fault's doing: a failed call, or an answer that
/// fell back in one of the fault's `own` stages. A degraded answer whose
/// stages the load does not record (`SimilarItems`, `Trending`) cannot be
/// told apart, so it is charged to every fault.
fn caused_by(bad: &Bad, own: &[&str]) -> bool {
    bad.code != "OK"
        || bad.fallbacks.is_empty()
        || bad
            .fallbacks
            .iter()
            .any(|f| own.iter().any(|o| f.starts_with(o)))
}

/// Calls in flight at the SIGTERM (`at`, from the row's start) that
/// failed: sent before it, and failed at it or after. A call that had
/// already failed before the SIGTERM was not in flight (it counts among
/// the row's failed calls). The load starts a few ms after the row, so a
/// failure up to 50 ms before `at` still counts.
fn inflight_failed(bad: &[Bad], at: Duration) -> u64 {
    const SLACK_MS: u64 = 50;
    let at = at.as_millis() as u64;
    bad.iter()
        .filter(|b| b.code != "OK" && b.at_ms < at && b.answered_ms + SLACK_MS >= at)
        .count() as u64
}

/// Runs the suite: starts the mesh, then every scenario in turn.
pub async fn run(spec: &Spec) -> anyhow::Result<Suite> {
    let names: Vec<String> = scenario_names()
        .into_iter()
        .filter(|n| spec.only.is_empty() || spec.only.iter().any(|o| o == n))
        .collect();
    for o in &spec.only {
        anyhow::ensure!(
            scenario_names().contains(o),
            "--only {o:?}: no such scenario (one of: {})",
            scenario_names().join(", ")
        );
    }
    let mut mesh = Mesh::start(spec).await?;
    let warmup = if spec.warmup_s > 0.0 {
        eprintln!("fault suite: warm-up");
        let w = warm_up(&mesh, spec).await?;
        eprintln!("  {}", warmup_text(&w, spec.rate));
        Some(w)
    } else {
        None
    };
    let mut rows = Vec::new();
    for name in names {
        eprintln!("fault suite: {name}");
        let row = one(&mut mesh, &name, spec).await?;
        eprintln!("  {}", row_text(&row));
        rows.push(row);
    }
    Ok(Suite { warmup, rows })
}

fn warmup_text(w: &WarmUp, rate: f64) -> String {
    format!(
        "Warm-up before the first row (a fresh mesh, every cache empty; not a fault, not judged): \
         {} s at {rate:.0}/s, {} calls failed, degraded {:.1}%, `Recommend` p99 {:.1} ms, \
         every call's p99 in the first second {:.1} ms.",
        w.seconds,
        w.failed,
        w.degraded_rate * 100.0,
        w.recommend_p99_ms,
        w.first_second_p99_ms,
    )
}

/// When, after `lifted_ms`, the rest of the run had no larger a share of
/// bad calls (sent at `bad_ms`, open loop at `rate`/s, so `rate` × seconds
/// calls in any window) than the lead before `fault_ms`; ms after the lift,
/// in 100 ms steps, with at least 1 s of the run left to judge.
fn back_to_lead_rate(
    bad_ms: &[u64],
    fault_ms: u64,
    lifted_ms: u64,
    end_ms: u64,
    rate: f64,
) -> Option<u64> {
    let calls = |ms: u64| rate * ms as f64 / 1000.0;
    let lead_bad = bad_ms.iter().filter(|&&t| t < fault_ms).count();
    let lead_share = if fault_ms > 0 {
        lead_bad as f64 / calls(fault_ms)
    } else {
        0.0
    };
    let mut t = lifted_ms;
    while t + 1000 <= end_ms {
        let bad = bad_ms.iter().filter(|&&b| b >= t).count();
        if bad as f64 <= lead_share * calls(end_ms - t) {
            return Some(t - lifted_ms);
        }
        t += 100;
    }
    None
}

fn row_text(r: &Row) -> String {
    format!(
        "failed Recommend {}/{}, p99 {:.1} ms (Recommend {:.1} ms), degraded {:.1}%, {:.0}% from cache, recovery {} (to the pre-fault rate {}; of the faulted stage {}), events lost {}{}; failed {:?}; fallbacks after the fault {:?}",
        r.failed_recommends,
        r.recommends,
        r.p99_ms,
        r.recommend_p99_ms,
        r.degraded_rate * 100.0,
        r.cache_hit_rate * 100.0,
        within(r.recovery_ms),
        within(r.recovery_to_lead_ms),
        fault_within(r),
        r.events_lost,
        r.inflight_failed
            .map_or(String::new(), |n| format!(", in-flight failed {n}")),
        r.failed_by_code,
        r.fallbacks_after,
    )
}

fn within(ms: Option<u64>) -> String {
    ms.map_or("not within the run".to_owned(), |ms| format!("{ms} ms"))
}

/// The faulted stage's recovery, `–` for the baseline (no fault).
fn fault_within(r: &Row) -> String {
    if fault_fallbacks(&r.fault).is_none() {
        "–".to_owned()
    } else {
        within(r.fault_recovery_ms)
    }
}

/// The table in Markdown.
pub fn markdown(suite: &Suite, spec: &Spec) -> String {
    let rows = &suite.rows;
    let warmup = suite.warmup.as_ref().map_or(String::new(), |w| {
        format!("{}\n\n", warmup_text(w, spec.rate))
    });
    let mut out = format!(
        "Load {:.0}/s (overload: {:.0}/s); each fault {} s after {} s of load, then {} s to recover; demo catalog {} items.\n\n{warmup}\
         | fault | Recommend failed / sent | other calls failed | degraded | from cache | p99 ms, Recommend / all calls | recovery after the fault is lifted (last bad call) | back to the pre-fault bad-call rate | recovery of the faulted stage (its last fallback or failure) | restart to ready | events acked | lost | in-flight failed |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        spec.rate, spec.overload_rate, spec.fault_s, spec.lead_s, spec.recover_s, spec.demo.0
    );
    for r in rows {
        let other = if r.failed_other.is_empty() {
            "0".to_owned()
        } else {
            r.failed_other
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        out.push_str(&format!(
            "| {} | {} / {} | {} | {:.1}% | {:.0}% | {:.1} / {:.1} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.fault,
            r.failed_recommends,
            r.recommends,
            other,
            r.degraded_rate * 100.0,
            r.cache_hit_rate * 100.0,
            r.recommend_p99_ms,
            r.p99_ms,
            within(r.recovery_ms),
            within(r.recovery_to_lead_ms),
            fault_within(r),
            r.restart_ms.map_or("–".to_owned(), |ms| format!("{ms} ms")),
            r.events_acked,
            r.events_lost,
            r.inflight_failed.map_or("–".to_owned(), |n| n.to_string()),
        ));
    }
    out
}

/// Where the service binaries are: `dir` when given, else beside this
/// executable (cargo puts every binary of a profile in one directory).
pub fn bin_dir(dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(d) = dir {
        return Ok(d.to_owned());
    }
    let exe = std::env::current_exe()?;
    exe.parent()
        .map(Path::to_owned)
        .context("no directory of the current executable")
}

/// Each row against the goals: no failed `Recommend` (for the gateway's
/// SIGTERM, none of those in flight), `Recommend`'s p99 within `p99_ms`
/// (the promise is about `Recommend`; a `Track` the store cannot take
/// fails at its own 200 ms budget), recovery within
/// `recovery_ms`, no acknowledged event lost. One line per breach.
pub fn breaches(rows: &[Row], p99_ms: f64, recovery_ms: u64) -> Vec<String> {
    let mut out = Vec::new();
    for r in rows {
        let f = &r.fault;
        match r.inflight_failed {
            Some(n) if n > 0 => out.push(format!("{f}: {n} calls in flight at SIGTERM failed")),
            Some(_) => {}
            None if r.failed_recommends > 0 => {
                out.push(format!("{f}: {} Recommend failed", r.failed_recommends));
            }
            None => {}
        }
        if r.recommend_p99_ms > p99_ms {
            out.push(format!(
                "{f}: Recommend p99 {:.1} ms > {p99_ms} ms",
                r.recommend_p99_ms
            ));
        }
        out.extend(recovery_miss(f, r.recovery_ms, recovery_ms));
        if r.events_lost > 0 {
            out.push(format!("{f}: {} acknowledged events lost", r.events_lost));
        }
    }
    out
}

/// The rows whose faulted stage was still failing or falling back more
/// than `recovery_ms` after the lift: [`breaches`]' recovery check with
/// the load's background of late answers in other stages left out. One
/// line per row; reported beside the goals, not instead of them.
pub fn fault_recovery_misses(rows: &[Row], recovery_ms: u64) -> Vec<String> {
    rows.iter()
        .filter(|r| fault_fallbacks(&r.fault).is_some())
        .filter_map(|r| recovery_miss(&r.fault, r.fault_recovery_ms, recovery_ms))
        .collect()
}

/// The line for a recovery (`ms`, `None`: not within the run) past the
/// goal, in the form `run-summary.py` reads.
fn recovery_miss(fault: &str, ms: Option<u64>, goal_ms: u64) -> Option<String> {
    match ms {
        None => Some(format!("{fault}: not recovered by the end of the run")),
        Some(ms) if ms > goal_ms => {
            Some(format!("{fault}: recovered after {ms} ms > {goal_ms} ms"))
        }
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{
        Bad, back_to_lead_rate, caused_by, fault_fallbacks, inflight_failed, last_bad_to_recovery,
    };
    use std::time::Duration;

    #[test]
    fn in_flight_at_the_sigterm_means_sent_before_it_and_failed_after() {
        let call = |at_ms, answered_ms, code| Bad {
            at_ms,
            answered_ms,
            call: "recommend",
            code,
            degraded: false,
            fallbacks: Vec::new(),
            message: String::new(),
        };
        let bad = [
            // Failed 900 ms before the SIGTERM: not in flight then.
            call(1_000, 1_100, "UNAVAILABLE"),
            // Sent before, failed after: in flight.
            call(1_950, 2_010, "UNAVAILABLE"),
            // Failed 30 ms before it: within the load's start slack.
            call(1_900, 1_970, "CANCELLED"),
            // Degraded, not failed.
            call(1_990, 2_005, "OK"),
            // Sent after the SIGTERM.
            call(2_100, 2_150, "UNAVAILABLE"),
        ];
        assert_eq!(inflight_failed(&bad, Duration::from_millis(2_000)), 2);
    }

    #[test]
    fn a_fault_is_charged_with_its_own_stages_fallbacks_and_every_failure() {
        let answer = |at_ms, code, fallbacks: &[&str]| Bad {
            at_ms,
            answered_ms: at_ms + 10,
            call: "recommend",
            code,
            degraded: !fallbacks.is_empty(),
            fallbacks: fallbacks.iter().map(|f| (*f).to_owned()).collect(),
            message: String::new(),
        };
        let ranking = fault_fallbacks("kill-9 ranking").expect("a fault");
        let features = fault_fallbacks("redis down").expect("a fault");
        let everything = fault_fallbacks("overload").expect("a fault");
        let stray = answer(10_500, "OK", &["features:anonymous"]);
        assert!(!caused_by(&stray, ranking));
        assert!(caused_by(&stray, features));
        assert!(caused_by(&stray, everything));
        // Ranking's own call to features: a features fault's doing, and
        // ranking's own fallback either way.
        let without = answer(6_000, "OK", &["ranking:without_features"]);
        assert!(caused_by(&without, ranking) && caused_by(&without, features));
        assert!(!caused_by(
            &without,
            fault_fallbacks("sigstop reranker").expect("a fault")
        ));
        // A failed call is charged to any fault.
        let failed = answer(7_000, "UNAVAILABLE", &[]);
        assert!(caused_by(
            &failed,
            fault_fallbacks("kill-9 experiments").expect("a fault")
        ));
        // A degraded `Trending` (no stage reports kept): charged to any fault.
        let trending = Bad {
            call: "trending",
            ..answer(7_000, "OK", &[])
        };
        assert!(caused_by(&trending, ranking));
        assert_eq!(fault_fallbacks("baseline"), None);
        assert_eq!(
            fault_fallbacks("latency retrieval"),
            Some(&["retrieval:"][..])
        );

        // Lifted at 5 s, the run ends at 11 s: the ranking fallback at 6 s
        // is the last of the fault's own; the stray at 10.5 s is not, and
        // would be "not within the run" if it were.
        let bad = [
            answer(5_200, "OK", &["ranking:retrieval_order"]),
            answer(6_000, "OK", &["ranking:retrieval_order"]),
            stray,
        ];
        let own = |own: &[&str]| {
            last_bad_to_recovery(bad.iter().filter(|b| caused_by(b, own)), 5_000, 11_000)
        };
        assert_eq!(own(ranking), Some(1_000));
        assert_eq!(own(everything), None);
        assert_eq!(
            own(fault_fallbacks("kill-9 retrieval").expect("a fault")),
            Some(0)
        );
    }

    #[test]
    fn recovery_is_judged_against_the_rate_before_the_fault() {
        // 100/s; fault at 3 s, lifted at 6 s, run ends at 12 s.
        let (fault, lifted, end, rate) = (3_000, 6_000, 12_000, 100.0);
        // Nothing bad before the fault: back once the last bad call is past.
        let bad = [3_100, 5_000, 6_250];
        assert_eq!(back_to_lead_rate(&bad, fault, lifted, end, rate), Some(300));
        // Nothing bad after the lift: recovered at once.
        assert_eq!(
            back_to_lead_rate(&[4_000], fault, lifted, end, rate),
            Some(0)
        );
        // 3 of 300 lead calls bad (1%). From 6.2 s on: 6 bad in 580 calls
        // (1.03%); from 6.3 s on: 5 in 570 (0.88%), though the last bad call
        // is at 11 s.
        let bad = [
            500, 1_500, 2_500, 6_100, 6_200, 6_300, 6_400, 8_000, 9_500, 11_000,
        ];
        assert_eq!(back_to_lead_rate(&bad, fault, lifted, end, rate), Some(300));
        // Still bad in the last second: not within the run.
        let bad: Vec<u64> = (6_000..12_000).step_by(10).collect();
        assert_eq!(back_to_lead_rate(&bad, fault, lifted, end, rate), None);
    }
}

//! `recmesh-loadtest`: an open-loop load generator for the gateway.
//!
//! Requests leave at a constant arrival rate whatever the gateway does, and
//! each one's latency runs from its *intended* send time, so a stalled
//! gateway shows up as latency instead of silently lowering the rate
//! (no coordinated omission). The warm-up is sent but not counted. Latencies
//! go into HDR histograms (overall, per call, per gateway stage from the
//! responses' stage reports, and per second for the timeline). The run ends
//! with a verdict against the SLO.

#![forbid(unsafe_code)]

pub mod faults;
pub mod html;
pub mod report;
pub mod scenario;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use recmesh_proto::v1::{self as pb, gateway_client::GatewayClient};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

pub use report::{Report, Verdict};
pub use scenario::Scenario;

/// One request's outcome.
#[derive(Debug)]
struct Sample {
    /// Intended send time, from the start of the run.
    at: Duration,
    /// From the intended send time to the answer.
    latency: Duration,
    call: &'static str,
    /// gRPC status code name, `OK` for an answer.
    code: &'static str,
    degraded: bool,
    /// A `Recommend` answered from the gateway's response cache.
    cached: bool,
    /// (stage, latency, fallback) from a `Recommend`'s stage report.
    stages: Vec<(String, Duration, String)>,
    /// The status message of a failed call; for a degraded answer, the
    /// `detail` of each stage that fell back.
    message: String,
}

/// Highest latency a histogram records (longer ones are clamped to it).
const MAX_LATENCY_US: u64 = 60_000_000;

fn histogram() -> Histogram<u64> {
    // Three significant digits: 0.1% resolution, a few hundred KB.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant, valid bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = (d.as_micros() as u64).clamp(1, MAX_LATENCY_US);
    let _ = h.record(us);
}

/// Connections to the gateway, used round robin: one HTTP/2 connection
/// would serialise on one socket at high rates.
const CONNECTIONS: usize = 4;

/// Requests in flight at most; past it a request is counted as
/// `CLIENT_OVERLOAD` rather than queued (the generator itself is saturated).
const MAX_IN_FLIGHT: usize = 20_000;

/// Small deterministic draws (SplitMix64).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Connects to the gateway at `addr`.
pub async fn connect(addr: &str) -> anyhow::Result<Vec<GatewayClient<Channel>>> {
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        let channel = Endpoint::from_shared(addr.to_owned())
            .map_err(|e| anyhow::anyhow!("--gateway {addr:?}: {e}"))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach the gateway at {addr}: {e}. Is the mesh up (`recmesh up`)?"
                )
            })?;
        clients.push(GatewayClient::new(channel));
    }
    Ok(clients)
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// One call of the scenario's mix, ready to send.
#[derive(Debug, Clone)]
enum Call {
    /// The request, and whether it bypasses the response cache.
    Recommend(pb::RecommendRequest, bool),
    Similar(pb::SimilarItemsRequest),
    Trending(pb::TrendingRequest),
    Track(pb::TrackRequest),
}

impl Call {
    fn name(&self) -> &'static str {
        match self {
            Call::Recommend(..) => "recommend",
            Call::Similar(_) => "similar",
            Call::Trending(_) => "trending",
            Call::Track(_) => "track",
        }
    }
}

fn draw_call(s: &Scenario, rng: &mut Rng, run: u128, n: u64) -> Call {
    let u = rng.unit();
    let user = if u < s.users.cold {
        format!("load-cold-{run}-{n}")
    } else if u < s.users.cold + s.users.power {
        format!("u{}", rng.below(u64::from(s.users.power_users)))
    } else {
        format!("u{}", rng.below(u64::from(s.users.population)))
    };
    let item = format!("i{}", rng.below(u64::from(s.catalog.items)));
    let c = rng.unit();
    let m = &s.calls;
    if c < m.recommend {
        Call::Recommend(
            pb::RecommendRequest {
                user_id: user,
                count: 10,
                ..Default::default()
            },
            s.bypass_cache,
        )
    } else if c < m.recommend + m.similar {
        Call::Similar(pb::SimilarItemsRequest {
            item_id: item,
            count: 10,
            ..Default::default()
        })
    } else if c < m.recommend + m.similar + m.trending {
        Call::Trending(pb::TrendingRequest {
            category: String::new(),
            count: 10,
        })
    } else {
        Call::Track(pb::TrackRequest {
            event_id: format!("load-{run}-{n}"),
            user_id: user,
            item_id: item,
            event_type: pb::EventType::View as i32,
            timestamp_ms: 0,
        })
    }
}

/// What `send` got back: status code name, degraded, cached, stage
/// reports, and a failure's message or, for a degraded answer, the
/// `detail` of each stage that fell back.
type Answer = (
    &'static str,
    bool,
    bool,
    Vec<(String, Duration, String)>,
    String,
);

/// A `Recommend` call; bypassing the cache sends `cache-control: no-cache`,
/// which makes the gateway compute the answer as it would for a user it
/// has not seen within the cache's TTL (unlike `debug`, which also skips
/// the gateway's local assignment).
fn recommend_request(
    r: pb::RecommendRequest,
    bypass_cache: bool,
) -> tonic::Request<pb::RecommendRequest> {
    let mut req = tonic::Request::new(r);
    if bypass_cache {
        req.metadata_mut().insert(
            "cache-control",
            tonic::metadata::MetadataValue::from_static("no-cache"),
        );
    }
    req
}

async fn send(client: &mut GatewayClient<Channel>, call: Call) -> Answer {
    let result = match call {
        Call::Recommend(r, bypass_cache) => client
            .recommend(recommend_request(r, bypass_cache))
            .await
            .map(|a| {
                let a = a.into_inner();
                let stages = a
                    .stages
                    .iter()
                    .map(|s| {
                        (
                            s.stage.clone(),
                            Duration::from_micros(u64::from(s.latency_us)),
                            s.fallback.clone(),
                        )
                    })
                    .collect();
                let details: Vec<String> = a
                    .stages
                    .iter()
                    .filter(|s| !s.fallback.is_empty())
                    .map(|s| format!("{}: {}", s.stage, s.detail))
                    .collect();
                (a.degraded, a.cached, stages, details.join("; "))
            }),
        Call::Similar(r) => client
            .similar_items(r)
            .await
            .map(|a| (a.into_inner().degraded, false, Vec::new(), String::new())),
        Call::Trending(r) => client
            .trending(r)
            .await
            .map(|a| (a.into_inner().degraded, false, Vec::new(), String::new())),
        Call::Track(r) => client
            .track(r)
            .await
            .map(|_| (false, false, Vec::new(), String::new())),
    };
    match result {
        Ok((degraded, cached, stages, details)) => ("OK", degraded, cached, stages, details),
        Err(status) => (
            code_name(status.code()),
            false,
            false,
            Vec::new(),
            status.message().to_owned(),
        ),
    }
}

/// How long each stage that fell back took, the whole call, and the
/// stages' `detail`: `features 10.4 ms, call 13.1 ms; features: …`.
fn degraded_latencies(sample: &Sample) -> String {
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let mut parts: Vec<String> = sample
        .stages
        .iter()
        .filter(|(_, _, f)| !f.is_empty())
        .map(|(stage, latency, _)| format!("{stage} {:.1} ms", ms(latency)))
        .collect();
    parts.push(format!("call {:.1} ms", ms(&sample.latency)));
    let mut out = parts.join(", ");
    if !sample.message.is_empty() {
        out = format!("{out}; {}", sample.message);
    }
    out
}

/// Failed or degraded calls kept per run, for fault analysis.
const MAX_BAD: usize = 1_000_000;

/// Everything one run measured, before it becomes a [`Report`].
#[derive(Debug)]
pub struct Measured {
    latency: Histogram<u64>,
    per_call: BTreeMap<&'static str, Histogram<u64>>,
    per_stage: BTreeMap<String, Histogram<u64>>,
    fallbacks: BTreeMap<String, u64>,
    errors: BTreeMap<&'static str, u64>,
    /// The first message seen for each failing call and code.
    error_examples: BTreeMap<String, String>,
    degraded: u64,
    /// Measured `Recommend` answers, and those from the response cache.
    recommends: u64,
    cached: u64,
    counted: u64,
    sent: u64,
    /// Per second of the run (warm-up included): latencies and errors.
    seconds: Vec<(Histogram<u64>, u64)>,
    wall: Duration,
    /// Answered calls by call, warm-up included.
    ok_by_call: BTreeMap<&'static str, u64>,
    /// Every failed or degraded call, warm-up included.
    bad: Vec<report::Bad>,
}

/// Runs `scenario` at its rate against the gateway `clients`; returns the
/// report with its verdict.
pub async fn run(
    clients: &[GatewayClient<Channel>],
    scenario: &Scenario,
) -> anyhow::Result<Report> {
    scenario.validate()?;
    let measured = drive(clients, scenario).await;
    Ok(Report::new(scenario, measured))
}

async fn drive(clients: &[GatewayClient<Channel>], s: &Scenario) -> Measured {
    let (tx, mut rx) = mpsc::unbounded_channel::<Sample>();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let interval = Duration::from_secs_f64(1.0 / s.rate);
    let total = Duration::from_secs_f64(s.warmup_s + s.duration_s);
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let start = Instant::now() + Duration::from_millis(50);
    let sender = {
        let clients = clients.to_vec();
        let s = s.clone();
        let tx = tx.clone();
        let in_flight = in_flight.clone();
        let runtime = tokio::runtime::Handle::current();
        // Paced on a thread of its own with the OS's sleep (tens of µs
        // late), not the runtime's timer: tokio's timer wheel ticks in whole
        // milliseconds and rounds a deadline up to the next tick, so a send
        // timed by it left 0–1 ms after its intended time, and every latency,
        // measured from that intended time, carried the delay.
        tokio::task::spawn_blocking(move || {
            let mut rng = Rng(s.seed);
            let mut n: u64 = 0;
            loop {
                let at = interval.mul_f64(n as f64);
                if at >= total {
                    return n;
                }
                let intended = start + at;
                if let Some(wait) = intended.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let call = draw_call(&s, &mut rng, run_id, n);
                let name = call.name();
                if in_flight.load(Ordering::Relaxed) >= MAX_IN_FLIGHT {
                    let _ = tx.send(Sample {
                        at,
                        latency: intended.elapsed(),
                        call: name,
                        code: "CLIENT_OVERLOAD",
                        degraded: false,
                        cached: false,
                        stages: Vec::new(),
                        message: String::new(),
                    });
                } else {
                    in_flight.fetch_add(1, Ordering::Relaxed);
                    let mut client = clients[(n as usize) % clients.len()].clone();
                    let tx = tx.clone();
                    let in_flight = in_flight.clone();
                    runtime.spawn(async move {
                        let (code, degraded, cached, stages, message) =
                            send(&mut client, call).await;
                        in_flight.fetch_sub(1, Ordering::Relaxed);
                        let _ = tx.send(Sample {
                            at,
                            latency: intended.elapsed(),
                            call: name,
                            code,
                            degraded,
                            cached,
                            stages,
                            message,
                        });
                    });
                }
                n += 1;
            }
        })
    };
    drop(tx);
    let warmup = Duration::from_secs_f64(s.warmup_s);
    let seconds_total = total.as_secs() as usize + 1;
    let mut m = Measured {
        latency: histogram(),
        per_call: BTreeMap::new(),
        per_stage: BTreeMap::new(),
        fallbacks: BTreeMap::new(),
        errors: BTreeMap::new(),
        error_examples: BTreeMap::new(),
        degraded: 0,
        recommends: 0,
        cached: 0,
        counted: 0,
        sent: 0,
        seconds: (0..seconds_total).map(|_| (histogram(), 0)).collect(),
        wall: Duration::ZERO,
        ok_by_call: BTreeMap::new(),
        bad: Vec::new(),
    };
    while let Some(sample) = rx.recv().await {
        let second = (sample.at.as_secs() as usize).min(seconds_total - 1);
        let ok = sample.code == "OK";
        record(&mut m.seconds[second].0, sample.latency);
        if !ok {
            m.seconds[second].1 += 1;
            m.error_examples
                .entry(format!("{} {}", sample.call, sample.code))
                .or_insert_with(|| sample.message.clone());
        } else {
            *m.ok_by_call.entry(sample.call).or_default() += 1;
        }
        if (!ok || sample.degraded) && m.bad.len() < MAX_BAD {
            m.bad.push(report::Bad {
                at_ms: sample.at.as_millis() as u64,
                answered_ms: (sample.at + sample.latency).as_millis() as u64,
                call: sample.call,
                code: sample.code,
                degraded: sample.degraded,
                message: if ok {
                    degraded_latencies(&sample)
                } else {
                    sample.message.clone()
                },
                fallbacks: sample
                    .stages
                    .iter()
                    .filter(|(_, _, f)| !f.is_empty())
                    .map(|(stage, _, f)| format!("{stage}:{f}"))
                    .collect(),
            });
        }
        if sample.at < warmup {
            continue;
        }
        m.counted += 1;
        record(&mut m.latency, sample.latency);
        record(
            m.per_call.entry(sample.call).or_insert_with(histogram),
            sample.latency,
        );
        if !ok {
            *m.errors.entry(sample.code).or_default() += 1;
        }
        m.degraded += u64::from(sample.degraded);
        if ok && sample.call == "recommend" {
            m.recommends += 1;
            m.cached += u64::from(sample.cached);
        }
        for (stage, latency, fallback) in sample.stages {
            if !fallback.is_empty() {
                *m.fallbacks
                    .entry(format!("{stage}:{fallback}"))
                    .or_default() += 1;
            }
            record(m.per_stage.entry(stage).or_insert_with(histogram), latency);
        }
    }
    m.sent = sender.await.unwrap_or(0);
    m.wall = start.elapsed();
    m
}

/// Step mode: runs `scenario` at `from`, `from + step`, … up to `to`
/// requests per second, each for the scenario's duration, and stops at the
/// first rate that breaks the SLO. Returns every step's report.
pub async fn step(
    clients: &[GatewayClient<Channel>],
    scenario: &Scenario,
    from: f64,
    step: f64,
    to: f64,
) -> anyhow::Result<Vec<Report>> {
    anyhow::ensure!(
        from > 0.0 && step > 0.0 && to >= from,
        "--from, --step and --to: need 0 < from <= to and step > 0"
    );
    let mut reports = Vec::new();
    let mut rate = from;
    while rate <= to + 1e-9 {
        let mut s = scenario.clone();
        s.rate = rate;
        let r = run(clients, &s).await?;
        let pass = r.verdict.pass;
        eprintln!("{}", r.summary_line());
        reports.push(r);
        if !pass {
            break;
        }
        rate += step;
        // Let queues drain between steps.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(reports)
}

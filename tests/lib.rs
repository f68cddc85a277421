//! Harness for the end-to-end tests: the real mesh on ephemeral loopback
//! ports, with a TCP fault proxy between the gateway and every stage.
//!
//! The proxy makes faults real at the socket level: `Refuse` drops every
//! connection (what a dead process looks like to its peers) and `Stall`
//! accepts connections but forwards nothing (a frozen process, SIGSTOP).

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use recmesh_catalog::Dataset;
use recmesh_catalog::demo::{DemoSpec, generate};
use recmesh_proto::v1::gateway_client::GatewayClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tonic::transport::Channel;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    None,
    /// Close every connection, existing and new.
    Refuse,
    /// Keep connections open but forward nothing.
    Stall,
}

/// A TCP proxy in front of one service.
#[derive(Debug)]
pub struct FaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    fault: watch::Sender<Fault>,
}

impl FaultProxy {
    /// Proxies a new loopback port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (fault, rx) = watch::channel(Fault::None);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let rx = rx.clone();
                if *rx.borrow() == Fault::Refuse {
                    drop(client);
                    continue;
                }
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    client.set_nodelay(true).ok();
                    server.set_nodelay(true).ok();
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        () = pump(cr, sw, rx.clone()) => {}
                        () = pump(sr, cw, rx) => {}
                    }
                });
            }
        });
        Ok(FaultProxy { addr, fault })
    }

    /// Sets the fault.
    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }

    /// `http://` URI for a gRPC client.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Copies bytes until EOF or `Refuse`; while `Stall`, holds them.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            changed = fault.changed() => {
                if changed.is_err() || *fault.borrow() == Fault::Refuse {
                    return;
                }
                continue;
            }
        };
        loop {
            let now = *fault.borrow_and_update();
            match now {
                Fault::Refuse => return,
                Fault::Stall => {
                    if fault.changed().await.is_err() {
                        return;
                    }
                }
                Fault::None => break,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// The mesh under test.
#[derive(Debug)]
pub struct TestMesh {
    /// The running services.
    pub mesh: recmesh::Mesh,
    /// Proxies by stage name: assign (experiments), features, retrieval,
    /// ranking, rerank (reranker).
    pub proxies: Vec<(&'static str, FaultProxy)>,
    /// One of the [`MESH_SLOTS`], held while the mesh runs.
    _slot: tokio::sync::SemaphorePermit<'static>,
}

/// At most two meshes run at a time in one test process.
///
/// The tests of a binary run in parallel; eight meshes starting (demo data,
/// models, indexes) on two cores starve the first requests of the meshes
/// already up, and a healthy stage misses even its scaled budget (seen in CI:
/// retrieval at 322 ms of 320 ms). Two slots keep that contention bounded and
/// leave room for a test that runs two meshes side by side (tests/balance.rs).
static MESH_SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Demo data small enough to start in a second in a debug build, large
/// enough for CF to have neighbours for most items.
pub fn test_data() -> Dataset {
    generate(&DemoSpec {
        items: 1_500,
        users: 400,
        interactions: 30_000,
        ..DemoSpec::default()
    })
}

/// How much longer every budget is in tests (see [`test_budgets`]).
pub const BUDGET_SCALE: u64 = 8;

/// Stage budgets for tests: the defaults × [`BUDGET_SCALE`]; ranking's own
/// features budget is scaled the same way.
///
/// These tests check behaviour (fallbacks, reports, recovery), not speed. They
/// run a debug build, about ten times slower than release, with up to two
/// meshes in parallel on two cores (see [`MESH_SLOTS`]), and the first call
/// on a channel also pays for the connection. At the default 5 ms assignment
/// budget a healthy stage would sometimes be reported late. Whether the
/// default budgets hold is measured on release builds (README, "Budgets and
/// fallbacks").
pub fn test_budgets() -> recmesh_gateway::config::Budgets {
    let d = recmesh_gateway::config::Budgets::default();
    recmesh_gateway::config::Budgets {
        request_ms: d.request_ms * BUDGET_SCALE,
        assign_ms: d.assign_ms * BUDGET_SCALE,
        features_ms: d.features_ms * BUDGET_SCALE,
        retrieval_ms: d.retrieval_ms * BUDGET_SCALE,
        ranking_ms: d.ranking_ms * BUDGET_SCALE,
        rerank_ms: d.rerank_ms * BUDGET_SCALE,
        reserve_ms: d.reserve_ms,
        track_ms: d.track_ms * BUDGET_SCALE,
    }
}

/// A new empty directory under the system temp dir, unique to this process
/// and call.
pub fn scratch_dir(what: &str) -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("recmesh-test-{what}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

impl TestMesh {
    /// Starts all six services; the gateway reaches each stage through a proxy.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// [`TestMesh::start`] with stage configs adjusted by `adjust` first.
    pub async fn start_with(adjust: impl FnOnce(&mut recmesh::StageConfigs)) -> Self {
        Self::start_configured(adjust, |_| {}).await
    }

    /// [`TestMesh::start_with`], and `gateway` adjusts the gateway's config
    /// last (its upstreams already point at the proxies).
    pub async fn start_configured(
        adjust: impl FnOnce(&mut recmesh::StageConfigs),
        gateway: impl FnOnce(&mut recmesh_gateway::Config),
    ) -> Self {
        let slot = MESH_SLOTS
            .acquire()
            .await
            .expect("the mesh slots are never closed");
        let data = Arc::new(test_data());
        let mut configs = recmesh::StageConfigs::default();
        configs.ranking.features_budget_ms *= BUDGET_SCALE;
        let state = scratch_dir("mesh");
        configs.features.event_log.path = state.join("events.tsv");
        configs.features.event_log.exposures_path = state.join("exposures.jsonl");
        configs.experiments.state_dir = state.join("experiments").display().to_string();
        adjust(&mut configs);
        let stages = recmesh::start_stages(&data, recmesh::PortPlan::EPHEMERAL, configs)
            .await
            .expect("stages start");
        let mut proxies = Vec::new();
        for (name, handle) in [
            ("assign", &stages.experiments),
            ("features", &stages.features),
            ("retrieval", &stages.retrieval),
            ("ranking", &stages.ranking),
            ("rerank", &stages.reranker),
        ] {
            proxies.push((
                name,
                FaultProxy::start(handle.grpc_addr).await.expect("proxy"),
            ));
        }
        let uri = |name: &str| {
            proxies
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, p)| p.uri())
                .unwrap_or_default()
        };
        let mut config = recmesh_gateway::Config {
            server: recmesh_server::ServerConfig::ephemeral(),
            budgets: test_budgets(),
            ..Default::default()
        };
        config.upstreams = recmesh_gateway::config::Upstreams {
            experiments: uri("assign"),
            features: uri("features"),
            retrieval: uri("retrieval"),
            ranking: uri("ranking"),
            reranker: uri("rerank"),
        };
        gateway(&mut config);
        let gateway = recmesh_gateway::server(config, &data)
            .expect("gateway config")
            .start()
            .await
            .expect("gateway starts");
        TestMesh {
            mesh: recmesh::Mesh {
                gateway,
                stages,
                data,
            },
            proxies,
            _slot: slot,
        }
    }

    /// A client of the gateway.
    pub async fn client(&self) -> GatewayClient<Channel> {
        GatewayClient::connect(self.mesh.gateway.grpc_uri())
            .await
            .expect("gateway reachable")
    }

    /// The proxy of a stage.
    pub fn proxy(&self, stage: &str) -> &FaultProxy {
        &self
            .proxies
            .iter()
            .find(|(n, _)| *n == stage)
            .unwrap_or_else(|| panic!("no stage {stage}"))
            .1
    }
}

/// `Recommend` of 5 items for `user`, which must answer (degraded or not).
pub async fn recommend_for(
    client: &mut GatewayClient<Channel>,
    user: &str,
) -> recmesh_proto::v1::RecommendResponse {
    client
        .recommend(recmesh_proto::v1::RecommendRequest {
            user_id: user.into(),
            count: 5,
            ..Default::default()
        })
        .await
        .expect("Recommend answers")
        .into_inner()
}

/// Asserts `n` `Recommend`s in a row answered without any fallback
/// (`tag` names the moment in failure messages).
pub async fn all_healthy(client: &mut GatewayClient<Channel>, n: usize, tag: &str) {
    for i in 0..n {
        let r = recommend_for(client, &format!("u{}", i % 50)).await;
        assert!(!r.degraded, "{tag} request {i}: {:?}", r.stages);
    }
}

/// `GET path` on an admin port; the whole HTTP response as text.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin port");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// Waits until `check` holds, checking every 100 ms; fails the test naming
/// `what` after 20 s.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !check().await {
        assert!(
            std::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

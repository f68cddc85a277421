//! The served evaluation over gRPC: the split's training data served by a
//! real mesh (`recmesh up`, six services on loopback), asked `Recommend` for
//! every test user as a client asks, with no client exclusions, and judged
//! with the same metric code as the in-process rows.
//!
//! The mesh serves the bundle the in-process rows use (the same build of the
//! same training data, with the learned ranker in it), and its clock is the
//! wall clock: so the split is first shifted in time to end now
//! ([`shift_to_now`]), as if the data had just been collected.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use recmesh_catalog::bundle::{BuildParams, Bundle};
use recmesh_proto::v1 as pb;

use crate::{Split, TrainedRanker};

/// Shifts every time in `split` (interactions, item creation) so that its
/// training period ends at `now_ms`. Relevance is unchanged (only the
/// order of events matters to the models); what changes is that a service
/// on the wall clock sees the data as fresh. Returns the shift, ms.
pub fn shift_to_now(split: &mut Split, now_ms: i64) -> i64 {
    let end = split
        .train
        .interactions
        .iter()
        .map(|e| e.timestamp_ms)
        .max()
        .unwrap_or(now_ms);
    let delta = now_ms - end;
    for data in [&mut split.train, &mut split.train_only] {
        for e in &mut data.interactions {
            e.timestamp_ms += delta;
        }
        for i in &mut data.items {
            i.created_at += delta.div_euclid(1000);
        }
    }
    delta
}

/// Writes what a mesh needs to serve `split`'s training data with the
/// served rows' models: `data/` (items.tsv, interactions.tsv), a bundle
/// root `bundles/` holding the bundle built from the training data with
/// `ranker` in it, and `experiments.toml` with no experiments (every user
/// gets the control pipeline, as the in-process rows do). Returns (data
/// dir, bundle root); the experiments file is [`EXPERIMENTS_FILE`] in `dir`.
pub fn prepare(
    split: &Split,
    ranker: Option<&TrainedRanker>,
    dir: &Path,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let data_dir = dir.join("data");
    let root = dir.join("bundles");
    let _ = std::fs::remove_dir_all(dir);
    recmesh_catalog::files::write_dir(&split.train, &data_dir)?;
    let mut bundle = Bundle::build(&split.train, &BuildParams::default(), |_| {});
    bundle.ranker = ranker.map(|r| r.model_text.clone());
    crate::publish::publish(&mut bundle, &root, &Default::default())?;
    std::fs::write(
        dir.join(EXPERIMENTS_FILE),
        "# No experiments: the served evaluation judges the control pipeline.\n",
    )?;
    Ok((data_dir, root))
}

/// The experiments file [`prepare`] writes.
pub const EXPERIMENTS_FILE: &str = "experiments.toml";

/// A `recmesh up` process serving a prepared directory; stopped on drop.
pub struct MeshProcess {
    child: Child,
    /// The gateway, `http://host:port`.
    pub gateway: String,
}

/// The `recmesh` binary: `RECMESH_BIN`, else beside this executable (or
/// one folder up, for a test binary in `deps/`).
fn recmesh_bin() -> anyhow::Result<PathBuf> {
    if let Ok(bin) = std::env::var("RECMESH_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe()?;
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("recmesh"))
        .find(|bin| bin.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--grpc: no `recmesh` binary beside {}; build it (`cargo build --release -p recmesh`) or set RECMESH_BIN",
                exe.display()
            )
        })
}

impl MeshProcess {
    /// Starts `recmesh up` on free ports over `data_dir` and the bundles in
    /// `root`, and waits until its gateway answers.
    pub fn start(data_dir: &Path, root: &Path) -> anyhow::Result<MeshProcess> {
        let bin = recmesh_bin()?;
        let mut child = Command::new(&bin)
            .args(["up", "--port", "0", "--data-dir"])
            .arg(data_dir)
            .arg("--bundle")
            .arg(root)
            .arg("--experiments")
            .arg(root.parent().map_or_else(
                || PathBuf::from(EXPERIMENTS_FILE),
                |d| d.join(EXPERIMENTS_FILE),
            ))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", bin.display()))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        // `up` prints "  gateway   127.0.0.1:PORT   http://…/metrics".
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let mut words = line.split_whitespace();
                if words.next() == Some("gateway")
                    && let Some(addr) = words.next()
                {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        // Dropped (and so stopped) on the error path too.
        let mut mesh = MeshProcess {
            child,
            gateway: String::new(),
        };
        match rx.recv_timeout(Duration::from_secs(600)) {
            Ok(addr) => {
                mesh.gateway = format!("http://{addr}");
                Ok(mesh)
            }
            Err(_) => {
                let status = mesh.child.try_wait().ok().flatten();
                anyhow::bail!("`recmesh up` did not start its gateway (exit: {status:?})")
            }
        }
    }
}

impl Drop for MeshProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the mesh answered.
#[derive(Debug, Default)]
pub struct GrpcLists {
    /// User → the item ids of their answer, in order.
    pub lists: HashMap<String, Vec<String>>,
    /// Answers marked degraded (a stage fell back).
    pub degraded: usize,
    /// Answers the gateway served from its cache (none with `debug`).
    pub cached: usize,
}

/// Asks `gateway` for `k` items for each of `users`, as a client would:
/// `debug` set (no response cache) and request id `SEED:USER` (which seeds
/// the exploration draw, as the in-process rows do). Waits up to a minute
/// for the gateway to come up.
pub async fn recommend_all(
    gateway: &str,
    users: &[String],
    k: usize,
    seed: u64,
) -> anyhow::Result<GrpcLists> {
    use pb::gateway_client::GatewayClient;
    let started = Instant::now();
    let mut client = loop {
        match GatewayClient::connect(gateway.to_owned()).await {
            Ok(c) => break c,
            Err(_) if started.elapsed() < Duration::from_secs(60) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => anyhow::bail!("gateway {gateway}: {e}"),
        }
    };
    let mut out = GrpcLists::default();
    for user in users {
        let mut req = tonic::Request::new(pb::RecommendRequest {
            user_id: user.clone(),
            count: k as u32,
            debug: true,
            ..Default::default()
        });
        req.metadata_mut().insert(
            "x-request-id",
            format!("{seed}:{user}")
                .parse()
                .map_err(|e| anyhow::anyhow!("request id for {user}: {e}"))?,
        );
        let answer = client
            .recommend(req)
            .await
            .map_err(|s| anyhow::anyhow!("Recommend for {user}: {s}"))?
            .into_inner();
        out.degraded += usize::from(answer.degraded);
        out.cached += usize::from(answer.cached);
        out.lists.insert(
            user.clone(),
            answer.items.into_iter().map(|i| i.item_id).collect(),
        );
    }
    Ok(out)
}

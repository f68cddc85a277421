//! A real Qdrant server for tests: the binary `tools/build-qdrant.sh`
//! builds into `~/.cache/recmesh/tools/qdrant/qdrant` (or `QDRANT_BIN`),
//! started on free loopback ports with its own storage directory and killed
//! when dropped. Tests that find no binary (and no `QDRANT_URL`) skip and
//! say so: the server cannot be installed from the registries these
//! machines reach.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `tools/build-qdrant.sh` puts the server.
pub fn default_binary() -> PathBuf {
    std::env::var_os("QDRANT_BIN").map_or_else(
        || {
            Path::new(&std::env::var("HOME").unwrap_or_default())
                .join(".cache/recmesh/tools/qdrant/qdrant")
        },
        PathBuf::from,
    )
}

/// The Qdrant server a test runs against: `QDRANT_URL` when set, else the
/// built binary started with its storage in `dir` (the server, kept alive
/// by the caller, is returned with its URL). `None`, after printing why,
/// when there is neither.
pub fn server_for_test(dir: &Path) -> Option<(String, Option<QdrantServer>)> {
    if let Ok(url) = std::env::var("QDRANT_URL") {
        return Some((url, None));
    }
    let binary = default_binary();
    if !binary.exists() {
        eprintln!(
            "skipped: no Qdrant server. {} does not exist (build it with \
             `bash tools/build-qdrant.sh QDRANT_SRC RAFT_RS_SRC`), and QDRANT_URL is not set",
            binary.display()
        );
        return None;
    }
    match QdrantServer::start(&binary, dir) {
        Ok(server) => Some((server.url(), Some(server))),
        Err(e) => panic!("{} does not start: {e}", binary.display()),
    }
}

/// A `qdrant` child process.
#[derive(Debug)]
pub struct QdrantServer {
    child: Child,
    grpc_port: u16,
    dir: PathBuf,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl QdrantServer {
    /// Starts `binary` with its storage in `dir` (created, emptied); waits up
    /// to 60 s for its gRPC port.
    pub fn start(binary: &Path, dir: &Path) -> std::io::Result<QdrantServer> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir)?;
        let (grpc_port, http_port) = (free_port()?, free_port()?);
        let log = std::fs::File::create(dir.join("qdrant.log"))?;
        let child = Command::new(binary)
            .current_dir(dir)
            .env("QDRANT__STORAGE__STORAGE_PATH", dir.join("storage"))
            .env("QDRANT__STORAGE__SNAPSHOTS_PATH", dir.join("snapshots"))
            .env("QDRANT__SERVICE__HOST", "127.0.0.1")
            .env("QDRANT__SERVICE__GRPC_PORT", grpc_port.to_string())
            .env("QDRANT__SERVICE__HTTP_PORT", http_port.to_string())
            .env("QDRANT__TELEMETRY_DISABLED", "true")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()?;
        let mut server = QdrantServer {
            child,
            grpc_port,
            dir: dir.to_owned(),
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], grpc_port));
        let started = Instant::now();
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(std::io::Error::other(format!(
                    "qdrant exited with {status}; see {}",
                    server.dir.join("qdrant.log").display()
                )));
            }
            if started.elapsed() > Duration::from_secs(60) {
                return Err(std::io::Error::other(format!(
                    "qdrant did not open its gRPC port in 60 s; see {}",
                    server.dir.join("qdrant.log").display()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(server)
    }

    /// `http://127.0.0.1:<grpc port>`, the URL the `qdrant` backend takes.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }
}

impl Drop for QdrantServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

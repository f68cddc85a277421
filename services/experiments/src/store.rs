//! Durable state of the experiments service. Embedded: the experiment set
//! as one JSON file, replaced atomically (write, fsync, rename) on every
//! accepted change, and the sticky assignments as an append-only TSV.
//! Production: [`RedisStore`].

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::model::ExperimentSet;

/// State file name inside the state directory.
pub const STATE_FILE: &str = "experiments.json";
/// Sticky assignments file name inside the state directory.
pub const STICKY_FILE: &str = "sticky.tsv";

/// Sticky assignments: (experiment, user) → variant.
pub type Sticky = HashMap<(String, String), String>;

/// The state directory.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
    sticky: Mutex<File>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> anyhow::Error + '_ {
    move |e| anyhow::anyhow!("{}: {e}", path.display())
}

impl FileStore {
    /// Opens `dir` (created when missing); returns the saved set, if any,
    /// and the sticky assignments.
    pub fn open(dir: &Path) -> anyhow::Result<(FileStore, Option<ExperimentSet>, Sticky)> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let state = dir.join(STATE_FILE);
        let set = match std::fs::read_to_string(&state) {
            Ok(text) => Some(serde_json::from_str(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{}: not an experiments state file ({e}); move it away to start from experiments_file",
                    state.display()
                )
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&state)(e)),
        };
        let sticky_path = dir.join(STICKY_FILE);
        let mut sticky = Sticky::new();
        match std::fs::read_to_string(&sticky_path) {
            Ok(text) => {
                // A torn last line (crash mid-write) has fewer fields: skipped.
                for line in text.lines() {
                    let f: Vec<&str> = line.split('\t').collect();
                    if let [exp, user, variant] = f[..] {
                        sticky.insert((exp.to_owned(), user.to_owned()), variant.to_owned());
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&sticky_path)(e)),
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&sticky_path)
            .map_err(io(&sticky_path))?;
        Ok((
            FileStore {
                dir: dir.to_owned(),
                sticky: Mutex::new(file),
            },
            set,
            sticky,
        ))
    }

    /// Saves the set: a crash leaves the old file or the new one, never half.
    pub fn save(&self, set: &ExperimentSet) -> anyhow::Result<()> {
        let path = self.dir.join(STATE_FILE);
        let tmp = self.dir.join(format!(".{STATE_FILE}.tmp"));
        let text = serde_json::to_string_pretty(set)?;
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(text.as_bytes()).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        Ok(())
    }

    /// Records a sticky assignment (ids hold no tabs or newlines: validated).
    pub fn record_sticky(&self, experiment: &str, user: &str, variant: &str) {
        let mut f = self.sticky.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = writeln!(f, "{experiment}\t{user}\t{variant}") {
            tracing::warn!(error = %e, "sticky assignment not recorded; the user may move on a weight change");
        }
    }
}

/// Production state in Redis, shared by every experiments replica:
/// `<prefix>:experiments:state` (the set as JSON) and
/// `<prefix>:experiments:version`, changed together by one Lua script only
/// when the version is still the one the change started from (optimistic
/// concurrency across replicas); `<prefix>:experiments:sticky:<id>` hashes
/// user → variant (`HSETNX`: the first assignment wins). Replicas poll the
/// version and reload on a change.
#[derive(Debug)]
pub struct RedisStore {
    client: fred::clients::Client,
    prefix: String,
    timeout: std::time::Duration,
}

const SAVE_LUA: &str = r#"
local current = redis.call('GET', KEYS[2]) or '0'
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], ARGV[3])
return 1
"#;

impl RedisStore {
    /// Connects; returns the saved set, if any, and the sticky assignments
    /// of its sticky experiments.
    pub async fn open(
        url: &str,
        prefix: &str,
    ) -> anyhow::Result<(RedisStore, Option<ExperimentSet>, Sticky)> {
        use fred::prelude::*;
        let config =
            Config::from_url(url).map_err(|e| anyhow::anyhow!("`redis_url` {url:?}: {e}"))?;
        let client = recmesh_server::wait_while_redis_loads(
            url,
            recmesh_server::REDIS_LOADING_WAIT,
            || async {
                let client = Builder::from_config(config.clone())
                    .set_policy(ReconnectPolicy::new_constant(0, 200))
                    .build()?;
                client.init().await.map_err(|e| {
                    anyhow::anyhow!("cannot reach Redis at {url} (`redis_url`): {e}")
                })?;
                Ok::<_, anyhow::Error>(client)
            },
        )
        .await?;
        let store = RedisStore {
            client,
            prefix: prefix.to_owned(),
            timeout: std::time::Duration::from_secs(2),
        };
        let set = store.load().await?;
        let sticky = match &set {
            Some(set) => store.load_sticky(set).await?,
            None => Sticky::new(),
        };
        Ok((store, set, sticky))
    }

    fn key(&self, rest: &str) -> String {
        format!("{}:experiments:{rest}", self.prefix)
    }

    fn options(&self) -> fred::types::config::Options {
        fred::types::config::Options {
            timeout: Some(self.timeout),
            fail_fast: true,
            ..Default::default()
        }
    }

    /// The saved version (0: nothing saved).
    pub async fn version(&self) -> anyhow::Result<u64> {
        use fred::prelude::*;
        let v: Option<u64> = self
            .client
            .with_options(&self.options())
            .get(self.key("version"))
            .await?;
        Ok(v.unwrap_or(0))
    }

    /// The saved set.
    pub async fn load(&self) -> anyhow::Result<Option<ExperimentSet>> {
        use fred::prelude::*;
        let text: Option<String> = self
            .client
            .with_options(&self.options())
            .get(self.key("state"))
            .await?;
        text.map(|t| {
            serde_json::from_str(&t).map_err(|e| {
                anyhow::anyhow!("{} is not an experiments state ({e})", self.key("state"))
            })
        })
        .transpose()
    }

    /// The sticky assignments of the sticky experiments of `set`.
    pub async fn load_sticky(&self, set: &ExperimentSet) -> anyhow::Result<Sticky> {
        use fred::prelude::*;
        let mut sticky = Sticky::new();
        for s in set.experiments.iter().filter(|s| s.def.sticky) {
            let users: HashMap<String, String> = self
                .client
                .with_options(&self.options())
                .hgetall(self.key(&format!("sticky:{}", s.def.id)))
                .await?;
            for (user, variant) in users {
                sticky.insert((s.def.id.clone(), user), variant);
            }
        }
        Ok(sticky)
    }

    /// Saves `set` if the saved version is still `expected`; false when
    /// another replica changed it first.
    pub async fn save(&self, set: &ExperimentSet, expected: u64) -> anyhow::Result<bool> {
        use fred::prelude::*;
        let won: i64 = self
            .client
            .with_options(&self.options())
            .eval(
                SAVE_LUA,
                vec![self.key("state"), self.key("version")],
                vec![
                    expected.to_string(),
                    serde_json::to_string(set)?,
                    set.version.to_string(),
                ],
            )
            .await?;
        Ok(won == 1)
    }

    /// Records a sticky assignment in the background (`HSETNX`).
    pub fn record_sticky(&self, experiment: &str, user: &str, variant: &str) {
        use fred::prelude::*;
        let client = self.client.clone();
        let key = self.key(&format!("sticky:{experiment}"));
        let (user, variant) = (user.to_owned(), variant.to_owned());
        let options = self.options();
        tokio::spawn(async move {
            let r: Result<bool, _> = client
                .with_options(&options)
                .hsetnx(key, user, variant)
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, "sticky assignment not recorded in redis");
            }
        });
    }
}

/// Where the state lives.
#[derive(Debug)]
pub enum Store {
    /// Files in the state directory (embedded).
    File(FileStore),
    /// Redis (production, shared by replicas).
    Redis(RedisStore),
}

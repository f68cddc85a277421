//! Durable state of the embedded experiments service: the experiment set as
//! one JSON file, replaced atomically (write, fsync, rename) on every
//! accepted change, and the sticky assignments as an append-only TSV.

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

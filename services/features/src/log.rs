//! The append-only event file: the embedded event log, and the Redis
//! backend's outage buffer.
//!
//! Tab-separated with a header, one event per line, the same columns as the
//! dataset's `interactions.tsv` plus the event id first, so the trainer and a
//! human with `awk` read it alike. A batch is one `write` followed by
//! `fdatasync` (unless disabled): once `append` returns, the events survive a
//! crash of the process or the machine.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use recmesh_catalog::EventKind;

use crate::store::ValidEvent;

/// Header line of the event file.
pub const HEADER: &str = "event_id\tuser_id\titem_id\tevent\ttimestamp_ms\n";

/// The event file could not be opened, read or written.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line is not an event (the file was edited or is not an event log).
    #[error("{path}:{line}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// An open event file, positioned at its end.
#[derive(Debug)]
pub struct EventFile {
    path: PathBuf,
    file: File,
    fsync: bool,
    /// Events in the file.
    len: usize,
}

/// One event as a line (ids never hold control characters: validated).
fn line(e: &ValidEvent) -> String {
    format!(
        "{}\t{}\t{}\t{}\t{}\n",
        e.event_id,
        e.user,
        e.item,
        e.kind.as_str(),
        e.timestamp_ms
    )
}

fn parse(text: &str) -> Result<ValidEvent, String> {
    let f: Vec<&str> = text.split('\t').collect();
    let [id, user, item, event, ts] = f[..] else {
        return Err(format!(
            "expected 5 tab-separated columns, found {}",
            f.len()
        ));
    };
    Ok(ValidEvent {
        event_id: id.to_owned(),
        user: user.to_owned(),
        item: item.to_owned(),
        kind: EventKind::parse(event).ok_or_else(|| format!("unknown event `{event}`"))?,
        timestamp_ms: ts
            .parse()
            .map_err(|_| format!("timestamp `{ts}` is not an integer"))?,
    })
}

/// The events of complete lines of an event file's text.
fn parse_lines(path: &Path, text: &str) -> Result<Vec<ValidEvent>, LogError> {
    let mut lines = text.lines();
    if lines.next() != Some(HEADER.trim_end()) {
        return Err(LogError::Parse {
            path: path.to_owned(),
            line: 1,
            reason: format!(
                "not an event log: the header must be `{}`",
                HEADER.trim_end()
            ),
        });
    }
    lines
        .enumerate()
        .map(|(n, l)| {
            parse(l).map_err(|reason| LogError::Parse {
                path: path.to_owned(),
                line: n + 2,
                reason,
            })
        })
        .collect()
}

/// Reads an event file without changing it (a writer may be appending: a
/// last line without its newline is ignored, not cut).
pub fn read_events(path: &Path) -> Result<Vec<ValidEvent>, LogError> {
    let text = std::fs::read_to_string(path).map_err(|source| LogError::Io {
        path: path.to_owned(),
        source,
    })?;
    let complete = text.rfind('\n').map_or(0, |n| n + 1);
    parse_lines(path, &text[..complete])
}

impl EventFile {
    /// Opens (or creates) the file and returns the events already in it.
    ///
    /// A last line without its newline is a write torn by a crash: it was
    /// never acknowledged, so it is cut off and the file stays appendable.
    pub fn open(path: &Path, fsync: bool) -> Result<(EventFile, Vec<ValidEvent>), LogError> {
        let io = |source| LogError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(io)?;
        if text.is_empty() {
            file.write_all(HEADER.as_bytes()).map_err(io)?;
            file.sync_data().map_err(io)?;
            text.push_str(HEADER);
        }
        let complete = text.rfind('\n').map_or(0, |n| n + 1);
        if complete < text.len() {
            tracing::warn!(path = %path.display(), bytes = text.len() - complete,
                "event file ends in a torn write (a crash during append); cutting it off");
            file.set_len(complete as u64).map_err(io)?;
            file.seek(SeekFrom::End(0)).map_err(io)?;
        }
        let events = parse_lines(path, &text[..complete])?;
        let len = events.len();
        Ok((
            EventFile {
                path: path.to_owned(),
                file,
                fsync,
                len,
            },
            events,
        ))
    }

    /// Appends a batch in one write; durable on return when `fsync` is on.
    pub fn append(&mut self, events: &[ValidEvent]) -> Result<(), LogError> {
        if events.is_empty() {
            return Ok(());
        }
        let body: String = events.iter().map(line).collect();
        let io = |source| LogError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(body.as_bytes()).map_err(io)?;
        if self.fsync {
            self.file.sync_data().map_err(io)?;
        }
        self.len += events.len();
        Ok(())
    }

    /// Drops every event, keeping the header (the buffer after a replay).
    pub fn clear(&mut self) -> Result<(), LogError> {
        let io = |source| LogError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.set_len(HEADER.len() as u64).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        self.len = 0;
        Ok(())
    }

    /// Events in the file.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the file holds no event.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str) -> ValidEvent {
        ValidEvent {
            event_id: id.into(),
            user: "u1".into(),
            item: "i1".into(),
            kind: EventKind::AddToCart,
            timestamp_ms: 1_700_000_000_000,
        }
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("recmesh-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn appends_survive_reopen_and_clear_empties() {
        let path = dir("reopen").join("events.tsv");
        let (mut f, old) = EventFile::open(&path, true).expect("open");
        assert!(old.is_empty());
        f.append(&[ev("a"), ev("b")]).expect("append");
        f.append(&[ev("c")]).expect("append");
        drop(f);
        let (mut f, old) = EventFile::open(&path, true).expect("reopen");
        assert_eq!(old, vec![ev("a"), ev("b"), ev("c")]);
        assert_eq!(f.len(), 3);
        f.clear().expect("clear");
        f.append(&[ev("d")]).expect("append");
        drop(f);
        let (_, old) = EventFile::open(&path, true).expect("reopen");
        assert_eq!(old, vec![ev("d")]);
    }

    #[test]
    fn a_torn_last_line_is_cut_and_a_bad_line_is_named() {
        let path = dir("torn").join("events.tsv");
        let (mut f, _) = EventFile::open(&path, false).expect("create");
        f.append(&[ev("e1")]).expect("append");
        drop(f);
        let mut torn = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .expect("reopen for a torn write");
        torn.write_all(b"e2\tu1\ti").expect("torn write");
        drop(torn);
        let (mut f, old) = EventFile::open(&path, false).expect("open");
        assert_eq!(old, vec![ev("e1")]);
        f.append(&[ev("e3")]).expect("append after the cut");
        drop(f);
        let (_, old) = EventFile::open(&path, false).expect("reopen");
        assert_eq!(old, vec![ev("e1"), ev("e3")]);

        std::fs::write(&path, format!("{HEADER}e1\tu1\ti1\tlike\t5\n")).expect("write");
        let err = EventFile::open(&path, false)
            .expect_err("bad event")
            .to_string();
        assert!(err.ends_with("events.tsv:2: unknown event `like`"), "{err}");
    }
}

/// Reads up to `max` complete lines of `path` starting at byte `offset`
/// (0: after the header line, when `skip_header`). Returns the lines and the
/// offset after the last one returned: the cursor of the next read. A line
/// still being written (no newline yet) is left for the next read.
pub fn read_lines_after(
    path: &Path,
    offset: u64,
    max: usize,
    skip_header: bool,
) -> Result<(Vec<String>, u64), LogError> {
    let io = |source| LogError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = match File::open(path) {
        Ok(f) => f,
        // Nothing written yet.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), offset)),
        Err(e) => return Err(io(e)),
    };
    file.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut reader = std::io::BufReader::new(file);
    let mut lines = Vec::new();
    let mut at = offset;
    let mut buf = String::new();
    while lines.len() < max {
        buf.clear();
        let n = std::io::BufRead::read_line(&mut reader, &mut buf).map_err(io)?;
        if n == 0 || !buf.ends_with('\n') {
            break;
        }
        at += n as u64;
        if skip_header && at == n as u64 {
            continue;
        }
        lines.push(buf.trim_end_matches('\n').to_owned());
    }
    Ok((lines, at))
}

/// The events of an event file after byte `offset`; see [`read_lines_after`].
pub fn read_events_after(
    path: &Path,
    offset: u64,
    max: usize,
) -> Result<(Vec<ValidEvent>, u64), LogError> {
    let (lines, next) = read_lines_after(path, offset, max, true)?;
    let events = lines
        .iter()
        .map(|l| {
            parse(l).map_err(|reason| LogError::Parse {
                path: path.to_owned(),
                line: 0,
                reason,
            })
        })
        .collect::<Result<_, _>>()?;
    Ok((events, next))
}

/// An append-only file of JSON lines (the exposure log of the memory
/// backend). Not fsynced per batch: exposures feed experiment results, and
/// losing the last ones in a machine crash only delays them.
#[derive(Debug)]
pub struct JsonLines {
    path: PathBuf,
    file: File,
}

impl JsonLines {
    /// Opens (or creates) the file for appending.
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let io = |source| LogError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .open(path)
            .map_err(io)?;
        Ok(JsonLines {
            path: path.to_owned(),
            file,
        })
    }

    /// Appends lines (each without a newline) in one write.
    pub fn append(&mut self, lines: &[String]) -> Result<(), LogError> {
        let mut body = String::new();
        for l in lines {
            body.push_str(l);
            body.push('\n');
        }
        self.file
            .write_all(body.as_bytes())
            .map_err(|source| LogError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

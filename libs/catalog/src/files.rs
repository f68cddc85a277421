//! The on-disk dataset: `items.tsv` and `interactions.tsv`, tab-separated with
//! a header line. Plain text so a data scientist can produce it from anything;
//! every parse error names the file, the line and the column.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::demo::{self, DemoSpec};
use crate::{Dataset, EventKind, Interaction, Item};

/// File of the catalog.
pub const ITEMS_FILE: &str = "items.tsv";
/// File of the interactions.
pub const INTERACTIONS_FILE: &str = "interactions.tsv";

const ITEMS_HEADER: &[&str] = &[
    "item_id",
    "category",
    "brand",
    "price",
    "in_stock",
    "promoted",
    "created_at",
    "title",
];
const INTERACTIONS_HEADER: &[&str] = &["user_id", "item_id", "event", "timestamp_ms"];

/// A dataset could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file system refused.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line did not parse.
    #[error("{path}:{line}: column `{column}`: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Column name from the header.
        column: String,
        /// What is wrong.
        reason: String,
    },
    /// The demo spec is invalid.
    #[error("demo data: `{field}` {reason}")]
    Spec {
        /// Field of [`DemoSpec`].
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// Where a service gets its data.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSource {
    /// Directory with `items.tsv` and `interactions.tsv`; empty: generate the
    /// demo dataset described by `demo` in memory.
    pub dir: String,
    /// Demo dataset used when `dir` is empty.
    pub demo: DemoSpec,
}

impl DataSource {
    /// Reads the directory, or generates the demo data.
    pub fn load(&self) -> Result<Dataset, DataError> {
        if self.dir.is_empty() {
            self.demo
                .validate()
                .map_err(|(field, reason)| DataError::Spec { field, reason })?;
            Ok(demo::generate(&self.demo))
        } else {
            read_dir(Path::new(&self.dir))
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The catalog as the text of an `items.tsv`.
pub fn items_tsv(items: &[Item]) -> String {
    let mut out = ITEMS_HEADER.join("\t");
    out.push('\n');
    for i in items {
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            i.id,
            i.category,
            i.brand,
            i.price,
            u8::from(i.in_stock),
            u8::from(i.promoted),
            i.created_at,
            i.title.replace(['\t', '\n'], " ")
        );
    }
    out
}

/// Writes `data` into `dir` (created if missing). Each file is written to a
/// temporary name and renamed, so a reader never sees half a file.
pub fn write_dir(data: &Dataset, dir: &Path) -> Result<(), DataError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let items = items_tsv(&data.items);
    let mut inter = INTERACTIONS_HEADER.join("\t");
    inter.push('\n');
    for e in &data.interactions {
        let _ = writeln!(
            inter,
            "{}\t{}\t{}\t{}",
            e.user,
            e.item,
            e.kind.as_str(),
            e.timestamp_ms
        );
    }
    for (name, body) in [(ITEMS_FILE, items), (INTERACTIONS_FILE, inter)] {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, body).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
    }
    Ok(())
}

/// What to do with a malformed row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RowPolicy {
    /// Stop at the first one, naming file, line and column (the default:
    /// nothing shifts silently).
    #[default]
    Fail,
    /// Skip it and count it; the caller reports the count and the first error.
    Skip,
}

/// Rows skipped under [`RowPolicy::Skip`].
#[derive(Debug, Default)]
pub struct Skipped {
    /// How many.
    pub count: usize,
    /// The first one's error (file, line, column, reason).
    pub first: Option<DataError>,
}

impl Skipped {
    /// Applies `policy` to a row error: `Fail` returns it, `Skip` counts it.
    pub fn handle(&mut self, policy: RowPolicy, err: DataError) -> Result<(), DataError> {
        match policy {
            RowPolicy::Fail => Err(err),
            RowPolicy::Skip => {
                self.count += 1;
                self.first.get_or_insert(err);
                Ok(())
            }
        }
    }
}

/// Reads a dataset written by [`write_dir`] (or by hand in the same format);
/// the first malformed row is an error.
pub fn read_dir(dir: &Path) -> Result<Dataset, DataError> {
    read_dir_with(dir, RowPolicy::Fail).map(|(data, _)| data)
}

/// Reads a dataset with `policy` for malformed rows (header and I/O errors
/// always stop the read).
pub fn read_dir_with(dir: &Path, policy: RowPolicy) -> Result<(Dataset, Skipped), DataError> {
    let mut skipped = Skipped::default();
    let items = read_items(&dir.join(ITEMS_FILE), policy, &mut skipped)?;
    let inter_path = dir.join(INTERACTIONS_FILE);
    let text = std::fs::read_to_string(&inter_path).map_err(io(&inter_path))?;
    let mut interactions = Vec::new();
    for_each_row(
        &inter_path,
        &text,
        INTERACTIONS_HEADER,
        policy,
        &mut skipped,
        |row| {
            let event = row.get(2);
            interactions.push(Interaction {
                user: row.text(0)?,
                item: row.text(1)?,
                kind: EventKind::parse(event).ok_or_else(|| {
                    row.error(
                        2,
                        format!("unknown event `{event}` (view, click, add_to_cart, purchase)"),
                    )
                })?,
                timestamp_ms: row.number(3)?,
            });
            Ok(())
        },
    )?;
    Ok((Dataset::from_rows(items, interactions), skipped))
}

/// Reads an `items.tsv` with `policy` for malformed rows.
pub fn read_items(
    path: &Path,
    policy: RowPolicy,
    skipped: &mut Skipped,
) -> Result<Vec<Item>, DataError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let mut items = Vec::new();
    for_each_row(path, &text, ITEMS_HEADER, policy, skipped, |row| {
        items.push(Item {
            id: row.text(0)?,
            category: row.text(1)?,
            brand: row.get(2).to_owned(),
            price: row.number(3)?,
            in_stock: row.flag(4)?,
            promoted: row.flag(5)?,
            created_at: row.number(6)?,
            title: row.get(7).to_owned(),
        });
        Ok(())
    })?;
    Ok(items)
}

struct Row<'a> {
    path: &'a Path,
    line: usize,
    header: &'a [&'a str],
    fields: Vec<&'a str>,
}

impl Row<'_> {
    fn get(&self, col: usize) -> &str {
        self.fields.get(col).copied().unwrap_or("")
    }

    fn error(&self, col: usize, reason: String) -> DataError {
        DataError::Parse {
            path: self.path.to_owned(),
            line: self.line,
            column: self.header.get(col).copied().unwrap_or("?").to_owned(),
            reason,
        }
    }

    fn text(&self, col: usize) -> Result<String, DataError> {
        let v = self.get(col);
        if v.is_empty() {
            Err(self.error(col, "must not be empty".into()))
        } else {
            Ok(v.to_owned())
        }
    }

    fn number<T: std::str::FromStr>(&self, col: usize) -> Result<T, DataError> {
        let v = self.get(col);
        v.parse()
            .map_err(|_| self.error(col, format!("`{v}` is not a number")))
    }

    fn flag(&self, col: usize) -> Result<bool, DataError> {
        match self.get(col) {
            "1" | "true" => Ok(true),
            "0" | "false" => Ok(false),
            v => Err(self.error(col, format!("`{v}` is not 0/1/true/false"))),
        }
    }
}

fn for_each_row<'a>(
    path: &'a Path,
    text: &'a str,
    header: &'a [&'a str],
    policy: RowPolicy,
    skipped: &mut Skipped,
    mut f: impl FnMut(Row<'a>) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let mut lines = text.lines().enumerate();
    let found: Vec<&str> = lines
        .next()
        .map(|(_, l)| l.split('\t').collect())
        .unwrap_or_default();
    if found != header {
        return Err(DataError::Parse {
            path: path.to_owned(),
            line: 1,
            column: "header".into(),
            reason: format!(
                "expected `{}`, found `{}`",
                header.join("\\t"),
                found.join("\\t")
            ),
        });
    }
    for (n, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        let row = Row {
            path,
            line: n + 1,
            header,
            fields,
        };
        let result = if row.fields.len() != header.len() {
            Err(row.error(
                row.fields.len().min(header.len() - 1),
                format!(
                    "expected {} tab-separated fields, found {}",
                    header.len(),
                    row.fields.len()
                ),
            ))
        } else {
            f(row)
        };
        if let Err(e) = result {
            skipped.handle(policy, e)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("recmesh-files-{name}-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        dir
    }

    #[test]
    fn round_trip() {
        let spec = DemoSpec {
            items: 50,
            users: 10,
            interactions: 300,
            ..DemoSpec::default()
        };
        let data = demo::generate(&spec);
        let dir = temp_dir("rt");
        write_dir(&data, &dir).expect("write");
        let back = read_dir(&dir).expect("read");
        assert_eq!(back.fingerprint(), data.fingerprint());
        assert_eq!(back.items, data.items);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let dir = temp_dir("bad");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(
            dir.join(ITEMS_FILE),
            "item_id\tcategory\tbrand\tprice\tin_stock\tpromoted\tcreated_at\ttitle\ni1\tbooks\tb\tcheap\t1\t0\t0\tt\n",
        )
        .expect("write");
        let err = read_dir(&dir)
            .expect_err("price is not a number")
            .to_string();
        assert!(err.contains("items.tsv:2: column `price`"), "{err}");

        std::fs::write(
            dir.join(ITEMS_FILE),
            "item_id\tcategory\tbrand\tprice\tin_stock\tpromoted\tcreated_at\ttitle\ni1\tbooks\tb\t1\t1\t0\t0\tt\n",
        )
        .expect("write");
        std::fs::write(
            dir.join(INTERACTIONS_FILE),
            "user_id\titem_id\tevent\ttimestamp_ms\nu1\ti1\tlike\t5\n",
        )
        .expect("write");
        let err = read_dir(&dir).expect_err("unknown event").to_string();
        // Skip-and-count keeps the good rows and reports the bad one.
        std::fs::write(
            dir.join(INTERACTIONS_FILE),
            "user_id\titem_id\tevent\ttimestamp_ms\nu1\ti1\tlike\t5\nu1\ti1\tview\t6\nu2\ti1\n",
        )
        .expect("write");
        let (data, skipped) = read_dir_with(&dir, RowPolicy::Skip).expect("skips");
        assert_eq!(data.interactions.len(), 1);
        assert_eq!(skipped.count, 2, "the unknown event and the short row");
        let first = skipped.first.expect("first").to_string();
        assert!(
            first.contains("interactions.tsv:2: column `event`"),
            "{first}"
        );
        assert!(
            err.contains("interactions.tsv:2: column `event`: unknown event `like`"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}

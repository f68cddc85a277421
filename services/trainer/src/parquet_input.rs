//! Parquet input: `items.parquet` and `interactions.parquet` in one
//! directory, with the columns of the TSV format (`recmesh_catalog::files`),
//! found by name in any order.
//!
//! - items: `item_id` and `category` (strings) are required; `brand`,
//!   `title` (strings), `price` (any number), `in_stock`, `promoted`
//!   (boolean or 0/1), `created_at` (Unix seconds, or a timestamp) are
//!   optional, with the defaults "", the id, 0, true, false and 0;
//! - interactions: `user_id`, `item_id` (strings or integers), `event`
//!   (view, click, add_to_cart, purchase) and `timestamp_ms` (milliseconds,
//!   or a timestamp) are all required.
//!
//! A bad value is reported with the file, the 1-based row and the column,
//! under the same fail-or-skip policy as the text formats; a missing required
//! column stops the read whatever the policy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use recmesh_catalog::files::{DataError, RowPolicy, Skipped};
use recmesh_catalog::{Dataset, EventKind, Interaction, Item};

/// File of the catalog.
pub const ITEMS_FILE: &str = "items.parquet";
/// File of the interactions.
pub const INTERACTIONS_FILE: &str = "interactions.parquet";

/// One row's values by column name.
struct Row<'a> {
    path: &'a Path,
    row: usize,
    fields: HashMap<&'a str, &'a Field>,
}

impl Row<'_> {
    fn error(&self, column: &str, reason: impl Into<String>) -> DataError {
        DataError::Parse {
            path: self.path.to_owned(),
            line: self.row,
            column: column.to_owned(),
            reason: reason.into(),
        }
    }

    fn get(&self, column: &str) -> Option<&Field> {
        self.fields
            .get(column)
            .copied()
            .filter(|f| !matches!(f, Field::Null))
    }

    fn text(&self, column: &str) -> Result<Option<String>, DataError> {
        let Some(f) = self.get(column) else {
            return Ok(None);
        };
        let s = match f {
            Field::Str(s) => s.clone(),
            Field::Int(v) => v.to_string(),
            Field::Long(v) => v.to_string(),
            Field::UInt(v) => v.to_string(),
            Field::ULong(v) => v.to_string(),
            other => return Err(self.error(column, format!("`{other}` is not text"))),
        };
        Ok(Some(s))
    }

    fn required_text(&self, column: &str) -> Result<String, DataError> {
        match self.text(column)? {
            Some(s) if !s.is_empty() => Ok(s),
            _ => Err(self.error(column, "must not be empty")),
        }
    }

    fn number(&self, column: &str) -> Result<Option<f64>, DataError> {
        let Some(f) = self.get(column) else {
            return Ok(None);
        };
        let v = match f {
            Field::Byte(v) => f64::from(*v),
            Field::Short(v) => f64::from(*v),
            Field::Int(v) => f64::from(*v),
            Field::Long(v) => *v as f64,
            Field::UByte(v) => f64::from(*v),
            Field::UShort(v) => f64::from(*v),
            Field::UInt(v) => f64::from(*v),
            Field::ULong(v) => *v as f64,
            Field::Float(v) => f64::from(*v),
            Field::Double(v) => *v,
            other => return Err(self.error(column, format!("`{other}` is not a number"))),
        };
        if v.is_finite() {
            Ok(Some(v))
        } else {
            Err(self.error(column, format!("`{v}` is not a finite number")))
        }
    }

    /// Milliseconds: a number as is, or a timestamp column.
    fn millis(&self, column: &str) -> Result<Option<i64>, DataError> {
        match self.get(column) {
            Some(Field::TimestampMillis(v)) => Ok(Some(*v)),
            Some(Field::TimestampMicros(v)) => Ok(Some(v / 1_000)),
            _ => Ok(self.number(column)?.map(|v| v as i64)),
        }
    }

    fn flag(&self, column: &str) -> Result<Option<bool>, DataError> {
        match self.get(column) {
            None => Ok(None),
            Some(Field::Bool(b)) => Ok(Some(*b)),
            Some(_) => match self.number(column)? {
                Some(0.0) => Ok(Some(false)),
                Some(1.0) => Ok(Some(true)),
                _ => Err(self.error(column, "is not a boolean or 0/1")),
            },
        }
    }
}

fn open_error(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Io {
        path: path.to_owned(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Calls `f` on every row of the Parquet file at `path`, after checking it
/// has the `required` columns.
fn for_each_row(
    path: &Path,
    required: &[&str],
    policy: RowPolicy,
    skipped: &mut Skipped,
    mut f: impl FnMut(&Row<'_>) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_owned(),
        source,
    })?;
    let reader = SerializedFileReader::new(file).map_err(|e| open_error(path, e))?;
    let schema = reader.metadata().file_metadata().schema_descr();
    let columns: Vec<String> = (0..schema.num_columns())
        .map(|i| schema.column(i).name().to_owned())
        .collect();
    if let Some(missing) = required.iter().find(|c| !columns.iter().any(|n| n == *c)) {
        return Err(DataError::Parse {
            path: path.to_owned(),
            line: 0,
            column: (*missing).to_owned(),
            reason: format!("missing; the file has {}", columns.join(", ")),
        });
    }
    let rows = reader.get_row_iter(None).map_err(|e| open_error(path, e))?;
    for (n, row) in rows.enumerate() {
        let row = row.map_err(|e| DataError::Parse {
            path: path.to_owned(),
            line: n + 1,
            column: "?".into(),
            reason: e.to_string(),
        })?;
        let view = Row {
            path,
            row: n + 1,
            fields: row
                .get_column_iter()
                .map(|(name, field)| (name.as_str(), field))
                .collect(),
        };
        if let Err(e) = f(&view) {
            skipped.handle(policy, e)?;
        }
    }
    Ok(())
}

/// Reads `dir/items.parquet` and `dir/interactions.parquet` with `policy`
/// for bad rows; interactions come back sorted by time.
pub fn read_dir(dir: &Path, policy: RowPolicy) -> Result<(Dataset, Skipped), DataError> {
    let mut skipped = Skipped::default();
    let mut items = Vec::new();
    let items_path: PathBuf = dir.join(ITEMS_FILE);
    for_each_row(
        &items_path,
        &["item_id", "category"],
        policy,
        &mut skipped,
        |r| {
            let id = r.required_text("item_id")?;
            items.push(Item {
                category: r.required_text("category")?,
                brand: r.text("brand")?.unwrap_or_default(),
                price: r.number("price")?.unwrap_or(0.0),
                in_stock: r.flag("in_stock")?.unwrap_or(true),
                promoted: r.flag("promoted")?.unwrap_or(false),
                created_at: match r.get("created_at") {
                    Some(Field::TimestampMillis(_) | Field::TimestampMicros(_)) => {
                        r.millis("created_at")?.unwrap_or(0) / 1_000
                    }
                    _ => r.number("created_at")?.unwrap_or(0.0) as i64,
                },
                title: r.text("title")?.unwrap_or_else(|| id.clone()),
                id,
            });
            Ok(())
        },
    )?;
    let mut interactions = Vec::new();
    let inter_path = dir.join(INTERACTIONS_FILE);
    for_each_row(
        &inter_path,
        &["user_id", "item_id", "event", "timestamp_ms"],
        policy,
        &mut skipped,
        |r| {
            let event = r.required_text("event")?;
            interactions.push(Interaction {
                user: r.required_text("user_id")?,
                item: r.required_text("item_id")?,
                kind: EventKind::parse(&event).ok_or_else(|| {
                    r.error(
                        "event",
                        format!("unknown event `{event}` (view, click, add_to_cart, purchase)"),
                    )
                })?,
                timestamp_ms: r
                    .millis("timestamp_ms")?
                    .ok_or_else(|| r.error("timestamp_ms", "must not be empty"))?,
            });
            Ok(())
        },
    )?;
    Ok((Dataset::from_rows(items, interactions), skipped))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;

    use super::*;

    /// A column's values for the test writer.
    enum Col<'a> {
        Text(&'a [&'a str]),
        Long(&'a [i64]),
        Double(&'a [f64]),
    }

    fn write(path: &Path, schema: &str, columns: &[Col<'_>]) {
        let schema = Arc::new(parse_message_type(schema).expect("schema"));
        let file = std::fs::File::create(path).expect("create");
        let props = Arc::new(
            WriterProperties::builder()
                .set_compression(parquet::basic::Compression::SNAPPY)
                .build(),
        );
        let mut writer = SerializedFileWriter::new(file, schema, props).expect("writer");
        let mut group = writer.next_row_group().expect("row group");
        for col in columns {
            let mut c = group.next_column().expect("column").expect("one more");
            match col {
                Col::Text(v) => {
                    let v: Vec<ByteArray> = v.iter().map(|s| ByteArray::from(*s)).collect();
                    c.typed::<ByteArrayType>()
                        .write_batch(&v, None, None)
                        .expect("write");
                }
                Col::Long(v) => {
                    c.typed::<Int64Type>()
                        .write_batch(v, None, None)
                        .expect("write");
                }
                Col::Double(v) => {
                    c.typed::<DoubleType>()
                        .write_batch(v, None, None)
                        .expect("write");
                }
            }
            c.close().expect("close column");
        }
        group.close().expect("close group");
        writer.close().expect("close file");
    }

    fn fixture(events: &[&str]) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("recmesh-parquet-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        // Columns in another order than the TSV, some optional ones absent.
        write(
            &dir.join(ITEMS_FILE),
            "message items { REQUIRED DOUBLE price; REQUIRED BYTE_ARRAY category (UTF8); \
             REQUIRED BYTE_ARRAY item_id (UTF8); }",
            &[
                Col::Double(&[9.5, 20.0]),
                Col::Text(&["books", "toys"]),
                Col::Text(&["i1", "i2"]),
            ],
        );
        let n = events.len();
        let users: Vec<&str> = (0..n).map(|_| "u1").collect();
        let items: Vec<&str> = (0..n)
            .map(|i| if i % 2 == 0 { "i1" } else { "i2" })
            .collect();
        let times: Vec<i64> = (0..n as i64).rev().map(|i| 1_700_000_000_000 + i).collect();
        write(
            &dir.join(INTERACTIONS_FILE),
            "message inter { REQUIRED BYTE_ARRAY user_id (UTF8); REQUIRED BYTE_ARRAY item_id (UTF8); \
             REQUIRED BYTE_ARRAY event (UTF8); REQUIRED INT64 timestamp_ms; }",
            &[
                Col::Text(&users),
                Col::Text(&items),
                Col::Text(events),
                Col::Long(&times),
            ],
        );
        dir
    }

    #[test]
    fn reads_columns_by_name_with_defaults() {
        let dir = fixture(&["view", "purchase", "click"]);
        let (data, skipped) = read_dir(&dir, RowPolicy::Fail).expect("reads");
        assert_eq!(skipped.count, 0);
        assert_eq!(data.items.len(), 2);
        let i2 = &data.items[1];
        assert_eq!(
            (i2.id.as_str(), i2.category.as_str(), i2.price, i2.in_stock),
            ("i2", "toys", 20.0, true)
        );
        assert_eq!(i2.title, "i2", "the title defaults to the id");
        assert_eq!(data.interactions.len(), 3);
        assert!(
            data.interactions
                .windows(2)
                .all(|w| w[0].timestamp_ms <= w[1].timestamp_ms),
            "sorted by time"
        );
        assert_eq!(data.interactions[0].kind, EventKind::Click);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_row_names_file_row_and_column_or_is_skipped() {
        let dir = fixture(&["view", "like", "click"]);
        let err = read_dir(&dir, RowPolicy::Fail)
            .expect_err("unknown event")
            .to_string();
        assert!(
            err.contains("interactions.parquet:2:")
                && err.contains("`event`")
                && err.contains("like"),
            "{err}"
        );
        let (data, skipped) = read_dir(&dir, RowPolicy::Skip).expect("skips");
        assert_eq!((data.interactions.len(), skipped.count), (2, 1));

        // A missing required column stops the read whatever the policy.
        write(
            &dir.join(ITEMS_FILE),
            "message items { REQUIRED BYTE_ARRAY item_id (UTF8); }",
            &[Col::Text(&["i1"])],
        );
        let err = read_dir(&dir, RowPolicy::Skip)
            .expect_err("no category")
            .to_string();
        assert!(
            err.contains("`category`") && err.contains("missing"),
            "{err}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

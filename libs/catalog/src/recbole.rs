//! RecBole atomic files (`<name>.inter`, `<name>.item`), as MovieLens-100k
//! ships inside the `recbole` wheel, read into a [`Dataset`].
//!
//! Columns are found by their header names (`user_id:token`, `rating:float`,
//! ...), so column order does not matter. The mapping to the shop's model:
//! - an item's category is its first genre (`class`); it has no brand (a
//!   film has none, so no brand cap applies), its title is the film's with
//!   the release year as MovieLens writes it (`Toy Story (1995)`), its
//!   creation time the start of that year, price 0 (unknown), in stock;
//! - a rating becomes an event of matching strength: 5 → purchase,
//!   4 → add to cart, 3 → click, 1–2 → view (implicit feedback keeps every
//!   rating as an interaction, stronger ratings weigh more).

use std::path::{Path, PathBuf};

use crate::files::{DataError, RowPolicy, Skipped};
use crate::{Dataset, EventKind, Interaction, Item};

fn parse_err(path: &Path, line: usize, column: &str, reason: String) -> DataError {
    DataError::Parse {
        path: path.to_owned(),
        line,
        column: column.to_owned(),
        reason,
    }
}

/// Reads `<dir>/<name>.inter` and `<dir>/<name>.item`; the first malformed
/// row is an error.
pub fn read(dir: &Path, name: &str) -> Result<Dataset, DataError> {
    read_with(dir, name, RowPolicy::Fail).map(|(data, _)| data)
}

/// Reads with `policy` for malformed rows.
pub fn read_with(
    dir: &Path,
    name: &str,
    policy: RowPolicy,
) -> Result<(Dataset, Skipped), DataError> {
    let mut skipped = Skipped::default();
    let items_path = dir.join(format!("{name}.item"));
    let inter_path = dir.join(format!("{name}.inter"));
    let items = read_table(
        &items_path,
        policy,
        &mut skipped,
        &["item_id", "movie_title", "release_year", "class"],
        |cols, line| {
            let id = cols[0];
            if id.is_empty() {
                return Err(parse_err(
                    &items_path,
                    line,
                    "item_id",
                    "must not be empty".into(),
                ));
            }
            let year: Option<i64> = cols[2].parse().ok();
            let category = cols[3]
                .split_whitespace()
                .next()
                .unwrap_or("unknown")
                .to_lowercase();
            Ok(Item {
                id: id.to_owned(),
                category,
                // Not the decade: a brand cap of 2 would then mean "at most
                // two 1990s films", which cost NDCG@10 0.160 against 0.225
                // on MovieLens-100k (docs/evaluation.md).
                brand: String::new(),
                price: 0.0,
                in_stock: true,
                promoted: false,
                // Jan 1 of the release year (days from 1970 by the 365.2425-day year).
                created_at: year.map_or(0, |y| ((y - 1970) as f64 * 365.2425 * 86_400.0) as i64),
                title: match year {
                    Some(y) => format!("{} ({y})", cols[1]),
                    None => cols[1].to_owned(),
                },
            })
        },
    )?;
    let interactions = read_table(
        &inter_path,
        policy,
        &mut skipped,
        &["user_id", "item_id", "rating", "timestamp"],
        |cols, line| {
            let rating: f64 = cols[2].parse().map_err(|_| {
                parse_err(
                    &inter_path,
                    line,
                    "rating",
                    format!("`{}` is not a number", cols[2]),
                )
            })?;
            let ts: f64 = cols[3].parse().map_err(|_| {
                parse_err(
                    &inter_path,
                    line,
                    "timestamp",
                    format!("`{}` is not a number", cols[3]),
                )
            })?;
            let kind = match rating.round() as i64 {
                5.. => EventKind::Purchase,
                4 => EventKind::AddToCart,
                3 => EventKind::Click,
                _ => EventKind::View,
            };
            Ok(Interaction {
                user: cols[0].to_owned(),
                item: cols[1].to_owned(),
                kind,
                timestamp_ms: (ts * 1000.0) as i64,
            })
        },
    )?;
    Ok((Dataset::from_rows(items, interactions), skipped))
}

/// Reads a RecBole table, picking `wanted` columns by name (the part of the
/// header before `:`), and maps every row with `f(columns, line)`.
fn read_table<T>(
    path: &Path,
    policy: RowPolicy,
    skipped: &mut Skipped,
    wanted: &[&str],
    mut f: impl FnMut(&[&str], usize) -> Result<T, DataError>,
) -> Result<Vec<T>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: PathBuf::from(path),
        source,
    })?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split('\t')
        .map(|h| h.split(':').next().unwrap_or(h))
        .collect();
    let index: Vec<usize> = wanted
        .iter()
        .map(|w| {
            header.iter().position(|h| h == w).ok_or_else(|| {
                parse_err(path, 1, w, format!("column missing from header {header:?}"))
            })
        })
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    let mut cols = Vec::with_capacity(wanted.len());
    for (n, line) in lines.enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split('\t').collect();
        cols.clear();
        let missing = wanted
            .iter()
            .zip(&index)
            .find_map(|(w, &i)| match fields.get(i) {
                Some(v) => {
                    cols.push(*v);
                    None
                }
                None => Some(parse_err(
                    path,
                    n + 2,
                    w,
                    format!("row has {} fields", fields.len()),
                )),
            });
        let row = match missing {
            Some(e) => Err(e),
            None => f(&cols, n + 2),
        };
        match row {
            Ok(v) => out.push(v),
            Err(e) => skipped.handle(policy, e)?,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_atomic_files_and_names_bad_cells() {
        let dir = std::env::temp_dir().join(format!("recmesh-recbole-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(
            dir.join("ml.item"),
            "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n1\tToy Story\t1995\tAnimation Children's\n",
        )
        .expect("write");
        std::fs::write(
            dir.join("ml.inter"),
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\n7\t1\t5\t881250949\n8\t1\t2\t881250950\n",
        )
        .expect("write");
        let d = read(&dir, "ml").expect("reads");
        assert_eq!(d.items[0].category, "animation");
        assert_eq!(d.items[0].brand, "");
        assert_eq!(d.items[0].title, "Toy Story (1995)");
        assert_eq!(d.interactions[0].kind, EventKind::Purchase);
        assert_eq!(d.interactions[1].kind, EventKind::View);
        assert_eq!(d.interactions[0].timestamp_ms, 881_250_949_000);

        std::fs::write(
            dir.join("ml.inter"),
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\n7\t1\tgood\t881250949\n",
        )
        .expect("write");
        let e = read(&dir, "ml").expect_err("bad rating").to_string();
        assert!(e.contains("ml.inter:2: column `rating`"), "{e}");
        std::fs::write(
            dir.join("ml.inter"),
            "user_id:token\titem_id:token\trating:float\ttimestamp:float\n7\t1\tgood\t881250949\n7\t1\t4\t881250950\n7\n",
        )
        .expect("write");
        let (d, skipped) = read_with(&dir, "ml", RowPolicy::Skip).expect("skips");
        assert_eq!(d.interactions.len(), 1);
        assert_eq!(skipped.count, 2, "the bad rating and the short row");
        std::fs::remove_dir_all(&dir).ok();
    }
}

//! Exact search: a scan over every vector. The recall baseline, and the
//! index when none was built.

use std::collections::HashMap;
use std::sync::RwLock;

use crate::{BoxFuture, Hit, Point, Query, VectorError, VectorIndex, check_dim, cosine};

/// Every point in memory, scanned per query.
#[derive(Debug)]
pub struct ExactIndex {
    dim: usize,
    /// Scores by dot product instead of cosine.
    by_dot: bool,
    points: RwLock<Points>,
}

#[derive(Debug, Default)]
struct Points {
    rows: Vec<Point>,
    by_id: HashMap<u32, usize>,
}

impl ExactIndex {
    /// An empty index of dimension `dim`.
    pub fn new(dim: usize) -> Self {
        ExactIndex {
            dim,
            by_dot: false,
            points: RwLock::new(Points::default()),
        }
    }

    /// An empty index of dimension `dim` that scores by dot product (what
    /// [`crate::mips::Mips`] approximates; retrieval's exact scan).
    pub fn by_dot_product(dim: usize) -> Self {
        ExactIndex {
            by_dot: true,
            ..ExactIndex::new(dim)
        }
    }

    /// Inserts or replaces points, synchronously.
    pub fn upsert_now(&self, points: Vec<Point>) -> Result<(), VectorError> {
        for (n, p) in points.iter().enumerate() {
            check_dim(&format!("points[{n}].vector"), self.dim, &p.vector)?;
        }
        let mut all = self.points.write().unwrap_or_else(|p| p.into_inner());
        for p in points {
            match all.by_id.get(&p.id) {
                Some(&row) => all.rows[row] = p,
                None => {
                    let row = all.rows.len();
                    all.by_id.insert(p.id, row);
                    all.rows.push(p);
                }
            }
        }
        Ok(())
    }

    /// The search, synchronously.
    pub fn search_now(&self, query: &Query) -> Result<Vec<Hit>, VectorError> {
        check_dim("query.vector", self.dim, &query.vector)?;
        let all = self.points.read().unwrap_or_else(|p| p.into_inner());
        // Sorted and searched: a few dozen ids (a user's seen items) probed
        // once per point is cheaper than hashing each point's id.
        let mut excluded = query.filter.exclude.clone();
        excluded.sort_unstable();
        let allowed = all
            .rows
            .iter()
            .filter(|p| excluded.binary_search(&p.id).is_err() && query.filter.allows_payload(p));
        let mut hits: Vec<Hit> = Vec::with_capacity(all.rows.len());
        if self.by_dot {
            recmesh_algo::als::similarities(
                &query.vector,
                allowed.map(|p| (p.id, p.vector.as_slice())),
                |id, score| hits.push(Hit { id, score }),
            );
        } else {
            hits.extend(allowed.map(|p| Hit {
                id: p.id,
                score: cosine(&query.vector, &p.vector),
            }));
        }
        // Only the best `limit` are sorted (a hundred of 5,000 on the demo
        // catalog: the full sort was a tenth of the in-process pipeline's
        // CPU).
        recmesh_algo::top_k(&mut hits, query.limit, |a, b| {
            b.score.total_cmp(&a.score).then(a.id.cmp(&b.id))
        });
        Ok(hits)
    }
}

impl VectorIndex for ExactIndex {
    fn backend(&self) -> &'static str {
        "exact"
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn upsert(&self, points: Vec<Point>) -> BoxFuture<'_, Result<(), VectorError>> {
        Box::pin(async move { self.upsert_now(points) })
    }

    fn count(&self) -> BoxFuture<'_, Result<usize, VectorError>> {
        Box::pin(async move {
            Ok(self
                .points
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .rows
                .len())
        })
    }

    fn search(&self, query: Query) -> BoxFuture<'_, Result<Vec<Hit>, VectorError>> {
        Box::pin(async move { self.search_now(&query) })
    }

    fn search_blocking(&self, query: &Query) -> Result<Vec<Hit>, VectorError> {
        self.search_now(query)
    }
}

//! Maximum inner product search through a cosine index.
//!
//! ALS scores a user's liking of an item by the dot product of their
//! vectors; an item vector's length carries how broadly liked the item is,
//! which cosine divides out (serving by cosine cost 6% of NDCG@10 on
//! MovieLens, docs/evaluation.md). An HNSW graph built on the dot product
//! itself is not a metric graph and walks badly: recall@100 0.67 at ef 128
//! on 1M items, against 0.96 for cosine (docs/ann.md).
//!
//! So every item vector `x` gets one more coordinate, `sqrt(M² − |x|²)`,
//! where `M` is the largest item norm: every stored vector has length `M`.
//! A query `q` gets 0. Then `cos(q', x') = q·x / (|q| M)`, so the cosine
//! order is exactly the dot product order (Bachrach et al., "Speeding up
//! the Xbox recommender system using a Euclidean transformation for
//! inner-product spaces", RecSys 2014; the `implicit` library serves its
//! approximate ALS the same way). [`Mips`] wraps any backend: callers give
//! and get the model's own vectors and dot products.

use crate::{BoxFuture, Hit, Point, Query, VectorError, VectorIndex, check_dim};

/// The largest norm among `vectors` (0 for none).
pub fn max_norm<'a>(vectors: impl IntoIterator<Item = &'a [f32]>) -> f32 {
    vectors.into_iter().map(norm).fold(0.0f32, f32::max)
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// `v` with the coordinate that brings its length to `max_norm` (0 for a
/// vector already that long or longer).
pub fn augment(v: &[f32], max_norm: f32) -> Vec<f32> {
    let squared: f32 = v.iter().map(|x| x * x).sum();
    let mut out = Vec::with_capacity(v.len() + 1);
    out.extend_from_slice(v);
    out.push((max_norm * max_norm - squared).max(0.0).sqrt());
    out
}

/// A cosine index of dimension `dim + 1` searched by inner product in
/// dimension `dim`. Points upserted later than the index was sized for
/// must not be longer than `max_norm`; longer ones are stored, but
/// ranked as if they were `max_norm` long.
#[derive(Debug)]
pub struct Mips<I> {
    inner: I,
    dim: usize,
    max_norm: f32,
}

impl<I: VectorIndex> Mips<I> {
    /// Wraps `inner` (dimension `dim + 1`, holding augmented vectors).
    pub fn new(inner: I, max_norm: f32) -> Self {
        let dim = inner.dim().saturating_sub(1);
        Mips {
            inner,
            dim,
            max_norm,
        }
    }

    /// The backend, holding augmented vectors.
    pub fn inner(&self) -> &I {
        &self.inner
    }

    /// The backend, to change its search settings.
    pub fn inner_mut(&mut self) -> &mut I {
        &mut self.inner
    }

    /// The largest item norm the index was sized for.
    pub fn max_norm(&self) -> f32 {
        self.max_norm
    }

    /// `p` as stored: its vector augmented. The error names `field`.
    pub fn augment_point(&self, field: &str, mut p: Point) -> Result<Point, VectorError> {
        check_dim(field, self.dim, &p.vector)?;
        p.vector = augment(&p.vector, self.max_norm);
        Ok(p)
    }

    /// Runs `search` (any search of the backend) with the query augmented,
    /// and turns its cosines back into dot products.
    pub fn search_with(
        &self,
        query: &Query,
        search: impl FnOnce(&I, &Query) -> Result<Vec<Hit>, VectorError>,
    ) -> Result<Vec<Hit>, VectorError> {
        let inner = self.query(query)?;
        search(&self.inner, &inner).map(|hits| self.dots(query, hits))
    }

    fn query(&self, query: &Query) -> Result<Query, VectorError> {
        check_dim("query.vector", self.dim, &query.vector)?;
        let mut inner = query.clone();
        inner.vector.push(0.0);
        Ok(inner)
    }

    fn dots(&self, query: &Query, mut hits: Vec<Hit>) -> Vec<Hit> {
        let scale = norm(&query.vector) * self.max_norm;
        for h in &mut hits {
            h.score *= scale;
        }
        hits
    }
}

impl<I: VectorIndex> VectorIndex for Mips<I> {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn upsert(&self, points: Vec<Point>) -> BoxFuture<'_, Result<(), VectorError>> {
        Box::pin(async move {
            let points = points
                .into_iter()
                .enumerate()
                .map(|(n, p)| self.augment_point(&format!("points[{n}].vector"), p))
                .collect::<Result<Vec<_>, _>>()?;
            self.inner.upsert(points).await
        })
    }

    fn count(&self) -> BoxFuture<'_, Result<usize, VectorError>> {
        self.inner.count()
    }

    fn search(&self, query: Query) -> BoxFuture<'_, Result<Vec<Hit>, VectorError>> {
        Box::pin(async move {
            let inner = self.query(&query)?;
            let hits = self.inner.search(inner).await?;
            Ok(self.dots(&query, hits))
        })
    }

    fn search_blocking(&self, query: &Query) -> Result<Vec<Hit>, VectorError> {
        self.search_with(query, |i, q| i.search_blocking(q))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exact::ExactIndex;
    use crate::{Filter, dot};

    #[test]
    fn augmented_vectors_all_have_the_largest_norm() {
        let vs: [&[f32]; 3] = [&[3.0, 4.0], &[1.0, 0.0], &[0.0, 0.0]];
        assert_eq!(max_norm(vs), 5.0);
        assert_eq!(augment(&[3.0, 4.0], 5.0), vec![3.0, 4.0, 0.0]);
        // 1 + x² = 25
        assert_eq!(augment(&[1.0, 0.0], 5.0), vec![1.0, 0.0, 24f32.sqrt()]);
        assert_eq!(augment(&[0.0, 0.0], 5.0), vec![0.0, 0.0, 5.0]);
        // Longer than the index was sized for: nothing to add.
        assert_eq!(augment(&[6.0, 8.0], 5.0), vec![6.0, 8.0, 0.0]);
    }

    /// Cosine would rank the short item first (it points the query's
    /// way); the dot product ranks the long one first, and so does Mips.
    #[test]
    fn ranks_by_the_dot_product_not_the_cosine() {
        let items = [vec![1.0f32, 0.1], vec![4.0, 2.0], vec![-1.0, 3.0]];
        let index = Mips::new(
            ExactIndex::new(3),
            max_norm(items.iter().map(Vec::as_slice)),
        );
        let points = items
            .iter()
            .enumerate()
            .map(|(id, v)| Point {
                id: id as u32,
                vector: v.clone(),
                category: 0,
                in_stock: true,
                price: 1.0,
                created_at: 0,
            })
            .map(|p| index.augment_point("points", p).expect("two dimensions"))
            .collect();
        index.inner().upsert_now(points).expect("three dimensions");
        let query = Query {
            vector: vec![1.0, 0.0],
            limit: 3,
            filter: Filter::default(),
        };
        let hits = index.search_blocking(&query).expect("two dimensions");
        assert_eq!(hits.iter().map(|h| h.id).collect::<Vec<_>>(), vec![1, 0, 2]);
        for h in &hits {
            let want = dot(&query.vector, &items[h.id as usize]);
            assert!((h.score - want).abs() < 1e-5, "{h:?}: dot {want}");
        }
        // The wrapper speaks the model's dimension, and says so.
        let bad = Query {
            vector: vec![1.0, 0.0, 0.0],
            ..query
        };
        match index.search_blocking(&bad) {
            Err(VectorError::Dimension {
                field,
                expected,
                got,
            }) => {
                assert_eq!((field.as_str(), expected, got), ("query.vector", 2, 3));
            }
            other => panic!("want a dimension error, got {other:?}"),
        }
    }
}

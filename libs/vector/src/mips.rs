//! Maximum inner product search over a cosine index.
//!
//! ALS scores a user's liking of an item by the dot product of their
//! vectors; an item vector's length carries how broadly liked the item is,
//! which cosine divides out (serving by cosine cost 6% of NDCG@10 on
//! MovieLens, docs/evaluation.md). Two textbook ways to search by dot
//! product with HNSW both fail on ALS vectors, measured at 1M items
//! (docs/ann.md): a graph built on the dot product itself reaches recall@100
//! 0.67 at ef 128, and the reduction to cosine (append `sqrt(M² − |x|²)`)
//! 0.07, because item norms are heavy-tailed: most items are short, so
//! after the reduction they all point along the added axis and the graph
//! cannot tell them apart.
//!
//! What works is splitting by norm (after Yan et al., "Norm-ranging LSH
//! for maximum inner product search", NeurIPS 2018), in two ranges:
//! - the **head**, the longest item vectors, is scanned exactly by dot
//!   product (a few thousand vectors: well under a millisecond);
//! - the **tail** is searched in the cosine index for `fetch × limit` hits,
//!   rescored as `cos · |q| · |x|` with each item's norm kept in memory
//!   (4 bytes an item). A tail item shorter than the head's shortest can
//!   only enter the top by a high cosine, which is what the graph finds.
//!
//! [`Mips`] wraps any backend: callers give and get the model's own
//! vectors and dot products.

use std::collections::HashSet;
use std::sync::RwLock;

use crate::{BoxFuture, Hit, Point, Query, VectorError, VectorIndex, check_dim, dot};

/// Head and tail settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MipsParams {
    /// Longest item vectors scanned exactly.
    pub head: usize,
    /// Tail hits fetched per result wanted.
    pub fetch: usize,
}

impl Default for MipsParams {
    fn default() -> Self {
        // Measured on user vectors of a trained model at 1M items (docs/ann.md).
        // Recall@100 1.000 at 1,580 QPS; the head's scan costs ~0.2 ms
        // (run 3). A filtered page needs the long head: 0.80 for one
        // category at 10,000, 0.49 at 2,000.
        MipsParams {
            head: 10_000,
            fetch: 1,
        }
    }
}

/// Vector norm.
pub fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

#[derive(Debug, Default)]
struct State {
    /// Norm of each item's vector, by id (0 for an id never stored).
    norms: Vec<f32>,
    /// The longest vectors, longest first.
    head: Vec<Point>,
    /// Their vectors side by side, scanned per query (a `Vec` per point
    /// would cost a cache miss each).
    head_vectors: Vec<f32>,
}

impl State {
    /// Keeps the `len` longest head vectors, longest first.
    fn trim(&mut self, len: usize) {
        let norms = &self.norms;
        let key = |p: &Point| norms[p.id as usize];
        self.head
            .sort_by(|a, b| key(b).total_cmp(&key(a)).then(a.id.cmp(&b.id)));
        self.head.truncate(len);
        self.head_vectors = self
            .head
            .iter()
            .flat_map(|p| p.vector.iter().copied())
            .collect();
    }
}

/// A cosine index searched by dot product; see the module docs.
#[derive(Debug)]
pub struct Mips<I> {
    tail: I,
    params: MipsParams,
    state: RwLock<State>,
}

impl<I: VectorIndex> Mips<I> {
    /// Wraps `tail`, which already holds `points` (the model's vectors):
    /// keeps their norms and the `params.head` longest.
    pub fn new(tail: I, points: impl IntoIterator<Item = Point>, params: MipsParams) -> Self {
        // The longest `head`, selected as the points stream by (at most
        // twice `head` held at once).
        let mut state = State::default();
        for p in points {
            let id = p.id as usize;
            if state.norms.len() <= id {
                state.norms.resize(id + 1, 0.0);
            }
            state.norms[id] = norm(&p.vector);
            if params.head > 0 {
                state.head.push(p);
                if state.head.len() >= 2 * params.head {
                    state.trim(params.head);
                }
            }
        }
        state.trim(params.head);
        Mips {
            tail,
            params,
            state: RwLock::new(state),
        }
    }

    /// The backend, holding the model's vectors.
    pub fn inner(&self) -> &I {
        &self.tail
    }

    /// The backend, to change its search settings.
    pub fn inner_mut(&mut self) -> &mut I {
        &mut self.tail
    }

    /// Uses the `head` longest vectors already kept (fewer: as many as
    /// there are) and fetches `fetch` tail hits per result.
    pub fn set_params(&mut self, params: MipsParams) {
        self.params.fetch = params.fetch.max(1);
        self.params.head = params.head;
    }

    /// Points upserted after construction: their norms, and the head.
    fn remember(&self, points: Vec<Point>) {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        for p in points {
            let id = p.id as usize;
            if state.norms.len() <= id {
                state.norms.resize(id + 1, 0.0);
            }
            state.norms[id] = norm(&p.vector);
            state.head.retain(|h| h.id != p.id);
            state.head.push(p);
        }
        state.trim(self.params.head);
    }

    /// Runs `search` (any search of the backend) on the tail with the
    /// query's limit raised to `fetch × limit`, rescores its hits by dot
    /// product, and merges the exact head.
    pub fn search_with(
        &self,
        query: &Query,
        search: impl FnOnce(&I, &Query) -> Result<Vec<Hit>, VectorError>,
    ) -> Result<Vec<Hit>, VectorError> {
        check_dim("query.vector", self.tail.dim(), &query.vector)?;
        let tail = search(&self.tail, &self.tail_query(query))?;
        Ok(self.merge(query, tail))
    }

    fn tail_query(&self, query: &Query) -> Query {
        Query {
            limit: query.limit.saturating_mul(self.params.fetch.max(1)),
            ..query.clone()
        }
    }

    fn merge(&self, query: &Query, tail: Vec<Hit>) -> Vec<Hit> {
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        let q = norm(&query.vector);
        let head = &state.head[..self.params.head.min(state.head.len())];
        // Exclusion lists run to thousands of ids (a user's history).
        let excluded: HashSet<u32> = query.filter.exclude.iter().copied().collect();
        let dim = query.vector.len().max(1);
        let mut hits: Vec<Hit> = head
            .iter()
            .zip(state.head_vectors.chunks_exact(dim))
            .filter(|(p, _)| !excluded.contains(&p.id) && query.filter.allows_payload(p))
            .map(|(p, v)| Hit {
                id: p.id,
                score: dot(&query.vector, v),
            })
            .collect();
        let best_first = |a: &Hit, b: &Hit| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id));
        if hits.len() > query.limit && query.limit > 0 {
            hits.select_nth_unstable_by(query.limit - 1, best_first);
            hits.truncate(query.limit);
        }
        hits.extend(tail.into_iter().map(|h| Hit {
            id: h.id,
            score: h.score * q * state.norms.get(h.id as usize).copied().unwrap_or(0.0),
        }));
        hits.sort_by(best_first);
        // A head item the tail found too is there twice, with the same score.
        let mut seen = HashSet::with_capacity(query.limit);
        hits.retain(|h| seen.len() < query.limit && seen.insert(h.id));
        hits
    }
}

impl<I: VectorIndex> VectorIndex for Mips<I> {
    fn backend(&self) -> &'static str {
        self.tail.backend()
    }

    fn dim(&self) -> usize {
        self.tail.dim()
    }

    fn upsert(&self, points: Vec<Point>) -> BoxFuture<'_, Result<(), VectorError>> {
        Box::pin(async move {
            self.tail.upsert(points.clone()).await?;
            self.remember(points);
            Ok(())
        })
    }

    fn count(&self) -> BoxFuture<'_, Result<usize, VectorError>> {
        self.tail.count()
    }

    fn search(&self, query: Query) -> BoxFuture<'_, Result<Vec<Hit>, VectorError>> {
        Box::pin(async move {
            check_dim("query.vector", self.tail.dim(), &query.vector)?;
            let tail = self.tail.search(self.tail_query(&query)).await?;
            Ok(self.merge(&query, tail))
        })
    }

    fn search_blocking(&self, query: &Query) -> Result<Vec<Hit>, VectorError> {
        self.search_with(query, |i, q| i.search_blocking(q))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Filter;
    use crate::exact::ExactIndex;

    fn point(id: u32, vector: Vec<f32>) -> Point {
        Point {
            id,
            vector,
            category: id % 2,
            in_stock: true,
            price: 1.0,
            created_at: 0,
        }
    }

    /// Cosine ranks the short item that points the query's way first; the
    /// dot product ranks the long one first, and so does Mips, whether the
    /// long one is in the head or found in the tail.
    #[test]
    fn ranks_by_the_dot_product_not_the_cosine() {
        let items = vec![
            point(0, vec![1.0, 0.1]),
            point(1, vec![4.0, 2.0]),
            point(2, vec![-1.0, 3.0]),
            point(3, vec![0.5, 0.0]),
        ];
        let query = Query {
            vector: vec![1.0, 0.0],
            limit: 3,
            filter: Filter::default(),
        };
        let cosine = ExactIndex::new(2);
        cosine.upsert_now(items.clone()).expect("two dimensions");
        assert_eq!(cosine.search_now(&query).expect("answers")[0].id, 3);
        for head in [0, 1, 4] {
            let tail = ExactIndex::new(2);
            tail.upsert_now(items.clone()).expect("two dimensions");
            let index = Mips::new(tail, items.clone(), MipsParams { head, fetch: 1 });
            let hits = index.search_blocking(&query).expect("two dimensions");
            assert_eq!(
                hits.iter().map(|h| h.id).collect::<Vec<_>>(),
                vec![1, 0, 3],
                "head {head}"
            );
            for h in &hits {
                let want = dot(&query.vector, &items[h.id as usize].vector);
                assert!(
                    (h.score - want).abs() < 1e-5,
                    "head {head}: {h:?}: dot {want}"
                );
            }
        }
    }

    #[test]
    fn the_head_keeps_the_longest_and_follows_upserts() {
        let items: Vec<Point> = (0..6).map(|i| point(i, vec![i as f32, 0.0])).collect();
        let tail = ExactIndex::new(2);
        tail.upsert_now(items.clone()).expect("two dimensions");
        let index = Mips::new(tail, items, MipsParams { head: 2, fetch: 1 });
        let head = |index: &Mips<ExactIndex>| -> Vec<u32> {
            index
                .state
                .read()
                .expect("not poisoned")
                .head
                .iter()
                .map(|p| p.id)
                .collect()
        };
        assert_eq!(head(&index), vec![5, 4]);
        // Item 1 grows past everything: it joins the head, 4 leaves it.
        let grown = point(1, vec![0.0, 9.0]);
        futures_lite(index.upsert(vec![grown])).expect("two dimensions");
        assert_eq!(head(&index), vec![1, 5]);
        let hits = index
            .search_blocking(&Query {
                vector: vec![0.0, 1.0],
                limit: 1,
                filter: Filter::default(),
            })
            .expect("two dimensions");
        assert_eq!((hits[0].id, hits[0].score), (1, 9.0));
        // Filters hold in the head as in the tail: category 1 only.
        let odd = index
            .search_blocking(&Query {
                vector: vec![1.0, 0.0],
                limit: 2,
                filter: Filter {
                    categories: vec![1],
                    ..Filter::default()
                },
            })
            .expect("two dimensions");
        assert_eq!(odd.iter().map(|h| h.id).collect::<Vec<_>>(), vec![5, 3]);
    }

    /// Polls a future that never waits (the exact index's).
    fn futures_lite<T>(f: impl std::future::Future<Output = T>) -> T {
        let mut f = std::pin::pin!(f);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => unreachable!("the exact index answers at once"),
        }
    }
}

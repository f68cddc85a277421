//! Popularity lists the gateway answers from when retrieval is late or down.
//!
//! Seeded from the dataset at start, so the gateway can answer before any
//! other service is reachable, then refreshed from retrieval's `Popular` in
//! the background. A failed refresh keeps the last good lists.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use recmesh_algo::popularity;
use recmesh_catalog::{Catalog, Dataset};
use recmesh_mesh::Balanced;
use recmesh_mesh::convert::attributes;
use recmesh_proto::v1::{self as pb, retrieval_client::RetrievalClient};

/// Source name of fallback candidates.
pub const SOURCE: &str = "popular";

/// Overall and per-category popular items, best first.
#[derive(Debug, Default, Clone)]
pub struct PopularityLists {
    overall: Vec<pb::Candidate>,
    by_category: HashMap<String, Vec<pb::Candidate>>,
    categories: BTreeSet<String>,
}

fn candidate(
    item_id: String,
    raw: f64,
    best: f64,
    attrs: pb::ItemAttributes,
    reason: String,
) -> pb::Candidate {
    pb::Candidate {
        item_id,
        score: if best > 0.0 { raw / best } else { 0.0 },
        source: SOURCE.into(),
        reasons: vec![reason],
        source_scores: [(SOURCE.to_owned(), raw)].into(),
        attributes: Some(attrs),
        exploration: false,
    }
}

impl PopularityLists {
    /// Lists computed from a dataset (weighted interaction counts).
    pub fn from_dataset(data: &Dataset, overall: usize, per_category: usize) -> Self {
        let catalog = Catalog::new(data.items.clone());
        let scores = recmesh_catalog::item_scores(&catalog, &data.interactions);
        let (top, by_cat) =
            popularity::top_lists(&scores, &catalog.category_of, overall.max(per_category));
        let make = |list: &[(u32, f64)],
                    n: usize,
                    reason: &dyn Fn(&str) -> String|
         -> Vec<pb::Candidate> {
            let best = list.first().map_or(0.0, |x| x.1);
            list.iter()
                .take(n)
                .filter_map(|&(i, s)| {
                    let item = catalog.item(i)?;
                    Some(candidate(
                        item.id.clone(),
                        s,
                        best,
                        attributes(item),
                        reason(&item.category),
                    ))
                })
                .collect()
        };
        PopularityLists {
            overall: make(&top, overall, &|_| "popular right now".to_owned()),
            by_category: by_cat
                .iter()
                .map(|(&c, list)| {
                    (
                        catalog.categories[c as usize].clone(),
                        make(list, per_category, &|c| format!("popular in {c}")),
                    )
                })
                .collect(),
            categories: catalog.categories.iter().cloned().collect(),
        }
    }

    /// Lists from retrieval's `Popular` answer (overall list then each
    /// category's), regrouped by the raw popularity every list shares.
    pub fn from_popular(
        candidates: Vec<pb::Candidate>,
        overall: usize,
        per_category: usize,
    ) -> Self {
        let raw = |c: &pb::Candidate| c.source_scores.get(SOURCE).copied().unwrap_or(c.score);
        let mut seen = std::collections::HashSet::new();
        let mut all: Vec<pb::Candidate> = candidates
            .into_iter()
            .filter(|c| seen.insert(c.item_id.clone()))
            .collect();
        // Stable: ties keep retrieval's order.
        all.sort_by(|a, b| raw(b).total_cmp(&raw(a)));
        let mut lists = PopularityLists::default();
        let best = all.first().map_or(0.0, raw);
        for c in &all {
            let Some(attrs) = c.attributes.clone() else {
                continue;
            };
            let category = attrs.category.clone();
            lists.categories.insert(category.clone());
            if lists.overall.len() < overall {
                lists.overall.push(candidate(
                    c.item_id.clone(),
                    raw(c),
                    best,
                    attrs.clone(),
                    "popular right now".into(),
                ));
            }
            let list = lists.by_category.entry(category.clone()).or_default();
            if list.len() < per_category {
                let best = list.first().map_or(raw(c), |first| {
                    first.source_scores.get(SOURCE).copied().unwrap_or(0.0)
                });
                list.push(candidate(
                    c.item_id.clone(),
                    raw(c),
                    best,
                    attrs,
                    format!("popular in {category}"),
                ));
            }
        }
        lists
    }

    /// True when `name` is a category of the catalog.
    pub fn knows_category(&self, name: &str) -> bool {
        self.categories.contains(name)
    }

    /// Known categories, sorted (for error messages).
    pub fn categories(&self) -> impl Iterator<Item = &str> {
        self.categories.iter().map(String::as_str)
    }

    /// True when there is nothing to fall back on.
    pub fn is_empty(&self) -> bool {
        self.overall.is_empty()
    }

    /// Candidates for a request: the given categories' lists first (in
    /// order, together at most half of `limit`, so per-category caps can
    /// still fill a list), then the overall list; deduplicated.
    pub fn candidates(&self, categories: &[&str], limit: usize) -> Vec<pb::Candidate> {
        let mut seen = std::collections::HashSet::new();
        let per_category = if categories.is_empty() {
            0
        } else {
            (limit / 2) / categories.len()
        };
        categories
            .iter()
            .filter_map(|c| self.by_category.get(*c))
            .flat_map(|list| list.iter().take(per_category))
            .chain(self.overall.iter())
            .filter(|c| seen.insert(c.item_id.clone()))
            .take(limit)
            .cloned()
            .collect()
    }

    /// One category's list, or the overall list.
    pub fn list(&self, category: Option<&str>) -> &[pb::Candidate] {
        match category {
            Some(c) => self.by_category.get(c).map_or(&[], Vec::as_slice),
            None => &self.overall,
        }
    }
}

/// The shared, swappable lists.
pub type SharedLists = Arc<RwLock<Arc<PopularityLists>>>;

/// Refreshes `lists` from retrieval every `every` until the gateway that owns
/// them is dropped.
pub fn spawn_refresh(
    lists: &SharedLists,
    retrieval: RetrievalClient<Balanced>,
    every: Duration,
    overall: u32,
    per_category: u32,
) {
    let weak: Weak<RwLock<Arc<PopularityLists>>> = Arc::downgrade(lists);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(lists) = weak.upgrade() else { return };
            let mut client = retrieval.clone();
            let req = pb::PopularRequest {
                category: String::new(),
                count: overall,
                per_category,
            };
            // Off the request path: a generous timeout, the interval bounds retries.
            let answer = recmesh_mesh::bounded(Duration::from_secs(2), |t| {
                client.popular(recmesh_mesh::outgoing(req, t, "popularity-refresh"))
            })
            .await;
            match answer {
                Ok(resp) if !resp.candidates.is_empty() => {
                    let fresh = PopularityLists::from_popular(
                        resp.candidates,
                        overall as usize,
                        per_category as usize,
                    );
                    *lists.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
                    metrics::counter!("recmesh_gateway_popularity_refresh_total", "outcome" => "ok").increment(1);
                }
                Ok(_) => {
                    metrics::counter!("recmesh_gateway_popularity_refresh_total", "outcome" => "empty").increment(1);
                }
                Err(e) => {
                    metrics::counter!("recmesh_gateway_popularity_refresh_total", "outcome" => e.outcome()).increment(1);
                    tracing::debug!(error = %e, "popularity refresh failed; keeping the last lists");
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use recmesh_catalog::demo::{DemoSpec, generate};

    #[test]
    fn seeded_lists_cover_categories_and_round_trip_through_popular() {
        let data = generate(&DemoSpec {
            items: 300,
            users: 50,
            interactions: 3_000,
            ..DemoSpec::default()
        });
        let lists = PopularityLists::from_dataset(&data, 100, 20);
        assert_eq!(lists.overall.len(), 100);
        assert!(lists.categories().count() > 1);
        let first = lists.categories().next().expect("a category").to_owned();
        // Half the limit from the browsed category, the rest from overall.
        let picked = lists.candidates(&[first.as_str()], 10);
        assert_eq!(picked.len(), 10);
        let in_first =
            |c: &pb::Candidate| c.attributes.as_ref().is_some_and(|a| a.category == first);
        assert!(picked[..5].iter().all(in_first));
        assert!(
            picked[..5]
                .iter()
                .all(|c| c.reasons[0] == format!("popular in {first}"))
        );
        assert!(
            picked[5..]
                .iter()
                .all(|c| c.reasons[0] == "popular right now")
        );
        let unique: std::collections::HashSet<_> = picked.iter().map(|c| &c.item_id).collect();
        assert_eq!(unique.len(), 10);

        let mut wire = lists.overall.clone();
        for c in lists.categories() {
            wire.extend(lists.list(Some(c)).iter().cloned());
        }
        let again = PopularityLists::from_popular(wire, 100, 20);
        let ids = |l: &[pb::Candidate]| l.iter().map(|c| c.item_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&again.overall), ids(&lists.overall));
        // Per category the same items (ties at equal popularity may order differently).
        let set = |l: &[pb::Candidate]| {
            l.iter()
                .map(|c| c.item_id.clone())
                .collect::<std::collections::HashSet<_>>()
        };
        let (a, b) = (set(again.list(Some(&first))), set(lists.list(Some(&first))));
        assert!(
            a.intersection(&b).count() >= b.len() * 9 / 10,
            "{a:?} vs {b:?}"
        );
    }
}

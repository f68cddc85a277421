//! The lean candidate list between stages (`recmesh.v1.CandidateList`).
//!
//! Retrieval, ranking and the re-ranker used to pass a `Candidate` message
//! per item: an id, reason strings, a source-score map and attributes, each
//! decoded, copied and encoded again at every hop. A list of a few hundred
//! candidates now travels as a dozen arrays, with the strings the candidates
//! share (reason texts, categories, brands) sent once. [`ListBuilder`]
//! writes one; [`Candidates`] checks one received and reads it by position;
//! only the items the re-ranker places become `Candidate`s again.

use std::collections::HashMap;

use recmesh_proto::v1 as pb;

use crate::convert::{FieldError, check_id};

/// Retrieval's sources, by bit position in `CandidateList.sources`.
pub const SOURCES: [&str; 6] = ["anchor", "cf", "ann", "content", "trending", "popular"];

/// `first_sources`: no source is named (a candidate made outside retrieval).
pub const NO_SOURCE: u32 = SOURCES.len() as u32;

/// `flags`: in stock.
pub const IN_STOCK: u32 = 1;
/// `flags`: promoted by merchandising.
pub const PROMOTED: u32 = 2;
/// `flags`: the attributes were sent (without it nobody vouched for stock).
pub const HAS_ATTRIBUTES: u32 = 4;
/// `flags`: placed by exploration, not by score.
pub const EXPLORATION: u32 = 8;
const KNOWN_FLAGS: u32 = IN_STOCK | PROMOTED | HAS_ATTRIBUTES | EXPLORATION;

/// The bit position of a source name (`None`: not a retrieval source).
pub fn source_code(name: &str) -> Option<u32> {
    SOURCES.iter().position(|s| *s == name).map(|p| p as u32)
}

/// A candidate's attributes, borrowed from a list.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Attributes<'a> {
    /// Category.
    pub category: &'a str,
    /// Brand.
    pub brand: &'a str,
    /// Price.
    pub price: f64,
    /// In stock now.
    pub in_stock: bool,
    /// Promoted by merchandising.
    pub promoted: bool,
    /// Entered the catalog at, Unix seconds.
    pub created_at: i64,
}

impl Attributes<'_> {
    /// The owned proto message.
    pub fn to_proto(&self) -> pb::ItemAttributes {
        pb::ItemAttributes {
            category: self.category.to_owned(),
            brand: self.brand.to_owned(),
            price: self.price,
            in_stock: self.in_stock,
            promoted: self.promoted,
            created_at: self.created_at,
        }
    }
}

impl<'a> From<&'a pb::ItemAttributes> for Attributes<'a> {
    fn from(a: &'a pb::ItemAttributes) -> Self {
        Attributes {
            category: &a.category,
            brand: &a.brand,
            price: a.price,
            in_stock: a.in_stock,
            promoted: a.promoted,
            created_at: a.created_at,
        }
    }
}

/// One candidate to add to a list.
#[derive(Debug, Clone, Copy)]
pub struct Entry<'a> {
    /// Item id.
    pub id: &'a str,
    /// The stage's score.
    pub score: f64,
    /// Bit position of the source that found it first ([`NO_SOURCE`]: none).
    pub first_source: u32,
    /// Each source's score, by bit position, lowest first, each once.
    pub source_scores: &'a [(u32, f64)],
    /// Reasons, best first, as positions of texts already in the builder
    /// ([`ListBuilder::text`]).
    pub reasons: &'a [u32],
    /// Attributes, when known.
    pub attributes: Option<Attributes<'a>>,
    /// Placed by exploration.
    pub exploration: bool,
}

/// Writes a `CandidateList`, interning its texts.
#[derive(Debug, Default)]
pub struct ListBuilder {
    list: pb::CandidateList,
    /// Position of each text in `list.texts`, built on the first new text
    /// (a reordered list whose texts all come from the list it reorders
    /// never needs it).
    texts: Option<HashMap<String, u32, foldhash::fast::RandomState>>,
}

/// Attributes with category and brand as positions in the list's texts.
#[derive(Debug, Clone, Copy)]
struct Placed {
    category: u32,
    brand: u32,
    price: f64,
    created_at: i64,
    flags: u32,
}

impl ListBuilder {
    /// A builder for about `n` candidates.
    pub fn with_capacity(n: usize) -> Self {
        let l = pb::CandidateList {
            ids: String::with_capacity(n * 8),
            id_ends: Vec::with_capacity(n),
            scores: Vec::with_capacity(n),
            sources: Vec::with_capacity(n),
            first_sources: Vec::with_capacity(n),
            source_scores: Vec::with_capacity(n * 2),
            texts: Vec::new(),
            reason_counts: Vec::with_capacity(n),
            reasons: Vec::with_capacity(n * 2),
            categories: Vec::with_capacity(n),
            brands: Vec::with_capacity(n),
            prices: Vec::with_capacity(n),
            created_at: Vec::with_capacity(n),
            flags: Vec::with_capacity(n),
        };
        ListBuilder {
            list: l,
            texts: Some(HashMap::default()),
        }
    }

    /// A builder that starts with `from`'s texts, so positions read from it
    /// stay valid in the new list.
    pub fn with_texts_of(from: &Candidates, n: usize) -> Self {
        let mut b = ListBuilder::with_capacity(n);
        b.list.texts = from.list.texts.clone();
        b.texts = None;
        b
    }

    /// The position of `text` in the list's texts, added when new.
    pub fn text(&mut self, text: &str) -> u32 {
        let texts = &self.list.texts;
        let map = self.texts.get_or_insert_with(|| {
            texts
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), i as u32))
                .collect()
        });
        if let Some(&i) = map.get(text) {
            return i;
        }
        let i = self.list.texts.len() as u32;
        self.list.texts.push(text.to_owned());
        map.insert(text.to_owned(), i);
        i
    }

    fn place(&mut self, a: Attributes<'_>) -> Placed {
        Placed {
            category: self.text(a.category),
            brand: self.text(a.brand),
            price: a.price,
            created_at: a.created_at,
            flags: HAS_ATTRIBUTES
                | if a.in_stock { IN_STOCK } else { 0 }
                | if a.promoted { PROMOTED } else { 0 },
        }
    }

    /// Candidates added so far.
    pub fn len(&self) -> usize {
        self.list.id_ends.len()
    }

    /// Whether none was added.
    pub fn is_empty(&self) -> bool {
        self.list.id_ends.is_empty()
    }

    /// Adds one candidate at the end.
    pub fn push(&mut self, e: Entry<'_>) {
        let placed = e.attributes.map(|a| self.place(a));
        self.push_placed(e, placed);
    }

    fn push_placed(&mut self, e: Entry<'_>, placed: Option<Placed>) {
        let l = &mut self.list;
        l.ids.push_str(e.id);
        l.id_ends.push(l.ids.len() as u32);
        l.scores.push(e.score);
        let mut bits = 0;
        for &(code, score) in e.source_scores {
            bits |= 1 << code;
            l.source_scores.push(score);
        }
        l.sources.push(bits);
        l.first_sources.push(e.first_source);
        l.reason_counts.push(e.reasons.len() as u32);
        l.reasons.extend_from_slice(e.reasons);
        let p = placed.unwrap_or(Placed {
            category: 0,
            brand: 0,
            price: 0.0,
            created_at: 0,
            flags: 0,
        });
        l.categories.push(p.category);
        l.brands.push(p.brand);
        l.prices.push(p.price);
        l.created_at.push(p.created_at);
        l.flags
            .push(p.flags | if e.exploration { EXPLORATION } else { 0 });
    }

    /// Adds candidate `k` of `from` (whose texts this builder started with:
    /// [`ListBuilder::with_texts_of`]) with `score`, and `attributes` in
    /// place of its own when given.
    pub fn push_from(
        &mut self,
        from: &Candidates,
        k: usize,
        score: f64,
        attributes: Option<&pb::ItemAttributes>,
    ) {
        let mut scores = [(0, 0.0); SOURCES.len()];
        let mut n = 0;
        for s in from.source_scores_by_code(k) {
            scores[n] = s;
            n += 1;
        }
        let own = from.attributes(k);
        // Texts the new attributes share with the old keep their positions
        // (the usual case: fresh stock and price, the same category).
        let same = |old: Option<&str>, new: &str, at: u32| (old == Some(new)).then_some(at);
        let placed = match attributes {
            Some(a) => {
                let fresh = Attributes::from(a);
                let mut p = Placed {
                    category: 0,
                    brand: 0,
                    price: fresh.price,
                    created_at: fresh.created_at,
                    flags: HAS_ATTRIBUTES
                        | if fresh.in_stock { IN_STOCK } else { 0 }
                        | if fresh.promoted { PROMOTED } else { 0 },
                };
                p.category = same(
                    own.map(|o| o.category),
                    fresh.category,
                    from.list.categories[k],
                )
                .unwrap_or_else(|| self.text(fresh.category));
                p.brand = same(own.map(|o| o.brand), fresh.brand, from.list.brands[k])
                    .unwrap_or_else(|| self.text(fresh.brand));
                Some(p)
            }
            None => own.map(|_| Placed {
                category: from.list.categories[k],
                brand: from.list.brands[k],
                price: from.list.prices[k],
                created_at: from.list.created_at[k],
                flags: from.list.flags[k] & !EXPLORATION,
            }),
        };
        let entry = Entry {
            id: from.id(k),
            score,
            first_source: from.list.first_sources[k],
            source_scores: &scores[..n],
            reasons: from.reason_positions(k),
            attributes: None,
            exploration: from.exploration(k),
        };
        self.push_placed(entry, placed);
    }

    /// Adds a candidate given whole (the gateway's popularity lists, tests,
    /// in-process callers). Source names outside [`SOURCES`] are refused.
    pub fn push_candidate(&mut self, c: &pb::Candidate) -> Result<(), FieldError> {
        let code = |name: &str| {
            source_code(name).ok_or_else(|| {
                FieldError::new(
                    "source",
                    format!("unknown source `{name}`; known: {}", SOURCES.join(", ")),
                )
            })
        };
        let mut scores = Vec::with_capacity(c.source_scores.len());
        for (name, score) in &c.source_scores {
            scores.push((code(name)?, *score));
        }
        scores.sort_by_key(|s| s.0);
        let first_source = if c.source.is_empty() {
            NO_SOURCE
        } else {
            code(&c.source)?
        };
        let reasons: Vec<u32> = c.reasons.iter().map(|r| self.text(r)).collect();
        self.push(Entry {
            id: &c.item_id,
            score: c.score,
            first_source,
            source_scores: &scores,
            reasons: &reasons,
            attributes: c.attributes.as_ref().map(Attributes::from),
            exploration: c.exploration,
        });
        Ok(())
    }

    /// The finished list.
    pub fn finish(self) -> pb::CandidateList {
        self.list
    }
}

/// The list of whole candidates `candidates`, in their order.
pub fn from_candidates(candidates: &[pb::Candidate]) -> Result<pb::CandidateList, FieldError> {
    let mut b = ListBuilder::with_capacity(candidates.len());
    for (n, c) in candidates.iter().enumerate() {
        b.push_candidate(c)
            .map_err(|e| FieldError::new(format!("candidates[{n}].{}", e.field), e.reason))?;
    }
    Ok(b.finish())
}

/// A received `CandidateList`, checked: every array as long as the list,
/// every position in range, every id a valid id. Read by position.
#[derive(Debug, Clone, Default)]
pub struct Candidates {
    list: pb::CandidateList,
    /// Where candidate k's source scores start in `source_scores`.
    score_starts: Vec<u32>,
    /// Where candidate k's reasons start in `reasons`.
    reason_starts: Vec<u32>,
}

impl Candidates {
    /// Checks `list`; `field` names it in errors (`candidates`).
    pub fn new(list: pb::CandidateList, field: &str) -> Result<Self, FieldError> {
        let n = list.id_ends.len();
        let err = |name: &str, reason: String| FieldError::new(format!("{field}.{name}"), reason);
        for (name, len) in [
            ("scores", list.scores.len()),
            ("sources", list.sources.len()),
            ("first_sources", list.first_sources.len()),
            ("reason_counts", list.reason_counts.len()),
            ("categories", list.categories.len()),
            ("brands", list.brands.len()),
            ("prices", list.prices.len()),
            ("created_at", list.created_at.len()),
            ("flags", list.flags.len()),
        ] {
            if len != n {
                return Err(err(name, format!("{len} entries for {n} candidates")));
            }
        }
        let mut start = 0usize;
        for (k, &end) in list.id_ends.iter().enumerate() {
            let end = end as usize;
            let id = (end >= start)
                .then(|| list.ids.get(start..end))
                .flatten()
                .ok_or_else(|| {
                    err(
                        &format!("id_ends[{k}]"),
                        format!("{end} does not end an id in `ids` after {start}"),
                    )
                })?;
            // The field's name is formatted only for an id that fails.
            check_id("", id)
                .map_err(|e| FieldError::new(format!("{field}[{k}].item_id"), e.reason))?;
            start = end;
        }
        let texts = list.texts.len();
        let all = (1u32 << SOURCES.len()) - 1;
        let (mut score_starts, mut reason_starts) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut scores, mut reasons) = (0u32, 0u32);
        for k in 0..n {
            let bits = list.sources[k];
            if bits & !all != 0 {
                return Err(err(
                    &format!("sources[{k}]"),
                    format!("{bits:#x} has bits past the {} sources", SOURCES.len()),
                ));
            }
            if list.first_sources[k] > NO_SOURCE {
                return Err(err(
                    &format!("first_sources[{k}]"),
                    format!(
                        "{} is not a source (0..={NO_SOURCE})",
                        list.first_sources[k]
                    ),
                ));
            }
            if list.flags[k] & !KNOWN_FLAGS != 0 {
                return Err(err(
                    &format!("flags[{k}]"),
                    format!("{:#x} unknown", list.flags[k]),
                ));
            }
            for (name, at) in [
                ("categories", list.categories[k]),
                ("brands", list.brands[k]),
            ] {
                if list.flags[k] & HAS_ATTRIBUTES != 0 && at as usize >= texts {
                    return Err(err(
                        &format!("{name}[{k}]"),
                        format!("{at} is past the {texts} texts"),
                    ));
                }
            }
            score_starts.push(scores);
            reason_starts.push(reasons);
            scores += bits.count_ones();
            reasons = reasons.saturating_add(list.reason_counts[k]);
        }
        if scores as usize != list.source_scores.len() {
            return Err(err(
                "source_scores",
                format!(
                    "{} entries for {scores} source bits",
                    list.source_scores.len()
                ),
            ));
        }
        if reasons as usize != list.reasons.len() {
            return Err(err(
                "reasons",
                format!(
                    "{} entries for reason_counts adding up to {reasons}",
                    list.reasons.len()
                ),
            ));
        }
        if let Some((i, r)) = list
            .reasons
            .iter()
            .enumerate()
            .find(|(_, r)| **r as usize >= texts)
        {
            return Err(err(
                &format!("reasons[{i}]"),
                format!("{r} is past the {texts} texts"),
            ));
        }
        Ok(Candidates {
            list,
            score_starts,
            reason_starts,
        })
    }

    /// [`Candidates::new`] of whole candidates (in-process callers, tests).
    pub fn from_candidates(candidates: &[pb::Candidate]) -> Result<Self, FieldError> {
        Candidates::new(from_candidates(candidates)?, "candidates")
    }

    /// The list as received.
    pub fn list(&self) -> &pb::CandidateList {
        &self.list
    }

    /// The list, given back.
    pub fn into_list(self) -> pb::CandidateList {
        self.list
    }

    /// How many candidates.
    pub fn len(&self) -> usize {
        self.list.id_ends.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.list.id_ends.is_empty()
    }

    /// Candidate `k`'s item id.
    pub fn id(&self, k: usize) -> &str {
        let start = if k == 0 {
            0
        } else {
            self.list.id_ends[k - 1] as usize
        };
        &self.list.ids[start..self.list.id_ends[k] as usize]
    }

    /// Every candidate's item id, in order.
    pub fn ids(&self) -> impl Iterator<Item = &str> + '_ {
        (0..self.len()).map(|k| self.id(k))
    }

    /// Candidate `k`'s score.
    pub fn score(&self, k: usize) -> f64 {
        self.list.scores[k]
    }

    /// The name of the source that found candidate `k` first.
    pub fn source(&self, k: usize) -> &'static str {
        SOURCES
            .get(self.list.first_sources[k] as usize)
            .copied()
            .unwrap_or("")
    }

    /// How many sources found candidate `k`.
    pub fn source_count(&self, k: usize) -> usize {
        self.list.sources[k].count_ones() as usize
    }

    fn source_scores_by_code(&self, k: usize) -> impl Iterator<Item = (u32, f64)> + '_ {
        let bits = self.list.sources[k];
        let start = self.score_starts[k] as usize;
        (0..SOURCES.len() as u32)
            .filter(move |b| bits & (1 << b) != 0)
            .zip(&self.list.source_scores[start..])
            .map(|(b, s)| (b, *s))
    }

    /// Candidate `k`'s score from each source that found it, by name.
    pub fn source_scores(&self, k: usize) -> impl Iterator<Item = (&'static str, f64)> + '_ {
        self.source_scores_by_code(k)
            .map(|(b, s)| (SOURCES[b as usize], s))
    }

    /// Candidate `k`'s score from `source` (0 when it did not find it).
    pub fn source_score(&self, k: usize, source: &str) -> f64 {
        self.source_scores(k)
            .find(|(s, _)| *s == source)
            .map_or(0.0, |(_, v)| v)
    }

    fn reason_positions(&self, k: usize) -> &[u32] {
        let start = self.reason_starts[k] as usize;
        &self.list.reasons[start..start + self.list.reason_counts[k] as usize]
    }

    /// Candidate `k`'s reasons, best first.
    pub fn reasons(&self, k: usize) -> impl Iterator<Item = &str> + '_ {
        self.reason_positions(k)
            .iter()
            .map(|&r| self.list.texts[r as usize].as_str())
    }

    /// Candidate `k`'s attributes, when sent.
    pub fn attributes(&self, k: usize) -> Option<Attributes<'_>> {
        let flags = self.list.flags[k];
        (flags & HAS_ATTRIBUTES != 0).then(|| Attributes {
            category: &self.list.texts[self.list.categories[k] as usize],
            brand: &self.list.texts[self.list.brands[k] as usize],
            price: self.list.prices[k],
            in_stock: flags & IN_STOCK != 0,
            promoted: flags & PROMOTED != 0,
            created_at: self.list.created_at[k],
        })
    }

    /// Whether candidate `k` was placed by exploration.
    pub fn exploration(&self, k: usize) -> bool {
        self.list.flags[k] & EXPLORATION != 0
    }

    /// The rule view of candidate `k`, for the hard filters and caps.
    pub fn rule_item(&self, k: usize) -> recmesh_algo::rules::RuleItem<'_> {
        let a = self.attributes(k);
        recmesh_algo::rules::RuleItem {
            id: self.id(k),
            category: a.map_or("", |a| a.category),
            price: a.map_or(0.0, |a| a.price),
            // No attributes means nobody vouched for stock: treat as unavailable.
            in_stock: a.is_some_and(|a| a.in_stock),
        }
    }

    /// Candidate `k` whole.
    pub fn candidate(&self, k: usize) -> pb::Candidate {
        pb::Candidate {
            item_id: self.id(k).to_owned(),
            score: self.score(k),
            source: self.source(k).to_owned(),
            reasons: self.reasons(k).map(str::to_owned).collect(),
            source_scores: self
                .source_scores(k)
                .map(|(s, v)| (s.to_owned(), v))
                .collect(),
            attributes: self.attributes(k).map(|a| a.to_proto()),
            exploration: self.exploration(k),
        }
    }

    /// Every candidate whole, in order.
    pub fn to_candidates(&self) -> Vec<pb::Candidate> {
        (0..self.len()).map(|k| self.candidate(k)).collect()
    }

    /// The list in `order` (positions in this list), with `scores[i]` for
    /// `order[i]` and, where `fresh` has them for a position, new attributes.
    pub fn reordered<'a>(
        &self,
        order: &[usize],
        scores: &[f64],
        fresh: impl Fn(usize) -> Option<&'a pb::ItemAttributes>,
    ) -> pb::CandidateList {
        let mut b = ListBuilder::with_texts_of(self, order.len());
        for (&k, &score) in order.iter().zip(scores) {
            b.push_from(self, k, score, fresh(k));
        }
        b.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: &str, score: f64) -> pb::Candidate {
        pb::Candidate {
            item_id: id.into(),
            score,
            source: "cf".into(),
            reasons: vec!["because you viewed i1".into(), "popular in books".into()],
            source_scores: [("cf".to_string(), 0.5), ("popular".to_string(), 0.25)].into(),
            attributes: Some(pb::ItemAttributes {
                category: "books".into(),
                brand: "acme".into(),
                price: 12.5,
                in_stock: true,
                promoted: false,
                created_at: 1_700_000_000,
            }),
            exploration: false,
        }
    }

    fn encoded(list: &pb::CandidateList) -> pb::CandidateList {
        use prost::Message;
        pb::CandidateList::decode(list.encode_to_vec().as_slice()).expect("decodes")
    }

    #[test]
    fn whole_candidates_survive_the_list_and_the_wire() {
        let mut bare = candidate("i3", 0.1);
        bare.attributes = None;
        bare.reasons.clear();
        bare.source = String::new();
        bare.source_scores = [("ann".to_string(), 0.9)].into();
        bare.exploration = true;
        let whole = vec![candidate("i1", 0.9), bare, candidate("i22", 0.3)];
        let list = encoded(&from_candidates(&whole).expect("known sources"));
        // Shared strings are sent once.
        assert_eq!(
            list.texts
                .iter()
                .filter(|t| t.as_str() == "popular in books")
                .count(),
            1
        );
        let read = Candidates::new(list, "candidates").expect("a list it wrote checks");
        assert_eq!(read.len(), 3);
        assert_eq!(read.to_candidates(), whole);
        assert_eq!(read.source_score(0, "popular"), 0.25);
        assert_eq!(read.source_score(1, "cf"), 0.0);
        assert!(
            !read.rule_item(1).in_stock,
            "no attributes: not vouched for"
        );
    }

    #[test]
    fn a_reordered_list_keeps_every_field_and_takes_fresh_attributes() {
        let whole = vec![candidate("a", 0.9), candidate("b", 0.5)];
        let read = Candidates::from_candidates(&whole).expect("checks");
        let fresh = pb::ItemAttributes {
            category: "music".into(),
            in_stock: false,
            price: 3.0,
            ..Default::default()
        };
        let out = read.reordered(&[1, 0], &[2.0, 1.0], |k| {
            (read.id(k) == "b").then_some(&fresh)
        });
        let out = Candidates::new(encoded(&out), "candidates").expect("checks");
        let mut b = whole[1].clone();
        b.score = 2.0;
        b.attributes = Some(fresh.clone());
        let mut a = whole[0].clone();
        a.score = 1.0;
        assert_eq!(out.to_candidates(), vec![b, a]);
    }

    #[test]
    fn an_unknown_source_is_refused_by_name() {
        let mut c = candidate("a", 1.0);
        c.source = "magic".into();
        let e = from_candidates(&[candidate("x", 1.0), c]).expect_err("refused");
        assert_eq!(e.field, "candidates[1].source");
        assert!(e.reason.contains("magic"), "{e}");
    }

    #[test]
    fn a_broken_list_is_refused_naming_the_field() {
        let good = from_candidates(&[candidate("a", 1.0), candidate("bb", 0.5)]).expect("ok");
        let check = |edit: &dyn Fn(&mut pb::CandidateList)| {
            let mut l = good.clone();
            edit(&mut l);
            Candidates::new(l, "candidates").expect_err("refused").field
        };
        assert_eq!(
            check(&|l| {
                l.scores.pop();
            }),
            "candidates.scores"
        );
        assert_eq!(check(&|l| l.id_ends[0] = 9), "candidates.id_ends[0]");
        assert_eq!(check(&|l| l.id_ends[1] = 0), "candidates.id_ends[1]");
        assert_eq!(
            check(&|l| l.ids = "a\u{1}b".into()),
            "candidates[1].item_id"
        );
        assert_eq!(check(&|l| l.sources[1] = 1 << 9), "candidates.sources[1]");
        assert_eq!(
            check(&|l| l.first_sources[0] = 7),
            "candidates.first_sources[0]"
        );
        assert_eq!(
            check(&|l| l.source_scores.push(1.0)),
            "candidates.source_scores"
        );
        assert_eq!(check(&|l| l.reason_counts[0] = 5), "candidates.reasons");
        assert_eq!(check(&|l| l.reasons[3] = 99), "candidates.reasons[3]");
        assert_eq!(check(&|l| l.brands[1] = 99), "candidates.brands[1]");
        assert_eq!(check(&|l| l.flags[0] |= 64), "candidates.flags[0]");
        // An empty list is a list.
        assert!(Candidates::new(pb::CandidateList::default(), "c").is_ok());
    }
}

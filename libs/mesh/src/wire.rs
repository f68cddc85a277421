//! The candidate list, passed from stage to stage still encoded.
//!
//! The gateway reads nothing inside the candidates it hands from retrieval
//! to ranking and from ranking to the reranker: decoding a few hundred
//! `Candidate`s (ids, reasons, source scores, attributes), cloning them for
//! the fallback and encoding them again was most of its CPU (allocator and
//! `memmove` at the top of a profile). These messages have the same wire
//! format as their `recmesh.v1` namesakes, with `candidates` read as the
//! encoded bytes of each one: decoding keeps slices of the received buffer,
//! a copy for the fallback is a reference count, encoding is one copy per
//! candidate. A candidate is decoded only when the gateway needs it itself
//! (a stage fell back and the gateway applies its own rules).
//!
//! The tests check each mirror against the generated type field by field,
//! so a field added to the protos without being added here fails them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::balance::Balanced;
use prost::Message;
pub use prost::bytes::{Bytes, BytesMut};
use prost::encoding::{WireType, decode_varint};
use recmesh_proto::v1 as pb;
use tonic::Status;
use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::{BoxFuture, http};

/// `recmesh.v1.RetrieveResponse` with encoded candidates.
#[derive(Clone, PartialEq, Message)]
pub struct RetrieveResponse {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub candidates: Vec<Bytes>,
    #[prost(string, tag = "2")]
    pub data_version: String,
    #[prost(message, repeated, tag = "3")]
    pub sources: Vec<pb::SourceReport>,
}

/// `recmesh.v1.RankRequest` with encoded candidates.
#[derive(Clone, PartialEq, Message)]
pub struct RankRequest {
    #[prost(string, tag = "1")]
    pub user_id: String,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub candidates: Vec<Bytes>,
    #[prost(string, tag = "3")]
    pub model: String,
    #[prost(message, repeated, tag = "4")]
    pub recent: Vec<pb::Interaction>,
}

/// `recmesh.v1.RankResponse` with encoded candidates.
#[derive(Clone, PartialEq, Message)]
pub struct RankResponse {
    #[prost(bytes = "bytes", repeated, tag = "1")]
    pub candidates: Vec<Bytes>,
    #[prost(string, tag = "2")]
    pub model_version: String,
    #[prost(bool, tag = "3")]
    pub degraded: bool,
    #[prost(string, tag = "4")]
    pub detail: String,
}

/// `recmesh.v1.RerankRequest` with encoded candidates.
#[derive(Clone, PartialEq, Message)]
pub struct RerankRequest {
    #[prost(string, tag = "1")]
    pub user_id: String,
    #[prost(bytes = "bytes", repeated, tag = "2")]
    pub candidates: Vec<Bytes>,
    #[prost(uint32, tag = "3")]
    pub count: u32,
    #[prost(string, repeated, tag = "4")]
    pub exclude_item_ids: Vec<String>,
    #[prost(string, repeated, tag = "5")]
    pub purchased_item_ids: Vec<String>,
    #[prost(message, optional, tag = "6")]
    pub filters: Option<pb::Filters>,
    #[prost(map = "string, string", tag = "8")]
    pub rule_overrides: HashMap<String, String>,
    #[prost(string, tag = "9")]
    pub request_id: String,
    #[prost(message, repeated, tag = "10")]
    pub recent: Vec<pb::Interaction>,
    #[prost(string, repeated, tag = "11")]
    pub usual_categories: Vec<String>,
}

/// Encodes candidates the gateway made itself (the popularity fallback).
pub fn encode(candidates: &[pb::Candidate]) -> Vec<Bytes> {
    candidates
        .iter()
        .map(|c| Bytes::from(c.encode_to_vec()))
        .collect()
}

/// Decodes encoded candidates, for the gateway's own rules. One a stage
/// sent that does not decode is left out and logged (the stage is broken;
/// the rest of the list still serves).
pub fn decode(candidates: &[Bytes]) -> Vec<pb::Candidate> {
    candidates
        .iter()
        .filter_map(|b| match pb::Candidate::decode(b.clone()) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(error = %e, "a stage sent a candidate that does not decode; left out");
                None
            }
        })
        .collect()
}

/// One unary call with these messages, as the generated clients make it.
pub async fn unary<Req, Resp>(
    channel: &Balanced,
    path: &'static str,
    request: tonic::Request<Req>,
) -> Result<tonic::Response<Resp>, Status>
where
    Req: Message + Send + Sync + 'static,
    Resp: Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    grpc.ready()
        .await
        .map_err(|e| Status::unknown(format!("service was not ready: {e}")))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    grpc.unary(request, PathAndQuery::from_static(path), codec)
        .await
}

/// `Retrieval/Retrieve`.
pub const RETRIEVE: &str = "/recmesh.v1.Retrieval/Retrieve";
/// `Ranking/Rank`.
pub const RANK: &str = "/recmesh.v1.Ranking/Rank";
/// `Reranker/Rerank`.
pub const RERANK: &str = "/recmesh.v1.Reranker/Rerank";

/// One unary method served with wire messages: a stage whose candidates
/// go back as they came needs no generated server type for them.
pub trait WireMethod: Send + Sync + 'static {
    /// The service's full name (`recmesh.v1.Ranking`), reported by health.
    const SERVICE: &'static str;
    /// The method's path (`/recmesh.v1.Ranking/Rank`).
    const PATH: &'static str;
    /// The request, as a mirror of the generated type.
    type Request: Message + Default + Send + 'static;
    /// The response, as a mirror of the generated type.
    type Response: Message + Send + 'static;
    /// Answers one call.
    fn call(
        self: Arc<Self>,
        request: tonic::Request<Self::Request>,
    ) -> impl Future<Output = Result<Self::Response, Status>> + Send;
}

/// Serves a [`WireMethod`] as the generated server would (routing, codec,
/// `UNIMPLEMENTED` for any other path).
#[derive(Debug)]
pub struct WireServer<M>(Arc<M>);

impl<M> WireServer<M> {
    /// Serves `method`.
    pub fn new(method: M) -> Self {
        WireServer(Arc::new(method))
    }
}

impl<M> Clone for WireServer<M> {
    fn clone(&self) -> Self {
        WireServer(Arc::clone(&self.0))
    }
}

impl<M: WireMethod> tonic::server::NamedService for WireServer<M> {
    const NAME: &'static str = M::SERVICE;
}

struct Unary<M>(Arc<M>);

impl<M: WireMethod> tonic::server::UnaryService<M::Request> for Unary<M> {
    type Response = M::Response;
    type Future = BoxFuture<tonic::Response<M::Response>, Status>;

    fn call(&mut self, request: tonic::Request<M::Request>) -> Self::Future {
        let method = Arc::clone(&self.0);
        Box::pin(async move { method.call(request).await.map(tonic::Response::new) })
    }
}

impl<M, B> tonic::codegen::Service<http::Request<B>> for WireServer<M>
where
    M: WireMethod,
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != M::PATH {
            let path = request.uri().path().to_owned();
            return Box::pin(async move {
                Ok(Status::unimplemented(format!("{path} is not served here")).into_http())
            });
        }
        let method = Unary(Arc::clone(&self.0));
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<M::Response, M::Request>::default();
            Ok(tonic::server::Grpc::new(codec).unary(method, request).await)
        })
    }
}

/// What ranking and the re-ranker read of an encoded `Candidate`, borrowed
/// from its bytes: a stage that rescores or picks needs no owned copy of
/// the rest (reasons, the source's name), so it never builds one.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CandidateView<'a> {
    /// `item_id`.
    pub item_id: &'a str,
    /// `score`.
    pub score: f64,
    /// `source_scores`, in the order sent; a key sent twice keeps its last
    /// value, as a map does.
    pub source_scores: Vec<(&'a str, f64)>,
    /// `attributes`, when sent.
    pub attributes: Option<AttributesView<'a>>,
}

/// `ItemAttributes`, borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AttributesView<'a> {
    /// `category`.
    pub category: &'a str,
    /// `brand`.
    pub brand: &'a str,
    /// `price`.
    pub price: f64,
    /// `in_stock`.
    pub in_stock: bool,
    /// `promoted`.
    pub promoted: bool,
    /// `created_at`, Unix seconds.
    pub created_at: i64,
}

impl<'a> AttributesView<'a> {
    /// Reads one encoded `ItemAttributes` into `self`: fields it sends
    /// replace those already read, as prost merges a message sent twice.
    fn merge(&mut self, message: &'a [u8]) -> Result<(), WireError> {
        for field in fields(message) {
            let field = field?;
            match (field.tag, field.value) {
                (1, Value::Bytes(b)) => self.category = text(b, "attributes.category")?,
                (2, Value::Bytes(b)) => self.brand = text(b, "attributes.brand")?,
                (3, Value::Fixed64(b)) => self.price = f64::from_le_bytes(b),
                (4, Value::Varint(v)) => self.in_stock = v != 0,
                (5, Value::Varint(v)) => self.promoted = v != 0,
                (6, Value::Varint(v)) => self.created_at = v as i64,
                (1..=6, _) => return Err(WireError::Malformed),
                _ => {}
            }
        }
        Ok(())
    }
}

/// Why an encoded candidate could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    /// Cut short, an unknown wire type, or a known field with the wrong one.
    #[error("does not decode as a recmesh.v1.Candidate")]
    Malformed,
    /// A string field that is not UTF-8.
    #[error("{0} is not UTF-8")]
    NotUtf8(&'static str),
}

/// One field of an encoded message: its number, its value, and where the
/// whole field (key included) sits in the message.
struct Field<'a> {
    tag: u32,
    value: Value<'a>,
    span: std::ops::Range<usize>,
}

enum Value<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32,
}

/// The fields of an encoded message, in wire order.
fn fields(message: &[u8]) -> impl Iterator<Item = Result<Field<'_>, WireError>> {
    let mut rest = message;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let start = message.len() - rest.len();
        Some(next_field(&mut rest).map(|(tag, value)| Field {
            tag,
            value,
            span: start..message.len() - rest.len(),
        }))
    })
}

fn next_field<'a>(rest: &mut &'a [u8]) -> Result<(u32, Value<'a>), WireError> {
    let key = decode_varint(rest).map_err(|_| WireError::Malformed)?;
    let tag = u32::try_from(key >> 3).map_err(|_| WireError::Malformed)?;
    if tag == 0 {
        return Err(WireError::Malformed);
    }
    let value = match WireType::try_from(key & 7).map_err(|_| WireError::Malformed)? {
        WireType::Varint => Value::Varint(decode_varint(rest).map_err(|_| WireError::Malformed)?),
        WireType::SixtyFourBit => Value::Fixed64(take(rest, 8)?.try_into().expect("eight bytes")),
        WireType::LengthDelimited => {
            let len = decode_varint(rest).map_err(|_| WireError::Malformed)?;
            Value::Bytes(take(
                rest,
                usize::try_from(len).map_err(|_| WireError::Malformed)?,
            )?)
        }
        WireType::ThirtyTwoBit => {
            take(rest, 4)?;
            Value::Fixed32
        }
        WireType::StartGroup | WireType::EndGroup => return Err(WireError::Malformed),
    };
    Ok((tag, value))
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], WireError> {
    let (head, tail) = rest.split_at_checked(n).ok_or(WireError::Malformed)?;
    *rest = tail;
    Ok(head)
}

fn text<'a>(bytes: &'a [u8], field: &'static str) -> Result<&'a str, WireError> {
    std::str::from_utf8(bytes).map_err(|_| WireError::NotUtf8(field))
}

/// Reads an encoded `Candidate`'s id, score, source scores and attributes;
/// the other fields are checked for shape only.
pub fn view(candidate: &[u8]) -> Result<CandidateView<'_>, WireError> {
    let mut view = CandidateView::default();
    for field in fields(candidate) {
        let field = field?;
        match (field.tag, field.value) {
            (1, Value::Bytes(b)) => view.item_id = text(b, "item_id")?,
            (2, Value::Fixed64(b)) => view.score = f64::from_le_bytes(b),
            (5, Value::Bytes(entry)) => {
                let (mut key, mut value) = ("", 0.0);
                for f in fields(entry) {
                    let f = f?;
                    match (f.tag, f.value) {
                        (1, Value::Bytes(b)) => key = text(b, "source_scores key")?,
                        (2, Value::Fixed64(b)) => value = f64::from_le_bytes(b),
                        (1 | 2, _) => return Err(WireError::Malformed),
                        _ => {}
                    }
                }
                match view.source_scores.iter_mut().find(|(k, _)| *k == key) {
                    Some(slot) => slot.1 = value,
                    None => view.source_scores.push((key, value)),
                }
            }
            (6, Value::Bytes(b)) => view.attributes.get_or_insert_default().merge(b)?,
            (1 | 2 | 5 | 6, _) => return Err(WireError::Malformed),
            _ => {}
        }
    }
    Ok(view)
}

/// Appends to `out`, and returns, `candidate` with `score` in place of its
/// score and, when given, `attributes` in place of its attributes; every
/// other field goes through byte for byte.
pub fn rescore(
    candidate: &[u8],
    score: f64,
    attributes: Option<&pb::ItemAttributes>,
    out: &mut BytesMut,
) -> Result<Bytes, WireError> {
    out.reserve(candidate.len() + 16);
    for field in fields(candidate) {
        let field = field?;
        if field.tag == 2 || (field.tag == 6 && attributes.is_some()) {
            continue;
        }
        out.extend_from_slice(&candidate[field.span]);
    }
    if score != 0.0 {
        prost::encoding::double::encode(2, &score, out);
    }
    if let Some(a) = attributes {
        prost::encoding::message::encode(6, a, out);
    }
    Ok(out.split().freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn candidate(id: &str) -> pb::Candidate {
        pb::Candidate {
            item_id: id.into(),
            score: 0.5,
            source: "cf".into(),
            reasons: vec!["because you viewed i1".into()],
            source_scores: [("cf".to_string(), 0.5), ("ann".to_string(), 0.25)].into(),
            attributes: Some(pb::ItemAttributes {
                category: "books".into(),
                price: 12.5,
                in_stock: true,
                ..Default::default()
            }),
            exploration: true,
        }
    }

    fn interaction() -> pb::Interaction {
        pb::Interaction {
            item_id: "i9".into(),
            event_type: pb::EventType::Click as i32,
            timestamp_ms: 1_700_000_000_000,
        }
    }

    /// `a` encoded, decoded as `B`, encoded again and decoded as `A` is `a`.
    fn round_trip<A: Message + Default + PartialEq + std::fmt::Debug, B: Message + Default>(a: &A) {
        let b = B::decode(a.encode_to_vec().as_slice()).expect("mirror decodes");
        let back = A::decode(b.encode_to_vec().as_slice()).expect("generated type decodes");
        assert_eq!(&back, a);
    }

    // Struct literals without `..Default::default()`: a field added to the
    // protos stops these from compiling until the mirror has it too.

    #[test]
    fn retrieve_response_mirror_keeps_every_field() {
        round_trip::<_, RetrieveResponse>(&pb::RetrieveResponse {
            candidates: vec![candidate("a"), candidate("b")],
            data_version: "v7".into(),
            sources: vec![pb::SourceReport {
                source: "cf".into(),
                outcome: "ok".into(),
                ..Default::default()
            }],
        });
    }

    #[test]
    fn rank_messages_mirrors_keep_every_field() {
        round_trip::<_, RankRequest>(&pb::RankRequest {
            user_id: "u1".into(),
            candidates: vec![candidate("a"), candidate("b")],
            model: "m2".into(),
            recent: vec![interaction()],
        });
        round_trip::<_, RankResponse>(&pb::RankResponse {
            candidates: vec![candidate("b")],
            model_version: "gbdt-3".into(),
            degraded: true,
            detail: "item features late".into(),
        });
    }

    #[test]
    fn rerank_request_mirror_keeps_every_field() {
        round_trip::<_, RerankRequest>(&pb::RerankRequest {
            user_id: "u1".into(),
            candidates: vec![candidate("a"), candidate("b")],
            count: 10,
            exclude_item_ids: vec!["x".into()],
            purchased_item_ids: vec!["y".into()],
            filters: Some(pb::Filters {
                categories: vec!["books".into()],
                min_price: 1.0,
                max_price: 99.0,
            }),
            rule_overrides: [("category_cap".to_string(), "3".to_string())].into(),
            request_id: "r1".into(),
            recent: vec![interaction()],
            usual_categories: vec!["toys".into()],
        });
    }

    #[test]
    fn candidates_survive_encode_and_decode_and_a_broken_one_is_left_out() {
        let list = vec![candidate("a"), candidate("b")];
        let mut raw = encode(&list);
        assert_eq!(decode(&raw), list);
        raw.insert(1, Bytes::from_static(&[0x0a, 0x05, b'x']));
        assert_eq!(decode(&raw), list, "the truncated candidate is dropped");
    }

    fn owned(a: AttributesView<'_>) -> pb::ItemAttributes {
        pb::ItemAttributes {
            category: a.category.into(),
            brand: a.brand.into(),
            price: a.price,
            in_stock: a.in_stock,
            promoted: a.promoted,
            created_at: a.created_at,
        }
    }

    fn sorted(mut scores: Vec<(&str, f64)>) -> Vec<(&str, f64)> {
        scores.sort_by(|a, b| a.0.cmp(b.0));
        scores
    }

    #[test]
    fn a_view_reads_what_the_generated_type_decodes() {
        let c = candidate("i7");
        let bytes = c.encode_to_vec();
        let v = view(&bytes).expect("a well-formed candidate reads");
        assert_eq!((v.item_id, v.score), ("i7", 0.5));
        let want = c.source_scores.iter().map(|(k, v)| (k.as_str(), *v));
        assert_eq!(sorted(v.source_scores), sorted(want.collect()));
        assert_eq!(v.attributes.map(owned), c.attributes);
        let mut c = c;
        c.attributes = Some(pb::ItemAttributes {
            brand: "acme".into(),
            promoted: true,
            created_at: -5,
            ..Default::default()
        });
        let bytes = c.encode_to_vec();
        assert_eq!(
            view(&bytes).expect("reads").attributes.map(owned),
            c.attributes
        );
        let empty = view(&[]).expect("an empty candidate is all defaults");
        assert_eq!(empty, CandidateView::default());
    }

    #[test]
    fn rescoring_replaces_score_and_attributes_and_keeps_every_other_field() {
        let c = candidate("i7");
        let fresh = pb::ItemAttributes {
            category: "music".into(),
            price: 3.0,
            ..Default::default()
        };
        let mut out = BytesMut::new();
        let b = rescore(&c.encode_to_vec(), 0.875, Some(&fresh), &mut out).expect("rescores");
        let want = pb::Candidate {
            score: 0.875,
            attributes: Some(fresh),
            ..c.clone()
        };
        assert_eq!(pb::Candidate::decode(b).expect("decodes"), want);
        // No fresh attributes: retrieval's stay. A zero score is left out,
        // as prost leaves it out, and decodes as zero.
        let b = rescore(&c.encode_to_vec(), 0.0, None, &mut out).expect("rescores");
        let want = pb::Candidate { score: 0.0, ..c };
        assert_eq!(
            b,
            Bytes::from(want.encode_to_vec()),
            "byte for byte as prost"
        );
        assert_eq!(pb::Candidate::decode(b).expect("decodes"), want);
    }

    #[test]
    fn a_field_sent_twice_reads_as_prost_merges_it() {
        // Two encodings one after the other are one message, merged: the
        // last scalar wins and map entries are combined.
        let mut bytes = candidate("a").encode_to_vec();
        let second = pb::Candidate {
            item_id: "b".into(),
            score: 2.0,
            source_scores: [("cf".to_string(), 9.0)].into(),
            attributes: Some(pb::ItemAttributes {
                brand: "acme".into(),
                in_stock: false,
                ..Default::default()
            }),
            ..Default::default()
        };
        bytes.extend(second.encode_to_vec());
        let merged = pb::Candidate::decode(bytes.as_slice()).expect("decodes");
        let v = view(&bytes).expect("reads");
        assert_eq!(
            (v.item_id, v.score),
            (merged.item_id.as_str(), merged.score)
        );
        let want = merged.source_scores.iter().map(|(k, v)| (k.as_str(), *v));
        assert_eq!(sorted(v.source_scores), sorted(want.collect()));
        assert_eq!(v.attributes.map(owned), merged.attributes);
        let b = rescore(&bytes, 1.5, None, &mut BytesMut::new()).expect("rescores");
        let want = pb::Candidate {
            score: 1.5,
            ..merged
        };
        assert_eq!(pb::Candidate::decode(b).expect("decodes"), want);
    }

    #[test]
    fn a_broken_candidate_is_refused_where_prost_refuses_it() {
        let bytes = candidate("i7").encode_to_vec();
        for cut in 0..bytes.len() {
            let ours = view(&bytes[..cut]);
            let prost = pb::Candidate::decode(&bytes[..cut]);
            assert_eq!(
                ours.is_ok(),
                prost.is_ok(),
                "cut at {cut}: {ours:?} / {prost:?}"
            );
            assert_eq!(
                rescore(&bytes[..cut], 1.0, None, &mut BytesMut::new()).is_ok(),
                prost.is_ok()
            );
        }
        let mut bad = pb::Candidate {
            item_id: "x".into(),
            ..Default::default()
        }
        .encode_to_vec();
        bad[2] = 0xff;
        assert_eq!(view(&bad), Err(WireError::NotUtf8("item_id")));
        // item_id sent as a varint; a field number of zero; a group;
        // attributes.price sent as a varint.
        assert_eq!(view(&[0x08, 0x05]), Err(WireError::Malformed));
        assert_eq!(view(&[0x32, 0x02, 0x18, 0x01]), Err(WireError::Malformed));
        assert_eq!(view(&[0x02, 0x00]), Err(WireError::Malformed));
        assert_eq!(view(&[0x1b]), Err(WireError::Malformed));
    }
}

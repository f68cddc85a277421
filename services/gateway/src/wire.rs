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

use prost::Message;
use prost::bytes::Bytes;
use recmesh_mesh::balance::Balanced;
use recmesh_proto::v1 as pb;
use tonic::Status;
use tonic::codegen::http::uri::PathAndQuery;

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
}

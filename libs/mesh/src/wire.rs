//! The candidate list, passed from stage to stage still encoded.
//!
//! The gateway reads nothing inside the lean candidate list
//! (`recmesh.v1.CandidateList`, [`crate::lean`]) it hands from retrieval to
//! ranking and from ranking to the reranker. These messages have the same
//! wire format as their `recmesh.v1` namesakes, with the list read as its
//! encoded bytes: decoding keeps a slice of the received buffer, a copy for
//! the fallback is a reference count, encoding is one copy. The list is
//! decoded only when the gateway needs it itself (a stage fell back and the
//! gateway applies its own rules).
//!
//! The tests check each mirror against the generated type field by field,
//! so a field added to the protos without being added here fails them.

use std::collections::HashMap;

use crate::balance::Balanced;
use prost::Message;
pub use prost::bytes::Bytes;
use recmesh_proto::v1 as pb;
use tonic::Status;
use tonic::codegen::http::uri::PathAndQuery;

/// `recmesh.v1.RetrieveResponse` with the list encoded.
#[derive(Clone, PartialEq, Message)]
pub struct RetrieveResponse {
    #[prost(message, repeated, tag = "1")]
    pub candidates: Vec<pb::Candidate>,
    #[prost(string, tag = "2")]
    pub data_version: String,
    #[prost(message, repeated, tag = "3")]
    pub sources: Vec<pb::SourceReport>,
    /// `list`, encoded.
    #[prost(bytes = "bytes", tag = "4")]
    pub list: Bytes,
}

/// `recmesh.v1.RankRequest` with the list encoded.
#[derive(Clone, PartialEq, Message)]
pub struct RankRequest {
    #[prost(string, tag = "1")]
    pub user_id: String,
    /// `candidates`, encoded.
    #[prost(bytes = "bytes", tag = "5")]
    pub candidates: Bytes,
    #[prost(string, tag = "3")]
    pub model: String,
    #[prost(message, repeated, tag = "4")]
    pub recent: Vec<pb::Interaction>,
}

/// `recmesh.v1.RankResponse` with the list encoded.
#[derive(Clone, PartialEq, Message)]
pub struct RankResponse {
    /// `candidates`, encoded.
    #[prost(bytes = "bytes", tag = "5")]
    pub candidates: Bytes,
    #[prost(string, tag = "2")]
    pub model_version: String,
    #[prost(bool, tag = "3")]
    pub degraded: bool,
    #[prost(string, tag = "4")]
    pub detail: String,
}

/// `recmesh.v1.RerankRequest` with the list encoded.
#[derive(Clone, PartialEq, Message)]
pub struct RerankRequest {
    #[prost(string, tag = "1")]
    pub user_id: String,
    /// `candidates`, encoded.
    #[prost(bytes = "bytes", tag = "12")]
    pub candidates: Bytes,
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
    #[prost(fixed64, repeated, tag = "13")]
    pub seen_items: Vec<u64>,
}

/// Encodes whole candidates the gateway made itself (the popularity
/// fallback) as a list. One whose source is not a retrieval source is left
/// out and logged.
pub fn encode(candidates: &[pb::Candidate]) -> Bytes {
    let mut list = crate::lean::ListBuilder::with_capacity(candidates.len());
    for c in candidates {
        if let Err(e) = list.push_candidate(c) {
            tracing::warn!(item = %c.item_id, error = %e, "a fallback candidate left out");
        }
    }
    Bytes::from(list.finish().encode_to_vec())
}

/// Decodes an encoded list into whole candidates, for the gateway's own
/// rules. A list a stage sent that does not decode or check is logged and
/// read as empty (the stage is broken; the gateway falls back).
pub fn decode(list: &[u8]) -> Vec<pb::Candidate> {
    let read = pb::CandidateList::decode(list)
        .map_err(|e| e.to_string())
        .and_then(|l| crate::lean::Candidates::new(l, "candidates").map_err(|e| e.to_string()));
    match read {
        Ok(c) => c.to_candidates(),
        Err(e) => {
            tracing::warn!(error = %e, "a stage sent a candidate list that does not read; left out");
            Vec::new()
        }
    }
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

    fn list(ids: &[&str]) -> Option<pb::CandidateList> {
        let whole: Vec<pb::Candidate> = ids.iter().map(|i| candidate(i)).collect();
        Some(crate::lean::from_candidates(&whole).expect("known sources"))
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
            candidates: vec![candidate("x")],
            data_version: "v7".into(),
            sources: vec![pb::SourceReport {
                source: "cf".into(),
                outcome: "ok".into(),
                ..Default::default()
            }],
            list: list(&["a", "b"]),
        });
    }

    #[test]
    fn rank_messages_mirrors_keep_every_field() {
        round_trip::<_, RankRequest>(&pb::RankRequest {
            user_id: "u1".into(),
            candidates: list(&["a", "b"]),
            model: "m2".into(),
            recent: vec![interaction()],
        });
        round_trip::<_, RankResponse>(&pb::RankResponse {
            candidates: list(&["b"]),
            model_version: "gbdt-3".into(),
            degraded: true,
            detail: "item features late".into(),
        });
    }

    #[test]
    fn rerank_request_mirror_keeps_every_field() {
        round_trip::<_, RerankRequest>(&pb::RerankRequest {
            user_id: "u1".into(),
            candidates: list(&["a", "b"]),
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
            seen_items: vec![7, u64::MAX],
        });
    }

    #[test]
    fn candidates_survive_encode_and_decode_and_a_broken_list_reads_empty() {
        let whole = vec![candidate("a"), candidate("b")];
        let mut bad = candidate("c");
        bad.source = "magic".into();
        let mut with_bad = whole.clone();
        with_bad.insert(1, bad);
        assert_eq!(
            decode(&encode(&with_bad)),
            whole,
            "the unknown source is left out"
        );
        let raw = encode(&whole);
        assert_eq!(decode(&raw[..raw.len() - 1]), Vec::new(), "cut short");
    }
}

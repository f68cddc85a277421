//! Conversions and checks at the edge between protos and domain types,
//! shared by every service so a field is validated the same way everywhere.

use recmesh_catalog::{EventKind, Item};
use recmesh_proto::v1 as pb;

/// A request field that failed validation; becomes `INVALID_ARGUMENT` with
/// the message `"<field>: <reason>"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldError {
    /// Path of the field, e.g. `events[2].event_type`.
    pub field: String,
    /// What is wrong and what is accepted.
    pub reason: String,
}

impl FieldError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl From<FieldError> for tonic::Status {
    fn from(e: FieldError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

/// Longest id (user, item, event) accepted anywhere in recmesh.
pub const MAX_ID_LEN: usize = 128;

/// Checks an id field: non-empty, at most [`MAX_ID_LEN`] bytes, no control
/// characters.
pub fn check_id(field: &str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        Err(FieldError::new(field, "must not be empty"))
    } else if value.len() > MAX_ID_LEN {
        Err(FieldError::new(
            field,
            format!("must be at most {MAX_ID_LEN} bytes"),
        ))
    } else if value.chars().any(char::is_control) {
        Err(FieldError::new(
            field,
            "must not contain control characters",
        ))
    } else {
        Ok(())
    }
}

/// The domain event kind of a proto `EventType` value (`None` for
/// unspecified or unknown values).
pub fn event_kind(value: i32) -> Option<EventKind> {
    match pb::EventType::try_from(value).ok()? {
        pb::EventType::View => Some(EventKind::View),
        pb::EventType::Click => Some(EventKind::Click),
        pb::EventType::AddToCart => Some(EventKind::AddToCart),
        pb::EventType::Purchase => Some(EventKind::Purchase),
        pb::EventType::Unspecified => None,
    }
}

/// The proto `EventType` of a domain event kind.
pub fn event_type(kind: EventKind) -> pb::EventType {
    match kind {
        EventKind::View => pb::EventType::View,
        EventKind::Click => pb::EventType::Click,
        EventKind::AddToCart => pb::EventType::AddToCart,
        EventKind::Purchase => pb::EventType::Purchase,
    }
}

/// Proto attributes of a catalog item.
pub fn attributes(item: &Item) -> pb::ItemAttributes {
    pb::ItemAttributes {
        category: item.category.clone(),
        brand: item.brand.clone(),
        price: item.price,
        in_stock: item.in_stock,
        promoted: item.promoted,
        created_at: item.created_at,
    }
}

/// The rule view of a candidate, for the hard filters and caps.
pub fn rule_item(c: &pb::Candidate) -> recmesh_algo::rules::RuleItem<'_> {
    let a = c.attributes.as_ref();
    recmesh_algo::rules::RuleItem {
        id: &c.item_id,
        category: a.map_or("", |a| a.category.as_str()),
        price: a.map_or(0.0, |a| a.price),
        // No attributes means nobody vouched for stock: treat as unavailable.
        in_stock: a.is_some_and(|a| a.in_stock),
    }
}

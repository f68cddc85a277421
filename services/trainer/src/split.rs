//! Temporal splits of an interaction log.
//!
//! - **Per-user temporal**: each user's last 20% of interactions (by time)
//!   are test, the 10% before them validation, the rest train. Every user
//!   with history is evaluated, which makes model differences measurable.
//! - **Global temporal**: everything before the 80th percentile of time is
//!   train, the next 10% validation, the last 10% test. This is leak-free (no
//!   training on the future), but on MovieLens-100k few test users have any
//!   history, so keep it as a check, not for comparing models.
//!
//! Models are fitted on train + validation. An item is relevant for a user
//! when they interacted with it in test and not before: items seen in
//! training are never recommended back, so counting them would reward
//! nothing.

use std::collections::{HashMap, HashSet};

use recmesh_catalog::{Dataset, Interaction};

/// A split protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Per user by time: 70 / 10 / 20.
    PerUserTemporal,
    /// Global by time: 80 / 10 / 10.
    GlobalTemporal,
}

impl Protocol {
    /// A one-line description for reports.
    pub fn describe(&self) -> String {
        match self {
            Protocol::PerUserTemporal => {
                "per-user temporal (each user's last 20% test, the 10% before validation; fit on train+validation)".into()
            }
            Protocol::GlobalTemporal => {
                "global temporal 80/10/10 by time (fit on the first 90%)".into()
            }
        }
    }
}

/// Training data and the held-out relevant items per user.
#[derive(Debug, Clone)]
pub struct Split {
    /// All items, and the train + validation interactions (what models are
    /// fitted on before they are evaluated on test).
    pub train: Dataset,
    /// All items, and the train interactions only (what the ranker's
    /// candidates come from when it learns on the validation period).
    pub train_only: Dataset,
    /// Per validation user: items first interacted with in validation.
    pub valid: HashMap<String, HashSet<String>>,
    /// Per test user: items first interacted with in the test period.
    pub test: HashMap<String, HashSet<String>>,
    /// How the split was made.
    pub protocol: Protocol,
    /// Fingerprint of the whole dataset.
    pub fingerprint: String,
}

impl Split {
    /// Splits `data` (interactions sorted by time) by `protocol`.
    pub fn new(data: &Dataset, protocol: Protocol) -> Split {
        // (train, validation, test) interactions, each in time order.
        let (train, valid, held): (Vec<Interaction>, Vec<Interaction>, Vec<Interaction>) =
            match protocol {
                Protocol::PerUserTemporal => {
                    let mut by_user: HashMap<&str, Vec<&Interaction>> = HashMap::new();
                    for e in &data.interactions {
                        by_user.entry(e.user.as_str()).or_default().push(e);
                    }
                    let (mut train, mut valid, mut held) = (Vec::new(), Vec::new(), Vec::new());
                    for events in by_user.values() {
                        let n = events.len();
                        // Fewer than 5 interactions: too few to hold any out.
                        let (n_test, n_valid) = if n < 5 {
                            (0, 0)
                        } else {
                            (
                                ((n as f64) * 0.2).round() as usize,
                                ((n as f64) * 0.1).round() as usize,
                            )
                        };
                        for (i, e) in events.iter().enumerate() {
                            let e = (*e).clone();
                            if i + n_test >= n {
                                held.push(e);
                            } else if i + n_test + n_valid >= n {
                                valid.push(e);
                            } else {
                                train.push(e);
                            }
                        }
                    }
                    train.sort_by_key(|e| e.timestamp_ms);
                    valid.sort_by_key(|e| e.timestamp_ms);
                    (train, valid, held)
                }
                Protocol::GlobalTemporal => {
                    let n = data.interactions.len() as f64;
                    let (a, b) = ((n * 0.8).round() as usize, (n * 0.9).round() as usize);
                    (
                        data.interactions[..a].to_vec(),
                        data.interactions[a..b].to_vec(),
                        data.interactions[b..].to_vec(),
                    )
                }
            };
        let mut fit = train.clone();
        fit.extend(valid.iter().cloned());
        fit.sort_by_key(|e| e.timestamp_ms);
        let new_items = |before: &[Interaction], after: &[Interaction]| {
            let mut seen: HashMap<&str, HashSet<&str>> = HashMap::new();
            for e in before {
                seen.entry(e.user.as_str())
                    .or_default()
                    .insert(e.item.as_str());
            }
            let mut out: HashMap<String, HashSet<String>> = HashMap::new();
            for e in after {
                if !seen
                    .get(e.user.as_str())
                    .is_some_and(|s| s.contains(e.item.as_str()))
                {
                    out.entry(e.user.clone())
                        .or_default()
                        .insert(e.item.clone());
                }
            }
            out
        };
        let test = new_items(&fit, &held);
        let valid_relevant = new_items(&train, &valid);
        Split {
            train: Dataset {
                items: data.items.clone(),
                interactions: fit,
            },
            train_only: Dataset {
                items: data.items.clone(),
                interactions: train,
            },
            valid: valid_relevant,
            test,
            protocol,
            fingerprint: data.fingerprint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use recmesh_catalog::{EventKind, Item};

    fn data() -> Dataset {
        let item = |id: &str| Item {
            id: id.into(),
            category: "c".into(),
            brand: "b".into(),
            price: 1.0,
            in_stock: true,
            promoted: false,
            created_at: 0,
            title: id.into(),
        };
        let ev = |user: &str, item: &str, ts: i64| Interaction {
            user: user.into(),
            item: item.into(),
            kind: EventKind::View,
            timestamp_ms: ts,
        };
        Dataset {
            items: (0..10).map(|i| item(&format!("i{i}"))).collect(),
            interactions: vec![
                ev("a", "i0", 1),
                ev("a", "i1", 2),
                ev("a", "i2", 3),
                ev("a", "i3", 4),
                ev("a", "i4", 5),
                ev("b", "i0", 6),
                ev("a", "i0", 7), // a repeat of a training item: not relevant
                ev("b", "i9", 8),
                ev("a", "i5", 9),
                ev("a", "i6", 10),
            ],
        }
    }

    #[test]
    fn per_user_holds_out_each_users_latest_fifth() {
        let s = Split::new(&data(), Protocol::PerUserTemporal);
        // a has 8 events: the last round(1.6) = 2 (i5, i6) are test.
        assert_eq!(s.test["a"], ["i5".to_string(), "i6".to_string()].into());
        // b has 2: too few to hold out.
        assert!(!s.test.contains_key("b"));
        assert_eq!(s.train.interactions.len(), 8);
        // The round(0.8) = 1 event before test is validation: a/i0 again at
        // t=7, a repeat of a training item, so a has nothing new in validation.
        assert!(!s.valid.contains_key("a"));
        assert_eq!(s.train_only.interactions.len(), 7);
        assert!(
            s.train
                .interactions
                .windows(2)
                .all(|w| w[0].timestamp_ms <= w[1].timestamp_ms)
        );
    }

    #[test]
    fn global_cuts_by_time_and_keeps_only_new_items() {
        let s = Split::new(&data(), Protocol::GlobalTemporal);
        // 10 events: the last 1 (a/i6) is test.
        assert_eq!(s.test.len(), 1);
        assert_eq!(s.test["a"], ["i6".to_string()].into());
        assert_eq!(s.train.interactions.len(), 9);
    }
}

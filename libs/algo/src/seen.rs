//! The seen-items policy: which of a user's items count as already seen, so
//! no stage recommends them back.
//!
//! The feature store keeps, per user, every item they had an event on (up to
//! a bound), each with the newest time of each event kind. A policy picks
//! the kinds that make an item seen (default: every kind) and optionally how
//! long an item stays seen (`window_s`, 0 = forever). The gateway resolves
//! the policy for the request (its `[seen]` config, then the variant's
//! `seen.kinds` / `seen.window_s` params) and sends the resulting item keys
//! down: retrieval drops them before it truncates its lists, the reranker
//! drops any that still arrive.

use crate::params::ParamError;

/// The compact key of an item id in a seen set: 64-bit FNV-1a of its bytes
/// (`recmesh_catalog::item_key` re-exports it). What the feature store keeps
/// and the stages exchange, so a seen set of thousands of items costs 8
/// bytes per item, not a string. Two ids share a key with probability about
/// n²/2⁶⁵ (3·10⁻⁸ for a million items); such a pair is excluded together.
pub fn item_key(id: &str) -> u64 {
    crate::assign::fnv1a64(id.as_bytes())
}

/// Event kind names in slot order: the slots of [`SeenTimes`].
pub const KIND_NAMES: [&str; 4] = ["view", "click", "add_to_cart", "purchase"];

/// The newest event of each kind on one item, Unix seconds (0: none), in
/// [`KIND_NAMES`] order.
pub type SeenTimes = [u32; 4];

/// The newest event of any kind among `times` (0: none).
pub fn newest(times: &SeenTimes) -> u32 {
    times.iter().copied().max().unwrap_or(0)
}

/// Which events make an item seen, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeenPolicy {
    /// Bit `n` set: an event of kind `KIND_NAMES[n]` makes the item seen.
    pub kinds: u8,
    /// An item stays seen this many seconds after its newest such event
    /// (0: forever).
    pub window_s: u64,
}

/// Every kind.
const ALL: u8 = 0b1111;

/// Longest window accepted: a year.
pub const MAX_WINDOW_S: u64 = 365 * 86_400;

impl Default for SeenPolicy {
    /// Every kind, forever: a user is never shown what they already had,
    /// whatever they did with it. A "recently viewed" shelf is a separate
    /// list, not leakage into recommendations.
    fn default() -> Self {
        SeenPolicy {
            kinds: ALL,
            window_s: 0,
        }
    }
}

fn bad(key: &str, reason: impl Into<String>) -> ParamError {
    ParamError {
        key: key.to_owned(),
        reason: reason.into(),
    }
}

impl SeenPolicy {
    /// Parses a kinds list: comma-separated names of [`KIND_NAMES`], `all`,
    /// or `none` (nothing is seen but purchases, which stay excluded by their
    /// own rule). `key` names the field in the error.
    pub fn parse_kinds(key: &str, value: &str) -> Result<u8, ParamError> {
        let v = value.trim();
        match v {
            "all" => return Ok(ALL),
            "none" => return Ok(0),
            _ => {}
        }
        let mut mask = 0u8;
        for name in v.split(',').map(str::trim) {
            let Some(slot) = KIND_NAMES.iter().position(|k| *k == name) else {
                return Err(bad(
                    key,
                    format!(
                        "`{name}` is not an event kind; use `all`, `none` or a comma-separated list of {}",
                        KIND_NAMES.join(", ")
                    ),
                ));
            };
            mask |= 1 << slot;
        }
        Ok(mask)
    }

    /// Parses a window in seconds (0..=[`MAX_WINDOW_S`]).
    pub fn parse_window(key: &str, value: &str) -> Result<u64, ParamError> {
        match value.trim().parse::<u64>() {
            Ok(w) if w <= MAX_WINDOW_S => Ok(w),
            _ => Err(bad(
                key,
                format!(
                    "`{value}` is not a whole number of seconds in 0..={MAX_WINDOW_S} (0: forever)"
                ),
            )),
        }
    }

    /// The kinds as a comma-separated list (`all`, `none`).
    pub fn kinds_text(&self) -> String {
        match self.kinds & ALL {
            ALL => "all".into(),
            0 => "none".into(),
            m => KIND_NAMES
                .iter()
                .enumerate()
                .filter(|(n, _)| m & (1 << n) != 0)
                .map(|(_, k)| *k)
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// True when an item with these newest event times is seen at `now_s`.
    pub fn is_seen(&self, times: &SeenTimes, now_s: i64) -> bool {
        let since = if self.window_s == 0 {
            1
        } else {
            now_s.saturating_sub(self.window_s as i64).max(1)
        };
        times
            .iter()
            .enumerate()
            .any(|(n, &t)| self.kinds & (1 << n) != 0 && t != 0 && i64::from(t) >= since)
    }

    /// The keys of the seen items among `keys`, whose times are `times`
    /// (four per key, in [`KIND_NAMES`] order; a short `times` counts as none).
    pub fn select(&self, keys: &[u64], times: &[u32], now_s: i64) -> Vec<u64> {
        if self.kinds & ALL == 0 {
            return Vec::new();
        }
        keys.iter()
            .enumerate()
            .filter(|(n, _)| {
                let t = times.get(n * 4..n * 4 + 4).unwrap_or(&[0; 4]);
                self.is_seen(&[t[0], t[1], t[2], t[3]], now_s)
            })
            .map(|(_, &k)| k)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_by_name_and_refuse_unknown_ones_naming_the_key() {
        assert_eq!(SeenPolicy::parse_kinds("k", "all"), Ok(0b1111));
        assert_eq!(SeenPolicy::parse_kinds("k", "none"), Ok(0));
        assert_eq!(SeenPolicy::parse_kinds("k", "click, purchase"), Ok(0b1010));
        let e = SeenPolicy::parse_kinds("seen.kinds", "like").expect_err("unknown kind");
        assert_eq!(e.key, "seen.kinds");
        assert!(e.reason.contains("`like`"), "{}", e.reason);
        assert!(SeenPolicy::parse_kinds("k", "").is_err());
        let p = SeenPolicy {
            kinds: 0b0110,
            window_s: 0,
        };
        assert_eq!(p.kinds_text(), "click,add_to_cart");
    }

    #[test]
    fn window_is_bounded() {
        assert_eq!(SeenPolicy::parse_window("w", "0"), Ok(0));
        assert_eq!(SeenPolicy::parse_window("w", "86400"), Ok(86_400));
        assert!(SeenPolicy::parse_window("w", "-1").is_err());
        assert!(SeenPolicy::parse_window("w", &(MAX_WINDOW_S + 1).to_string()).is_err());
    }

    #[test]
    fn an_item_is_seen_by_a_listed_kind_inside_the_window() {
        let now = 1_000_000;
        // Viewed long ago, clicked recently.
        let times: SeenTimes = [10, now as u32 - 100, 0, 0];
        let forever = SeenPolicy::default();
        assert!(forever.is_seen(&times, now));
        let views_for_an_hour = SeenPolicy {
            kinds: 0b0001,
            window_s: 3_600,
        };
        // The view is outside the hour; the click does not count.
        assert!(!views_for_an_hour.is_seen(&times, now));
        let clicks_for_an_hour = SeenPolicy {
            kinds: 0b0010,
            window_s: 3_600,
        };
        assert!(clicks_for_an_hour.is_seen(&times, now));
        assert!(!forever.is_seen(&[0; 4], now));
        let keys = [7, 8];
        let flat = [10, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(forever.select(&keys, &flat, now), vec![7]);
        let none = SeenPolicy {
            kinds: 0,
            window_s: 0,
        };
        assert!(none.select(&keys, &flat, now).is_empty());
    }
}

//! Deterministic experiment assignment.
//!
//! A user's bucket in a layer is `fnv1a64(salt ‖ ":" ‖ user) mod 10_000`: the
//! same user always lands in the same bucket, different layers (different
//! salts) are independent, and nothing needs to be stored. FNV-1a is stable
//! across Rust versions and platforms, unlike `std`'s `DefaultHasher`.

/// Buckets per layer: traffic shares and weights resolve to 0.01 %.
pub const BUCKETS: u32 = 10_000;

/// 64-bit FNV-1a.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `full` shortened by up to `jitter` (a share, 0..1) of itself, by a
/// fixed hash of `key`: one key always gets the same life, and keys stored
/// in the same second do not all expire in the same second (cache TTLs).
pub fn jittered(full: std::time::Duration, key: &str, jitter: f64) -> std::time::Duration {
    let share = (fnv1a64(key.as_bytes()) % 1024) as f64 / 1024.0;
    full.mul_f64(1.0 - jitter * share)
}

/// The bucket of `user` in the layer salted with `salt`, in `0..BUCKETS`.
pub fn bucket(salt: &str, user: &str) -> u32 {
    let mut key = Vec::with_capacity(salt.len() + user.len() + 1);
    key.extend_from_slice(salt.as_bytes());
    key.push(b':');
    key.extend_from_slice(user.as_bytes());
    // FNV's low bits mix poorly; fold the high half in before the modulo.
    let h = fnv1a64(&key);
    ((h ^ (h >> 32)) % u64::from(BUCKETS)) as u32
}

/// Buckets a traffic share (0..=1) covers.
pub fn share_buckets(traffic: f64) -> u32 {
    (traffic.clamp(0.0, 1.0) * f64::from(BUCKETS)).round() as u32
}

/// Picks a variant for `bucket` for an experiment that owns the buckets
/// `offset .. offset + share_buckets(traffic)` of its layer (experiments of one
/// layer own disjoint ranges, which makes them mutually exclusive). `None` when
/// the bucket is outside that range or every weight is zero.
///
/// Within its range, variants take contiguous sub-ranges in proportion to
/// their weights.
pub fn pick_variant(bucket: u32, offset: u32, traffic: f64, weights: &[u32]) -> Option<usize> {
    let in_traffic = share_buckets(traffic);
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    let bucket = bucket.checked_sub(offset)?;
    if bucket >= in_traffic || total == 0 {
        return None;
    }
    // Position of the bucket within the experiment's share, scaled to the weights.
    let position = u64::from(bucket) * total / u64::from(in_traffic);
    let mut upper = 0u64;
    for (i, &w) in weights.iter().enumerate() {
        upper += u64::from(w);
        if position < upper {
            return Some(i);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_reference_values() {
        // Published FNV-1a 64 test vectors.
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn buckets_are_stable_and_roughly_uniform() {
        assert_eq!(bucket("layer", "u1"), bucket("layer", "u1"));
        let mut counts = [0u32; 10];
        for u in 0..20_000 {
            counts[(bucket("home", &format!("u{u}")) / 1_000) as usize] += 1;
        }
        // 2,000 expected per decile; a fair hash stays well within ±15 %.
        assert!(
            counts.iter().all(|&c| (1_700..=2_300).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn layers_are_independent() {
        let same = (0..5_000)
            .filter(|u| {
                let user = format!("u{u}");
                (bucket("a", &user) < 5_000) == (bucket("b", &user) < 5_000)
            })
            .count();
        // Independent halves agree about half the time.
        assert!((2_200..=2_800).contains(&same), "{same}");
    }

    #[test]
    fn variants_split_by_weight_and_traffic() {
        assert_eq!(pick_variant(0, 0, 0.5, &[1, 1]), Some(0));
        assert_eq!(pick_variant(2_499, 0, 0.5, &[1, 1]), Some(0));
        assert_eq!(pick_variant(2_500, 0, 0.5, &[1, 1]), Some(1));
        assert_eq!(pick_variant(4_999, 0, 0.5, &[1, 1]), Some(1));
        assert_eq!(
            pick_variant(5_000, 0, 0.5, &[1, 1]),
            None,
            "outside traffic"
        );
        assert_eq!(pick_variant(10, 0, 1.0, &[0, 0]), None);
        assert_eq!(pick_variant(9_999, 0, 1.0, &[0, 3]), Some(1));
        // A second experiment of the layer owning buckets 5000..7000.
        assert_eq!(pick_variant(4_999, 5_000, 0.2, &[1]), None);
        assert_eq!(pick_variant(5_000, 5_000, 0.2, &[1]), Some(0));
        assert_eq!(pick_variant(7_000, 5_000, 0.2, &[1]), None);
        let shares: Vec<usize> = (0..BUCKETS)
            .filter_map(|b| pick_variant(b, 0, 1.0, &[1, 3]))
            .collect();
        assert_eq!(shares.iter().filter(|&&v| v == 0).count(), 2_500);
    }
}

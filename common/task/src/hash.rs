//! Deterministic pseudo-random draws: the same inputs give the same number on every machine
//! and every toolchain (no `DefaultHasher`, whose algorithm may change between releases).

/// SplitMix64's finaliser: a well-spread 64-bit mix.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A stable 64-bit hash of a sequence of strings (FNV-1a over each, with a separator, then
/// mixed): the same on every machine and toolchain, unlike `std`'s `DefaultHasher`, whose
/// algorithm may change between releases (workers built apart would disagree).
pub fn hash_strs<'a>(parts: impl IntoIterator<Item = &'a str>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain([0xff]) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    mix(h)
}

/// A number in [0, 1) drawn from seed, job, batch and attempt.
pub fn draw(seed: u64, job: &str, batch: u64, attempt: u32) -> f64 {
    // FNV-1a over the job id, then mixed with the rest.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in job.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let x = mix(mix(mix(h ^ seed) ^ batch) ^ u64::from(attempt));
    (x >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_stable() {
        // Fixed values: a change here changes every worker's results.
        assert_eq!(hash_strs(["the", "cat"]), hash_strs(["the", "cat"]));
        assert_ne!(hash_strs(["the", "cat"]), hash_strs(["thec", "at"]));
        assert_eq!(mix(0), 0xe220_a839_7b1d_cdaf);
        let d = draw(1, "job", 3, 1);
        assert!((0.0..1.0).contains(&d));
    }
}

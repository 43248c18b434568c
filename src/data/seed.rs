//! Derived generators: a ChaCha8 stream for one purpose, seeded from a user seed and a few
//! numbers (epoch, example index, ...), so a random choice never depends on the order in which
//! threads ask for it, and is the same on every machine.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Which use a derived stream serves; two purposes never share a stream.
#[derive(Clone, Copy, Debug)]
#[repr(u64)]
pub enum Purpose {
    /// The order of an epoch.
    Shuffle = 1,
    /// The random transforms of one example in one epoch.
    Augment = 2,
    /// Label noise.
    Noise = 3,
    /// A random split of a dataset.
    Split = 4,
}

/// A generator seeded from `(seed, purpose, a, b)`, all four packed into the 32-byte ChaCha key.
pub fn derived_rng(seed: u64, purpose: Purpose, a: u64, b: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    for (i, v) in [seed, purpose as u64, a, b].into_iter().enumerate() {
        key[i * 8..(i + 1) * 8].copy_from_slice(&v.to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

/// A uniform integer in `0..n` (`n > 0`), drawn as a u64 so that 32- and 64-bit machines agree.
pub fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    use rand::Rng;
    rng.random_range(0..n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn streams_are_fixed_and_distinct() {
        let a: u64 = derived_rng(1, Purpose::Shuffle, 0, 0).random();
        let b: u64 = derived_rng(1, Purpose::Shuffle, 0, 0).random();
        let c: u64 = derived_rng(1, Purpose::Augment, 0, 0).random();
        let d: u64 = derived_rng(1, Purpose::Shuffle, 1, 0).random();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }
}

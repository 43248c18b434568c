//! The host's seeded random source: every random number samhost draws comes from here, so the
//! same `--seed` gives the same numbers on every machine (ChaCha8 is portable).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

/// The exact position of a [`HostRng`], for checkpoints: restoring it makes the generator draw
/// the same numbers it would have drawn next.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The ChaCha8 key (32 bytes) as hexadecimal.
    pub seed: String,
    /// The ChaCha stream number.
    pub stream: u64,
    /// The position in the stream, in 32-bit words (a decimal string: it is a u128).
    pub word_pos: String,
}

/// A shared, seeded random generator. Cloning shares the same stream.
#[derive(Clone, Debug)]
pub struct HostRng(Arc<Mutex<ChaCha8Rng>>);

impl HostRng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(Arc::new(Mutex::new(ChaCha8Rng::seed_from_u64(seed))))
    }

    fn with<T>(&self, f: impl FnOnce(&mut ChaCha8Rng) -> T) -> T {
        let mut guard = match self.0.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut guard)
    }

    /// The generator's current position.
    pub fn state(&self) -> RngState {
        self.with(|r| RngState {
            seed: r.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
            stream: r.get_stream(),
            word_pos: r.get_word_pos().to_string(),
        })
    }

    /// Moves the generator to a position saved by [`HostRng::state`].
    pub fn restore(&self, state: &RngState) -> anyhow::Result<()> {
        let bad = || anyhow::anyhow!("random generator state: malformed seed or position");
        if state.seed.len() != 64 || !state.seed.is_ascii() {
            return Err(bad());
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&state.seed[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        let pos: u128 = state.word_pos.parse().map_err(|_| bad())?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(state.stream);
        rng.set_word_pos(pos);
        self.with(|r| *r = rng);
        Ok(())
    }

    /// A fresh 64-bit seed drawn from this stream (for a sub-generator, e.g. a loader thread).
    pub fn next_seed(&self) -> u64 {
        self.with(|r| r.random())
    }

    /// `n` samples of N(mean, std²).
    pub fn normal(&self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        self.with(|r| {
            (0..n)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(r);
                    (mean + std * z) as f32
                })
                .collect()
        })
    }

    /// `n` samples of U[lo, hi).
    pub fn uniform(&self, n: usize, lo: f64, hi: f64) -> Vec<f32> {
        self.with(|r| (0..n).map(|_| (lo + (hi - lo) * r.random::<f64>()) as f32).collect())
    }

    /// `n` samples of a normal truncated to [-2 std, 2 std] around `mean` (ViT-style init).
    pub fn truncated_normal(&self, n: usize, mean: f64, std: f64) -> Vec<f32> {
        self.with(|r| {
            (0..n)
                .map(|_| loop {
                    let z: f64 = StandardNormal.sample(r);
                    if z.abs() <= 2.0 {
                        break (mean + std * z) as f32;
                    }
                })
                .collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_generator_draws_the_same_numbers() {
        let a = HostRng::new(5);
        a.normal(7, 0.0, 1.0);
        a.next_seed();
        let saved = a.state();
        let next = a.uniform(9, 0.0, 1.0);
        let b = HostRng::new(99);
        b.restore(&saved).unwrap();
        assert_eq!(b.uniform(9, 0.0, 1.0), next);
        assert!(b.restore(&RngState { seed: "zz".into(), stream: 0, word_pos: "0".into() }).is_err());
    }
}

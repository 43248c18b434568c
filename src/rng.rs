//! The host's seeded random source: every random number samhost draws comes from here, so the
//! same `--seed` gives the same numbers on every machine (ChaCha8 is portable).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::sync::{Arc, Mutex};

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

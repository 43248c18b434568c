//! A built-in dataset with real structure, so the quickstart and the tests need no files.
//!
//! Each class has a smooth prototype image: a pattern all classes share plus `separation` times
//! a pattern of its own (random low-resolution patterns, upsampled). An example is its class
//! prototype at a random contrast, shifted by a random offset, plus pixel noise. The defaults
//! make classes overlap: a model must learn, cannot reach 100% on held-out data, and visibly
//! memorises noisy labels when trained long enough.

use super::Dataset;
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::Deserialize;

/// Settings of the synthetic dataset.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SyntheticConfig {
    /// Number of examples.
    pub n: usize,
    /// Number of classes.
    pub classes: usize,
    /// Image shape `[C, H, W]`.
    pub shape: [usize; 3],
    /// Seed of the prototypes and of the examples. Two datasets with the same seed share
    /// prototypes; use `sample_seed` to draw a different sample (a test set).
    pub seed: u64,
    /// Seed of the examples (defaults to `seed`).
    pub sample_seed: Option<u64>,
    /// Standard deviation of the pixel noise.
    pub noise: f64,
    /// How far each class prototype stands from the pattern all classes share (the prototype
    /// is `common + separation·own`, both unit-variance patterns): lower is harder.
    pub separation: f64,
    /// Maximum shift of the prototype, in pixels.
    pub max_shift: usize,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            n: 1000,
            classes: 10,
            shape: [3, 16, 16],
            seed: 0,
            sample_seed: None,
            noise: 1.5,
            separation: 0.5,
            max_shift: 2,
        }
    }
}

fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let z: f64 = StandardNormal.sample(rng);
    z as f32
}

/// A smooth random pattern: 4x4 normal values per channel, bilinearly upsampled to `[C, H, W]`.
fn smooth_pattern(rng: &mut ChaCha8Rng, [c, h, w]: [usize; 3]) -> Vec<f32> {
    let low = 4usize;
    let coarse: Vec<f32> = (0..c * low * low).map(|_| normal(rng)).collect();
    let mut img = vec![0f32; c * h * w];
    for ch in 0..c {
        for y in 0..h {
            for x in 0..w {
                let fy = y as f32 * (low - 1) as f32 / (h.max(2) - 1) as f32;
                let fx = x as f32 * (low - 1) as f32 / (w.max(2) - 1) as f32;
                let (y0, x0) = (fy.floor() as usize, fx.floor() as usize);
                let (y1, x1) = ((y0 + 1).min(low - 1), (x0 + 1).min(low - 1));
                let (dy, dx) = (fy - y0 as f32, fx - x0 as f32);
                let at = |yy: usize, xx: usize| coarse[ch * low * low + yy * low + xx];
                img[ch * h * w + y * w + x] = at(y0, x0) * (1.0 - dy) * (1.0 - dx)
                    + at(y0, x1) * (1.0 - dy) * dx
                    + at(y1, x0) * dy * (1.0 - dx)
                    + at(y1, x1) * dy * dx;
            }
        }
    }
    img
}

/// Builds the synthetic dataset.
pub fn synthetic(cfg: &SyntheticConfig) -> Result<Dataset> {
    let [c, h, w] = cfg.shape;
    if cfg.classes < 2 || c == 0 || h == 0 || w == 0 {
        bail!(
            "synthetic: need at least 2 classes and a non-empty shape, got {} classes, shape {:?}",
            cfg.classes,
            cfg.shape
        );
    }
    if cfg.noise.is_nan() || cfg.noise < 0.0 || cfg.separation.is_nan() || cfg.separation < 0.0 {
        bail!("synthetic: noise and separation must be >= 0, got {} and {}", cfg.noise, cfg.separation);
    }
    let mut proto_rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    // A pattern every class shares, plus one of each class's own, scaled by `separation`.
    let common = smooth_pattern(&mut proto_rng, cfg.shape);
    let prototypes: Vec<Vec<f32>> = (0..cfg.classes)
        .map(|_| {
            let own = smooth_pattern(&mut proto_rng, cfg.shape);
            common.iter().zip(&own).map(|(a, b)| a + cfg.separation as f32 * b).collect()
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.sample_seed.unwrap_or(cfg.seed).wrapping_add(0x5EED));
    let per = c * h * w;
    let mut images = Vec::with_capacity(cfg.n * per);
    let mut labels = Vec::with_capacity(cfg.n);
    let s = cfg.max_shift as i64;
    for _ in 0..cfg.n {
        let label = rng.random_range(0..cfg.classes);
        let contrast = 0.5 + rng.random::<f32>();
        let (sy, sx) = (rng.random_range(-s..=s), rng.random_range(-s..=s));
        let p = &prototypes[label];
        for ch in 0..c {
            for y in 0..h as i64 {
                for x in 0..w as i64 {
                    let yy = (y + sy).clamp(0, h as i64 - 1) as usize;
                    let xx = (x + sx).clamp(0, w as i64 - 1) as usize;
                    let v = contrast * p[ch * h * w + yy * w + xx] + cfg.noise as f32 * normal(&mut rng);
                    images.push(v);
                }
            }
        }
        labels.push(label as u32);
    }
    let classes = (0..cfg.classes).map(|i| format!("class{i}")).collect();
    Dataset::new(images, labels, cfg.shape, classes)
}

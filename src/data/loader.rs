//! Batching: shuffled (seeded, a different order every epoch) or in order, batches assembled
//! from a dataset view.

use super::{Batch, Dataset};
use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;

/// How to cut a dataset into batches.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchOptions {
    /// Shuffle the order each epoch.
    pub shuffle: bool,
    /// Seed of the shuffle (drawn from the host generator when absent).
    pub seed: Option<u64>,
    /// Drop the last batch when it is smaller than the batch size.
    pub drop_last: bool,
    /// Epoch number: the shuffle of epoch `e` is seeded by `(seed, e)`.
    pub epoch: u64,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self { shuffle: true, seed: None, drop_last: false, epoch: 0 }
    }
}

/// The order in which an epoch visits the examples.
pub fn epoch_order(n: usize, shuffle: bool, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        order.shuffle(&mut rng);
    }
    order
}

/// An iterator over the batches of one epoch.
#[derive(Clone)]
pub struct Batches {
    ds: Dataset,
    order: Vec<usize>,
    size: usize,
    pos: usize,
    drop_last: bool,
    device: Device,
}

impl Batches {
    /// Batches of `size` examples of `ds` in `order`.
    pub fn new(ds: Dataset, order: Vec<usize>, size: usize, drop_last: bool, device: Device) -> Result<Self> {
        if size == 0 {
            anyhow::bail!("batch size must be > 0");
        }
        Ok(Self { ds, order, size, pos: 0, drop_last, device })
    }

    /// Number of batches this epoch yields in total.
    pub fn num_batches(&self) -> usize {
        let n = self.order.len();
        if self.drop_last {
            n / self.size
        } else {
            n.div_ceil(self.size)
        }
    }

    fn make(&self, positions: &[usize]) -> Result<Batch> {
        let [c, h, w] = self.ds.shape();
        let per = c * h * w;
        let mut pixels = Vec::with_capacity(positions.len() * per);
        let mut labels = Vec::with_capacity(positions.len());
        for &i in positions {
            pixels.extend_from_slice(self.ds.image(i));
            labels.push(self.ds.label(i));
        }
        let n = positions.len();
        let images = Tensor::from_vec(pixels, (n, c, h, w), &self.device)?;
        let labels = Tensor::from_vec(labels, n, &self.device)?;
        Batch::new(images, labels)
    }
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        let n = self.order.len();
        if self.pos >= n {
            return None;
        }
        let end = (self.pos + self.size).min(n);
        if self.drop_last && end - self.pos < self.size {
            return None;
        }
        let positions = self.order[self.pos..end].to_vec();
        self.pos = end;
        Some(self.make(&positions))
    }
}

//! The loader: the batches of one epoch, assembled (transforms applied) on a worker thread that
//! stays up to two batches ahead of training. Every random choice is seeded by `(seed, epoch)`
//! or `(seed, epoch, example)`, so the prefetched batches are exactly the single-threaded ones.

use super::seed::{below, derived_rng, Purpose};
use super::transforms::Scratch;
use super::{Batch, Dataset};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use serde::Deserialize;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// How many assembled batches may wait for training.
pub const PREFETCH: usize = 2;

/// How to cut a dataset into batches.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchOptions {
    /// Shuffle the order each epoch.
    pub shuffle: bool,
    /// Seed of the shuffle and of the random transforms (drawn from the host generator when
    /// absent).
    pub seed: Option<u64>,
    /// Drop the last batch when it is smaller than the batch size.
    pub drop_last: bool,
    /// Epoch number: the order and augmentations of epoch `e` are seeded by `(seed, e)`. When
    /// absent, the dataset counts: 0 for its first `batches` call, 1 for the next, ...
    pub epoch: Option<u64>,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self { shuffle: true, seed: None, drop_last: false, epoch: None }
    }
}

/// The order in which an epoch visits the examples: each index once, shuffled by
/// `(seed, epoch)` when `shuffle`.
pub fn epoch_order(n: usize, shuffle: bool, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = derived_rng(seed, Purpose::Shuffle, epoch, 0);
        for i in (1..n).rev() {
            order.swap(i, below(&mut rng, i + 1));
        }
    }
    order
}

/// One batch assembled in host memory, before it becomes tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct HostBatch {
    /// Pixels `[N, C, H, W]`.
    pub pixels: Vec<f32>,
    /// Labels `[N]`.
    pub labels: Vec<u32>,
    /// `[N, C, H, W]`.
    pub shape: [usize; 4],
}

impl HostBatch {
    /// The batch as tensors on `device`.
    pub fn into_batch(self, device: &Device) -> Result<Batch> {
        let images = Tensor::from_vec(self.pixels, self.shape.to_vec(), device)?;
        let labels = Tensor::from_vec(self.labels, self.shape[0], device)?;
        Ok(Batch { images, labels })
    }
}

/// The plan of one epoch: which examples go in which batch, and the seed of the transforms.
/// Iterating it (`for b in batches`) starts the worker thread.
#[derive(Clone, Debug)]
pub struct Batches {
    ds: Dataset,
    order: Arc<Vec<usize>>,
    size: usize,
    drop_last: bool,
    seed: u64,
    epoch: u64,
    device: Device,
    /// This rank's share of each batch: (rank, ranks).
    shard: (usize, usize),
}

impl Batches {
    /// Batches of `size` examples of `ds` in `order`, random transforms seeded by (0, epoch 0).
    pub fn new(ds: Dataset, order: Vec<usize>, size: usize, drop_last: bool, device: Device) -> Result<Self> {
        if size == 0 {
            bail!("batch size must be > 0");
        }
        if let Some(&i) = order.iter().find(|&&i| i >= ds.len()) {
            bail!("batches: index {i} out of range for {} examples", ds.len());
        }
        Ok(Self { ds, order: Arc::new(order), size, drop_last, seed: 0, epoch: 0, device, shard: (0, 1) })
    }

    /// Epoch `epoch` of `ds`: the order (shuffled or not) and the transforms seeded by
    /// `(seed, epoch)`.
    pub fn epoch(
        ds: &Dataset,
        size: usize,
        opts: &BatchOptions,
        seed: u64,
        epoch: u64,
        device: &Device,
    ) -> Result<Self> {
        let order = epoch_order(ds.len(), opts.shuffle, seed, epoch);
        let b = Self::new(ds.clone(), order, size, opts.drop_last, device.clone())?;
        Ok(Self { seed, epoch, ..b })
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

    /// Rank `rank` of `ranks`'s share of every batch: of a batch of `n` examples (in the order of
    /// one process), the rows `rank·n/ranks .. (rank+1)·n/ranks`. Fails when a batch (the last,
    /// with `drop_last: false`) has fewer examples than there are ranks.
    pub fn sharded(self, rank: usize, ranks: usize) -> Result<Self> {
        if let Some(k) = (0..self.num_batches()).find(|&k| ranks > 1 && self.global_positions(k).len() < ranks) {
            bail!(
                "batches: batch {k} has {} examples for {ranks} ranks: every rank needs at least one (use drop_last: true, or a batch size that divides the {} examples)",
                self.global_positions(k).len(),
                self.order.len()
            );
        }
        self.shares(rank, ranks)
    }

    /// [`Batches::sharded`] where a rank's share of a small batch may be empty (evaluation).
    pub fn shares(self, rank: usize, ranks: usize) -> Result<Self> {
        if rank >= ranks.max(1) {
            bail!("batches: rank {rank} of {ranks}");
        }
        Ok(Self { shard: (rank, ranks.max(1)), ..self })
    }

    /// The dataset positions of batch `k` over all ranks, in order.
    fn global_positions(&self, k: usize) -> &[usize] {
        let start = (k * self.size).min(self.order.len());
        &self.order[start..(start + self.size).min(self.order.len())]
    }

    /// The dataset positions of batch `k` (this rank's share of it, with several ranks), in order.
    pub fn positions(&self, k: usize) -> &[usize] {
        let all = self.global_positions(k);
        let (r, ranks) = self.shard;
        let n = all.len();
        &all[r * n / ranks..(r + 1) * n / ranks]
    }

    /// Assembles batch `k` (`k < num_batches()`) in host memory.
    pub fn host_batch(&self, k: usize, scratch: &mut Scratch) -> HostBatch {
        let positions = self.positions(k);
        let [c, h, w] = self.ds.shape();
        let per = c * h * w;
        let mut pixels = vec![0f32; positions.len() * per];
        for (slot, &i) in pixels.chunks_mut(per).zip(positions) {
            self.ds.example_into(i, self.seed, self.epoch, slot, scratch);
        }
        let labels = positions.iter().map(|&i| self.ds.label(i)).collect();
        HostBatch { pixels, labels, shape: [positions.len(), c, h, w] }
    }

    /// The same batches assembled on the calling thread (no worker): the reference the loader
    /// is tested against.
    pub fn iter_sync(&self) -> impl Iterator<Item = Result<Batch>> + '_ {
        let mut scratch = Scratch::default();
        (0..self.num_batches()).map(move |k| self.host_batch(k, &mut scratch).into_batch(&self.device))
    }
}

/// A running epoch: batches arrive from the worker thread through a channel of capacity
/// [`PREFETCH`]. Dropping it early (a `break`) stops the worker after at most one batch.
pub struct Loader {
    rx: Option<Receiver<HostBatch>>,
    worker: Option<JoinHandle<()>>,
    device: Device,
    failed: bool,
    spawn_error: Option<String>,
}

impl Iterator for Loader {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if let Some(e) = self.spawn_error.take() {
            self.failed = true;
            return Some(Err(anyhow::anyhow!("cannot start the loader thread: {e}")));
        }
        match self.rx.as_ref().map(|rx| rx.recv()) {
            Some(Ok(hb)) => Some(hb.into_batch(&self.device)),
            _ => {
                // The worker is done: finished, or panicked (an error, never a short epoch).
                self.rx = None;
                match self.worker.take().map(|w| w.join()) {
                    Some(Err(_)) => {
                        self.failed = true;
                        Some(Err(anyhow::anyhow!("the loader thread failed while assembling a batch")))
                    }
                    _ => None,
                }
            }
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.rx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl IntoIterator for Batches {
    type Item = Result<Batch>;
    type IntoIter = Loader;

    fn into_iter(self) -> Loader {
        let device = self.device.clone();
        let (tx, rx) = sync_channel::<HostBatch>(PREFETCH);
        let spawned = std::thread::Builder::new().name("samhost-loader".into()).spawn(move || {
            let mut scratch = Scratch::default();
            for k in 0..self.num_batches() {
                if tx.send(self.host_batch(k, &mut scratch)).is_err() {
                    break;
                }
            }
        });
        match spawned {
            Ok(worker) => Loader { rx: Some(rx), worker: Some(worker), device, failed: false, spawn_error: None },
            Err(e) => Loader { rx: None, worker: None, device, failed: false, spawn_error: Some(e.to_string()) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_share_each_batch_in_order() {
        let cfg = crate::data::synthetic::SyntheticConfig { n: 10, shape: [1, 2, 2], ..Default::default() };
        let ds = crate::data::synthetic::synthetic(&cfg).unwrap();
        let all = Batches::new(ds.clone(), (0..10).collect(), 4, false, Device::Cpu).unwrap();
        let shards: Vec<Batches> = (0..2).map(|r| all.clone().sharded(r, 2).unwrap()).collect();
        for k in 0..all.num_batches() {
            let joined: Vec<usize> = shards.iter().flat_map(|s| s.positions(k).to_vec()).collect();
            assert_eq!(joined, all.positions(k), "batch {k}");
        }
        assert_eq!(shards[1].positions(2), &[9]);
        let e = all.clone().sharded(0, 3).err().unwrap().to_string();
        assert!(e.contains("batch 2 has 2 examples for 3 ranks"), "{e}");
    }

    #[test]
    fn order_is_a_permutation_that_changes_by_epoch() {
        let a = epoch_order(100, true, 7, 0);
        let b = epoch_order(100, true, 7, 1);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_ne!(a, b);
        assert_eq!(a, epoch_order(100, true, 7, 0));
        assert_eq!(epoch_order(5, false, 7, 3), vec![0, 1, 2, 3, 4]);
    }
}

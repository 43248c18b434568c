//! Loader throughput against training speed: images per second through the prefetching loader
//! for CIFAR-sized u8 images (32x32x3) with random crop (padding 4) + horizontal flip +
//! normalisation, next to the step rate of a small network at batch 128.
//!
//! There is no `cnn` model on this branch: the network timed is `mlp([3072, 512, 512, 10])`
//! (`train_step`, SGD with momentum). Real data is used when available (a CIFAR-format file
//! given as the first argument, or the workplace's `mnist/cifar/train.bin`), otherwise random
//! bytes of the same size.
//!
//! Run: `cargo bench --bench data` (a few seconds).

use anyhow::Result;
use candle_core::Device;
use samhost::data::loader::{BatchOptions, Batches};
use samhost::data::transforms::{parse_transforms, Scratch};
use samhost::data::{load_dataset, Dataset, LoadOptions};
use samhost::models::mlp::mlp;
use samhost::rng::HostRng;
use samhost::train::{train_step, LossFn, Sgd, SgdConfig};
use std::path::PathBuf;
use std::time::Instant;

const BATCH: usize = 128;

fn dataset() -> Result<(Dataset, String)> {
    let candidates: Vec<PathBuf> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .map(PathBuf::from)
        .chain([PathBuf::from("/work/shared/data/mnist/cifar/train.bin")])
        .collect();
    for p in candidates {
        if p.is_file() {
            let ds = load_dataset(&p, &LoadOptions { format: Some("cifar10".into()), ..Default::default() })?;
            return Ok((ds, p.display().to_string()));
        }
    }
    let n = 10_000;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    use rand::{Rng, SeedableRng};
    let px: Vec<u8> = (0..n * 3072).map(|_| rng.random()).collect();
    let labels = (0..n).map(|i| (i % 10) as u32).collect();
    let classes = (0..10).map(|i| i.to_string()).collect();
    Ok((Dataset::from_u8(px, labels, [3, 32, 32], classes)?, "random u8 bytes".into()))
}

fn main() -> Result<()> {
    let (raw, source) = dataset()?;
    let steps =
        parse_transforms(&serde_json::json!([{"random_crop": 32, "padding": 4}, "hflip", {"normalize": "cifar10"}]))?;
    let ds = raw.with_transforms(steps)?;
    let dev = Device::Cpu;
    println!(
        "data: {} images 3x32x32 u8 from {source}; transforms: random_crop(32, padding 4), hflip, normalize",
        ds.len()
    );

    // 1. The loader alone: every batch of three epochs through the worker thread.
    let epochs = 3;
    let t = Instant::now();
    let mut images = 0usize;
    for e in 0..epochs {
        for b in Batches::epoch(&ds, BATCH, &BatchOptions::default(), 1, e, &dev)? {
            images += b?.len();
        }
    }
    let loader_rate = images as f64 / t.elapsed().as_secs_f64();

    // 2. Batch assembly on the calling thread (one core's work).
    let plan = Batches::epoch(&ds, BATCH, &BatchOptions::default(), 1, 0, &dev)?;
    let mut scratch = Scratch::default();
    let t = Instant::now();
    let mut n = 0usize;
    for k in 0..plan.num_batches() {
        n += plan.host_batch(k, &mut scratch).shape[0];
    }
    let assemble_rate = n as f64 / t.elapsed().as_secs_f64();

    // 3. Training steps of the MLP at batch 128 on a fixed batch (no loader).
    let model = mlp(&[3072, 512, 512, 10], &HostRng::new(0), &dev)?;
    let mut opt = Sgd::new(SgdConfig { lr: 0.01, momentum: 0.9, ..Default::default() })?;
    let fixed = plan.host_batch(0, &mut scratch).into_batch(&dev)?;
    let loss = LossFn::default();
    for _ in 0..3 {
        train_step(&model, &mut opt, &fixed.images, &fixed.labels, &loss, None)?;
    }
    let n_steps = 30;
    let t = Instant::now();
    for _ in 0..n_steps {
        train_step(&model, &mut opt, &fixed.images, &fixed.labels, &loss, None)?;
    }
    let step_s = t.elapsed().as_secs_f64() / n_steps as f64;

    // 4. The same steps fed by the loader (the worker assembles the next batch meanwhile).
    let t = Instant::now();
    let mut fed = 0usize;
    for b in Batches::epoch(&ds, BATCH, &BatchOptions::default(), 1, 7, &dev)?.into_iter().take(n_steps) {
        let b = b?;
        train_step(&model, &mut opt, &b.images, &b.labels, &loss, None)?;
        fed += 1;
    }
    let fed_s = t.elapsed().as_secs_f64() / fed as f64;

    let train_rate = BATCH as f64 / step_s;
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| loader, prefetching thread (crop+flip+normalize) | {loader_rate:>10.0} images/s |");
    println!("| batch assembly on one thread | {assemble_rate:>10.0} images/s |");
    println!("| mlp 3072-512-512-10 train_step, batch {BATCH}, fixed batch | {:>7.2} ms/step = {:>4.1} steps/s = {train_rate:>7.0} images/s |", step_s * 1e3, 1.0 / step_s);
    println!("| the same steps fed by the loader | {:>7.2} ms/step |", fed_s * 1e3);
    println!("| loader / training speed | {:>10.1}x (needs >= 10x) |", loader_rate / train_rate);
    Ok(())
}

//! Model benchmark: forward + backward time per image, in training mode, for ResNet-32 and
//! WRN-16-8 on 32x32 images and ViT-S/16 on 224x224 images, on the CPU. Prints a table; run
//! with `cargo bench --bench models`. `SAMHOST_BENCH_STEPS` sets the timed steps per model
//! (default 3, median reported; one untimed warm-up step first) and `SAMHOST_BENCH_BATCH` the
//! batch size (default 16 for the CNNs, a quarter of it for the ViT); `SAMHOST_BENCH_MODELS`
//! (comma-separated: resnet32, wrn-16-8, vit-s16) picks the models.

use candle_core::{Device, Tensor};
use samhost::models::registry::{build_model, count_parameters, resolve_config, ArchConfig};
use samhost::rng::HostRng;
use samhost::train::grads::gradients;
use samhost::train::loss::cross_entropy;
use std::time::Instant;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).filter(|&v| v > 0).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median milliseconds per image of one forward + backward pass over a batch of `n`.
fn time(cfg: &ArchConfig, image: usize, n: usize, steps: usize) -> f64 {
    let rng = HostRng::new(1);
    let m = build_model(cfg, &rng, &Device::Cpu).expect("model");
    let classes = cfg.num_classes().expect("a head");
    let x = Tensor::from_vec(rng.normal(n * 3 * image * image, 0.0, 1.0), (n, 3, image, image), &Device::Cpu)
        .expect("input");
    let y =
        Tensor::from_vec((0..n).map(|i| (i % classes) as u32).collect::<Vec<_>>(), n, &Device::Cpu).expect("labels");
    let params = m.params().trainable();
    let step = || {
        let t = Instant::now();
        let logits = m.forward_t(&x, true).expect("forward");
        let loss = cross_entropy(&logits, &y, 0.0).expect("loss");
        gradients(&loss, &params).expect("backward");
        t.elapsed().as_secs_f64() * 1e3 / n as f64
    };
    step();
    median((0..steps).map(|_| step()).collect())
}

fn main() {
    samhost::runtime::tune();
    let steps = env("SAMHOST_BENCH_STEPS", 3);
    let batch = env("SAMHOST_BENCH_BATCH", 16);
    println!(
        "forward + backward on the CPU ({} threads available), training mode, median of {steps} steps",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    );
    println!("{:<10} {:>7} {:>11} {:>6} {:>11}", "model", "image", "parameters", "batch", "ms/image");
    let only = std::env::var("SAMHOST_BENCH_MODELS").unwrap_or_default();
    for (name, image, n) in [("resnet32", 32, batch), ("wrn-16-8", 32, batch), ("vit-s16", 224, (batch / 4).max(1))] {
        if !only.is_empty() && !only.split(',').any(|m| m.trim() == name) {
            continue;
        }
        let cfg = ArchConfig::from_json(&resolve_config(name).expect("config"), true).expect("valid config");
        let params = count_parameters(&cfg).expect("count");
        let ms = time(&cfg, image, n, steps);
        println!("{name:<10} {:>7} {:>10.2}M {n:>6} {ms:>11.1}", format!("{image}x{image}"), params as f64 / 1e6);
    }
}

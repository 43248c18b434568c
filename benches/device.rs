//! Training speed on a device (a GPU when built with `--features cuda`): ms per step of
//! `train_step` and `sam_step` (SGD momentum 0.9, rho 0.05, cross-entropy) in f32 and in bf16
//! mixed precision, for the cnn, ResNet-32, WRN-16-8 and ViT-B/16 at 224. The median of the timed
//! steps after warm-up, each step ending with a device synchronisation.
//!
//! `cargo bench --features cuda --bench device` (scripts/device_check.sh runs the prebuilt binary).
//! Environment: `SAMHOST_BENCH_DEVICE` (default `auto`: GPU 0 if there is one, else the CPU),
//! `SAMHOST_BENCH_MODELS=cnn,vit-b16` picks models, `SAMHOST_BENCH_STEPS` timed steps (default 10,
//! after 3 warm-up steps), `SAMHOST_BENCH_DTYPES=f32,bf16`.

use candle_core::{Device, Tensor};
use samhost::device::parse_device;
use samhost::models::{Model, Precision};
use samhost::rng::HostRng;
use samhost::train::{sam_step, train_step, LossFn, SamConfig, Sgd, SgdConfig};
use std::time::Instant;

#[path = "support/bench_models.rs"]
mod bench_models;
use bench_models::{build_on, env_list, median};

/// (name, named configuration, image side, batch)
const MODELS: [(&str, &str, usize, usize); 4] = [
    ("cnn", "cnn", 32, 128),
    ("resnet32", "resnet32", 32, 128),
    ("wrn-16-8", "wrn-16-8", 32, 128),
    ("vit-b16", "vit-b16", 224, 32),
];

/// Median ms of `steps` timed steps after 3 warm-up steps.
fn time_step(model: &Model, x: &Tensor, y: &Tensor, sam: bool, steps: usize, device: &Device) -> f64 {
    let mut opt = Sgd::new(SgdConfig { lr: 0.01, momentum: 0.9, ..SgdConfig::default() }).expect("sgd");
    let cfg = SamConfig::default();
    let mut run = || {
        if sam {
            sam_step(model, &mut opt, x, y, &LossFn::default(), &cfg).expect("sam_step");
        } else {
            train_step(model, &mut opt, x, y, &LossFn::default(), None).expect("train_step");
        }
        device.synchronize().expect("synchronize");
    };
    for _ in 0..3 {
        run();
    }
    let times = (0..steps)
        .map(|_| {
            let t = Instant::now();
            run();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    median(times)
}

fn main() {
    samhost::runtime::tune();
    let device = parse_device(&std::env::var("SAMHOST_BENCH_DEVICE").unwrap_or_else(|_| "auto".into()))
        .expect("SAMHOST_BENCH_DEVICE");
    let steps: usize = std::env::var("SAMHOST_BENCH_STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let models = env_list("SAMHOST_BENCH_MODELS", "cnn,resnet32,wrn-16-8,vit-b16");
    let dtypes: Vec<Precision> =
        env_list("SAMHOST_BENCH_DTYPES", "f32,bf16").iter().map(|d| d.parse().expect("SAMHOST_BENCH_DTYPES")).collect();
    println!("device {} ({} timed steps, median)", device.describe(), steps);
    println!(
        "{:<9} {:>5} {:>5} {:>10} {:>10} {:>7} {:>9} {:>9}",
        "model", "dtype", "batch", "sgd ms", "sam ms", "sam/sgd", "sgd im/s", "sam im/s"
    );
    let dev = &device.device;
    for (name, spec, side, batch) in MODELS {
        if !models.iter().any(|m| m == name) {
            continue;
        }
        let rng = HostRng::new(1);
        let x = Tensor::from_vec(rng.normal(batch * 3 * side * side, 0.0, 1.0), (batch, 3, side, side), dev)
            .expect("input");
        let y = Tensor::from_vec((0..batch as u32).map(|i| i % 10).collect::<Vec<_>>(), batch, dev).expect("labels");
        for &precision in &dtypes {
            let model = build_on(spec, dev);
            model.set_precision(precision);
            let sgd = time_step(&model, &x, &y, false, steps, dev);
            let sam = time_step(&model, &x, &y, true, steps, dev);
            println!(
                "{:<9} {:>5} {:>5} {:>10.2} {:>10.2} {:>7.2} {:>9.0} {:>9.0}",
                name,
                precision.name(),
                batch,
                sgd,
                sam,
                sam / sgd,
                batch as f64 / sgd * 1e3,
                batch as f64 / sam * 1e3
            );
        }
    }
}

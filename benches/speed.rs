//! Training speed: ms per step of `train_step` and `sam_step` (SGD with momentum 0.9, lr 0.01,
//! rho 0.05, cross-entropy) per model and thread count, the SAM/SGD ratio, images per second and
//! the peak heap memory of a step. The same settings as `benches/peer/torch_peer.py`, which reads
//! the `target/speed.json` this writes and prints samhost/PyTorch ratios.
//!
//! `cargo bench --bench speed` runs every model with 1 and 2 threads (each thread count in a child
//! process with `RAYON_NUM_THREADS` set, since the thread pools are sized once per process).
//! `SAMHOST_BENCH_MODELS=mlp,cnn` picks models; `SAMHOST_BENCH_STEPS` sets the timed steps
//! (default 10; the ViT and ResNet-32 use half, WRN-16-8 at batch 128 (`wrn-b128`) a fifth, at
//! least 3); train and SAM steps alternate, and the medians are reported after a warm-up step of
//! each, with SAM/SGD both as the ratio of the medians and as the median of each SAM step over the
//! train step timed just before it ("paired"); likewise "x floor" also as the median of each train
//! step over one pass of the floor's products timed right after it.
//!
//! The floor: the matrix products one SGD step makes (every gemm call through `ops::gemm`,
//! recorded during a step) timed alone on this machine at their shapes, so "x floor" says how far
//! the step is from what the gemm allows; with the step's GFLOP (2·m·n·k summed) and the gemm's
//! rate over them (each shape the fastest of 5 rounds over all shapes). The direct convolution makes no gemm calls
//! (and Winograd's makes fewer, uncounted);
//! it records the products im2col + gemm would make for the same work, so its layers count at
//! the gemm's rate on those shapes (and "x floor" can fall below 1 where it beats them). Products
//! candle makes itself (outside samhost's ops) are not counted.

use candle_core::{Device, Tensor};
use samhost::data::Batch;
use samhost::models::Model;
use samhost::rng::HostRng;
use samhost::train::{sam_step, train_step, LossFn, SamConfig, Sgd, SgdConfig};
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::time::Instant;

#[path = "support/bench_models.rs"]
mod bench_models;
#[path = "support/counting_alloc.rs"]
mod counting_alloc;
use bench_models::{build_on, env_list, median};
use counting_alloc::{LIVE, PEAK};

/// (name, config name or JSON, image side, batch, steps divisor)
const MODELS: [(&str, &str, usize, usize, usize); 7] = [
    ("mlp", r#"{"model_type": "mlp", "sizes": [3072, 512, 512, 10]}"#, 32, 128, 1),
    ("cnn", "cnn", 32, 128, 1),
    ("resnet20", "resnet20", 32, 128, 1),
    ("resnet32", "resnet32", 32, 128, 2),
    ("wrn-16-8", "wrn-16-8", 32, 16, 1),
    ("wrn-b128", "wrn-16-8", 32, 128, 5),
    ("vit-s16", "vit-s16", 224, 8, 2),
];

fn build(spec: &str) -> Model {
    build_on(spec, &Device::Cpu)
}

/// One step of `train_step` (`sam` false) or `sam_step` with its own optimizer.
struct Stepper<'a> {
    model: &'a Model,
    batch: &'a Batch,
    sam: bool,
    opt: Sgd,
}

impl Stepper<'_> {
    fn run(&mut self) {
        let (x, y, loss) = (&self.batch.images, &self.batch.labels, LossFn::default());
        if self.sam {
            sam_step(self.model, &mut self.opt, x, y, &loss, &SamConfig::default()).expect("sam_step");
        } else {
            train_step(self.model, &mut self.opt, x, y, &loss, None).expect("train_step");
        }
    }

    /// Peak heap bytes above the resting level during one step.
    fn peak(&mut self) -> usize {
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        self.run();
        PEAK.load(Ordering::Relaxed).saturating_sub(base)
    }

    fn timed(&mut self) -> f64 {
        let t = Instant::now();
        self.run();
        t.elapsed().as_secs_f64() * 1e3
    }
}

/// What [`time_steps`] measured.
struct Timings {
    /// Median ms per train step.
    sgd_ms: f64,
    /// Median ms per SAM step.
    sam_ms: f64,
    /// Peak heap bytes of a train step.
    sgd_peak: usize,
    /// Peak heap bytes of a SAM step.
    sam_peak: usize,
    /// Median over the pairs of SAM step / the train step timed just before it.
    sam_over_sgd: f64,
    /// Median over the steps of train step / one pass of the floor's products timed just after it.
    x_floor_paired: f64,
}

/// Train steps and SAM steps timed alternately (a train step, a SAM step, then one pass of the
/// floor's products `calls`, `steps` times) so that a slow spell of the machine hits all three,
/// and their peak heap. Besides the medians, SAM/SGD and "x floor" as medians of ratios of
/// neighbouring timings, which a slow spell moves less than ratios of medians.
fn time_steps(model: &Model, b: &Batch, steps: usize, calls: &[samhost::ops::gemm::GemmCall]) -> Timings {
    let sgd = || Sgd::new(SgdConfig { lr: 0.01, momentum: 0.9, ..SgdConfig::default() }).expect("sgd");
    let mut plain = Stepper { model, batch: b, sam: false, opt: sgd() };
    let mut sam = Stepper { model, batch: b, sam: true, opt: sgd() };
    plain.run();
    sam.run();
    let (sgd_peak, sam_peak) = (plain.peak(), sam.peak());
    let (mut tp, mut ts, mut tf) = (Vec::with_capacity(steps), Vec::with_capacity(steps), Vec::with_capacity(steps));
    for _ in 0..steps {
        tp.push(plain.timed());
        ts.push(sam.timed());
        tf.push(samhost::ops::gemm::floor_seconds(calls, 1) * 1e3);
    }
    let ratios = |a: &[f64], b: &[f64]| median(a.iter().zip(b).map(|(a, b)| a / b).collect());
    Timings {
        sam_over_sgd: ratios(&ts, &tp),
        x_floor_paired: ratios(&tp, &tf),
        sgd_ms: median(tp),
        sam_ms: median(ts),
        sgd_peak,
        sam_peak,
    }
}

fn child(selected: &[String], steps: usize) {
    let threads: usize = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    for (name, spec, side, batch, div) in MODELS {
        if !selected.is_empty() && !selected.iter().any(|s| s == name) {
            continue;
        }
        let model = build(spec);
        let rng = HostRng::new(1);
        let x = Tensor::from_vec(rng.normal(batch * 3 * side * side, 0.0, 1.0), (batch, 3, side, side), &Device::Cpu)
            .expect("input");
        let y = Tensor::from_vec((0..batch as u32).map(|i| i % 10).collect::<Vec<_>>(), batch, &Device::Cpu)
            .expect("labels");
        let b = Batch::new(x, y).expect("batch");
        let n = (steps / div).max(3);
        let mut census =
            Stepper { model: &model, batch: &b, sam: false, opt: Sgd::new(SgdConfig::default()).expect("sgd") };
        let ((), calls) = samhost::ops::gemm::record_calls(|| census.run());
        let t = time_steps(&model, &b, n, &calls);
        let floor_ms = samhost::ops::gemm::floor_seconds(&calls, 5) * 1e3;
        let gflop: f64 = calls.iter().map(|c| c.flops()).sum::<f64>() / 1e9;
        let row = json!({
            "model": name, "threads": threads, "batch": batch, "steps": n,
            "train_step": t.sgd_ms, "sam_step": t.sam_ms, "sam_over_sgd": t.sam_over_sgd,
            "x_floor_paired": t.x_floor_paired,
            "train_peak_mb": t.sgd_peak as f64 / 1e6, "sam_peak_mb": t.sam_peak as f64 / 1e6,
            "params_mb": model.params().num_trainable() as f64 * 4.0 / 1e6,
            "floor_ms": floor_ms, "gflop": gflop,
        });
        println!("ROW {row}");
    }
}

fn main() {
    samhost::runtime::tune();
    let steps: usize = std::env::var("SAMHOST_BENCH_STEPS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let selected = env_list("SAMHOST_BENCH_MODELS", "");
    if std::env::args().any(|a| a == "--child") {
        child(&selected, steps);
        return;
    }
    let exe = std::env::current_exe().expect("bench executable");
    println!(
        "{:<9} {:>3} {:>5} {:>10} {:>10} {:>7} {:>7} {:>8} {:>8} {:>11} {:>11} {:>9} {:>9} {:>8} {:>7} {:>7} {:>8}",
        "model",
        "thr",
        "batch",
        "sgd ms",
        "sam ms",
        "sam/sgd",
        "pair",
        "sgd im/s",
        "sam im/s",
        "sgd peakMB",
        "sam peakMB",
        "paramsMB",
        "floor ms",
        "x floor",
        "pair",
        "GFLOP",
        "GFLOP/s"
    );
    let mut rows = Vec::new();
    for threads in [1, 2] {
        let out = std::process::Command::new(&exe)
            .arg("--child")
            .env("RAYON_NUM_THREADS", threads.to_string())
            .output()
            .expect("child benchmark");
        if !out.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            std::process::exit(1);
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(j) = line.strip_prefix("ROW ") else { continue };
            let r: Value = serde_json::from_str(j).expect("row");
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            let batch = f("batch");
            println!(
                "{:<9} {:>3} {:>5} {:>10.2} {:>10.2} {:>7.2} {:>7.2} {:>8.0} {:>8.0} {:>11.1} {:>11.1} {:>9.1} {:>9.2} {:>8.2} {:>7.2} {:>7.2} {:>8.1}",
                r["model"].as_str().unwrap_or("?"),
                threads,
                batch,
                f("train_step"),
                f("sam_step"),
                f("sam_step") / f("train_step"),
                f("sam_over_sgd"),
                batch / f("train_step") * 1e3,
                batch / f("sam_step") * 1e3,
                f("train_peak_mb"),
                f("sam_peak_mb"),
                f("params_mb"),
                f("floor_ms"),
                f("train_step") / f("floor_ms"),
                f("x_floor_paired"),
                f("gflop"),
                f("gflop") / f("floor_ms") * 1e3
            );
            rows.push(r);
        }
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("speed.json");
    match std::fs::write(&path, serde_json::to_string_pretty(&rows).unwrap_or_default()) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("cannot write {}: {e}", path.display()),
    }
}

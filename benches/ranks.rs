//! Data-parallel step time: one process against `mpirun -np 2` on the same global batch, and
//! the collectives' share of the step (`cargo bench --features mpi --bench ranks`).
//!
//! Each round runs this binary alone (all the machine's cores, `RAYON_NUM_THREADS` unset) and
//! then under `mpirun -np 2` (each rank takes half the cores), one after the other, so a slow
//! spell of the machine hits both; the table gives the range over the rounds (min-max). Every
//! process builds the same model from the same seed and the same global batch; a rank takes its
//! rows of it as `batches` does. Timed: whole `train_step` (SGD) and `sam_step` (SAM, rho 0.05)
//! calls, alternating, medians after a warm-up step of each; "collectives" is the time inside
//! `dist::sum_tensors` and the other collectives per step, as rank 0 sees it (waiting for the
//! slower rank included), packing and unpacking of the gradient included.
//!
//! `SAMHOST_BENCH_MODELS` (default `cnn,resnet20`), `SAMHOST_BENCH_STEPS` (10),
//! `SAMHOST_BENCH_ROUNDS` (3), `SAMHOST_BENCH_BATCH` (128).

use candle_core::{Device, Tensor};
use samhost::train::{sam_step, train_step, LossFn, SamConfig, Sgd, SgdConfig};
use serde_json::{json, Value};
use std::process::Command;
use std::time::Instant;

#[path = "support/bench_models.rs"]
mod bench_models;
use bench_models::{build_on, env_list, median};

/// Set in the children this benchmark starts.
const CHILD: &str = "SAMHOST_BENCH_RANKS_CHILD";

fn env_usize(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One process's measurement of `model`: median ms of the SGD and SAM steps and of the
/// collectives within each.
fn measure(model_name: &str, batch: usize, steps: usize) -> Value {
    let w = samhost::dist::world();
    let (rank, ranks) = (w.rank(), w.size());
    let model = build_on(model_name, &Device::Cpu);
    // The global batch, the same in every process; this rank's rows of it.
    let pixels: Vec<f32> = (0..batch * 3 * 32 * 32).map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 2.0).collect();
    let x = Tensor::from_vec(pixels, (batch, 3, 32, 32), &Device::Cpu).expect("images");
    let labels: Vec<u32> = (0..batch as u32).map(|i| (i * 7) % 10).collect();
    let y = Tensor::from_vec(labels, batch, &Device::Cpu).expect("labels");
    let (lo, hi) = (rank * batch / ranks, (rank + 1) * batch / ranks);
    let (x, y) = (x.narrow(0, lo, hi - lo).expect("rows"), y.narrow(0, lo, hi - lo).expect("rows"));
    let loss = LossFn::default();
    let mut opt = Sgd::new(SgdConfig { lr: 0.01, momentum: 0.9, ..SgdConfig::default() }).expect("sgd");
    let cfg = SamConfig::default();
    let mut step = |sam: bool| -> (f64, f64) {
        let c0 = samhost::dist::comm_stats().seconds;
        let t = Instant::now();
        if sam {
            sam_step(&model, &mut opt, &x, &y, &loss, &cfg).expect("sam_step");
        } else {
            train_step(&model, &mut opt, &x, &y, &loss, None).expect("train_step");
        }
        (t.elapsed().as_secs_f64() * 1e3, (samhost::dist::comm_stats().seconds - c0) * 1e3)
    };
    step(false);
    step(true);
    let (mut sgd, mut sam, mut sgd_c, mut sam_c) = (vec![], vec![], vec![], vec![]);
    for _ in 0..steps {
        let (t, c) = step(false);
        sgd.push(t);
        sgd_c.push(c);
        let (t, c) = step(true);
        sam.push(t);
        sam_c.push(c);
    }
    json!({
        "model": model_name, "ranks": ranks, "threads": rayon::current_num_threads(), "batch": batch,
        "sgd_ms": median(sgd), "sam_ms": median(sam), "sgd_comm_ms": median(sgd_c), "sam_comm_ms": median(sam_c),
    })
}

/// Runs this binary as a child (alone, or under `mpirun -np 2`) and reads rank 0's lines.
fn child(ranks: usize) -> Vec<Value> {
    let me = std::env::current_exe().expect("this benchmark's path");
    let mut cmd = if ranks == 1 {
        Command::new(&me)
    } else {
        let mut c = Command::new("mpirun");
        c.args(["--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "-np", &ranks.to_string()]).arg(&me);
        c
    };
    cmd.arg("--bench").env(CHILD, "1").env_remove("RAYON_NUM_THREADS");
    let out = cmd.output().unwrap_or_else(|e| panic!("starting the {ranks}-rank child: {e}"));
    if !out.status.success() {
        panic!("the {ranks}-rank child failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

fn range(v: &[f64]) -> String {
    let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.1}-{hi:.1}")
}

fn main() {
    samhost::runtime::tune();
    samhost::dist::share_cores();
    let models = env_list("SAMHOST_BENCH_MODELS", "cnn,resnet20");
    let (steps, batch) = (env_usize("SAMHOST_BENCH_STEPS", 10), env_usize("SAMHOST_BENCH_BATCH", 128));
    if std::env::var_os(CHILD).is_some() {
        samhost::dist::start(&Device::Cpu).expect("joining the ranks");
        for m in &models {
            let v = measure(m, batch, steps);
            if samhost::dist::is_leader() {
                println!("{v}");
            }
        }
        samhost::dist::finish(0);
        return;
    }
    let rounds = env_usize("SAMHOST_BENCH_ROUNDS", 3);
    let mut rows: Vec<Value> = Vec::new();
    for r in 0..rounds {
        eprintln!("round {}/{rounds}", r + 1);
        for ranks in [1, 2] {
            rows.extend(child(ranks));
        }
    }
    println!(
        "{:<10} {:>5} {:>7} {:>13} {:>13} {:>9} {:>13} {:>13} {:>9}",
        "model", "ranks", "threads", "sgd ms", "sgd comm ms", "sgd comm", "sam ms", "sam comm ms", "sam comm"
    );
    for m in &models {
        for ranks in [1u64, 2] {
            let sel: Vec<&Value> = rows.iter().filter(|v| v["model"] == m.as_str() && v["ranks"] == ranks).collect();
            let get = |k: &str| sel.iter().map(|v| v[k].as_f64().unwrap_or(f64::NAN)).collect::<Vec<_>>();
            let share = |c: &str, t: &str| {
                let v: Vec<f64> = get(c).iter().zip(get(t)).map(|(c, t)| 100.0 * c / t).collect();
                format!("{}%", range(&v))
            };
            println!(
                "{:<10} {:>5} {:>7} {:>13} {:>13} {:>9} {:>13} {:>13} {:>9}",
                m,
                ranks,
                sel.first().map_or(0, |v| v["threads"].as_u64().unwrap_or(0)),
                range(&get("sgd_ms")),
                range(&get("sgd_comm_ms")),
                share("sgd_comm_ms", "sgd_ms"),
                range(&get("sam_ms")),
                range(&get("sam_comm_ms")),
                share("sam_comm_ms", "sam_ms"),
            );
        }
    }
    println!(
        "(global batch {batch}, {steps} timed steps per process, {rounds} rounds; ranges are min-max over rounds)"
    );
}

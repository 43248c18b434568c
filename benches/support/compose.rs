//! The cost of writing SAM in the script: ms per step of the built-in `sam_step` against the same
//! step composed from `grad`, TensorSet arithmetic, `perturb`, `restore` and `opt.step`
//! (scripts/lib/variants.rhai), both driven from a Rhai loop as an experiment runs them; the same
//! for GSAM; and LookSAM's mean cost per step at k = 5 against SAM's.
//!
//! Part of `cargo bench --bench sam` (alone: `SAMHOST_BENCH_PART=compose cargo bench --bench sam`);
//! mlp 3072-512-512-10 and the cnn, batch 128, at the process's thread count
//! (`RAYON_NUM_THREADS=1` for one). Each round times every contender for
//! `SAMHOST_BENCH_STEPS` steps (default 5) one block after the other, so a slow spell of the
//! machine hits them alike; `SAMHOST_BENCH_ROUNDS` rounds (default 5) give the range printed.

use candle_core::{Device, Tensor};
use samhost::data::Batch;
use samhost::models::Model;
use samhost::rng::HostRng;
use samhost::session::Session;
use std::rc::Rc;
use std::time::Instant;

use super::bench_models::{build_on, median};

fn env(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn batch(n: usize) -> Batch {
    let rng = HostRng::new(1);
    let x = Tensor::from_vec(rng.normal(n * 3072, 0.0, 1.0), (n, 3, 32, 32), &Device::Cpu).unwrap();
    let y = Tensor::from_vec((0..n as u32).map(|i| i % 10).collect::<Vec<_>>(), n, &Device::Cpu).unwrap();
    Batch::new(x, y).unwrap()
}

/// One contender: a script statement run once per step.
struct Contender {
    name: &'static str,
    step: &'static str,
}

const CONTENDERS: [Contender; 5] = [
    Contender { name: "sam_step (built-in)", step: "sam_step(m, o, b, #{ rho: 0.05 })" },
    Contender { name: "SAM composed", step: "st = v::sam(m, o, b, #{ rho: 0.05 }, st).state" },
    Contender { name: "GSAM built-in", step: "sam_step(m, o, b, #{ variant: \"gsam\", alpha: 0.1 })" },
    Contender { name: "GSAM composed", step: "st = v::gsam(m, o, b, #{ alpha: 0.1 }, st).state" },
    Contender { name: "LookSAM k=5 (built-in)", step: "sam_step(m, o, b, #{ variant: \"looksam\", k: 5 })" },
];

/// Per round, the median ms per step of each contender.
fn rounds(model: &Model, b: &Batch, steps: usize, rounds: usize) -> Vec<Vec<f64>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join("bench.rhai");
    let session = Rc::new(Session::cpu_for(&path));
    let engine = samhost::script::build_engine(&session);
    let mut scopes: Vec<rhai::Scope> = Vec::new();
    let mut asts = Vec::new();
    for c in &CONTENDERS {
        let mut scope = rhai::Scope::new();
        scope.push("m", model.clone());
        scope.push("b", b.clone());
        scope.push("st", rhai::Map::new());
        let setup = engine.compile("let o = sgd(m, #{ lr: 0.01, momentum: 0.9 });").unwrap();
        engine.run_ast_with_scope(&mut scope, &setup).unwrap();
        scopes.push(scope);
        asts.push(engine.compile(format!("import \"lib/variants\" as v; {};", c.step)).unwrap());
    }
    let mut out = Vec::new();
    for round in 0..rounds + 1 {
        let mut per = Vec::new();
        for (scope, ast) in scopes.iter_mut().zip(&asts) {
            let times: Vec<f64> = (0..steps)
                .map(|_| {
                    let t = Instant::now();
                    engine.run_ast_with_scope(scope, ast).unwrap();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            // LookSAM's cost is the mean over its cycle, not the median step.
            per.push(if steps >= 5 { times.iter().sum::<f64>() / steps as f64 } else { median(times) });
        }
        if round > 0 {
            out.push(per);
        }
    }
    out
}

fn range(v: &[f64]) -> String {
    let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    format!("{lo:.3}-{hi:.3}")
}

/// Prints the comparison (see the module documentation).
pub fn run() {
    let steps = env("SAMHOST_BENCH_STEPS", 5);
    let n_rounds = env("SAMHOST_BENCH_ROUNDS", 5);
    let threads = rayon::current_num_threads();
    println!("{threads} thread(s), batch 128, {n_rounds} rounds of {steps} steps per contender (mean ms per step)");
    for (name, spec) in [("mlp", r#"{"model_type": "mlp", "sizes": [3072, 512, 512, 10]}"#), ("cnn", "cnn")] {
        let model = build_on(spec, &Device::Cpu);
        let b = batch(128);
        let r = rounds(&model, &b, steps, n_rounds);
        println!("\n{name}:");
        for (i, c) in CONTENDERS.iter().enumerate() {
            let ms: Vec<f64> = r.iter().map(|row| row[i]).collect();
            println!("  {:<24} {:>10} ms  (median {:.2})", c.name, range(&ms), median(ms.clone()));
        }
        let ratio = |a: usize, b: usize| -> Vec<f64> { r.iter().map(|row| row[a] / row[b]).collect() };
        println!("  composed SAM / built-in SAM:   {} (per round; target <= 1.05)", range(&ratio(1, 0)));
        println!("  composed GSAM / built-in GSAM: {}", range(&ratio(3, 2)));
        println!("  LookSAM (k=5) / SAM per step:  {} (target <= 0.65)", range(&ratio(4, 0)));
    }
}

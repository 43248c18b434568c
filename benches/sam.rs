//! SAM step benchmark: ms per step of `train_step` and `sam_step`, their ratio, the overhead of
//! driving the loop from a Rhai script, the cost of one script call into a registered tensor
//! function, and the peak memory of a step. Prints a table; run with `cargo bench --bench sam`.
//! `SAMHOST_BENCH_STEPS` sets the number of timed steps (default 10, median reported). Then the
//! composed-SAM comparison of `support/compose.rs` (`SAMHOST_BENCH_PART=compose`: that alone)
//! the Hessian-vector product's cost of `support/hvp.rs` (`SAMHOST_BENCH_PART=hvp`), and the
//! linear-probe step of `support/probe.rs` (`SAMHOST_BENCH_PART=probe`), and models written in
//! the script against the built-ins, `support/script_models.rs` (`SAMHOST_BENCH_PART=layers`).

use candle_core::{Device, Tensor};
use samhost::data::Batch;
use samhost::models::registry::{build_model, resolve_config, ArchConfig};
use samhost::models::{mlp::mlp, Model};
use samhost::rng::HostRng;
use samhost::session::Session;
use samhost::train::{sam_step, train_step, LossFn, SamConfig, Sgd, SgdConfig};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Instant;

#[path = "support/bench_models.rs"]
mod bench_models;
#[path = "support/compose.rs"]
mod compose;
#[path = "support/counting_alloc.rs"]
mod counting_alloc;
#[path = "support/hvp.rs"]
mod hvp;
#[path = "support/probe.rs"]
mod probe;
#[path = "support/script_models.rs"]
mod script_models;
use counting_alloc::{LIVE, PEAK};

fn steps() -> usize {
    std::env::var("SAMHOST_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(10)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn batch(shape: &[usize], classes: u32, n: usize) -> Batch {
    let rng = HostRng::new(1);
    let per: usize = shape.iter().product();
    let mut dims = vec![n];
    dims.extend_from_slice(shape);
    let x = Tensor::from_vec(rng.normal(n * per, 0.0, 1.0), dims, &Device::Cpu).unwrap();
    let y = Tensor::from_vec((0..n as u32).map(|i| i % classes).collect::<Vec<_>>(), n, &Device::Cpu).unwrap();
    Batch::new(x, y).unwrap()
}

fn opt() -> Sgd {
    Sgd::new(SgdConfig { lr: 0.01, momentum: 0.9, ..SgdConfig::default() }).unwrap()
}

/// (median ms per step, peak extra bytes during one step)
fn time_step(model: &Model, b: &Batch, sam: bool) -> (f64, usize) {
    let mut o = opt();
    let cfg = SamConfig::default();
    let run = |o: &mut Sgd| {
        if sam {
            sam_step(model, o, &b.images, &b.labels, &LossFn::default(), &cfg).unwrap();
        } else {
            train_step(model, o, &b.images, &b.labels, &LossFn::default(), None).unwrap();
        }
    };
    for _ in 0..2 {
        run(&mut o);
    }
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    run(&mut o);
    let peak = PEAK.load(Ordering::Relaxed) - base;
    let times = (0..steps())
        .map(|_| {
            let t = Instant::now();
            run(&mut o);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    (median(times), peak)
}

/// Median ms per step of the same step driven from Rust and from a Rhai script, the two timed
/// alternately (one Rust step, one script step, `n` times) so that machine noise hits both alike.
/// The script side is a `for` loop body: a registered call with an option map and the returned
/// statistics map, as an experiment script runs it.
fn rust_vs_script(model: &Model, b: &Batch, n: usize, sam: bool) -> (f64, f64) {
    let session = Rc::new(Session::cpu());
    let engine = samhost::script::build_engine(&session);
    let mut scope = rhai::Scope::new();
    scope.push("m", model.clone());
    scope.push("b", b.clone());
    let setup = engine.compile("let o = sgd(m, #{ lr: 0.01, momentum: 0.9 });").unwrap();
    engine.run_ast_with_scope(&mut scope, &setup).unwrap();
    let call =
        if sam { "let s = sam_step(m, o, b, #{ rho: 0.05 }); s.loss" } else { "let s = train_step(m, o, b); s.loss" };
    let step = engine.compile(call).unwrap();
    let mut o = opt();
    let cfg = SamConfig::default();
    let mut rust = || {
        if sam {
            sam_step(model, &mut o, &b.images, &b.labels, &LossFn::default(), &cfg).unwrap();
        } else {
            train_step(model, &mut o, &b.images, &b.labels, &LossFn::default(), None).unwrap();
        }
    };
    let (mut tr, mut ts) = (Vec::new(), Vec::new());
    for i in 0..n + 2 {
        let t = Instant::now();
        rust();
        let r = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        let out = engine.eval_ast_with_scope::<rhai::Dynamic>(&mut scope, &step).unwrap();
        drop(std::hint::black_box(out));
        let s = t.elapsed().as_secs_f64() * 1e3;
        if i >= 2 {
            tr.push(r);
            ts.push(s);
        }
    }
    (median(tr), median(ts))
}

/// Nanoseconds per script call of `t + 1.0` on a one-element tensor, minus the same op from Rust.
fn call_overhead() -> (f64, f64) {
    let n = 200_000;
    let t1 = Tensor::new(&[1f32], &Device::Cpu).unwrap();
    let start = Instant::now();
    for _ in 0..n {
        std::hint::black_box((&t1 + 1.0).unwrap());
    }
    let rust_ns = start.elapsed().as_secs_f64() * 1e9 / n as f64;
    let session = Rc::new(Session::cpu());
    let engine = samhost::script::build_engine(&session);
    let mut scope = rhai::Scope::new();
    scope.push("t", t1);
    let ast = engine.compile(format!("for i in 0..{n} {{ t + 1.0; }}")).unwrap();
    let empty = engine.compile(format!("for i in 0..{n} {{ }}")).unwrap();
    let s = Instant::now();
    engine.run_ast_with_scope(&mut scope, &ast).unwrap();
    let script_ns = s.elapsed().as_secs_f64() * 1e9 / n as f64;
    let s = Instant::now();
    engine.run_ast_with_scope(&mut scope, &empty).unwrap();
    let loop_ns = s.elapsed().as_secs_f64() * 1e9 / n as f64;
    (rust_ns, script_ns - loop_ns - rust_ns)
}

fn main() {
    samhost::runtime::tune();
    let part = std::env::var("SAMHOST_BENCH_PART").unwrap_or_default();
    if part == "compose" {
        compose::run();
        return;
    }
    if part == "hvp" {
        hvp::run();
        return;
    }
    if part == "probe" {
        probe::run();
        return;
    }
    if part == "layers" {
        script_models::run();
        return;
    }
    let (rust_ns, over_ns) = call_overhead();
    println!("script call into a registered tensor function (t + 1.0, 1 element):");
    println!("  tensor op from Rust {rust_ns:.0} ns; extra cost from a script {over_ns:.0} ns per call\n");

    let rng = HostRng::new(0);
    let cnn_cfg = ArchConfig::from_json(&resolve_config("cnn").unwrap(), false).unwrap();
    let models: Vec<(&str, Model, Vec<usize>)> = vec![
        ("mlp [3072,512,512,10]", mlp(&[3072, 512, 512, 10], &rng, &Device::Cpu).unwrap(), vec![3, 32, 32]),
        ("cnn (defaults)", build_model(&cnn_cfg, &rng, &Device::Cpu).unwrap(), vec![3, 32, 32]),
    ];
    println!(
        "{:<24} {:>5} {:>12} {:>12} {:>8} {:>14} {:>14} {:>10}",
        "model", "batch", "train ms", "sam ms", "sam/sgd", "train peak MB", "sam peak MB", "params MB"
    );
    for (name, model, shape) in &models {
        let b = batch(shape, 10, 128);
        let (t_train, m_train) = time_step(model, &b, false);
        let (t_sam, m_sam) = time_step(model, &b, true);
        let params_mb = model.params().num_trainable() as f64 * 4.0 / 1e6;
        println!(
            "{name:<24} {:>5} {t_train:>12.2} {t_sam:>12.2} {:>8.2} {:>14.2} {:>14.2} {params_mb:>10.2}",
            128,
            t_sam / t_train,
            m_train as f64 / 1e6,
            m_sam as f64 / 1e6
        );
        let n = steps();
        for sam in [false, true] {
            let (r, s) = rust_vs_script(model, &b, n, sam);
            println!(
                "  {} loop: Rust {r:.2} ms/step, Rhai script {s:.2} ms/step, script overhead {:+.2}%",
                if sam { "sam_step  " } else { "train_step" },
                (s - r) / r * 100.0
            );
        }
    }
    println!("\nSAM written in the script against the built-in:");
    compose::run();
    println!("\nHessian-vector products against gradients:");
    hvp::run();
}

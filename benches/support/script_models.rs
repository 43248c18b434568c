//! The cost of defining a model in the script: ms per `sam_step` of the built-in cnn and
//! ResNet-20 against the same networks written as `sequential([...])` (scripts/lib/models.rhai)
//! and as a forward closure over the same layers, all stepped from a Rhai loop as an experiment
//! runs them. Targets: a sequence within 5 % of the built-in, a forward closure within 15 %.
//!
//! `SAMHOST_BENCH_PART=layers cargo bench --bench sam`; batch 128 at the process's thread count
//! (`RAYON_NUM_THREADS=1` for one). Each round times every contender for `SAMHOST_BENCH_STEPS`
//! steps (default 3) one after the other, so a slow spell hits them alike; `SAMHOST_BENCH_ROUNDS`
//! rounds (default 3) give the range printed.

use candle_core::{Device, Tensor};
use samhost::data::Batch;
use samhost::rng::HostRng;
use samhost::session::Session;
use std::rc::Rc;
use std::time::Instant;

use super::bench_models::median;

fn env(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// The cnn's forward pass as a closure over its layers (the built-in's tensor names).
const CNN_CLOSURE: &str = r#"model(#{
    layers: #{ conv1: conv2d(3, 32, 3, #{ padding: 1 }), conv2: conv2d(32, 64, 3, #{ padding: 1 }),
               conv3: conv2d(64, 128, 3, #{ padding: 1 }), fc: linear(128 * 4 * 4, 256), classifier: linear(256, 10) },
    forward: |x| {
        let h = max_pool2d(relu(this.conv1.forward(x)), 2);
        h = max_pool2d(relu(this.conv2.forward(h)), 2);
        h = max_pool2d(relu(this.conv3.forward(h)), 2);
        this.classifier.forward(relu(this.fc.forward(flatten(h, 1))))
    }
})"#;

/// The cnn as a closure whose stages are sequences (conv2d, relu, max_pool2d: the fused op).
const CNN_CLOSURE_STAGES: &str = r#"model(#{
    layers: #{ stages: [sequential([conv2d(3, 32, 3, #{ padding: 1 }), relu(), max_pool2d(2)]),
                        sequential([conv2d(32, 64, 3, #{ padding: 1 }), relu(), max_pool2d(2)]),
                        sequential([conv2d(64, 128, 3, #{ padding: 1 }), relu(), max_pool2d(2)])],
               fc: linear(128 * 4 * 4, 256), classifier: linear(256, 10) },
    forward: |x| {
        let h = x;
        for s in this.stages { h = s.forward(h); }
        this.classifier.forward(relu(this.fc.forward(flatten(h, 1))))
    }
})"#;

/// ResNet-20 as a closure: the stem, then the residual blocks of lib/models in a list.
const RESNET_CLOSURE: &str = r#"
let blocks = [];
let c = 16;
for stage in 0..3 {
    let width = [16, 32, 64][stage];
    for i in 0..3 {
        let stride = if stage > 0 && i == 0 { 2 } else { 1 };
        blocks.push(arch::basic_block(c, width, stride, "pad"));
        c = width;
    }
}
model(#{
    layers: #{ conv1: conv2d(3, 16, 3, #{ padding: 1, bias: false }), bn1: batch_norm2d(16), blocks: blocks, linear: linear(64, 10) },
    forward: |x| {
        let h = relu(this.bn1.forward(this.conv1.forward(x)));
        for b in this.blocks { h = relu(b.forward(h)); }
        this.linear.forward(h.mean(-1).mean(-1))
    }
})"#;

type Family = (&'static str, &'static [(&'static str, &'static str)]);

const FAMILIES: [Family; 2] = [
    (
        "cnn (defaults)",
        &[
            ("built-in cnn()", "cnn()"),
            ("sequential", "arch::small_cnn([3, 32, 32], [32, 64, 128], 256, 10)"),
            ("closure, layer by layer", CNN_CLOSURE),
            ("closure over sequences", CNN_CLOSURE_STAGES),
        ],
    ),
    (
        "ResNet-20",
        &[
            ("built-in resnet(20, 10)", "resnet(20, 10)"),
            ("sequential", "arch::cifar_resnet(20, 10, \"pad\")"),
            ("closure over blocks", RESNET_CLOSURE),
        ],
    ),
];

fn range(v: &[f64]) -> String {
    let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    format!("{lo:.3}-{hi:.3}")
}

/// Prints the comparison (see the module documentation).
pub fn run() {
    let steps = env("SAMHOST_BENCH_STEPS", 3);
    let n_rounds = env("SAMHOST_BENCH_ROUNDS", 3);
    let threads = rayon::current_num_threads();
    println!(
        "{threads} thread(s), batch 128, sam_step rho 0.05, {n_rounds} rounds of {steps} steps (median ms per step)"
    );
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join("bench.rhai");
    let session = Rc::new(Session::cpu_for(&path));
    let engine = samhost::script::build_engine(&session);
    let rng = HostRng::new(1);
    let x = Tensor::from_vec(rng.normal(128 * 3072, 0.0, 1.0), (128, 3, 32, 32), &Device::Cpu).unwrap();
    let y = Tensor::from_vec((0..128u32).map(|i| i % 10).collect::<Vec<_>>(), 128, &Device::Cpu).unwrap();
    let b = Batch::new(x, y).unwrap();
    let step = engine.compile("sam_step(m, o, b, #{ rho: 0.05 });").unwrap();
    for (family, contenders) in FAMILIES {
        let mut scopes: Vec<rhai::Scope> = contenders
            .iter()
            .map(|(_, build)| {
                let mut scope = rhai::Scope::new();
                scope.push("b", b.clone());
                let setup = format!(
                    "import \"lib/models\" as arch; let m = {{ {build} }}; let o = sgd(m, #{{ lr: 0.01, momentum: 0.9 }});"
                );
                engine.run_with_scope(&mut scope, &setup).unwrap();
                scope
            })
            .collect();
        let mut per_round: Vec<Vec<f64>> = Vec::new();
        for round in 0..n_rounds + 1 {
            let row: Vec<f64> = scopes
                .iter_mut()
                .map(|scope| {
                    let times: Vec<f64> = (0..steps)
                        .map(|_| {
                            let t = Instant::now();
                            engine.run_ast_with_scope(scope, &step).unwrap();
                            t.elapsed().as_secs_f64() * 1e3
                        })
                        .collect();
                    median(times)
                })
                .collect();
            if round > 0 {
                per_round.push(row);
            }
        }
        println!("\n{family}:");
        for (i, (name, _)) in contenders.iter().enumerate() {
            let ms: Vec<f64> = per_round.iter().map(|r| r[i]).collect();
            println!("  {name:<26} {:>18} ms", range(&ms));
        }
        let ratio = |i: usize| -> Vec<f64> { per_round.iter().map(|r| r[i] / r[0]).collect() };
        for (i, (name, _)) in contenders.iter().enumerate().skip(1) {
            let target = if *name == "sequential" { 1.05 } else { 1.15 };
            let of_medians =
                median(per_round.iter().map(|r| r[i]).collect()) / median(per_round.iter().map(|r| r[0]).collect());
            println!(
                "  {name} / built-in: {} per round, {of_medians:.3} of the medians (target <= {target})",
                range(&ratio(i))
            );
        }
    }
}

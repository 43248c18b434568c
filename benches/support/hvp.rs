//! The cost of a Hessian-vector product (central differences: two gradients and two
//! perturb/restore passes) against one gradient, in evaluation mode as the diagnostics take them;
//! part of `cargo bench --bench sam` (`SAMHOST_BENCH_PART=hvp` alone). Target <= 2.5x.

use super::bench_models::{build_on, median};
use candle_core::{Device, Tensor};
use samhost::diagnostics::{gaussian_like, hvp, loss_grad};
use samhost::rng::HostRng;
use samhost::train::LossFn;
use std::time::Instant;

/// Prints ms per gradient and per product, and their ratio per round (range over 5 rounds).
pub fn run() {
    let rng = HostRng::new(2);
    let threads = rayon::current_num_threads();
    println!("{threads} thread(s), batch 128, 5 rounds of 5 (median ms)");
    for (name, spec) in [("mlp", r#"{"model_type": "mlp", "sizes": [3072, 512, 512, 10]}"#), ("cnn", "cnn")] {
        let model = build_on(spec, &Device::Cpu);
        let x = Tensor::from_vec(rng.normal(128 * 3072, 0.0, 1.0), (128, 3, 32, 32), &Device::Cpu).unwrap();
        let y = Tensor::from_vec((0..128u32).map(|i| i % 10).collect::<Vec<_>>(), 128, &Device::Cpu).unwrap();
        let data = vec![(x, y)];
        let loss = LossFn::default();
        let (_, _, g) = loss_grad(&model, &data, &loss).unwrap();
        let v = gaussian_like(&g, &rng).unwrap();
        let h = hvp::step_for(&model, hvp::DEFAULT_STEP).unwrap();
        let (mut ratios, mut tg, mut th) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..6 {
            let time = |f: &mut dyn FnMut()| -> f64 {
                median(
                    (0..5)
                        .map(|_| {
                            let t = Instant::now();
                            f();
                            t.elapsed().as_secs_f64() * 1e3
                        })
                        .collect(),
                )
            };
            let a = time(&mut || drop(loss_grad(&model, &data, &loss).unwrap()));
            let b = time(&mut || drop(hvp::hvp(&model, &data, &loss, &v, h).unwrap()));
            if round > 0 {
                ratios.push(b / a);
                tg.push(a);
                th.push(b);
            }
        }
        let range = |v: &[f64]| {
            let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
            format!("{lo:.2}-{hi:.2}")
        };
        println!(
            "  {name}: gradient {} ms, Hessian-vector product {} ms, ratio {} (target <= 2.5)",
            range(&tg),
            range(&th),
            range(&ratios)
        );
    }
}

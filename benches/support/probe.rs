//! The cost of a linear-probe SAM step (ViT backbone frozen, head trained) against one forward
//! pass, and of the full SAM step, as fine-tuning runs them: a ViT-S/14 (DINOv2-small's shape:
//! hidden 384, 12 layers, 6 heads) on 56x56 images, batch 32; part of `cargo bench --bench sam`
//! (`SAMHOST_BENCH_PART=probe` alone; `SAMHOST_BENCH_PROBE_SIZE=112` for another image size,
//! `SAMHOST_BENCH_PROBE_BATCH=8` for another batch).
//! Target (issue 15): a probe SAM step <= 2.2 forward passes. The probe step runs the frozen trunk
//! once (its pass at `w + e` reuses the features of the pass at `w`, `Model::reuse_trunk`), so it
//! costs about one forward pass; PyTorch's SAM loop (`benches/peer/vit_sam.py`) runs it twice.
//! Ranges are min-max over 3 rounds (`SAMHOST_BENCH_PROBE_ROUNDS` for another number), each the
//! median of 3 timings; each round also prints a `ROUND {json}` line with its three times (ms),
//! which `benches/peer/vit_sam.py --samhost-bin` reads to pair rounds with PyTorch's.
//! `SAMHOST_BENCH_PROBE_SERVE=1` instead serves single steps for step-by-step pairing
//! (`vit_sam.py --samhost-bin BIN --pair steps`): after `READY`, each line `forward`, `probe` or
//! `full` on stdin runs one such step and answers `MS <milliseconds>`.

use super::bench_models::median;
use candle_core::{Device, Tensor};
use samhost::models::registry::{build_model, ArchConfig};
use samhost::rng::HostRng;
use samhost::train::{sam_step, LossFn, SamConfig, Sgd, SgdConfig};
use std::time::Instant;

/// Prints ms per forward pass, probe SAM step and full SAM step, and the ratios per round.
pub fn run() {
    let size: usize = std::env::var("SAMHOST_BENCH_PROBE_SIZE").ok().and_then(|s| s.parse().ok()).unwrap_or(56);
    let batch: usize = std::env::var("SAMHOST_BENCH_PROBE_BATCH").ok().and_then(|s| s.parse().ok()).unwrap_or(32);
    let n_rounds: usize =
        std::env::var("SAMHOST_BENCH_PROBE_ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(3).max(1);
    let cfg = ArchConfig::from_json(
        &serde_json::json!({"model_type": "vit", "hidden_size": 384, "num_hidden_layers": 12,
            "num_attention_heads": 6, "intermediate_size": 1536, "image_size": size, "patch_size": 14,
            "num_labels": 10, "layer_norm_eps": 1e-6}),
        true,
    )
    .expect("a valid ViT config");
    let rng = HostRng::new(3);
    let model = build_model(&cfg, &rng, &Device::Cpu).expect("the ViT builds");
    let x = Tensor::from_vec(rng.normal(batch * 3 * size * size, 0.0, 1.0), (batch, 3, size, size), &Device::Cpu)
        .expect("a batch");
    let y =
        Tensor::from_vec((0..batch as u32).map(|i| i % 10).collect::<Vec<_>>(), batch, &Device::Cpu).expect("labels");
    let mut opt = Sgd::new(SgdConfig { lr: 0.01, momentum: 0.9, ..SgdConfig::default() }).expect("sgd");
    let sam = SamConfig::default();
    let threads = rayon::current_num_threads();
    if std::env::var("SAMHOST_BENCH_PROBE_SERVE").is_ok_and(|v| v == "1") {
        serve(&model, &mut opt, &x, &y, &sam);
        return;
    }
    println!("ViT-S/14, {size}x{size}, batch {batch}, {threads} thread(s): ms (median of 3), {n_rounds} rounds");
    let time = |f: &mut dyn FnMut()| -> f64 {
        f();
        median(
            (0..3)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect(),
        )
    };
    let (mut fwd, mut probe, mut full) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n_rounds {
        let f = time(&mut || drop(model.forward_t(&x, true).expect("forward")));
        model.params().freeze("vit.");
        let p = time(&mut || {
            sam_step(&model, &mut opt, &x, &y, &LossFn::default(), &sam).expect("probe step");
        });
        model.params().unfreeze("vit.");
        let s = time(&mut || {
            sam_step(&model, &mut opt, &x, &y, &LossFn::default(), &sam).expect("full step");
        });
        println!("ROUND {}", serde_json::json!({"forward": f, "probe": p, "full": s}));
        fwd.push(f);
        probe.push(p);
        full.push(s);
    }
    let range = |v: &[f64]| {
        let (lo, hi) = v.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
        format!("{lo:.1}-{hi:.1}")
    };
    let ratio = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(a, b)| a / b).collect::<Vec<_>>();
    println!("  forward pass (training mode)  {} ms", range(&fwd));
    println!(
        "  probe SAM step (backbone frozen) {} ms = {} forward passes",
        range(&probe),
        range(&ratio(&probe, &fwd))
    );
    println!("  full SAM step                 {} ms = {} forward passes", range(&full), range(&ratio(&full, &fwd)));
    let rounds = |v: &[f64]| v.iter().map(|t| format!("{t:.0}")).collect::<Vec<_>>().join(", ");
    println!("  by round (ms): forward {}; probe {}; full {}", rounds(&fwd), rounds(&probe), rounds(&full));
}

/// Answers `forward`, `probe` and `full` on stdin with one such step, timed: `MS <ms>` on stdout
/// (`ERROR ...` for anything else). The backbone is frozen or not as the request says, changed
/// untimed and only when it changes.
fn serve(model: &samhost::models::Model, opt: &mut Sgd, x: &Tensor, y: &Tensor, sam: &SamConfig) {
    use std::io::{BufRead, Write};
    let say = |line: String| {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{line}").and_then(|()| out.flush()).expect("stdout");
    };
    say("READY".to_string());
    let mut frozen = false;
    for line in std::io::stdin().lock().lines() {
        let request = line.expect("stdin");
        let request = request.trim();
        match request {
            "" => continue,
            "forward" | "probe" | "full" => {}
            other => {
                say(format!("ERROR unknown request {other:?}"));
                continue;
            }
        }
        if request != "forward" && (request == "probe") != frozen {
            frozen = !frozen;
            if frozen {
                model.params().freeze("vit.");
            } else {
                model.params().unfreeze("vit.");
            }
        }
        let t = Instant::now();
        if request == "forward" {
            drop(model.forward_t(x, true).expect("forward"));
        } else {
            sam_step(model, opt, x, y, &LossFn::default(), sam).expect("SAM step");
        }
        say(format!("MS {}", t.elapsed().as_secs_f64() * 1e3));
    }
}

//! Sharpness diagnostics against closed forms and an exact Hessian: quadratic losses with known
//! Hessians (eigenvalues, trace, worst- and average-case sharpness), a small MLP against its exact
//! float64 Hessian (every entry, by central differences of the hand-derived float64 gradient of
//! reference.rs), filter normalization per filter, the landscape at 0, interpolation's ends.

use crate::reference::Mlp2;
use crate::sam::{batch, reference_mlp, samhost_mlp};
use candle_core::{DType, Device, Tensor};
use samhost::diagnostics::eigen::symmetric_eigen;
use samhost::diagnostics::{hessian, landscape, loss_at, sharpness};
use samhost::models::Model;
use samhost::rng::HostRng;
use samhost::train::{LossFn, TensorSet};

fn direct(w0: &[f64]) -> Model {
    crate::sam::direct(w0, &Device::Cpu)
}

/// A = Q diag(λ) Qᵀ for a rotation Q mixing every coordinate (Householder reflection).
fn spd(lambdas: &[f64]) -> Vec<f64> {
    let d = lambdas.len();
    let u: Vec<f64> = (0..d).map(|i| 1.0 + i as f64 * 0.37).collect();
    let uu: f64 = u.iter().map(|x| x * x).sum();
    let q = |i: usize, j: usize| (if i == j { 1.0 } else { 0.0 }) - 2.0 * u[i] * u[j] / uu;
    (0..d * d).map(|ij| (0..d).map(|k| q(ij / d, k) * lambdas[k] * q(ij % d, k)).sum()).collect()
}

/// The loss ½ (w − c)ᵀ A (w − c) as a closure over `Direct`'s output.
fn quadratic(a: &[f64], c: &[f64]) -> impl Fn(&Tensor, &Tensor) -> anyhow::Result<Tensor> {
    let d = c.len();
    let at = Tensor::from_vec(a.to_vec(), (d, d), &Device::Cpu).unwrap();
    let ct = Tensor::from_vec(c.to_vec(), d, &Device::Cpu).unwrap();
    move |w: &Tensor, _y: &Tensor| {
        let x = (w - &ct)?.unsqueeze(1)?;
        Ok((x.t()?.matmul(&at.matmul(&x)?)?.squeeze(0)?.squeeze(0)? * 0.5)?)
    }
}

fn dummy() -> Vec<(Tensor, Tensor)> {
    vec![(
        Tensor::zeros((1, 1), DType::F64, &Device::Cpu).unwrap(),
        Tensor::zeros(1, DType::U32, &Device::Cpu).unwrap(),
    )]
}

#[test]
fn quadratic_hessian_eigenvalues_and_trace_are_exact() {
    let lambdas = [6.0, 3.5, 2.0, 1.0, 0.25];
    let a = spd(&lambdas);
    let w0: Vec<f64> = (0..5).map(|i| 0.3 * i as f64 - 0.5).collect();
    let quad = quadratic(&a, &[0.1; 5]);
    let model = direct(&w0);
    let loss = LossFn::Custom(&quad);
    let rng = HostRng::new(1);
    let o = hessian::TopOptions { k: 3, iters: 500, tol: 1e-10, ..Default::default() };
    let top = hessian::top_eigen(&model, &dummy(), &loss, &o, &rng).unwrap();
    for (got, want) in top.eigenvalues.iter().zip(lambdas) {
        assert!((got - want).abs() / want < 1e-4, "eigenvalues {:?} vs {lambdas:?}", top.eigenvalues);
    }
    // Rademacher vᵀAv has mean tr(A); on a diagonal A every sample is exactly the trace.
    let diag: Vec<f64> = (0..25).map(|ij| if ij / 5 == ij % 5 { lambdas[ij / 5] } else { 0.0 }).collect();
    let quad_d = quadratic(&diag, &[0.0; 5]);
    let t = hessian::trace(&direct(&w0), &dummy(), &LossFn::Custom(&quad_d), &Default::default(), &rng).unwrap();
    let tr: f64 = lambdas.iter().sum();
    assert!((t.trace - tr).abs() < 1e-6 * tr, "trace {} vs {tr}", t.trace);
    let t = hessian::trace(
        &model,
        &dummy(),
        &loss,
        &hessian::TraceOptions { samples: 400, tol: 0.0, ..Default::default() },
        &rng,
    )
    .unwrap();
    assert!((t.trace - tr).abs() < 4.0 * t.std_error + 1e-9, "trace {} ± {} vs {tr}", t.trace, t.std_error);
    // The density's nodes are the Hessian's eigenvalues (5 Lanczos steps span the space).
    let d =
        hessian::density(&model, &dummy(), &loss, &hessian::DensityOptions { iters: 5, ..Default::default() }, &rng)
            .unwrap();
    let mut nodes = d.nodes[0].clone();
    nodes.sort_by(f64::total_cmp);
    for (got, want) in nodes.iter().rev().zip(lambdas) {
        assert!((got - want).abs() < 1e-4 * want, "nodes {nodes:?}");
    }
    let mass: f64 = d.weights[0].iter().sum();
    assert!((mass - 1.0).abs() < 1e-9, "quadrature weights sum to {mass}");
}

/// The exact float64 Hessian of the reference MLP's mean cross-entropy, every entry by central
/// differences (step 1e-5) of its hand-derived gradient.
fn exact_hessian(r: &Mlp2, x: &[f64], y: &[usize]) -> (Vec<f64>, usize) {
    let p0 = r.flat();
    let flat: Vec<f64> = p0.iter().flatten().copied().collect();
    let n = flat.len();
    let split = |v: &[f64]| -> Vec<Vec<f64>> {
        let mut out = Vec::new();
        let mut at = 0;
        for t in &p0 {
            out.push(v[at..at + t.len()].to_vec());
            at += t.len();
        }
        out
    };
    let grad =
        |v: &[f64]| -> Vec<f64> { r.with_params(&split(v)).loss_grad(x, y, 0.0).1.into_iter().flatten().collect() };
    let h = 1e-5;
    let mut hess = vec![0.0; n * n];
    for j in 0..n {
        let (mut up, mut down) = (flat.clone(), flat.clone());
        up[j] += h;
        down[j] -= h;
        let (gu, gd) = (grad(&up), grad(&down));
        for i in 0..n {
            hess[i * n + j] = (gu[i] - gd[i]) / (2.0 * h);
        }
    }
    // Symmetrize the rounding away.
    for i in 0..n {
        for j in 0..i {
            let m = 0.5 * (hess[i * n + j] + hess[j * n + i]);
            hess[i * n + j] = m;
            hess[j * n + i] = m;
        }
    }
    (hess, n)
}

#[test]
fn mlp_top_eigenvalue_and_trace_match_the_exact_hessian() {
    let r = reference_mlp(51);
    let (x, y, xt, yt) = batch(52, 12, r.d_in, r.d_out);
    let x32: Vec<f64> = x.iter().map(|&v| v as f32 as f64).collect();
    let (hess, n) = exact_hessian(&r, &x32, &y);
    let (values, _) = symmetric_eigen(&hess, n);
    let top = values.iter().copied().max_by(|a, b| a.abs().total_cmp(&b.abs())).unwrap();
    let exact_trace: f64 = (0..n).map(|i| hess[i * n + i]).sum();
    let off: f64 = (0..n)
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .filter(|(i, j)| i != j)
        .map(|(i, j)| hess[i * n + j].powi(2))
        .sum();

    let model = samhost_mlp(&r);
    let data = vec![(xt, yt)];
    let rng = HostRng::new(3);
    let o = hessian::TopOptions { k: 1, iters: 300, tol: 1e-7, ..Default::default() };
    let got = hessian::top_eigen(&model, &data, &LossFn::default(), &o, &rng).unwrap().eigenvalues[0];
    eprintln!("mlp: top eigenvalue {got} vs the exact {top}");
    assert!((got - top).abs() / top.abs() < 0.01, "top eigenvalue {got} vs the exact {top}");

    let samples = 200;
    let t = hessian::trace(
        &model,
        &data,
        &LossFn::default(),
        &hessian::TraceOptions { samples, tol: 0.0, ..Default::default() },
        &rng,
    )
    .unwrap();
    // Var(vᵀHv) = 2 Σ_{i≠j} H_ij² for Rademacher v.
    let predicted = (2.0 * off / samples as f64).sqrt();
    eprintln!("mlp: trace {} ± {} vs the exact {exact_trace} (predicted error {predicted})", t.trace, t.std_error);
    assert!(
        (t.trace - exact_trace).abs() < 4.0 * predicted + 0.01 * exact_trace.abs(),
        "trace {} vs the exact {exact_trace} (predicted error {predicted})",
        t.trace
    );
    assert!((t.std_error - predicted).abs() < 0.5 * predicted, "std error {} vs predicted {predicted}", t.std_error);
}

#[test]
fn worst_and_average_case_sharpness_of_a_quadratic() {
    let lambdas = [4.0, 2.0, 1.0, 0.5];
    let a = spd(&lambdas);
    let w0 = [0.2, -0.4, 0.6, 0.1];
    let quad = quadratic(&a, &w0);
    let model = direct(&w0);
    let loss = LossFn::Custom(&quad);
    let rng = HostRng::new(4);
    let rho = 0.3;
    // max_{‖δ‖₂ ≤ ρ} ½ δᵀAδ = ½ ρ² λ_max.
    let o = sharpness::Options { rho, adaptive: false, steps: 60, ..Default::default() };
    let s = sharpness::adaptive_sharpness(&model, &dummy(), &loss, &o, &rng).unwrap();
    let want = 0.5 * rho * rho * lambdas[0];
    assert!((s.sharpness - want).abs() < 0.02 * want, "worst case {} vs {want}", s.sharpness);
    // E[½ ρ² zᵀAz] = ½ ρ² tr(A), z ~ N(0, I).
    let o =
        sharpness::Options { rho, adaptive: false, kind: sharpness::Kind::Average, steps: 4000, ..Default::default() };
    let s = sharpness::adaptive_sharpness(&model, &dummy(), &loss, &o, &rng).unwrap();
    let want = 0.5 * rho * rho * lambdas.iter().sum::<f64>();
    assert!((s.sharpness - want).abs() < 0.06 * want, "average case {} vs {want}", s.sharpness);
    // ℓ∞ worst case stays inside the box and reaches at least the ℓ2 ball's value.
    let o = sharpness::Options { rho, adaptive: false, norm: sharpness::Norm::Linf, steps: 60, ..Default::default() };
    let s = sharpness::adaptive_sharpness(&model, &dummy(), &loss, &o, &rng).unwrap();
    assert!(s.sharpness >= 0.98 * 0.5 * rho * rho * lambdas[0], "linf {}", s.sharpness);
    assert_eq!(model.params().get("w").unwrap().as_tensor().to_vec1::<f64>().unwrap(), w0, "weights restored");
}

#[test]
fn directions_are_filter_normalized_and_the_landscape_starts_at_the_loss() {
    let rng = HostRng::new(5);
    let w = TensorSet::from_pairs([
        (
            "conv.weight".to_string(),
            Tensor::from_vec(rng.normal(4 * 27, 0.0, 0.5), (4, 3, 3, 3), &Device::Cpu).unwrap(),
        ),
        ("conv.bias".to_string(), Tensor::from_vec(rng.normal(4, 0.0, 1.0), 4, &Device::Cpu).unwrap()),
    ]);
    let d = landscape::filter_normalized(&w, &rng, false).unwrap();
    let (dw, ww) = (d.get("conv.weight").unwrap(), w.get("conv.weight").unwrap());
    for f in 0..4 {
        let n = |t: &Tensor| {
            t.get(f).unwrap().sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap()
        };
        assert!((n(dw) - n(ww)).abs() < 1e-5 * n(ww), "filter {f}: {} vs {}", n(dw), n(ww));
    }
    assert_eq!(d.get("conv.bias").unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    let with = landscape::filter_normalized(&w, &rng, true).unwrap();
    assert_eq!(
        with.get("conv.bias").unwrap().to_vec1::<f32>().unwrap(),
        w.get("conv.bias").unwrap().to_vec1::<f32>().unwrap()
    );

    let r = reference_mlp(53);
    let (_, _, xt, yt) = batch(54, 12, r.d_in, r.d_out);
    let model = samhost_mlp(&r);
    let data = vec![(xt, yt)];
    let (at_w, _) = loss_at(&model, &data, &LossFn::default()).unwrap();
    let l = landscape::landscape(
        &model,
        &data,
        &LossFn::default(),
        &landscape::Options { points: 5, ..Default::default() },
    )
    .unwrap();
    assert_eq!(l.xs[2], 0.0);
    assert_eq!(l.loss[0][2], at_w, "the landscape at 0 is the model's loss");
    assert!(l.loss[0].iter().all(|v| v.is_finite()));
    let l2 = landscape::landscape(
        &model,
        &data,
        &LossFn::default(),
        &landscape::Options { dims: 2, points: 3, ..Default::default() },
    )
    .unwrap();
    assert_eq!(l2.loss[1][1], at_w);
    let b = samhost_mlp(&reference_mlp(55));
    let (_, losses, _) = landscape::interpolate(&model, &b, &data, &LossFn::default(), 5).unwrap();
    let (at_b, _) = loss_at(&b, &data, &LossFn::default()).unwrap();
    assert!((losses[0] - at_w).abs() < 1e-6 && (losses[4] - at_b).abs() < 1e-6, "{losses:?} vs {at_w}, {at_b}");
    assert_eq!(loss_at(&model, &data, &LossFn::default()).unwrap().0, at_w, "the first model is put back");
}

/// `samhost sharpness RUN_DIR` measures the newest checkpoint of a run on the run's data.
#[test]
fn the_sharpness_command_measures_a_saved_checkpoint() {
    use crate::common::{samhost, stderr, write};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.safetensors");
    let rng = HostRng::new(9);
    let images = Tensor::from_vec(
        rng.uniform(40 * 16, 0.0, 255.0).iter().map(|v| *v as u8).collect::<Vec<_>>(),
        (40, 1, 4, 4),
        &Device::Cpu,
    )
    .unwrap();
    let labels = Tensor::from_vec((0..40u8).map(|i| i % 3).collect::<Vec<_>>(), 40, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("images", images), ("labels", labels)]), &data)
        .unwrap();
    write(
        dir.path(),
        "train.rhai",
        &format!(
            "let cfg = config(#{{ data: \"{}\" }});\nlet ds = load_dataset(cfg.data);\nlet m = mlp([16, 8, 3]);\nlet o = sgd(m, #{{ lr: 0.1 }});\nlet st = resume(m, o);\nfor b in ds.batches(20) {{ sam_step(m, o, b); }}\nsave_checkpoint(m, o, #{{ epoch: 1 }});\n",
            data.display()
        ),
    );
    let runs = dir.path().join("runs");
    let o =
        samhost().current_dir(dir.path()).args(["run", "train.rhai", "-q", "--runs-dir"]).arg(&runs).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let run = std::fs::read_dir(&runs).unwrap().next().unwrap().unwrap().path();
    let o = samhost().args(["sharpness"]).arg(&run).args(["--examples", "32"]).output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("top Hessian eigenvalue") && err.contains("adaptive sharpness"), "{err}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("diagnostics/epoch-0001-sharpness.json")).unwrap())
            .unwrap();
    assert!(json["top_eigenvalue"].as_f64().unwrap().is_finite() && json["examples"] == 32, "{json}");
    assert!(run.join("diagnostics/epoch-0001-landscape.png").is_file());
    let o = samhost().args(["sharpness"]).arg(&run).args(["--checkpoint", "nope"]).output().unwrap();
    assert!(!o.status.success() && stderr(&o).contains("no checkpoint `nope`"), "{}", stderr(&o));
}

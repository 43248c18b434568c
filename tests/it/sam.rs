//! SAM, ASAM, m-sharpness and the optimizers, checked against independent float64 math.
//! Tolerances are stated per test; samhost computes in float32.

use crate::common::test_device;
use crate::reference::{sam_grad, AdamWRef, Mlp2, SgdRef};
use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::VarMap;
use samhost::models::init::seeded_var_builder;
use samhost::models::{mlp::mlp, Model, Network, Params};
use samhost::rng::HostRng;
use samhost::train::{
    sam_step, train_step, AdamW, AdamWConfig, LossFn, Optimizer, SamConfig, Schedule, ScheduleKind, Sgd, SgdConfig,
};
use std::collections::HashMap;
use std::sync::Arc;

pub(crate) fn lcg(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}

pub(crate) fn reference_mlp(seed: u64) -> Mlp2 {
    let (di, dh, dout) = (6, 5, 3);
    Mlp2 {
        d_in: di,
        d_h: dh,
        d_out: dout,
        w1: lcg(seed, dh * di, 0.6),
        b1: lcg(seed + 1, dh, 0.3),
        w2: lcg(seed + 2, dout * dh, 0.6),
        b2: lcg(seed + 3, dout, 0.3),
    }
}

pub(crate) fn samhost_mlp(r: &Mlp2) -> Model {
    samhost_mlp_on(r, &Device::Cpu)
}

pub(crate) fn samhost_mlp_on(r: &Mlp2, device: &Device) -> Model {
    let m = mlp(&[r.d_in, r.d_h, r.d_out], &HostRng::new(0), device).unwrap();
    set_weights(&m, &r.flat());
    m
}

const NAMES: [&str; 4] = ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"];

pub(crate) fn set_weights(m: &Model, flat: &[Vec<f64>]) {
    let mut map = HashMap::new();
    for (name, v) in NAMES.iter().zip(flat) {
        let shape = m.params().get(name).unwrap().dims().to_vec();
        map.insert(name.to_string(), Tensor::from_vec(v.clone(), shape, &Device::Cpu).unwrap());
    }
    m.params().assign(&map, true, "test").unwrap();
}

pub(crate) fn weights(m: &Model) -> Vec<Vec<f64>> {
    NAMES
        .iter()
        .map(|n| {
            let v = m.params().get(n).unwrap();
            v.as_tensor().flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
        })
        .collect()
}

pub(crate) fn batch(seed: u64, n: usize, d: usize, classes: usize) -> (Vec<f64>, Vec<usize>, Tensor, Tensor) {
    batch_on(seed, n, d, classes, &Device::Cpu)
}

pub(crate) fn batch_on(
    seed: u64,
    n: usize,
    d: usize,
    classes: usize,
    device: &Device,
) -> (Vec<f64>, Vec<usize>, Tensor, Tensor) {
    let x = lcg(seed, n * d, 1.5);
    let y: Vec<usize> = (0..n).map(|i| (i * 7 + seed as usize) % classes).collect();
    let xt = Tensor::from_vec(x.iter().map(|&v| v as f32).collect::<Vec<_>>(), (n, d), device).unwrap();
    let yt = Tensor::from_vec(y.iter().map(|&v| v as u32).collect::<Vec<_>>(), n, device).unwrap();
    (x, y, xt, yt)
}

/// Values rounded to float32, as samhost stores them.
pub(crate) fn as_f32(v: &[f64]) -> Vec<f64> {
    v.iter().map(|&x| x as f32 as f64).collect()
}

/// Max over tensors of ‖a − b‖ / ‖b‖.
pub(crate) fn rel_err(a: &[Vec<f64>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(a, b)| {
            let d: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt();
            let n: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
            d / n.max(1e-12)
        })
        .fold(0.0, f64::max)
}

pub(crate) fn sgd(lr: f64, momentum: f64, nesterov: bool, wd: f64) -> Sgd {
    Sgd::new(SgdConfig { lr, momentum, dampening: 0.0, nesterov, weight_decay: wd }).unwrap()
}

fn sam(rho: f64) -> SamConfig {
    SamConfig { rho, ..SamConfig::default() }
}

/// A model whose output is its parameter vector `w` (the input is ignored), for closed forms.
struct Direct {
    w: Tensor,
}

impl Network for Direct {
    fn forward_t(&self, _x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        Ok(self.w.clone())
    }
    fn config(&self) -> serde_json::Value {
        serde_json::json!({})
    }
}

pub(crate) fn direct(w0: &[f64], device: &Device) -> Model {
    let varmap = VarMap::new();
    let var = Var::from_vec(w0.to_vec(), w0.len(), device).unwrap();
    varmap.data().lock().unwrap().insert("w".into(), var.clone());
    Model::new(Arc::new(Direct { w: var.as_tensor().clone() }), Params::new(varmap))
}

/// L(w) = ½ wᵀAw + bᵀw: one SAM and one ASAM step match the closed form to 1e-6 (relative).
fn quadratic_sam_and_asam_match_the_closed_form(device: &Device) {
    let d = 5;
    let m = lcg(11, d * d, 1.0);
    // A = MᵀM + I, symmetric positive definite.
    let a: Vec<f64> = (0..d * d)
        .map(|ij| {
            (0..d).map(|k| m[k * d + ij / d] * m[k * d + ij % d]).sum::<f64>()
                + if ij / d == ij % d { 1.0 } else { 0.0 }
        })
        .collect();
    let b = lcg(12, d, 1.0);
    let w0 = lcg(13, d, 1.0);
    let grad =
        |w: &[f64]| -> Vec<f64> { (0..d).map(|i| (0..d).map(|j| a[i * d + j] * w[j]).sum::<f64>() + b[i]).collect() };
    let (rho, lr, eta) = (0.3, 0.1, 0.05);
    let at = Tensor::from_vec(a.clone(), (d, d), device).unwrap();
    let bt = Tensor::from_vec(b.clone(), d, device).unwrap();
    let quad = move |w: &Tensor, _y: &Tensor| -> anyhow::Result<Tensor> {
        let wc = w.unsqueeze(1)?;
        let q = wc.t()?.matmul(&at.matmul(&wc)?)?.squeeze(0)?.squeeze(0)?;
        Ok(((q * 0.5)? + (w * &bt)?.sum_all()?)?)
    };
    for adaptive in [false, true] {
        let model = direct(&w0, device);
        let mut opt = sgd(lr, 0.0, false, 0.0);
        let cfg = SamConfig { rho, adaptive, eta: Some(eta), ..SamConfig::default() };
        let x = Tensor::zeros((1, 1), DType::F64, device).unwrap();
        let y = Tensor::zeros(1, DType::U32, device).unwrap();
        sam_step(&model, &mut opt, &x, &y, &LossFn::Custom(&quad), &cfg).unwrap();
        let got = model.params().get("w").unwrap().as_tensor().to_vec1::<f64>().unwrap();
        // Closed form.
        let g = grad(&w0);
        let t: Vec<f64> = w0.iter().map(|w| if adaptive { w.abs() + eta } else { 1.0 }).collect();
        let tg_norm = g.iter().zip(&t).map(|(g, t)| (g * t).powi(2)).sum::<f64>().sqrt();
        let e: Vec<f64> = (0..d).map(|i| rho * t[i] * t[i] * g[i] / tg_norm).collect();
        let we: Vec<f64> = (0..d).map(|i| w0[i] + e[i]).collect();
        let g2 = grad(&we);
        let want: Vec<f64> = (0..d).map(|i| w0[i] - lr * g2[i]).collect();
        crate::common::assert_close(if adaptive { "asam" } else { "sam" }, &got, &want, 1e-6);
    }
}
test_device!(quadratic_sam_and_asam_match_the_closed_form, quadratic_closed_form_cpu, quadratic_closed_form_cuda);

/// An MLP with cross-entropy: SAM and ASAM steps (with SGD momentum, weight decay and label
/// smoothing) match the float64 reference to 1e-5 relative.
fn mlp_sam_step_matches_float64_reference(device: &Device) {
    let r = reference_mlp(3);
    let (x, y, xt, yt) = batch_on(5, 8, r.d_in, r.d_out, device);
    for (adaptive, ls) in [(false, 0.0), (true, 0.0), (false, 0.1)] {
        let model = samhost_mlp_on(&r, device);
        let mut opt = sgd(0.05, 0.9, false, 5e-4);
        let cfg = SamConfig { rho: 0.2, adaptive, eta: Some(0.01), ..SamConfig::default() };
        let mut reference = r.flat();
        let mut sgd_ref = SgdRef::default();
        for _ in 0..3 {
            let loss = LossFn::CrossEntropy { label_smoothing: ls };
            let stats = sam_step(&model, &mut opt, &xt, &yt, &loss, &cfg).unwrap();
            let want_loss = r.with_params(&reference).loss_grad(&x, &y, ls).0;
            assert!((stats.loss - want_loss).abs() / want_loss < 1e-5, "loss {} vs {want_loss}", stats.loss);
            let mask = [true; 4];
            let g = sam_grad(&reference, 0.2, adaptive.then_some(0.01), &mask, |p| {
                r.with_params(p).loss_grad(&x, &y, ls).1
            });
            sgd_ref.step(&mut reference, &g, 0.05, 0.9, 0.0, false, 5e-4);
        }
        let err = rel_err(&weights(&model), &reference);
        assert!(err < 1e-5, "adaptive {adaptive}, smoothing {ls}: relative error {err:e}");
    }
}
test_device!(mlp_sam_step_matches_float64_reference, mlp_sam_reference_cpu, mlp_sam_reference_cuda);

/// Frozen parameters are neither perturbed nor updated; the ascent norm covers the others only.
#[test]
fn frozen_parameters_are_not_perturbed_nor_updated() {
    let r = reference_mlp(4);
    let (x, y, xt, yt) = batch(6, 8, r.d_in, r.d_out);
    let model = samhost_mlp(&r);
    assert_eq!(model.params().freeze("fc1"), 2);
    let mut opt = sgd(0.1, 0.0, false, 0.0);
    sam_step(&model, &mut opt, &xt, &yt, &LossFn::default(), &sam(0.3)).unwrap();
    let mut reference = r.flat();
    let mask = [false, false, true, true];
    let g = sam_grad(&reference, 0.3, None, &mask, |p| r.with_params(p).loss_grad(&x, &y, 0.0).1);
    for i in 2..4 {
        for (w, g) in reference[i].iter_mut().zip(&g[i]) {
            *w -= 0.1 * g;
        }
    }
    let got = weights(&model);
    assert_eq!(got[0], as_f32(&r.b1), "frozen fc1.bias changed");
    assert_eq!(got[1], as_f32(&r.w1), "frozen fc1.weight changed");
    let err = rel_err(&got, &reference);
    assert!(err < 1e-5, "relative error {err:e}");
}

/// rho = 0 gives the base optimizer's step: equal to train_step to 1e-7 over several steps.
#[test]
fn rho_zero_equals_train_step() {
    let r = reference_mlp(7);
    let (_, _, xt, yt) = batch(8, 16, r.d_in, r.d_out);
    let (a, b) = (samhost_mlp(&r), samhost_mlp(&r));
    let mut oa = sgd(0.1, 0.9, true, 1e-3);
    let mut ob = sgd(0.1, 0.9, true, 1e-3);
    for _ in 0..5 {
        let sa = sam_step(&a, &mut oa, &xt, &yt, &LossFn::default(), &sam(0.0)).unwrap();
        let sb = train_step(&b, &mut ob, &xt, &yt, &LossFn::default(), None).unwrap();
        assert_eq!(sa.loss, sb.loss);
        assert_eq!(sa.sharp_loss, sa.loss);
    }
    for (wa, wb) in weights(&a).iter().zip(&weights(&b)) {
        for (p, q) in wa.iter().zip(wb) {
            assert!((p - q).abs() <= 1e-7, "{p} vs {q}");
        }
    }
}

/// m-sharpness: M = batch size is plain SAM; M = 1 is the mean of per-example SAM gradients.
#[test]
fn m_sharpness_chunks() {
    let r = reference_mlp(9);
    let n = 6;
    let (_, _, xt, yt) = batch(10, n, r.d_in, r.d_out);
    let plain = samhost_mlp(&r);
    sam_step(&plain, &mut sgd(0.1, 0.0, false, 0.0), &xt, &yt, &LossFn::default(), &sam(0.2)).unwrap();
    let full = samhost_mlp(&r);
    let cfg = SamConfig { rho: 0.2, m_sharpness: Some(n), ..SamConfig::default() };
    sam_step(&full, &mut sgd(0.1, 0.0, false, 0.0), &xt, &yt, &LossFn::default(), &cfg).unwrap();
    assert_eq!(weights(&plain), weights(&full), "M = batch size must be plain SAM");

    // Per-example SAM gradients, one at a time, with SGD lr 1: g_i = w - w_i'.
    let w0 = r.flat();
    let mut mean = vec![vec![0.0; 0]; 4];
    for i in 0..n {
        let m = samhost_mlp(&r);
        let (xi, yi) = (xt.narrow(0, i, 1).unwrap(), yt.narrow(0, i, 1).unwrap());
        sam_step(&m, &mut sgd(1.0, 0.0, false, 0.0), &xi, &yi, &LossFn::default(), &sam(0.2)).unwrap();
        for (k, (w, wi)) in w0.iter().zip(weights(&m)).enumerate() {
            let gi: Vec<f64> = w.iter().zip(&wi).map(|(a, b)| (a - b) / n as f64).collect();
            if mean[k].is_empty() {
                mean[k] = gi;
            } else {
                mean[k].iter_mut().zip(&gi).for_each(|(m, g)| *m += g);
            }
        }
    }
    let want: Vec<Vec<f64>> =
        w0.iter().zip(&mean).map(|(w, g)| w.iter().zip(g).map(|(w, g)| w - 0.1 * g).collect()).collect();
    let chunked = samhost_mlp(&r);
    let cfg = SamConfig { rho: 0.2, m_sharpness: Some(1), ..SamConfig::default() };
    sam_step(&chunked, &mut sgd(0.1, 0.0, false, 0.0), &xt, &yt, &LossFn::default(), &cfg).unwrap();
    let err = rel_err(&weights(&chunked), &want);
    assert!(err < 1e-5, "m = 1: relative error {err:e}");
    // m = 4 on 6 examples: chunks of 4 and 2, weighted 4/6 and 2/6, against the per-chunk SAM
    // gradients computed one chunk at a time.
    let chunk_grad = |rows: std::ops::Range<usize>| -> Vec<Vec<f64>> {
        let part = samhost_mlp(&r);
        let (x, y) = (xt.narrow(0, rows.start, rows.len()).unwrap(), yt.narrow(0, rows.start, rows.len()).unwrap());
        sam_step(&part, &mut sgd(1.0, 0.0, false, 0.0), &x, &y, &LossFn::default(), &sam(0.2)).unwrap();
        w0.iter().zip(weights(&part)).map(|(a, b)| a.iter().zip(&b).map(|(a, b)| a - b).collect()).collect()
    };
    let (g1, g2) = (chunk_grad(0..4), chunk_grad(4..6));
    let want: Vec<Vec<f64>> = w0
        .iter()
        .zip(g1.iter().zip(&g2))
        .map(|(w, (a, b))| {
            w.iter().zip(a.iter().zip(b)).map(|(w, (a, b))| w - 0.1 * (4.0 * a + 2.0 * b) / 6.0).collect()
        })
        .collect();
    let uneven = samhost_mlp(&r);
    let cfg = SamConfig { rho: 0.2, m_sharpness: Some(4), ..SamConfig::default() };
    sam_step(&uneven, &mut sgd(0.1, 0.0, false, 0.0), &xt, &yt, &LossFn::default(), &cfg).unwrap();
    let err = rel_err(&weights(&uneven), &want);
    assert!(err < 1e-5, "m = 4 of 6: relative error {err:e}");
}

/// A small network with BatchNorm: linear -> batch norm -> relu -> linear.
struct BnNet {
    fc1: candle_nn::Linear,
    bn: candle_nn::BatchNorm,
    fc2: candle_nn::Linear,
}

impl Network for BnNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = self.fc1.forward(x)?;
        let h = candle_nn::ModuleT::forward_t(&self.bn, &h, train)?.relu()?;
        self.fc2.forward(&h)
    }
    fn config(&self) -> serde_json::Value {
        serde_json::json!({})
    }
}

fn bn_model(seed: u64, device: &Device) -> Model {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, &HostRng::new(seed), device);
    let net = BnNet {
        fc1: candle_nn::linear(6, 8, vb.pp("fc1")).unwrap(),
        bn: candle_nn::batch_norm(8, candle_nn::BatchNormConfig::default(), vb.pp("bn")).unwrap(),
        fc2: candle_nn::linear(8, 3, vb.pp("fc2")).unwrap(),
    };
    Model::new(Arc::new(net), Params::new(varmap))
}

/// After a SAM step the BatchNorm running statistics equal those after one training-mode
/// forward at the original weights; they are never trained.
fn batchnorm_statistics_come_from_the_first_pass_only(device: &Device) {
    let (_, _, xt, yt) = batch_on(12, 16, 6, 3, device);
    let a = bn_model(1, device);
    let b = bn_model(1, device);
    assert_eq!(a.params().trainable().len(), 6, "running stats are not trainable");
    b.forward_t(&xt, true).unwrap();
    sam_step(&a, &mut sgd(0.5, 0.0, false, 0.0), &xt, &yt, &LossFn::default(), &sam(0.5)).unwrap();
    for name in ["bn.running_mean", "bn.running_var"] {
        let va = a.params().get(name).unwrap().as_tensor().to_vec1::<f32>().unwrap();
        let vb = b.params().get(name).unwrap().as_tensor().to_vec1::<f32>().unwrap();
        assert_eq!(va, vb, "{name}");
    }
    // And the statistics did move from their initial values (the test is not vacuous).
    let mean = a.params().get("bn.running_mean").unwrap().as_tensor().to_vec1::<f32>().unwrap();
    assert!(mean.iter().any(|&v| v != 0.0));
}
test_device!(batchnorm_statistics_come_from_the_first_pass_only, bn_first_pass_stats_cpu, bn_first_pass_stats_cuda);

/// A zero gradient gives a zero perturbation and finite weights.
#[test]
fn zero_gradient_gives_finite_weights() {
    let r = reference_mlp(13);
    let (_, _, xt, yt) = batch(14, 4, r.d_in, r.d_out);
    let zero = |logits: &Tensor, _y: &Tensor| -> anyhow::Result<Tensor> { Ok((logits.sum_all()? * 0.0)?) };
    for adaptive in [false, true] {
        let m = samhost_mlp(&r);
        let cfg = SamConfig { rho: 0.05, adaptive, ..SamConfig::default() };
        let s = sam_step(&m, &mut sgd(0.1, 0.0, false, 0.0), &xt, &yt, &LossFn::Custom(&zero), &cfg).unwrap();
        assert_eq!(s.grad_norm, 0.0);
        let w = weights(&m);
        assert!(w.iter().flatten().all(|v| v.is_finite()));
        assert_eq!(w, r.flat().iter().map(|t| as_f32(t)).collect::<Vec<_>>(), "zero gradient, zero update");
    }
}

/// Global-norm clipping of the SAM gradient matches the reference scaling.
#[test]
fn grad_clip_scales_the_sam_gradient() {
    let r = reference_mlp(15);
    let (x, y, xt, yt) = batch(16, 8, r.d_in, r.d_out);
    let m = samhost_mlp(&r);
    let cfg = SamConfig { rho: 0.1, grad_clip: Some(0.01), ..SamConfig::default() };
    sam_step(&m, &mut sgd(1.0, 0.0, false, 0.0), &xt, &yt, &LossFn::default(), &cfg).unwrap();
    let g = sam_grad(&r.flat(), 0.1, None, &[true; 4], |p| r.with_params(p).loss_grad(&x, &y, 0.0).1);
    let n = crate::reference::norm(&g, &[true; 4]);
    assert!(n > 0.01, "the test must clip");
    let s = 0.01 / (n + 1e-6);
    let want: Vec<Vec<f64>> =
        r.flat().iter().zip(&g).map(|(w, g)| w.iter().zip(g).map(|(w, g)| w - s * g).collect()).collect();
    let err = rel_err(&weights(&m), &want);
    assert!(err < 1e-5, "relative error {err:e}");
}

/// SGD (momentum, dampening, Nesterov, weight decay) and AdamW over several plain steps match
/// PyTorch's update rules computed in float64, to 1e-5 relative.
#[test]
fn optimizers_match_pytorch_semantics() {
    let r = reference_mlp(17);
    let (x, y, xt, yt) = batch(18, 8, r.d_in, r.d_out);
    let grad = |p: &[Vec<f64>]| r.with_params(p).loss_grad(&x, &y, 0.0).1;
    for (momentum, dampening, nesterov, wd) in [(0.0, 0.0, false, 0.0), (0.9, 0.1, false, 1e-2), (0.9, 0.0, true, 5e-4)]
    {
        let m = samhost_mlp(&r);
        let mut opt = Sgd::new(SgdConfig { lr: 0.1, momentum, dampening, nesterov, weight_decay: wd }).unwrap();
        let (mut p, mut st) = (r.flat(), SgdRef::default());
        for _ in 0..4 {
            train_step(&m, &mut opt, &xt, &yt, &LossFn::default(), None).unwrap();
            let g = grad(&p);
            st.step(&mut p, &g, 0.1, momentum, dampening, nesterov, wd);
        }
        let err = rel_err(&weights(&m), &p);
        assert!(err < 1e-5, "sgd momentum {momentum} nesterov {nesterov}: {err:e}");
    }
    let m = samhost_mlp(&r);
    let mut opt = AdamW::new(AdamWConfig { lr: 0.01, betas: [0.9, 0.99], eps: 1e-8, weight_decay: 0.1 }).unwrap();
    let (mut p, mut st) = (r.flat(), AdamWRef::default());
    for _ in 0..4 {
        train_step(&m, &mut opt, &xt, &yt, &LossFn::default(), None).unwrap();
        let g = grad(&p);
        st.step(&mut p, &g, 0.01, 0.9, 0.99, 1e-8, 0.1);
    }
    let err = rel_err(&weights(&m), &p);
    assert!(err < 1e-5, "adamw: {err:e}");
}

/// Optimizer state saved after k steps and restored into a fresh optimizer continues exactly.
#[test]
fn optimizer_state_round_trips() {
    let r = reference_mlp(19);
    let (_, _, xt, yt) = batch(20, 8, r.d_in, r.d_out);
    let make: [fn() -> Box<dyn Optimizer>; 2] = [
        || Box::new(Sgd::new(SgdConfig { lr: 0.1, momentum: 0.9, ..SgdConfig::default() }).unwrap()),
        || Box::new(AdamW::new(AdamWConfig::default()).unwrap()),
    ];
    for new_opt in make {
        let (a, b) = (samhost_mlp(&r), samhost_mlp(&r));
        let (mut oa, mut ob) = (new_opt(), new_opt());
        for _ in 0..2 {
            sam_step(&a, oa.as_mut(), &xt, &yt, &LossFn::default(), &sam(0.1)).unwrap();
            sam_step(&b, ob.as_mut(), &xt, &yt, &LossFn::default(), &sam(0.1)).unwrap();
        }
        let state = ob.state().unwrap();
        let mut oc = new_opt();
        oc.load_state(&state).unwrap();
        for _ in 0..2 {
            sam_step(&a, oa.as_mut(), &xt, &yt, &LossFn::default(), &sam(0.1)).unwrap();
            sam_step(&b, oc.as_mut(), &xt, &yt, &LossFn::default(), &sam(0.1)).unwrap();
        }
        assert_eq!(weights(&a), weights(&b), "{}", oa.name());
    }
}

/// Schedules against their closed forms.
#[test]
fn schedules_follow_their_formulas() {
    let lrs = |kind: ScheduleKind, n: usize| -> Vec<f64> {
        let s = Schedule::new(kind, 0.1).unwrap();
        (0..n).map(|t| s.lr_at(t)).collect()
    };
    let step = lrs(ScheduleKind::Step { step_size: 2, gamma: 0.5 }, 5);
    crate::common::assert_close("step", &step, &[0.1, 0.1, 0.05, 0.05, 0.025], 1e-12);
    let ms = lrs(ScheduleKind::MultiStep { milestones: vec![1, 3], gamma: 0.1 }, 4);
    crate::common::assert_close("multi_step", &ms, &[0.1, 0.01, 0.01, 0.001], 1e-12);
    let cos = lrs(ScheduleKind::Cosine { total: 6, warmup: 2, min_lr: 0.0 }, 7);
    let want: Vec<f64> = (0..7)
        .map(|t: usize| {
            if t < 2 {
                0.1 * (t + 1) as f64 / 2.0
            } else {
                0.05 * (1.0 + (std::f64::consts::PI * (t - 2) as f64 / 4.0).cos())
            }
        })
        .collect();
    crate::common::assert_close("cosine", &cos, &want, 1e-12);
    let lin = lrs(ScheduleKind::Linear { total: 4, warmup: 0, end_lr: 0.0 }, 5);
    crate::common::assert_close("linear", &lin, &[0.1, 0.075, 0.05, 0.025, 0.0], 1e-12);
}

/// From a script: a loss closure is called for both passes (twice per chunk) and gives the same
/// step as the built-in cross-entropy.
#[test]
fn script_loss_closure_is_used_for_both_passes() {
    let dir = tempfile::tempdir().unwrap();
    crate::common::write(
        dir.path(),
        "l.rhai",
        r#"
let data = synthetic(#{ n: 16, classes: 3, shape: [1, 4, 4] });
let b = ();
for x in data.batches(8, #{ shuffle: false }) { b = x; break; }
let a = mlp([16, 8, 3]);
let c = mlp([16, 8, 3]);
c.set_parameters(a.parameters());
let oa = sgd(a, #{ lr: 0.1 });
let oc = sgd(c, #{ lr: 0.1 });
let calls = 0;
let loss = |logits, labels| { calls += 1; cross_entropy(logits, labels) };
let sa = sam_step(a, oa, b, #{ rho: 0.1, loss: loss });
let sc = sam_step(c, oc, b, #{ rho: 0.1 });
if calls != 2 { throw `closure called ${calls} times`; }
if sa.loss != sc.loss || sa.sharp_loss != sc.sharp_loss { throw "losses differ"; }
let pa = a.parameters();
let pc = c.parameters();
for k in pa.keys() { if pa[k].to_array() != pc[k].to_array() { throw `weights differ: ${k}`; } }
sam_step(a, oa, b, #{ rho: 0.1, loss: loss, m_sharpness: 2 });
if calls != 10 { throw `m_sharpness 2 on 8 examples: ${calls} calls`; }
let bad = |logits, labels| 3;
sam_step(a, oa, b, #{ loss: bad });
"#,
    );
    let o = crate::common::run_in(dir.path(), &["run", "l.rhai", "--quiet"]);
    let e = crate::common::stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("the loss closure must return a Tensor") && e.contains("l.rhai:22:"), "{e}");
}

/// With m-sharpness (and with micro-batches) BatchNorm's running statistics take one update
/// per optimizer step: the mean of each chunk's update from the same start, i.e. momentum 0.1
/// applied once to the mean of the chunks' batch statistics.
#[test]
fn m_sharpness_updates_batch_norm_statistics_once_per_step() {
    let (_, _, xt, yt) = batch(14, 16, 6, 3);
    let expected = {
        let b = bn_model(2, &Device::Cpu);
        let start = b.params().save_buffers().unwrap();
        let mut sums: HashMap<String, Vec<f64>> = HashMap::new();
        for c in 0..4 {
            b.params().restore_buffers(&start).unwrap();
            b.forward_t(&xt.narrow(0, c * 4, 4).unwrap(), true).unwrap();
            for name in ["bn.running_mean", "bn.running_var"] {
                let v =
                    b.params().get(name).unwrap().as_tensor().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
                let s = sums.entry(name.to_string()).or_insert_with(|| vec![0.0; v.len()]);
                s.iter_mut().zip(&v).for_each(|(s, v)| *s += v / 4.0);
            }
        }
        sums
    };
    let micro: Vec<_> = (0..4).map(|c| (xt.narrow(0, c * 4, 4).unwrap(), yt.narrow(0, c * 4, 4).unwrap())).collect();
    for how in ["m_sharpness", "micro-batches"] {
        let a = bn_model(2, &Device::Cpu);
        let mut opt = sgd(0.1, 0.0, false, 0.0);
        if how == "m_sharpness" {
            let cfg = SamConfig { m_sharpness: Some(4), ..sam(0.2) };
            sam_step(&a, &mut opt, &xt, &yt, &LossFn::default(), &cfg).unwrap();
        } else {
            samhost::train::sam_step_accumulated(&a, &mut opt, &micro, &LossFn::default(), &sam(0.2)).unwrap();
        }
        for (name, want) in &expected {
            let got = a.params().get(name).unwrap().as_tensor().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-6 * w.abs().max(1.0), "{how}: {name} {got:?} vs {want:?}");
            }
        }
    }
}

/// With dropout, rho = 0 is still the plain step, bit for bit: the perturbed pass sees the masks
/// of the first pass, and a SAM step draws as many masks as a plain step (so the steps after it
/// match too). Checked for a WideResNet (dropout between the convolutions) and a ViT (hidden and
/// attention dropout), over several steps.
#[test]
fn rho_zero_equals_train_step_with_dropout() {
    use samhost::models::registry::{build_model, ArchConfig};
    let configs = [
        serde_json::json!({"model_type": "wide_resnet", "depth": 10, "widen_factor": 1, "num_labels": 3,
                           "num_channels": 1, "dropout": 0.3}),
        serde_json::json!({"model_type": "vit", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "intermediate_size": 16, "image_size": 4, "patch_size": 2, "num_channels": 1,
                           "num_labels": 3, "hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.1}),
    ];
    for c in configs {
        let cfg = ArchConfig::from_json(&c, true).unwrap();
        let (a, b) = (
            build_model(&cfg, &HostRng::new(5), &Device::Cpu).unwrap(),
            build_model(&cfg, &HostRng::new(5), &Device::Cpu).unwrap(),
        );
        let xs = Tensor::from_vec(HostRng::new(9).normal(6 * 16, 0.0, 1.0), (6, 1, 4, 4), &Device::Cpu).unwrap();
        let ys = Tensor::from_vec(vec![0u32, 1, 2, 0, 1, 2], 6, &Device::Cpu).unwrap();
        // Dropout is on: two training-mode passes draw different masks.
        let c3 = build_model(&cfg, &HostRng::new(5), &Device::Cpu).unwrap();
        let (l1, l2) = (c3.forward_t(&xs, true).unwrap(), c3.forward_t(&xs, true).unwrap());
        let d = (l1 - l2).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d > 0.0, "{c}: dropout is active in training mode");
        assert_eq!(a.dropout_state(), b.dropout_state(), "{c}: both start with the same mask generator");
        let (mut oa, mut ob) = (sgd(0.1, 0.9, false, 5e-4), sgd(0.1, 0.9, false, 5e-4));
        for step in 0..4 {
            let sa = sam_step(&a, &mut oa, &xs, &ys, &LossFn::default(), &sam(0.0)).unwrap();
            let sb = train_step(&b, &mut ob, &xs, &ys, &LossFn::default(), None).unwrap();
            assert_eq!(sa.loss, sb.loss, "{c}: step {step}");
            assert_eq!(sa.sharp_loss, sa.loss, "{c}: step {step}: the perturbed pass saw other masks");
        }
        for ((name, va), (_, vb)) in a.params().all().iter().zip(b.params().all().iter()) {
            let (x, y) = (va.as_tensor().flatten_all().unwrap(), vb.as_tensor().flatten_all().unwrap());
            let d = (&x - &y).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d == 0.0, "{c}: `{name}` differs by up to {d:e} after 4 steps");
        }
        assert_eq!(a.dropout_state(), b.dropout_state(), "{c}: as many masks drawn");
    }
}

/// A frozen parameter costs nothing: under the scope a gradient pass uses, a forward pass with
/// nothing to differentiate records no autograd graph at all (nothing for a backward pass to
/// walk), one with only the head records ops from the head on; and the head's gradient and SAM
/// step are bit-identical to those computed with the backbone trainable and its gradient dropped.
#[test]
fn a_frozen_backbone_takes_no_backward_pass() {
    use samhost::models::registry::{build_model, ArchConfig};
    use samhost::train::grads::{grad_of, no_grad_outside, GradOptions};
    let c = serde_json::json!({"model_type": "vit", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                               "intermediate_size": 32, "image_size": 8, "patch_size": 4, "num_labels": 3});
    let cfg = ArchConfig::from_json(&c, true).unwrap();
    let build = || build_model(&cfg, &HostRng::new(2), &Device::Cpu).unwrap();
    let x = Tensor::from_vec(HostRng::new(4).normal(4 * 3 * 64, 0.0, 1.0), (4, 3, 8, 8), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(vec![0u32, 1, 2, 1], 4, &Device::Cpu).unwrap();

    let m = build();
    assert!(m.forward_t(&x, true).unwrap().track_op(), "outside a scope every parameter is tracked");
    {
        let _all = no_grad_outside(&m, &[]);
        assert!(!m.forward_t(&x, true).unwrap().track_op(), "nothing to differentiate: no graph");
    }
    m.params().freeze("vit.");
    let head = m.params().trainable();
    assert!(head.iter().all(|(n, _)| n.starts_with("classifier.")));
    {
        let _head = no_grad_outside(&m, &head);
        assert!(m.forward_t(&x, true).unwrap().track_op(), "the head is tracked");
    }

    // The head's gradient: frozen backbone against the whole model's gradient, restricted.
    let full = build();
    let all = full.params().trainable();
    let g_full = grad_of(&full, &all, &x, &y, &LossFn::default(), GradOptions::default()).unwrap();
    let g_probe = grad_of(&m, &head, &x, &y, &LossFn::default(), GradOptions::default()).unwrap();
    assert_eq!(g_full.loss, g_probe.loss);
    for (name, _) in &head {
        let (a, b) = (g_full.grads.get(name).unwrap(), g_probe.grads.get(name).unwrap());
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{name}");
        assert!(a.iter().any(|v| *v != 0.0), "{name} got a gradient");
    }
    // A probe SAM step leaves the backbone bit-identical and moves the head.
    let before: Vec<(String, Vec<f32>)> = m
        .params()
        .all()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
        .collect();
    sam_step(&m, &mut sgd(0.1, 0.9, false, 0.0), &x, &y, &LossFn::default(), &sam(0.05)).unwrap();
    for ((name, b), (_, v)) in before.iter().zip(m.params().all()) {
        let now: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(name.starts_with("classifier."), &now != b, "{name}");
    }
}

/// `mode: "model"` runs a step's passes in the model's own mode: after `eval()` BatchNorm's
/// running statistics stay as they are (and normalise the batch); the default trains them.
#[test]
fn a_step_in_the_models_mode_keeps_frozen_statistics() {
    use samhost::models::registry::{build_model, ArchConfig};
    use samhost::train::{train_step_in, StepMode};
    let cfg =
        ArchConfig::from_json(&serde_json::json!({"model_type": "cifar_resnet", "depth": 8, "num_labels": 3}), true)
            .unwrap();
    let x = Tensor::from_vec(HostRng::new(1).normal(4 * 3 * 64, 0.0, 1.0), (4, 3, 8, 8), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(vec![0u32, 1, 2, 1], 4, &Device::Cpu).unwrap();
    let stats = |m: &Model| -> Vec<Vec<f32>> {
        m.params().buffers().iter().map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect()
    };
    let weights_of = |m: &Model| -> Vec<Vec<f32>> {
        m.params().trainable().iter().map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect()
    };
    for sam_pass in [false, true] {
        let m = build_model(&cfg, &HostRng::new(2), &Device::Cpu).unwrap();
        m.set_training(false);
        let (s0, w0) = (stats(&m), weights_of(&m));
        let model_mode = SamConfig { mode: StepMode::Model, ..SamConfig::default() };
        if sam_pass {
            sam_step(&m, &mut sgd(0.1, 0.9, false, 0.0), &x, &y, &LossFn::default(), &model_mode).unwrap();
        } else {
            train_step_in(
                &m,
                &mut sgd(0.1, 0.9, false, 0.0),
                &[(x.clone(), y.clone())],
                &LossFn::default(),
                None,
                StepMode::Model,
            )
            .unwrap();
        }
        assert_eq!(stats(&m), s0, "eval mode: the running statistics stay");
        assert_ne!(weights_of(&m), w0, "the weights still move");
        sam_step(&m, &mut sgd(0.1, 0.9, false, 0.0), &x, &y, &LossFn::default(), &SamConfig::default()).unwrap();
        assert_ne!(stats(&m), s0, "the default mode trains the statistics");
    }
}

/// A linear probe's SAM step runs the frozen trunk once: its pass at `w + e` reuses the features
/// of the pass at `w` (the trunk's weights and dropout masks are the same in both). Checked
/// against the step composed by hand from two full gradient passes (`grad_of`, `perturb`,
/// `restore`, the SGD update): weights, running statistics, dropout generator and losses equal
/// bit for bit, over two steps, for a ViT with dropout and DINOv2 (in f32 and bf16), a CIFAR
/// ResNet (BatchNorm), a WideResNet with dropout and the cnn. That the reuse engages is checked
/// directly in every precision (a trunk weight moved inside the scope leaves the logits as they
/// were) and, in f32, by the step's matrix products (the gemm census): those of one forward pass
/// of the trunk, where the composed step makes two.
#[test]
fn a_probe_sam_step_runs_the_frozen_trunk_once() {
    use samhost::models::registry::{build_model, ArchConfig};
    use samhost::ops::gemm::record_calls;
    use samhost::train::grads::{grad_of, GradOptions};
    let configs = [
        serde_json::json!({"model_type": "vit", "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
                           "intermediate_size": 16, "image_size": 4, "patch_size": 2, "num_channels": 1,
                           "num_labels": 3, "hidden_dropout_prob": 0.2, "attention_probs_dropout_prob": 0.1}),
        serde_json::json!({"model_type": "dinov2", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                           "mlp_ratio": 2, "image_size": 4, "patch_size": 2, "num_channels": 1, "num_labels": 3}),
        serde_json::json!({"model_type": "cifar_resnet", "depth": 8, "num_labels": 3, "num_channels": 1}),
        serde_json::json!({"model_type": "wide_resnet", "depth": 10, "widen_factor": 1, "num_labels": 3,
                           "num_channels": 1, "dropout": 0.3}),
        serde_json::json!({"model_type": "cnn", "input": [1, 4, 4], "channels": [4], "hidden": 6, "num_labels": 3}),
    ];
    let xs = Tensor::from_vec(HostRng::new(9).normal(6 * 16, 0.0, 1.0), (6, 1, 4, 4), &Device::Cpu).unwrap();
    let ys = Tensor::from_vec(vec![0u32, 1, 2, 0, 1, 2], 6, &Device::Cpu).unwrap();
    let cfg_sam = sam(0.5);
    let values = |m: &Model| -> Vec<(String, Vec<f32>)> {
        m.params()
            .all()
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
            .collect()
    };
    let runs = configs.into_iter().flat_map(|c| {
        // bf16 for the transformers (fine-tuning's mixed precision), f32 for all.
        let bf16 = matches!(c["model_type"].as_str(), Some("vit" | "dinov2"));
        let mut r = vec![(c.clone(), samhost::models::Precision::F32)];
        if bf16 {
            r.push((c, samhost::models::Precision::Bf16));
        }
        r
    });
    for (c, precision) in runs {
        let cfg = ArchConfig::from_json(&c, true).unwrap();
        let (a, b) = (
            build_model(&cfg, &HostRng::new(5), &Device::Cpu).unwrap(),
            build_model(&cfg, &HostRng::new(5), &Device::Cpu).unwrap(),
        );
        let kind = c["model_type"].as_str().unwrap_or_default().to_string();
        let c = format!("{c} in {precision}");
        let head = cfg.head_prefix();
        for m in [&a, &b] {
            m.set_precision(precision);
            let all: Vec<String> = m.params().trainable().into_iter().map(|(n, _)| n).collect();
            for n in all.iter().filter(|n| !n.starts_with(&head)) {
                m.params().freeze(n);
            }
        }
        let params = b.params().trainable();
        assert!(!params.is_empty() && params.iter().all(|(n, _)| n.starts_with(&head)), "{c}: the head alone trains");
        // The reuse engages in this precision: inside the scope a moved trunk weight does not
        // reach the logits of a batch the trunk has seen; outside it, it does.
        {
            let trunk =
                a.params().all().into_iter().find(|(n, _)| !n.starts_with(&head) && !samhost::models::is_buffer(n));
            let (name, w) = trunk.expect("a trunk parameter");
            let logits = |m: &Model| m.forward_t(&xs, false).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let shift = samhost::train::TensorSet::from_pairs([(name.clone(), w.as_tensor().ones_like().unwrap())]);
            let scope = a.reuse_trunk(&params).expect("the scope opens for a head-only step");
            let before = logits(&a);
            a.perturb(&shift, 1.0).unwrap();
            assert_eq!(logits(&a), before, "{c}: `{name}` moved, the trunk's kept features serve");
            drop(scope);
            assert_ne!(logits(&a), before, "{c}: outside the scope the moved `{name}` counts");
            a.restore().unwrap();
        }
        let (mut oa, mut ob) = (sgd(0.1, 0.0, false, 0.0), sgd(0.1, 0.0, false, 0.0));
        // The census counts every product the process makes, other tests' running beside this
        // one included: stray calls only ever add, so each side counts at its least over 3 steps.
        let (mut fa, mut fb) = (f64::INFINITY, f64::INFINITY);
        let flops = |calls: &[samhost::ops::gemm::GemmCall]| calls.iter().map(|k| k.flops()).sum::<f64>();
        for step in 0..3 {
            let (sa, calls_a) = record_calls(|| sam_step(&a, &mut oa, &xs, &ys, &LossFn::default(), &cfg_sam).unwrap());
            // The same step composed from two full passes.
            let ((first, second), calls_b) = record_calls(|| {
                let first = grad_of(&b, &params, &xs, &ys, &LossFn::default(), GradOptions::default()).unwrap();
                let norm = first.grads.norm().unwrap();
                b.perturb(&first.grads, cfg_sam.rho / (norm + cfg_sam.eps)).unwrap();
                let saved = b.params().save_buffers().unwrap();
                let second = grad_of(&b, &params, &xs, &ys, &LossFn::default(), GradOptions::default()).unwrap();
                b.restore().unwrap();
                b.params().restore_buffers(&saved).unwrap();
                ob.step_set(&b, &second.grads).unwrap();
                (first, second)
            });
            assert_eq!((sa.loss, sa.sharp_loss), (first.loss, second.loss), "{c}: step {step}: losses");
            assert_eq!(values(&a), values(&b), "{c}: step {step}: weights and running statistics");
            assert_eq!(a.dropout_state(), b.dropout_state(), "{c}: step {step}: as many masks drawn");
            (fa, fb) = (fa.min(flops(&calls_a)), fb.min(flops(&calls_b)));
        }
        if precision.is_mixed() {
            // bf16 products run in candle's matmul, outside the census.
            continue;
        }
        if kind != "cnn" {
            // The trunk dominates (the cnn's head is as large as its convolution).
            assert!(fa < 0.6 * fb, "{c}: {fa} flops in the probe step against {fb} composed");
        }
        assert!(fa < fb, "{c}: the trunk ran twice ({fa} against {fb} flops)");
    }
}

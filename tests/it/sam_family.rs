//! The SAM family built into `sam_step` (GSAM, LookSAM, every-k, Fisher SAM, F-SAM, ESAM,
//! SAM-ON, ASAM's weight scope) against independent float64 computations of the papers'
//! formulas, written here from the formulas over the reference MLP of `reference.rs`, over
//! several steps for the stateful ones; and the checkpointing of their state. samhost computes in
//! float32: the tolerance is 1e-5 relative to the weights after the steps (the plain SAM step
//! meets the same bound in sam.rs).

use crate::reference::{norm, Mlp2, SgdRef};
use crate::sam::{batch, reference_mlp, rel_err, samhost_mlp, sgd, weights};
use samhost::train::{sam_step, LossFn, Optimizer, PerturbScope, SamConfig, Variant};

type Params = Vec<Vec<f64>>;

const TOL: f64 = 1e-5;
const LR: f64 = 0.1;
const MOMENTUM: f64 = 0.9;

fn dot(a: &Params, b: &Params) -> f64 {
    a.iter().zip(b).flat_map(|(a, b)| a.iter().zip(b)).map(|(x, y)| x * y).sum()
}

fn all_norm(a: &Params) -> f64 {
    norm(a, &vec![true; a.len()])
}

/// `a + s·b`.
fn axpy(a: &Params, s: f64, b: &Params) -> Params {
    a.iter().zip(b).map(|(a, b)| a.iter().zip(b).map(|(x, y)| x + s * y).collect()).collect()
}

fn scale(a: &Params, s: f64) -> Params {
    a.iter().map(|t| t.iter().map(|x| x * s).collect()).collect()
}

/// The float64 side of one test: the reference MLP, its batch, SGD with momentum.
struct Reference {
    r: Mlp2,
    x: Vec<f64>,
    y: Vec<usize>,
    p: Params,
    sgd: SgdRef,
}

impl Reference {
    fn new(r: &Mlp2, x: &[f64], y: &[usize]) -> Self {
        Self { r: r.clone(), x: x.to_vec(), y: y.to_vec(), p: r.flat(), sgd: SgdRef::default() }
    }

    fn grad_at(&self, p: &Params) -> Params {
        self.r.with_params(p).loss_grad(&self.x, &self.y, 0.0).1
    }

    /// Per-example losses at `p`.
    fn losses_at(&self, p: &Params) -> Vec<f64> {
        let d = self.r.d_in;
        (0..self.y.len())
            .map(|i| self.r.with_params(p).loss_grad(&self.x[i * d..(i + 1) * d], &self.y[i..i + 1], 0.0).0)
            .collect()
    }

    fn step(&mut self, d: &Params) {
        self.sgd.step(&mut self.p, d, LR, MOMENTUM, 0.0, false, 0.0);
    }

    /// `∇L(w + ρ·a/‖a‖)`.
    fn sharp_grad(&self, a: &Params, rho: f64) -> Params {
        let e = scale(a, rho / (all_norm(a) + 1e-12));
        self.grad_at(&axpy(&self.p, 1.0, &e))
    }
}

/// Runs `steps` built-in steps of `cfg` and the same steps of `reference` (which updates the
/// float64 weights), and returns the relative error of the weights.
fn compare(seed: u64, cfg: &SamConfig, steps: usize, mut reference: impl FnMut(&mut Reference, usize)) -> f64 {
    let r = reference_mlp(seed);
    let (x, y, xt, yt) = batch(seed + 10, 12, r.d_in, r.d_out);
    let model = samhost_mlp(&r);
    let mut opt = sgd(LR, MOMENTUM, false, 0.0);
    let mut f64_side = Reference::new(&r, &x, &y);
    for t in 0..steps {
        sam_step(&model, &mut opt, &xt, &yt, &LossFn::default(), cfg).expect("sam_step");
        reference(&mut f64_side, t);
    }
    rel_err(&weights(&model), &f64_side.p)
}

#[test]
fn gsam_matches_the_formula_with_rho_following_the_learning_rate() {
    for (alpha, rho) in [(0.3, 0.2), (0.0, 0.1)] {
        let cfg = SamConfig { variant: Variant::Gsam, alpha: Some(alpha), rho, ..SamConfig::default() };
        let err = compare(21, &cfg, 3, |f, _| {
            let g = f.grad_at(&f.p);
            let gp = f.sharp_grad(&g, rho);
            // d = g_p − α·(g − (g·u)u), u = g_p/‖g_p‖
            let u = scale(&gp, 1.0 / all_norm(&gp));
            let vertical = axpy(&g, -dot(&g, &u), &u);
            let d = axpy(&gp, -alpha, &vertical);
            f.step(&d);
        });
        assert!(err < TOL, "GSAM alpha {alpha}: relative error {err:e}");
    }
    // rho_t = rho_min + (rho_max − rho_min)·(lr − lr_min)/(lr_max − lr_min), with the lr set
    // before each step (0.1, 0.06, 0.02; lr_max the largest seen: 0.1).
    let r = reference_mlp(22);
    let (x, y, xt, yt) = batch(32, 12, r.d_in, r.d_out);
    let model = samhost_mlp(&r);
    let mut opt = sgd(LR, MOMENTUM, false, 0.0);
    let cfg = SamConfig {
        variant: Variant::Gsam,
        alpha: Some(0.2),
        rho_max: Some(0.3),
        rho_min: Some(0.05),
        ..SamConfig::default()
    };
    let mut f = Reference::new(&r, &x, &y);
    for lr in [0.1, 0.06, 0.02] {
        opt.set_learning_rate(lr);
        sam_step(&model, &mut opt, &xt, &yt, &LossFn::default(), &cfg).unwrap();
        let rho_t = 0.05 + (0.3 - 0.05) * lr / 0.1;
        let g = f.grad_at(&f.p);
        let gp = f.sharp_grad(&g, rho_t);
        let u = scale(&gp, 1.0 / all_norm(&gp));
        let d = axpy(&gp, -0.2, &axpy(&g, -dot(&g, &u), &u));
        f.sgd.step(&mut f.p, &d, lr, MOMENTUM, 0.0, false, 0.0);
    }
    let err = rel_err(&weights(&model), &f.p);
    assert!(err < TOL, "GSAM with the rho schedule: relative error {err:e}");
}

#[test]
fn looksam_takes_sam_steps_every_k_and_reuses_g_v_between() {
    let (k, alpha, rho) = (3usize, 0.7, 0.2);
    let cfg = SamConfig { variant: Variant::Looksam, k, alpha: Some(alpha), rho, ..SamConfig::default() };
    let mut gv: Option<Params> = None;
    let err = compare(23, &cfg, 5, |f, t| {
        let g = f.grad_at(&f.p);
        if t % k == 0 {
            let gs = f.sharp_grad(&g, rho);
            // g_v = g_s − (g_s·ĝ)ĝ, ĝ = g/‖g‖
            let gh = scale(&g, 1.0 / all_norm(&g));
            gv = Some(axpy(&gs, -dot(&gs, &gh), &gh));
            f.step(&gs);
        } else {
            let gv = gv.as_ref().expect("g_v from step 0");
            let d = axpy(&g, alpha * all_norm(&g) / all_norm(gv), gv);
            f.step(&d);
        }
    });
    assert!(err < TOL, "LookSAM: relative error {err:e}");
}

#[test]
fn every_k_alternates_sam_and_plain_steps() {
    let rho = 0.2;
    let cfg = SamConfig { every: Some(2), rho, ..SamConfig::default() };
    let err = compare(24, &cfg, 4, |f, t| {
        let g = f.grad_at(&f.p);
        let d = if t % 2 == 0 { f.sharp_grad(&g, rho) } else { g };
        f.step(&d);
    });
    assert!(err < TOL, "every 2: relative error {err:e}");
}

#[test]
fn fisher_sam_scales_the_ascent_by_the_inverse_fisher() {
    for eta in [1.0, 40.0] {
        let rho = 0.2;
        let cfg = SamConfig { variant: Variant::Fisher, eta: Some(eta), rho, ..SamConfig::default() };
        let err = compare(25, &cfg, 2, |f, _| {
            let g = f.grad_at(&f.p);
            // e = ρ·f⁻¹g / √(g·f⁻¹g), f = 1 + η·g²
            let finv_g: Params = g.iter().map(|t| t.iter().map(|v| v / (1.0 + eta * v * v)).collect()).collect();
            let e = scale(&finv_g, rho / dot(&g, &finv_g).sqrt());
            let d = f.grad_at(&axpy(&f.p, 1.0, &e));
            f.step(&d);
        });
        assert!(err < TOL, "Fisher SAM eta {eta}: relative error {err:e}");
    }
}

#[test]
fn friendly_sam_subtracts_the_gradient_average() {
    let (sigma, lambda, rho) = (1.0, 0.6, 0.2);
    let cfg = SamConfig { variant: Variant::Friendly, sigma, lambda, rho, ..SamConfig::default() };
    let mut m: Option<Params> = None;
    let err = compare(26, &cfg, 3, |f, _| {
        let g = f.grad_at(&f.p);
        let a = match &m {
            None => {
                m = Some(g.clone());
                g.clone()
            }
            Some(prev) => {
                let a = axpy(&g, -sigma, prev);
                m = Some(axpy(&scale(prev, lambda), 1.0 - lambda, &g));
                a
            }
        };
        let d = f.sharp_grad(&a, rho);
        f.step(&d);
    });
    assert!(err < TOL, "F-SAM: relative error {err:e}");
}

#[test]
fn esam_selects_the_sharpest_examples_for_the_second_pass() {
    let (rho, gamma) = (0.3, 0.5);
    let cfg = SamConfig { variant: Variant::Esam, beta: 1.0, gamma, rho, ..SamConfig::default() };
    let err = compare(27, &cfg, 2, |f, _| {
        let g = f.grad_at(&f.p);
        let before = f.losses_at(&f.p);
        let w_e = axpy(&f.p, rho / all_norm(&g), &g);
        let after = f.losses_at(&w_e);
        let mut order: Vec<usize> = (0..f.y.len()).collect();
        order.sort_by(|&a, &b| (after[b] - before[b]).total_cmp(&(after[a] - before[a])));
        let mut keep: Vec<usize> = order[..(gamma * f.y.len() as f64).round() as usize].to_vec();
        keep.sort_unstable();
        let d_in = f.r.d_in;
        let xs: Vec<f64> = keep.iter().flat_map(|&i| f.x[i * d_in..(i + 1) * d_in].to_vec()).collect();
        let ys: Vec<usize> = keep.iter().map(|&i| f.y[i]).collect();
        let d = f.r.with_params(&w_e).loss_grad(&xs, &ys, 0.0).1;
        f.step(&d);
    });
    assert!(err < TOL, "ESAM: relative error {err:e}");
}

#[test]
fn perturbation_scopes_sam_on_prefixes_and_asam_weights() {
    let rho = 0.2;
    // Only fc2 perturbed: e = ρ·g_fc2/‖g_fc2‖, every parameter updated with the gradient at w + e.
    let cfg = SamConfig { perturb: Some(PerturbScope::Prefixes(vec!["fc2".into()])), rho, ..SamConfig::default() };
    let err = compare(28, &cfg, 2, |f, _| {
        let g = f.grad_at(&f.p);
        let mask = [false, false, true, true];
        let n = norm(&g, &mask);
        let e: Params =
            g.iter().zip(mask).map(|(t, m)| t.iter().map(|v| if m { rho * v / n } else { 0.0 }).collect()).collect();
        let d = f.grad_at(&axpy(&f.p, 1.0, &e));
        f.step(&d);
    });
    assert!(err < TOL, "perturb [fc2]: relative error {err:e}");
    // ASAM with the authors' scope: T = |w| + η on weights, 1 on biases.
    let eta = 0.01;
    let cfg = SamConfig {
        adaptive: true,
        asam_scope: samhost::train::AsamScope::Weights,
        eta: Some(eta),
        rho: 1.0,
        ..SamConfig::default()
    };
    let err = compare(29, &cfg, 2, |f, _| {
        let g = f.grad_at(&f.p);
        let is_weight = [false, true, false, true];
        let t: Params =
            f.p.iter()
                .zip(is_weight)
                .map(|(w, wt)| w.iter().map(|w| if wt { w.abs() + eta } else { 1.0 }).collect())
                .collect();
        let tg: Params = t.iter().zip(&g).map(|(t, g)| t.iter().zip(g).map(|(t, g)| t * g).collect()).collect();
        let n = all_norm(&tg);
        let e: Params = t.iter().zip(&tg).map(|(t, tg)| t.iter().zip(tg).map(|(t, x)| t * x / n).collect()).collect();
        let d = f.grad_at(&axpy(&f.p, 1.0, &e));
        f.step(&d);
    });
    assert!(err < TOL, "ASAM weights scope: relative error {err:e}");
}

/// The variants' state lives with the optimizer: saved and loaded with it, a run continued from
/// the saved state equals one that never stopped.
#[test]
fn variant_state_round_trips_through_the_optimizer_state() {
    let r = reference_mlp(30);
    let (_, _, xt, yt) = batch(31, 12, r.d_in, r.d_out);
    for cfg in [
        SamConfig { variant: Variant::Looksam, k: 3, ..SamConfig::default() },
        SamConfig { variant: Variant::Friendly, ..SamConfig::default() },
        SamConfig { every: Some(3), ..SamConfig::default() },
    ] {
        let (a, b) = (samhost_mlp(&r), samhost_mlp(&r));
        let mut oa = sgd(LR, MOMENTUM, false, 0.0);
        let mut ob = sgd(LR, MOMENTUM, false, 0.0);
        for _ in 0..2 {
            sam_step(&a, &mut oa, &xt, &yt, &LossFn::default(), &cfg).unwrap();
            sam_step(&b, &mut ob, &xt, &yt, &LossFn::default(), &cfg).unwrap();
        }
        let saved = ob.state().unwrap();
        assert!(saved.contains_key("sam.steps"), "{:?}: the step counter is saved", cfg.variant);
        let mut oc = sgd(LR, MOMENTUM, false, 0.0);
        oc.load_state(&saved).unwrap();
        for _ in 0..3 {
            sam_step(&a, &mut oa, &xt, &yt, &LossFn::default(), &cfg).unwrap();
            sam_step(&b, &mut oc, &xt, &yt, &LossFn::default(), &cfg).unwrap();
        }
        assert_eq!(weights(&a), weights(&b), "{:?}: resumed from the saved state", cfg.variant);
    }
}

#[test]
fn bad_variant_settings_are_errors_that_name_the_option() {
    let r = reference_mlp(32);
    let (_, _, xt, yt) = batch(33, 12, r.d_in, r.d_out);
    let model = samhost_mlp(&r);
    let mut opt = sgd(LR, MOMENTUM, false, 0.0);
    for (cfg, needle) in [
        (SamConfig { k: 0, ..SamConfig::default() }, "k must be"),
        (SamConfig { beta: 0.0, variant: Variant::Esam, ..SamConfig::default() }, "beta"),
        (SamConfig { rho_max: Some(0.1), ..SamConfig::default() }, "rho_max and rho_min"),
        (SamConfig { m_sharpness: Some(4), variant: Variant::Looksam, ..SamConfig::default() }, "m_sharpness"),
        (SamConfig { perturb: Some(PerturbScope::Named("bn".into())), ..SamConfig::default() }, "perturb"),
        (SamConfig { perturb: Some(PerturbScope::Prefixes(vec!["nope".into()])), ..SamConfig::default() }, "scope"),
    ] {
        let e = sam_step(&model, &mut opt, &xt, &yt, &LossFn::default(), &cfg).unwrap_err();
        assert!(format!("{e:#}").contains(needle), "{needle}: {e:#}");
    }
}

/// Gradient accumulation: the step over micro-batches equals the step over their union (a model
/// without BatchNorm), for SAM, GSAM and the plain step, to 1e-5 relative.
#[test]
fn accumulated_micro_batches_equal_the_whole_batch() {
    use samhost::train::{sam_step_accumulated, train_step, train_step_accumulated};
    let r = reference_mlp(40);
    let (_, _, xt, yt) = batch(41, 12, r.d_in, r.d_out);
    let micro: Vec<_> = [(0, 5), (5, 4), (9, 3)]
        .iter()
        .map(|&(s, n)| (xt.narrow(0, s, n).unwrap(), yt.narrow(0, s, n).unwrap()))
        .collect();
    for cfg in [
        SamConfig { rho: 0.2, ..SamConfig::default() },
        SamConfig { variant: Variant::Gsam, alpha: Some(0.3), rho: 0.2, ..SamConfig::default() },
        SamConfig { variant: Variant::Looksam, k: 2, ..SamConfig::default() },
    ] {
        let (a, b) = (samhost_mlp(&r), samhost_mlp(&r));
        let (mut oa, mut ob) = (sgd(LR, MOMENTUM, false, 0.0), sgd(LR, MOMENTUM, false, 0.0));
        for _ in 0..3 {
            let sa = sam_step(&a, &mut oa, &xt, &yt, &LossFn::default(), &cfg).unwrap();
            let sb = sam_step_accumulated(&b, &mut ob, &micro, &LossFn::default(), &cfg).unwrap();
            assert!((sa.loss - sb.loss).abs() < 1e-5 * sa.loss, "{:?}: loss {} vs {}", cfg.variant, sa.loss, sb.loss);
            assert!((sa.accuracy - sb.accuracy).abs() < 1e-12);
        }
        let err = rel_err(&weights(&b), &weights(&a));
        assert!(err < TOL, "{:?} accumulated: relative error {err:e}", cfg.variant);
    }
    let (a, b) = (samhost_mlp(&r), samhost_mlp(&r));
    let (mut oa, mut ob) = (sgd(LR, MOMENTUM, false, 0.0), sgd(LR, MOMENTUM, false, 0.0));
    train_step(&a, &mut oa, &xt, &yt, &LossFn::default(), None).unwrap();
    train_step_accumulated(&b, &mut ob, &micro, &LossFn::default(), None).unwrap();
    let err = rel_err(&weights(&b), &weights(&a));
    assert!(err < TOL, "train_step accumulated: relative error {err:e}");
    let esam = SamConfig { variant: Variant::Esam, ..SamConfig::default() };
    let e = sam_step_accumulated(&b, &mut ob, &micro, &LossFn::default(), &esam).unwrap_err();
    assert!(format!("{e:#}").contains("esam"), "{e:#}");
}

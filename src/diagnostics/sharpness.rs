//! Adaptive sharpness (Andriushchenko et al., ICML 2023): the mean over batches of size `m` of
//! `L_B(w + δ) − L_B(w)`, with `δ` in the ball `‖δ ⊘ c‖_p ≤ ρ`, `c = |w|` (adaptive) or 1.
//! Worst case: `δ` found by projected gradient ascent in the ball (APGD-style: a random start,
//! steps of size `2ρ` along the normalized gradient or its sign, momentum 0.75, the step halved
//! when the loss stopped rising, the best point kept). Average case: `δ = ρ·c ⊙ z`, z ~ N(0, 1),
//! averaged over `steps` draws.

use super::{loss_at, loss_grad, Data};
use crate::models::Model;
use crate::rng::HostRng;
use crate::train::{LossFn, TensorSet};
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::Deserialize;

/// Worst or average case.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// The largest loss increase in the ball.
    #[default]
    Worst,
    /// The mean increase under Gaussian noise scaled by `c`.
    Average,
}

/// The ball's norm.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// ‖·‖₂
    #[default]
    L2,
    /// ‖·‖∞
    Linf,
}

/// Options of `adaptive_sharpness`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// The radius ρ.
    pub rho: f64,
    /// Worst or average case.
    pub kind: Kind,
    /// `c = |w|` (true) or 1.
    pub adaptive: bool,
    /// The ball's norm.
    pub norm: Norm,
    /// Ascent steps (worst case) or noise draws (average case).
    pub steps: usize,
    /// Examples per batch of the mean (0: each batch of the data as given).
    pub m: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self { rho: 0.1, kind: Kind::Worst, adaptive: true, norm: Norm::L2, steps: 20, m: 0 }
    }
}

/// The sharpness and its per-batch values.
pub struct Sharpness {
    /// The mean over batches of the loss increase.
    pub sharpness: f64,
    /// Per batch.
    pub per_batch: Vec<f64>,
    /// The mean loss at `w`.
    pub loss: f64,
}

/// Splits `data` into batches of `m` examples (0: as given).
fn rebatch(data: &Data, m: usize) -> Result<Vec<(Tensor, Tensor)>> {
    if m == 0 {
        return Ok(data.to_vec());
    }
    let mut out = Vec::new();
    for (x, y) in data {
        let n = x.dim(0)?;
        let mut s = 0;
        while s < n {
            let k = m.min(n - s);
            out.push((x.narrow(0, s, k)?, y.narrow(0, s, k)?));
            s += k;
        }
    }
    Ok(out)
}

/// The projection of `u` (in the scaled coordinates δ ⊘ c) onto the ball.
fn project(u: &TensorSet, rho: f64, norm: Norm) -> Result<TensorSet> {
    match norm {
        Norm::L2 => {
            let n = u.norm()?;
            if n <= rho {
                Ok(u.clone())
            } else {
                u.scale(rho / n)
            }
        }
        Norm::Linf => u.map(|_, t| Ok(t.clamp(-rho, rho)?)),
    }
}

/// The ascent direction in scaled coordinates: the normalized gradient (ℓ2) or its sign (ℓ∞).
fn direction(g: &TensorSet, norm: Norm) -> Result<TensorSet> {
    match norm {
        Norm::L2 => super::normalized(g),
        Norm::Linf => g.sign(),
    }
}

/// The loss at `w + c ⊙ u`.
fn loss_with(model: &Model, batch: &Data, loss_fn: &LossFn, c: &TensorSet, u: &TensorSet) -> Result<f64> {
    model.perturb(&c.zip(u, crate::train::Elementwise::Mul)?, 1.0)?;
    let l = loss_at(model, batch, loss_fn);
    model.restore()?;
    Ok(l?.0)
}

/// The worst-case increase on one batch.
fn worst(
    model: &Model,
    batch: &Data,
    loss_fn: &LossFn,
    c: &TensorSet,
    o: &Options,
    rng: &HostRng,
    base: f64,
) -> Result<f64> {
    // A random start inside the ball (at w the gradient may vanish by symmetry).
    let start = super::gaussian_like(c, rng)?;
    let mut u = project(&super::normalized(&start)?.scale(o.rho * 0.5)?, o.rho, o.norm)?;
    let mut prev = u.clone();
    let mut best = loss_with(model, batch, loss_fn, c, &u)?;
    let mut best_u = u.clone();
    let mut eta = 2.0 * o.rho;
    let mut last_check = best;
    let check_every = (o.steps / 5).max(2);
    for t in 0..o.steps {
        model.perturb(&c.zip(&u, crate::train::Elementwise::Mul)?, 1.0)?;
        let r = loss_grad(model, batch, loss_fn);
        model.restore()?;
        let (_, _, g) = r?;
        // The gradient in scaled coordinates: ∂L/∂u = c ⊙ ∂L/∂δ.
        let gu = g.zip(c, crate::train::Elementwise::Mul)?;
        let z = project(&u.axpy(eta, &direction(&gu, o.norm)?)?, o.rho, o.norm)?;
        let alpha = if t == 0 { 1.0 } else { 0.75 };
        // APGD's momentum step: x + α(z − x) + (1 − α)(x − x_prev), projected.
        let next =
            project(&u.axpy(alpha, &z.axpy(-1.0, &u)?)?.axpy(1.0 - alpha, &u.axpy(-1.0, &prev)?)?, o.rho, o.norm)?;
        prev = u;
        u = next;
        let l = loss_with(model, batch, loss_fn, c, &u)?;
        if l > best {
            best = l;
            best_u = u.clone();
        }
        if (t + 1) % check_every == 0 {
            if best <= last_check {
                eta *= 0.5;
                u = best_u.clone();
            }
            last_check = best;
        }
    }
    Ok(best - base)
}

/// Adaptive sharpness (see the module documentation).
pub fn adaptive_sharpness(
    model: &Model,
    data: &Data,
    loss_fn: &LossFn,
    o: &Options,
    rng: &HostRng,
) -> Result<Sharpness> {
    if !(o.rho >= 0.0 && o.rho.is_finite()) {
        bail!("adaptive_sharpness: rho must be a finite number >= 0, got {}", o.rho);
    }
    if o.steps == 0 {
        bail!("adaptive_sharpness: steps must be >= 1");
    }
    let w = TensorSet::snapshot(&model.params().trainable())?;
    if w.is_empty() {
        bail!("adaptive_sharpness: the model has no trainable parameters");
    }
    let c = if o.adaptive { w.abs()? } else { w.zeros_like()?.scalar(crate::train::Elementwise::Add, 1.0, false)? };
    let batches = rebatch(data, o.m)?;
    if batches.is_empty() {
        bail!("adaptive_sharpness: no data");
    }
    let (mut per_batch, mut losses) = (Vec::new(), Vec::new());
    for b in &batches {
        let one = std::slice::from_ref(b);
        let base = loss_at(model, one, loss_fn)?.0;
        let s = match o.kind {
            Kind::Worst => worst(model, one, loss_fn, &c, o, rng, base)?,
            Kind::Average => {
                let mut sum = 0.0;
                for _ in 0..o.steps {
                    let z = super::gaussian_like(&c, rng)?.scale(o.rho)?;
                    sum += loss_with(model, one, loss_fn, &c, &z)? - base;
                }
                sum / o.steps as f64
            }
        };
        per_batch.push(s);
        losses.push(base);
    }
    let k = per_batch.len() as f64;
    Ok(Sharpness { sharpness: per_batch.iter().sum::<f64>() / k, per_batch, loss: losses.iter().sum::<f64>() / k })
}

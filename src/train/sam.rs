//! Sharpness-Aware Minimization (Foret et al., ICLR 2021) and its variants, on candle autograd.
//!
//! One SAM step at weights `w` on a batch:
//! 1. `g = ∇L(w)` (training mode: BatchNorm uses and updates batch statistics);
//! 2. the ascent step `e = ρ·g / (‖g‖₂ + ε)`, the norm taken over all trainable parameters
//!    together; adaptive SAM (Kwon et al., 2021) uses `e = ρ·T²g / (‖Tg‖₂ + ε)` with
//!    `T = |w| + η`, applied to weights and biases alike;
//! 3. `g_SAM = ∇L(w + e)`, with BatchNorm running statistics restored afterwards, so they come
//!    from the first pass only (as the paper's code does);
//! 4. the weights are restored to `w` and the base optimizer steps with `g_SAM`.
//!
//! With m-sharpness the batch is split into chunks of `m` examples; each chunk gets its own
//! perturbation and the chunk gradients `g_SAM` are averaged.

use super::grads::{clip_global_norm, global_norm, gradients};
use super::loss::LossFn;
use super::metrics::correct;
use super::optim::Optimizer;
use crate::models::Model;
use crate::ops::sum_squares::sum_squares;
use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use serde::Deserialize;

/// Settings of a SAM step.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamConfig {
    /// Radius of the neighbourhood (ρ). 0 gives exactly the base optimizer's step.
    pub rho: f64,
    /// Adaptive SAM: scale the perturbation by `T = |w| + eta` (weights and biases alike).
    pub adaptive: bool,
    /// The ASAM offset η.
    pub eta: f64,
    /// Split the batch into chunks of this many examples, one perturbation each (the paper's m).
    pub m_sharpness: Option<usize>,
    /// Clip the SAM gradient to this global norm before the base step.
    pub grad_clip: Option<f64>,
    /// Added to the norm so that a zero gradient gives a zero perturbation, not NaN.
    pub eps: f64,
}

impl Default for SamConfig {
    fn default() -> Self {
        Self { rho: 0.05, adaptive: false, eta: 0.01, m_sharpness: None, grad_clip: None, eps: 1e-12 }
    }
}

impl SamConfig {
    /// Rejects settings that have no meaning.
    pub fn validate(&self) -> Result<()> {
        if !crate::train::is_nonneg(self.rho) || !self.rho.is_finite() {
            bail!("rho must be a finite number >= 0, got {}", self.rho);
        }
        if !crate::train::is_nonneg(self.eta) {
            bail!("eta must be >= 0, got {}", self.eta);
        }
        if self.m_sharpness == Some(0) {
            bail!("m_sharpness must be >= 1");
        }
        if let Some(c) = self.grad_clip {
            if !crate::train::is_positive(c) {
                bail!("grad_clip must be > 0, got {c}");
            }
        }
        Ok(())
    }
}

/// What one training step measured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    /// Loss at `w` (first pass).
    pub loss: f64,
    /// Loss at `w + e` (second pass); equals `loss` for a plain step.
    pub sharp_loss: f64,
    /// Global L2 norm of the first gradient (mean over chunks with m-sharpness).
    pub grad_norm: f64,
    /// Batch accuracy of the first pass (NaN when the logits are not `[N, K]`).
    pub accuracy: f64,
}

/// The splits of a batch of `n` examples into chunks of `m`.
fn chunk_ranges(n: usize, m: Option<usize>) -> Result<Vec<(usize, usize)>> {
    match m {
        None => Ok(vec![(0, n)]),
        Some(m) if m >= n => Ok(vec![(0, n)]),
        Some(m) => {
            if !n.is_multiple_of(m) {
                bail!("m_sharpness {m} does not divide the batch size {n}");
            }
            Ok((0..n / m).map(|i| (i * m, m)).collect())
        }
    }
}

struct Pass {
    loss: Tensor,
    grads: Vec<Tensor>,
    correct: Option<usize>,
}

fn forward_backward(model: &Model, params: &[(String, Var)], x: &Tensor, y: &Tensor, loss_fn: &LossFn) -> Result<Pass> {
    let logits = model.forward_t(x, true).context("forward pass")?;
    let loss = loss_fn.compute(&logits, y)?;
    let grads = gradients(&loss, params)?;
    let correct = match (logits.dims(), y.dims()) {
        ([n, _], [m]) if n == m => Some(correct(&logits, y)?),
        _ => None,
    };
    Ok(Pass { loss: loss.detach(), grads, correct })
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

/// `T = |w| + η` for adaptive SAM.
fn asam_scale(p: &Var, eta: f64) -> Result<Tensor> {
    Ok(p.as_tensor().abs()?.affine(1.0, eta)?)
}

/// Moves every parameter to `w + e` in place and returns copies of the original weights (`g_norm`
/// is `‖g‖₂`, already computed for the statistics). The ascent step `e` is formed one parameter
/// at a time, so besides the weight copies only one
/// parameter-sized temporary is alive at once.
fn perturb(params: &[(String, Var)], g: &[Tensor], g_norm: f64, cfg: &SamConfig) -> Result<Vec<Tensor>> {
    let norm = if cfg.adaptive {
        let mut sq = 0.0;
        for ((_, p), g) in params.iter().zip(g) {
            sq += sum_squares(&[(asam_scale(p, cfg.eta)? * g.to_dtype(p.dtype())?)?])?;
        }
        sq.sqrt()
    } else {
        g_norm
    };
    let scale = cfg.rho / (norm + cfg.eps);
    let mut saved = Vec::with_capacity(params.len());
    for ((_, p), g) in params.iter().zip(g) {
        if !cfg.adaptive && crate::ops::inplace::applies(&[p.as_tensor(), g]) {
            saved.push(crate::ops::inplace::axpy_saving(p.as_tensor(), g, scale)?);
            continue;
        }
        let w = p.as_tensor().copy()?;
        let g = g.to_dtype(p.dtype())?;
        let e = if cfg.adaptive {
            (asam_scale(p, cfg.eta)?.sqr()? * g)?.affine(scale, 0.0)?
        } else {
            g.affine(scale, 0.0)?
        };
        p.set(&(&w + e)?)?;
        saved.push(w);
    }
    Ok(saved)
}

/// One SAM step: updates `model`'s trainable parameters with `opt` and returns the statistics.
pub fn sam_step(
    model: &Model,
    opt: &mut dyn Optimizer,
    images: &Tensor,
    labels: &Tensor,
    loss_fn: &LossFn,
    cfg: &SamConfig,
) -> Result<StepStats> {
    cfg.validate()?;
    let params = model.params().trainable();
    if params.is_empty() {
        bail!("the model has no trainable parameters (all frozen?)");
    }
    let buffers = model.params().buffers();
    let n = images.dim(0)?;
    if labels.dim(0)? != n {
        bail!("batch: {} images but {} labels", n, labels.dim(0)?);
    }
    let chunks = chunk_ranges(n, cfg.m_sharpness)?;
    let k = chunks.len() as f64;
    let (mut loss_sum, mut sharp_sum, mut norm_sum, mut hits, mut counted) = (0.0, 0.0, 0.0, 0usize, true);
    let mut sam_grads: Option<Vec<Tensor>> = None;
    for &(start, len) in &chunks {
        let (x, y) = if chunks.len() == 1 {
            (images.clone(), labels.clone())
        } else {
            (images.narrow(0, start, len)?, labels.narrow(0, start, len)?)
        };
        let first = forward_backward(model, &params, &x, &y, loss_fn)?;
        loss_sum += scalar(&first.loss)?;
        let g_norm = sum_squares(&first.grads)?.sqrt();
        norm_sum += g_norm;
        match first.correct {
            Some(c) => hits += c,
            None => counted = false,
        }
        // Perturb in place, keeping one copy of the weights; the first gradients go.
        let saved_w = perturb(&params, &first.grads, g_norm, cfg)?;
        drop(first);
        let saved_buffers: Vec<Tensor> =
            buffers.iter().map(|(_, b)| b.as_tensor().copy()).collect::<candle_core::Result<_>>()?;
        let second = forward_backward(model, &params, &x, &y, loss_fn);
        // Restore weights and running statistics whatever the second pass did.
        for ((_, p), w) in params.iter().zip(&saved_w) {
            if crate::ops::inplace::applies(&[p.as_tensor(), w]) {
                crate::ops::inplace::copy_into(p.as_tensor(), w)?;
            } else {
                p.set(w)?;
            }
        }
        for ((_, b), s) in buffers.iter().zip(&saved_buffers) {
            b.set(s)?;
        }
        let second = second.context("second (perturbed) pass")?;
        sharp_sum += scalar(&second.loss)?;
        sam_grads = Some(match sam_grads {
            None => second.grads,
            Some(acc) => acc.iter().zip(&second.grads).map(|(a, g)| a + g).collect::<candle_core::Result<_>>()?,
        });
    }
    let mut grads = sam_grads.context("empty batch")?;
    if chunks.len() > 1 {
        grads = grads.into_iter().map(|g| g.affine(1.0 / k, 0.0)).collect::<candle_core::Result<_>>()?;
    }
    if let Some(c) = cfg.grad_clip {
        grads = clip_global_norm(grads, c)?;
    }
    opt.step(&params, &grads)?;
    Ok(StepStats {
        loss: loss_sum / k,
        sharp_loss: sharp_sum / k,
        grad_norm: norm_sum / k,
        accuracy: if counted && n > 0 { hits as f64 / n as f64 } else { f64::NAN },
    })
}

/// One plain step (the baseline): gradient at `w`, optional clipping, base optimizer step.
pub fn train_step(
    model: &Model,
    opt: &mut dyn Optimizer,
    images: &Tensor,
    labels: &Tensor,
    loss_fn: &LossFn,
    grad_clip: Option<f64>,
) -> Result<StepStats> {
    let params = model.params().trainable();
    if params.is_empty() {
        bail!("the model has no trainable parameters (all frozen?)");
    }
    let n = images.dim(0)?;
    if labels.dim(0)? != n {
        bail!("batch: {} images but {} labels", n, labels.dim(0)?);
    }
    let pass = forward_backward(model, &params, images, labels, loss_fn)?;
    let loss = scalar(&pass.loss)?;
    let grad_norm = global_norm(&pass.grads)?;
    let mut grads = pass.grads;
    if let Some(c) = grad_clip {
        if !crate::train::is_positive(c) {
            bail!("grad_clip must be > 0, got {c}");
        }
        grads = clip_global_norm(grads, c)?;
    }
    opt.step(&params, &grads)?;
    Ok(StepStats {
        loss,
        sharp_loss: loss,
        grad_norm,
        accuracy: match pass.correct {
            Some(c) if n > 0 => c as f64 / n as f64,
            _ => f64::NAN,
        },
    })
}

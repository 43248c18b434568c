//! Sharpness diagnostics on a trained model: the Hessian's top eigenvalues, trace and spectral
//! density (as PyHessian computes them), adaptive sharpness (Andriushchenko et al., ICML 2023),
//! and loss landscapes along filter-normalized random directions and between two models (as
//! tomgoldstein/loss-landscape). Everything is evaluated in evaluation mode (BatchNorm's running
//! statistics, no dropout) over a list of batches, averaged with the batches' sizes as weights.
//!
//! The Hessian-vector product is a central difference of gradients ([`hvp`]): candle's
//! second-order gradients need `CANDLE_GRAD_DO_NOT_DETACH` set for the whole process, which turns
//! off every fused CPU op.

pub mod eigen;
pub mod hessian;
pub mod hvp;
pub mod landscape;
pub mod report;
pub mod sharpness;

use crate::models::Model;
use crate::rng::HostRng;
use crate::train::{GradOptions, LossFn, TensorSet};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// The data a measure runs over: batches of (images, labels).
pub type Data = [(Tensor, Tensor)];

/// Loss, accuracy and gradient of the trainable parameters over `data`, in evaluation mode, the
/// batches weighted by their sizes.
pub fn loss_grad(model: &Model, data: &Data, loss_fn: &LossFn) -> Result<(f64, f64, TensorSet)> {
    if data.is_empty() {
        bail!("no data to measure on");
    }
    let params = model.params().trainable();
    if params.is_empty() {
        bail!("the model has no trainable parameters (all frozen?)");
    }
    let opts = GradOptions { update_bn: false, per_example: false, train: false };
    let out = crate::train::grads::grad_micro(model, &params, data, loss_fn, opts)?;
    let acc = out.accuracy();
    Ok((out.loss, acc, out.grads))
}

/// Loss and accuracy over `data` in evaluation mode (no gradient), batches weighted by size.
pub fn loss_at(model: &Model, data: &Data, loss_fn: &LossFn) -> Result<(f64, f64)> {
    if data.is_empty() {
        bail!("no data to measure on");
    }
    let (mut loss, mut hits, mut n, mut counted) = (0.0, 0usize, 0usize, true);
    let total: usize = data.iter().map(|(x, _)| x.dim(0)).sum::<candle_core::Result<usize>>()?;
    for (x, y) in data {
        let logits = model.forward_t(x, false)?.detach();
        let l = loss_fn.compute(&logits, y)?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let k = x.dim(0)?;
        loss += l * k as f64 / total.max(1) as f64;
        match (logits.dims(), y.dims()) {
            ([a, _], [b]) if a == b => hits += crate::train::metrics::correct(&logits, y)?,
            _ => counted = false,
        }
        n += k;
    }
    Ok((loss, if counted && n > 0 { hits as f64 / n as f64 } else { f64::NAN }))
}

/// A vector over the same names and shapes as `like`, each element drawn N(0, 1).
pub fn gaussian_like(like: &TensorSet, rng: &HostRng) -> Result<TensorSet> {
    like.map(|_, t| {
        Ok(Tensor::from_vec(rng.normal(t.elem_count(), 0.0, 1.0), t.shape(), t.device())?.to_dtype(t.dtype())?)
    })
}

/// A vector over the same names and shapes as `like`, each element ±1 with equal probability
/// (Rademacher).
pub fn rademacher_like(like: &TensorSet, rng: &HostRng) -> Result<TensorSet> {
    like.map(|_, t| {
        let v: Vec<f32> =
            rng.uniform(t.elem_count(), 0.0, 1.0).into_iter().map(|u| if u < 0.5 { -1.0 } else { 1.0 }).collect();
        Ok(Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(t.dtype())?)
    })
}

/// `v / ‖v‖` (a zero vector stays zero).
pub fn normalized(v: &TensorSet) -> Result<TensorSet> {
    let n = v.norm()?;
    if n == 0.0 {
        return Ok(v.clone());
    }
    v.scale(1.0 / n)
}

//! Gradients as plain vectors aligned with a parameter list, and the norms SAM needs (the sum of
//! squares itself is a kernel: [`crate::ops::sum_squares`]).

use crate::ops::sum_squares::sum_squares;
use anyhow::Result;
use candle_core::{Tensor, Var};

/// The gradient of `loss` with respect to each of `params` (zeros where a parameter does not
/// reach the loss). The custom ops hand the gradients of variables over directly
/// ([`crate::ops::param_grads`]); candle's store holds the rest, and a parameter reached both
/// ways gets the sum.
pub fn gradients(loss: &Tensor, params: &[(String, Var)]) -> Result<Vec<Tensor>> {
    let (store, mut direct) = crate::ops::param_grads::capture(|| loss.backward())?;
    params
        .iter()
        .map(|(_, v)| {
            let t = v.as_tensor();
            Ok(match (store.get(t), direct.remove(&t.id())) {
                (Some(a), Some(b)) => (a + b)?,
                (Some(g), None) => g.clone(),
                (None, Some(g)) => g,
                (None, None) => t.zeros_like()?,
            })
        })
        .collect()
}

/// The global L2 norm over all tensors together.
pub fn global_norm(tensors: &[Tensor]) -> Result<f64> {
    Ok(sum_squares(tensors)?.sqrt())
}

/// Scales every tensor so that their global norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when the norm exceeds it).
pub fn clip_global_norm(grads: Vec<Tensor>, max_norm: f64) -> Result<Vec<Tensor>> {
    let norm = global_norm(&grads)?;
    if norm <= max_norm {
        return Ok(grads);
    }
    let scale = max_norm / (norm + 1e-6);
    grads.into_iter().map(|g| Ok(g.affine(scale, 0.0)?)).collect()
}

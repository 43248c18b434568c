//! Gradients as plain vectors aligned with a parameter list, and the norms SAM needs.

use anyhow::Result;
use candle_core::{DType, Tensor, Var};

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

/// Sum of squares of every element of every tensor, returned as f64: one pass over each f32 CPU
/// tensor (sums of 1,024 squares in f32, added in f64, in a fixed order), candle's ops in f32 on
/// the device for the rest.
pub fn sum_squares(tensors: &[Tensor]) -> Result<f64> {
    let mut host = 0f64;
    let mut total: Option<Tensor> = None;
    for t in tensors {
        if t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() {
            let (storage, layout) = t.storage_and_layout();
            host += sum_squares_f32(crate::ops::cpu::slice_of(&storage, layout, "gradient")?);
            continue;
        }
        let s = t.to_dtype(DType::F32)?.sqr()?.sum_all()?;
        total = Some(match total {
            None => s,
            Some(acc) => (acc + s)?,
        });
    }
    Ok(host
        + match total {
            None => 0.0,
            Some(t) => t.to_scalar::<f32>()? as f64,
        })
}

/// `Σ v²` over a slice, in parallel blocks whose partial sums are added in order.
fn sum_squares_f32(v: &[f32]) -> f64 {
    use rayon::prelude::*;
    let block = |c: &[f32]| -> f64 {
        c.chunks(1024)
            .map(|c| {
                let mut acc = [0f32; 8];
                let mut lanes = c.chunks_exact(8);
                for l in &mut lanes {
                    acc.iter_mut().zip(l).for_each(|(a, &x)| *a += x * x);
                }
                let tail: f32 = lanes.remainder().iter().map(|x| x * x).sum();
                (acc.iter().sum::<f32>() + tail) as f64
            })
            .sum()
    };
    let parts: Vec<f64> = v.par_chunks(1 << 16).map(block).collect();
    parts.into_iter().sum()
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

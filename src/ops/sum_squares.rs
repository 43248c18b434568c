//! The sum of squares of many tensors in f64, one pass over each: SAM's gradient norm.

use anyhow::Result;
use candle_core::{DType, Tensor};

/// Sum of squares of every element of every tensor, returned as f64: one pass over each f32 CPU
/// tensor (sums of 1,024 squares in f32, added in f64, in a fixed order), candle's ops in f32 on
/// the device for the rest.
pub fn sum_squares(tensors: &[Tensor]) -> Result<f64> {
    let mut host = 0f64;
    let mut total: Option<Tensor> = None;
    for t in tensors {
        if t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous() {
            let (storage, layout) = t.storage_and_layout();
            host += sum_squares_f32(super::cpu::slice_of(&storage, layout, "gradient")?);
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

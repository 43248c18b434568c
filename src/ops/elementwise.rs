//! Element-wise maps and dot products over whole tensors, in parallel blocks on the CPU: the
//! arithmetic of a `TensorSet` (one pass per operation, no temporaries). The fast path is for
//! contiguous f32 CPU tensors ([`applies`]); callers fall back to candle's ops elsewhere.

use super::cpu::slice_of;
use candle_core::{Result, Tensor};
use rayon::prelude::*;

/// Elements per parallel task.
const BLOCK: usize = 1 << 15;

pub use super::inplace::applies;

/// `f(x)` for every element of `x` (CPU, f32, contiguous: check with [`applies`]).
pub fn map1(x: &Tensor, f: impl Fn(f32) -> f32 + Sync) -> Result<Tensor> {
    let (s, l) = x.storage_and_layout();
    let xs = slice_of::<f32>(&s, l, "map")?;
    let mut out = vec![0f32; xs.len()];
    out.par_chunks_mut(BLOCK).zip(xs.par_chunks(BLOCK)).for_each(|(o, x)| {
        o.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x));
    });
    Tensor::from_vec(out, x.shape(), x.device())
}

/// `f(a, b)` for matching elements of `a` and `b`, which have the same shape (CPU, f32,
/// contiguous: check with [`applies`]).
pub fn map2(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32 + Sync) -> Result<Tensor> {
    if a.shape() != b.shape() {
        candle_core::bail!("element-wise: shapes {:?} and {:?} differ", a.dims(), b.dims());
    }
    let ((sa, la), (sb, lb)) = (a.storage_and_layout(), b.storage_and_layout());
    let (xa, xb) = (slice_of::<f32>(&sa, la, "map")?, slice_of::<f32>(&sb, lb, "map")?);
    let mut out = vec![0f32; xa.len()];
    out.par_chunks_mut(BLOCK).zip(xa.par_chunks(BLOCK).zip(xb.par_chunks(BLOCK))).for_each(|(o, (a, b))| {
        o.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&a, &b))| *o = f(a, b));
    });
    Tensor::from_vec(out, a.shape(), a.device())
}

/// `Σ a·b` over matching elements, in f64: sums of 1,024 products in eight f32 lanes, added in
/// f64 in a fixed order. Any device and dtype (elsewhere than the fast path, in f64 through candle).
pub fn dot(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.shape() != b.shape() {
        candle_core::bail!("dot: shapes {:?} and {:?} differ", a.dims(), b.dims());
    }
    if !applies(&[a, b]) {
        let (a, b) = (a.to_dtype(candle_core::DType::F64)?, b.to_dtype(candle_core::DType::F64)?);
        return (a * b)?.sum_all()?.to_scalar::<f64>();
    }
    let ((sa, la), (sb, lb)) = (a.storage_and_layout(), b.storage_and_layout());
    let (xa, xb) = (slice_of::<f32>(&sa, la, "dot")?, slice_of::<f32>(&sb, lb, "dot")?);
    let block = |(a, b): (&[f32], &[f32])| -> f64 {
        a.chunks(1024)
            .zip(b.chunks(1024))
            .map(|(a, b)| {
                let mut acc = [0f32; 8];
                let (la, lb) = (a.chunks_exact(8), b.chunks_exact(8));
                let tail: f32 = la.remainder().iter().zip(lb.remainder()).map(|(x, y)| x * y).sum();
                for (x, y) in la.zip(lb) {
                    for k in 0..8 {
                        acc[k] += x[k] * y[k];
                    }
                }
                (acc.iter().sum::<f32>() + tail) as f64
            })
            .sum()
    };
    let parts: Vec<f64> = xa.par_chunks(1 << 16).zip(xb.par_chunks(1 << 16)).map(block).collect();
    Ok(parts.into_iter().sum())
}

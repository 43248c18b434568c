//! `y + p` for a parameter `p` broadcast over `y` (a bias, an embedding) on CPU, with a backward
//! pass that sums `p`'s gradient in one contiguous pass.
//!
//! Through candle's ops the gradient of a broadcast operand is a sum over the broadcast
//! dimensions by its generic strided reduction, which took a quarter of the cnn's step (the
//! convolution biases, summed over batch and pixels). Here `y` is seen as `[outer, P, inner]`
//! with `p` holding the `P` middle values, which covers a convolution bias (`[1, C, 1, 1]` over
//! `[N, C, H, W]`), a linear bias (`[N]` over `[M, N]`) and position embeddings (`[1, T, D]` over
//! `[B, T, D]`). Other shapes, devices and dtypes use candle.

use super::cpu::{f32_slice, fused_ok};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `y + p` with `p` (a parameter: a bias, an embedding) broadcast to `y`'s shape. With `y` in
/// bf16/f16 and `p` f32 the sum is taken in f32 and rounded back, so the gradient of `p`, a sum
/// over the broadcast dimensions, accumulates in f32 (a bf16 sum over a batch of feature maps
/// loses most of its digits).
pub fn add_broadcast(y: &Tensor, p: &Tensor) -> Result<Tensor> {
    if y.dtype() != p.dtype() {
        return add_broadcast(&y.to_dtype(p.dtype())?, p)?.to_dtype(y.dtype());
    }
    match block(y.dims(), p.dims()) {
        Some((outer, inner)) if fused_ok(y) && p.dtype() == DType::F32 && p.device().is_cpu() && outer > 0 => {
            y.contiguous()?.apply_op2(&p.contiguous()?, AddBroadcast { inner })
        }
        _ => y.broadcast_add(p),
    }
}

/// `(outer, inner)` when `p` (padded on the left with 1s to `y`'s rank) is 1 everywhere except
/// one contiguous run of dimensions equal to `y`'s there.
fn block(y: &[usize], p: &[usize]) -> Option<(usize, usize)> {
    if p.len() > y.len() || p.is_empty() {
        return None;
    }
    let padded: Vec<usize> = std::iter::repeat_n(1, y.len() - p.len()).chain(p.iter().copied()).collect();
    let first = padded.iter().position(|&d| d != 1).unwrap_or(0);
    let last = padded.iter().rposition(|&d| d != 1).unwrap_or(0);
    if (first..=last).any(|i| padded[i] != y[i]) {
        return None;
    }
    Some((y[..first].iter().product(), y[last + 1..].iter().product()))
}

/// `(y [outer, P, inner], p [P]) -> y + p`.
struct AddBroadcast {
    inner: usize,
}

impl CustomOp2 for AddBroadcast {
    fn name(&self) -> &'static str {
        "samhost-add-broadcast"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, p) = (f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?);
        let inner = self.inner;
        let mut out = y.to_vec();
        out.par_chunks_mut(p.len() * inner).for_each(|block| {
            for (run, &v) in block.chunks_mut(inner).zip(p) {
                run.iter_mut().for_each(|o| *o += v);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, y: &Tensor, p: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = if y.track_op() { Some(grad.clone()) } else { None };
        let dp = if p.track_op() {
            let sums = grad.contiguous()?.apply_op1_no_bwd(&SumBlocks { inner: self.inner, len: p.elem_count() })?;
            Some(sums.reshape(p.shape())?)
        } else {
            None
        };
        Ok((dy, dp))
    }
}

/// The sum of a run: eight f32 lanes (vectorised), then added up in f64.
fn run_sum(run: &[f32]) -> f64 {
    let mut lanes = [0f32; 8];
    let mut chunks = run.chunks_exact(8);
    for c in &mut chunks {
        lanes.iter_mut().zip(c).for_each(|(l, &v)| *l += v);
    }
    lanes.iter().chain(chunks.remainder()).map(|&v| v as f64).sum()
}

/// `g [outer, P, inner] -> [P]`: the sum over `outer` and `inner` (runs of `inner` in f32 lanes,
/// the rest in f64).
struct SumBlocks {
    inner: usize,
    len: usize,
}

impl CustomOp1 for SumBlocks {
    fn name(&self) -> &'static str {
        "samhost-sum-broadcast-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s, l, self.name())?;
        let (inner, len) = (self.inner, self.len);
        let outer = g.len() / (len * inner).max(1);
        // Parallel over ranges of P, each summed over `outer` in order: the same result for any
        // number of threads.
        let chunk = len.div_ceil(4 * rayon::current_num_threads()).max(1);
        let mut sums = vec![0f64; len];
        sums.par_chunks_mut(chunk).enumerate().for_each(|(ci, acc)| {
            let c0 = ci * chunk;
            for o in 0..outer {
                let base = (o * len + c0) * inner;
                for (j, a) in acc.iter_mut().enumerate() {
                    *a += run_sum(&g[base + j * inner..base + (j + 1) * inner]);
                }
            }
        });
        Ok((CpuStorage::F32(sums.into_iter().map(|v| v as f32).collect()), Shape::from(len)))
    }
}

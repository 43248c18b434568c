//! Softmax over the last dimension with an exact backward pass, in parallel blocks of rows.
//! candle's own fused softmax has no backward pass (it cuts the graph silently: see
//! ../shared/STACK.md).
//! The fused path runs for contiguous f32 tensors on the CPU when [`super::cpu::fused_ok`] says
//! so; elsewhere (other devices and dtypes, second-order gradients) elementary candle ops compute
//! the same math.

use super::cpu::has_avx2;
use super::cpu::{f32_slice, fused_ok, grad_f32, rows_per_task, slice_of};
use super::fast_exp::exp_nonpositive;
use super::half::{in_f32, is_half};
use super::lanes::{sum2, LANES};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Softmax over the last dimension (computed in f32 for bf16/f16 inputs).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if is_half(x) {
        return in_f32(x, softmax_last);
    }
    if fused_ok(x) && x.rank() > 0 {
        x.contiguous()?.apply_op1(SoftmaxLast)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

struct SoftmaxLast;

impl CustomOp1 for SoftmaxLast {
    fn name(&self) -> &'static str {
        "fused-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "the input")?;
        let n = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut y = super::buffer::zeroed::<f32>(x.len());
        let task = rows_per_task(n) * n;
        y.par_chunks_mut(task).zip(x.par_chunks(task)).for_each(|(y, x)| {
            y.copy_from_slice(x);
            for row in y.chunks_mut(n) {
                softmax_in_place(row, 1.0);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_f32(grad)?;
        let ((ys, yl), (gs, gl)) = (res.storage_and_layout(), grad.storage_and_layout());
        let (y, g) = (slice_of::<f32>(&ys, yl, "softmax output")?, slice_of::<f32>(&gs, gl, "softmax gradient")?);
        let n = arg.dims().last().copied().unwrap_or(1).max(1);
        let mut dx = super::buffer::zeroed::<f32>(y.len());
        let task = rows_per_task(n) * n;
        dx.par_chunks_mut(task).zip(y.par_chunks(task).zip(g.par_chunks(task))).for_each(|(dx, (y, g))| {
            dx.copy_from_slice(g);
            for (out, yr) in dx.chunks_mut(n).zip(y.chunks(n)) {
                softmax_grad_in_place(out, yr, 1.0);
            }
        });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// The largest element of `x` (NaNs ignored, as `f32::max` does; -inf for an empty row).
#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    lanes.into_iter().chain(rest.iter().copied()).fold(f32::NEG_INFINITY, f32::max)
}

/// `row` replaced by `softmax(scale·row)`, `scale > 0`: the exponentials and their sum in one
/// pass (eight partial sums), then the division.
#[inline(always)]
fn softmax_block(row: &mut [f32], scale: f32) {
    let max = max_of(row);
    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (s, v) in sums.iter_mut().zip(c.iter_mut()) {
            *v = exp_nonpositive((*v - max) * scale);
            *s += *v;
        }
    }
    let mut sum = 0f32;
    for v in chunks.into_remainder() {
        *v = exp_nonpositive((*v - max) * scale);
        sum += *v;
    }
    let inv = 1.0 / (sum + sums.iter().sum::<f32>());
    row.iter_mut().for_each(|v| *v *= inv);
}

/// `g` (the gradient of a softmax's output `p = softmax(scale·x)`, one row) replaced by the
/// gradient of `x`: `scale · p ⊙ (g - Σ p·g)`.
#[inline(always)]
fn softmax_grad_block(g: &mut [f32], p: &[f32], scale: f32) {
    let dot = sum2(g, p, |a, b| a * b);
    g.iter_mut().zip(p).for_each(|(a, &b)| *a = scale * b * (*a - dot));
}

/// The row kernels compiled for AVX2 and FMA, chosen at run time where the CPU has them.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    /// [`super::softmax_block`] in AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_block(row: &mut [f32], scale: f32) {
        super::softmax_block(row, scale)
    }

    /// [`super::softmax_grad_block`] in AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_grad_block(g: &mut [f32], p: &[f32], scale: f32) {
        super::softmax_grad_block(g, p, scale)
    }
}

/// One row replaced by `softmax(scale·row)` (`scale > 0`; the attention op folds its
/// 1/sqrt(d) in here).
pub fn softmax_in_place(row: &mut [f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked).
        return unsafe { avx2::softmax_block(row, scale) };
    }
    softmax_block(row, scale)
}

/// One row of a softmax's output gradient `g` replaced by its input's, for `p = softmax(scale·x)`.
pub fn softmax_grad_in_place(g: &mut [f32], p: &[f32], scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked).
        return unsafe { avx2::softmax_grad_block(g, p, scale) };
    }
    softmax_grad_block(g, p, scale)
}

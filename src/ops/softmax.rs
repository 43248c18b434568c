//! Softmax over the last dimension with an exact backward pass, in parallel blocks of rows.
//! candle's own fused softmax has no backward pass (it cuts the graph silently: see
//! ../shared/STACK.md).
//! The fused path runs for contiguous f32 tensors on the CPU when [`super::cpu::fused_ok`] says
//! so; elsewhere (other devices and dtypes, second-order gradients) elementary candle ops compute
//! the same math.

use super::cpu::{f32_slice, fused_ok, grad_f32, rows_per_task, slice_of};
use super::fast_exp::exp_nonpositive;
use super::half::{in_f32, is_half};
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
        let mut y = vec![0f32; x.len()];
        let task = rows_per_task(n) * n;
        y.par_chunks_mut(task).zip(x.par_chunks(task)).for_each(|(y, x)| {
            for (row, out) in x.chunks(n).zip(y.chunks_mut(n)) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for (o, &v) in out.iter_mut().zip(row) {
                    *o = exp_nonpositive(v - max);
                }
                let sum: f64 = out.iter().map(|&o| o as f64).sum();
                let inv = (1.0 / sum) as f32;
                out.iter_mut().for_each(|o| *o *= inv);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_f32(grad)?;
        let ((ys, yl), (gs, gl)) = (res.storage_and_layout(), grad.storage_and_layout());
        let (y, g) = (slice_of::<f32>(&ys, yl, "softmax output")?, slice_of::<f32>(&gs, gl, "softmax gradient")?);
        let n = arg.dims().last().copied().unwrap_or(1).max(1);
        let mut dx = vec![0f32; y.len()];
        let task = rows_per_task(n) * n;
        dx.par_chunks_mut(task).zip(y.par_chunks(task).zip(g.par_chunks(task))).for_each(|(dx, (y, g))| {
            for ((yr, gr), out) in y.chunks(n).zip(g.chunks(n)).zip(dx.chunks_mut(n)) {
                let dot: f64 = yr.iter().zip(gr).map(|(&a, &b)| a as f64 * b as f64).sum();
                for ((o, &a), &b) in out.iter_mut().zip(yr).zip(gr) {
                    *o = (a as f64 * (b as f64 - dot)) as f32;
                }
            }
        });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

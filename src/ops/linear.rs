//! The fully connected layer `relu?(x·wᵀ + b)` on CPU as one gemm and one pass per direction.
//!
//! Through candle's ops, `x.matmul(&w.t())` differentiates into a product for `wᵀ` followed by a
//! transpose, and the transposed gradient is then added into a zero-filled `[N, K]` tensor element
//! by element (the strided add was a quarter of the mlp's step in a profile); the bias and the
//! ReLU are two more graph nodes, each with a full-size gradient added into zeros. Here one op
//! does all three: the forward pass adds the bias and clamps in one pass over the gemm's output,
//! and the backward pass masks the incoming gradient once, then writes `dyᵀ·x`, the bias sums and
//! (only when the input needs one: not for a data batch) `dy·w`. The parameters' gradients go to
//! [`super::param_grads`]. An exact GELU can take the ReLU's place ([`dense_act`]): the op keeps
//! the pre-activation for its backward pass, so the transformer MLP's activation is no graph node
//! of its own. Other devices and dtypes use candle.

use super::cpu::{f32_slice, fused_ok, slice_of};
use super::gemm::{matmul, matmul_new};
use super::param_op::{self, Grads3, Operand, ParamOp};
use candle_core::{CpuStorage, DType, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// `x·wᵀ` for `x` `[.., K]` and `w` `[N, K]` (PyTorch's linear layer without its bias).
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    dense(x, w, None, false)
}

/// `x·wᵀ + b`, then `max(·, 0)` when `relu`, for `x` `[.., K]`, `w` `[N, K]` and `b` `[N]`.
pub fn dense(x: &Tensor, w: &Tensor, b: Option<&Tensor>, relu: bool) -> Result<Tensor> {
    dense_act(x, w, b, if relu { Act::Relu } else { Act::None })
}

/// The activation a dense layer applies to `x·wᵀ + b` in the same op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// None: the affine map alone.
    None,
    /// `max(·, 0)`.
    Relu,
    /// Exact GELU, `z·Φ(z)` (as [`super::gelu_erf`]).
    Gelu,
}

/// `act(x·wᵀ + b)` for `x` `[.., K]`, `w` `[N, K]` and `b` `[N]`: one op on the CPU in f32,
/// else candle's matmul followed by the separate bias and activation ops.
pub fn dense_act(x: &Tensor, w: &Tensor, b: Option<&Tensor>, act: Act) -> Result<Tensor> {
    let k = x.dims().last().copied().unwrap_or(0);
    let (n, wk) = w.dims2()?;
    let m = x.elem_count() / k.max(1);
    let on_cpu_f32 = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu();
    let bias_ok = b.is_none_or(|b| on_cpu_f32(b) && b.dims() == [n]);
    if !(fused_ok(x) && on_cpu_f32(w) && bias_ok && m > 0 && n > 0 && k > 0 && wk == k) {
        let y = x.broadcast_matmul(&w.t()?)?;
        let y = match b {
            Some(b) => super::bias::add_broadcast(&y, b)?,
            None => y,
        };
        return match act {
            Act::None => Ok(y),
            Act::Relu => super::relu(&y),
            Act::Gelu => super::gelu_erf(&y),
        };
    }
    let mut out = x.dims().to_vec();
    if let Some(last) = out.last_mut() {
        *last = n;
    }
    let (x, w) = (x.contiguous()?.reshape((m, k))?, w.contiguous()?);
    let b = b.map(Tensor::contiguous).transpose()?;
    let op = Dense { relu: act == Act::Relu, gelu: act == Act::Gelu, pre: Mutex::new(None) };
    param_op::apply(&x, &w, b.as_ref(), op)?.reshape(out)
}

/// `(x [M, K], w [N, K], b [N]?) -> act(x·wᵀ + b) [M, N]`.
struct Dense {
    relu: bool,
    /// GELU after the bias; the pre-activation is then kept in `pre` for the backward pass.
    gelu: bool,
    pre: Mutex<Option<Vec<f32>>>,
}

/// Rows of the output per parallel task of the epilogue and the masking pass.
const ROWS_PER_TASK: usize = 16;

impl Dense {
    fn forward(&self, x: &[f32], w: &[f32], b: Option<&[f32]>, (m, n, k): (usize, usize, usize)) -> Vec<f32> {
        if n > m && k > n {
            return self.forward_transposed(x, w, b, (m, n, k));
        }
        // wᵀ as a k×n matrix: element (kk, nn) is w[nn·k + kk].
        let mut y = matmul_new((m, n, k), x, (k as isize, 1), w, (1, k as isize), true);
        if b.is_some() || self.relu {
            y.par_chunks_mut(n * ROWS_PER_TASK).for_each(|rows| {
                for row in rows.chunks_mut(n) {
                    if let Some(b) = b {
                        row.iter_mut().zip(b).for_each(|(v, &bv)| *v += bv);
                    }
                    if self.relu {
                        row.iter_mut().for_each(|v| *v = v.max(0.0));
                    }
                }
            });
        }
        y
    }

    /// The forward pass for a wide weight larger than the batch (`k > n > m`, e.g. an mlp's first
    /// layer at batch 128): the gemm writes `y` column-major, so it packs the batch rather than the
    /// weight (mlp 3072 -> 512 at batch 128: 3.9 instead of 4.8 ms on one core); the transpose
    /// to row-major is fused with the bias and the ReLU. Not for narrower weights: at 512 -> 512
    /// (batch 128) and a ViT's 384 -> 1152 projection (544 rows) the plain product was faster on
    /// one core (1.0-1.2 against 1.2-1.3 ms, 7.2-8.3 against 9.4-11.2 ms, December 2026).
    fn forward_transposed(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        (m, n, k): (usize, usize, usize),
    ) -> Vec<f32> {
        let mut yt = super::buffer::zeroed::<f32>(m * n);
        // y(m×n) with element (i, j) at yt[j·m + i].
        matmul((m, n, k), &mut yt, (1, m as isize), x, (k as isize, 1), w, (1, k as isize), false, true);
        let mut y = super::buffer::zeroed::<f32>(m * n);
        let relu = self.relu;
        y.par_chunks_mut(n * ROWS_PER_TASK).enumerate().for_each(|(task, rows)| {
            for (r, row) in rows.chunks_mut(n).enumerate() {
                let i = task * ROWS_PER_TASK + r;
                for (j, v) in row.iter_mut().enumerate() {
                    let z = yt[j * m + i] + b.map_or(0.0, |b| b[j]);
                    *v = if relu { z.max(0.0) } else { z };
                }
            }
        });
        y
    }
}

impl ParamOp for Dense {
    const NAME: &'static str = "samhost-linear";

    fn cpu_fwd(&self, x: Operand, w: Operand, b: Option<Operand>) -> Result<(CpuStorage, Shape)> {
        let ((m, k), (n, _)) = (x.1.shape().dims2()?, w.1.shape().dims2()?);
        let b = b.map(|(s, l)| f32_slice(s, l, "linear bias")).transpose()?;
        let mut y =
            self.forward(f32_slice(x.0, x.1, "linear input")?, f32_slice(w.0, w.1, "linear weight")?, b, (m, n, k));
        if self.gelu {
            let pre = y;
            y = super::buffer::zeroed::<f32>(pre.len());
            super::gelu::forward_all(&mut y, &pre);
            *self.pre.lock().unwrap_or_else(|e| e.into_inner()) = Some(pre);
        }
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, y: &Tensor, dy: &Tensor) -> Result<Grads3> {
        let dy = dy.contiguous()?;
        let ((m, n), k) = (dy.dims2()?, x.dim(1)?);
        let ((ds, dl), (ys, yl)) = (dy.storage_and_layout(), y.storage_and_layout());
        let (dy_v, y_v) = (slice_of::<f32>(&ds, dl, "linear gradient")?, slice_of::<f32>(&ys, yl, "linear output")?);
        // The gradient before the activation: for the ReLU, dy where the output is positive.
        let masked;
        let dz: &[f32] = if self.gelu {
            let guard = self.pre.lock().unwrap_or_else(|e| e.into_inner());
            let Some(pre) = guard.as_ref() else {
                candle_core::bail!("linear + GELU: the backward pass ran before the forward pass")
            };
            let mut v = super::buffer::zeroed::<f32>(dy_v.len());
            super::gelu::backward_all(&mut v, pre, dy_v);
            masked = v;
            &masked
        } else if self.relu {
            let mut v = dy_v.to_vec();
            v.par_chunks_mut(n * ROWS_PER_TASK).zip(y_v.par_chunks(n * ROWS_PER_TASK)).for_each(|(d, y)| {
                d.iter_mut().zip(y).for_each(|(d, &y)| *d = if y > 0.0 { *d } else { 0.0 });
            });
            masked = v;
            &masked
        } else {
            dy_v
        };
        let dev = x.device();
        let dx = if x.track_op() {
            let (ws, wl) = w.storage_and_layout();
            let w_v = slice_of::<f32>(&ws, wl, "linear weight")?;
            Some(Tensor::from_vec(matmul_new((m, k, n), dz, (n as isize, 1), w_v, (k as isize, 1), true), (m, k), dev)?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let (xs, xl) = x.storage_and_layout();
            let x_v = slice_of::<f32>(&xs, xl, "linear input")?;
            // dzᵀ as an n×m matrix: element (nn, mm) is dz[mm·n + nn].
            Some(Tensor::from_vec(matmul_new((n, k, m), dz, (1, n as isize), x_v, (k as isize, 1), true), (n, k), dev)?)
        } else {
            None
        };
        let db = match b {
            Some(b) if b.track_op() => Some(Tensor::from_vec(column_sums(dz, n), n, dev)?),
            _ => None,
        };
        Ok((dx, dw, db))
    }
}

/// The sums of the columns of the row-major `[·, n]` matrix `dz`: partial sums over blocks of
/// 64 rows in parallel, then added in block order, so the result does not depend on
/// the number of threads. (Summed on one thread, it left the other cores idle during every linear
/// layer's bias gradient.)
pub(crate) fn column_sums(dz: &[f32], n: usize) -> Vec<f32> {
    let partials: Vec<Vec<f32>> = dz
        .par_chunks(n.max(1) * 64)
        .map(|block| {
            let mut sums = vec![0f32; n];
            for row in block.chunks_exact(n.max(1)) {
                sums.iter_mut().zip(row).for_each(|(s, &v)| *s += v);
            }
            sums
        })
        .collect();
    let mut sums = vec![0f32; n];
    for p in &partials {
        sums.iter_mut().zip(p).for_each(|(s, &v)| *s += v);
    }
    sums
}

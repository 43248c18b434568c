//! Layer normalisation over the last dimension with exact gradients for the input, the weight and
//! the bias, in parallel blocks of rows (the weight and bias gradients are summed per block and
//! the blocks added in order, so the result depends only on the thread count). candle's fused
//! layer norm has no backward pass. Rows are computed in f32 (two passes for the variance, eight
//! partial sums, AVX2 where the CPU has it); the weight and bias gradients are summed in f64.
//! The fused path runs for contiguous f32 tensors on the CPU when [`super::cpu::fused_ok`] says
//! so; elsewhere (other devices and dtypes, second-order gradients) elementary candle ops compute
//! the same math.

use super::cpu::{f32_slice, fused_ok, grad_f32, rows_per_task, slice_of};
use super::half::{in_f32, is_half};
use super::lanes;
use super::param_op::{self, Grads3, Operand, ParamOp};
use candle_core::{CpuStorage, DType, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Layer normalisation over the last dimension with `weight` and `bias` (the reference math:
/// `(x - mean) / sqrt(var + eps) * weight + bias`, biased variance). bf16/f16 inputs are
/// normalised in f32 with the f32 weight and bias, and the result cast back.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if is_half(x) {
        return in_f32(x, |x| layer_norm(x, weight, bias, eps));
    }
    if fused_ok(x) && weight.dtype() == DType::F32 && bias.dtype() == DType::F32 {
        param_op::apply(&x.contiguous()?, weight, Some(bias), LayerNormOp { eps })
    } else {
        layer_norm_ops(x, weight, bias, eps)
    }
}

/// Layer normalisation from elementary ops (the reference, and the fallback).
pub fn layer_norm_ops(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let n = x.dim(D::Minus1)? as f64;
    let mean = (x.sum_keepdim(D::Minus1)? / n)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = (centred.sqr()?.sum_keepdim(D::Minus1)? / n)?;
    let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(weight)?.broadcast_add(bias)
}

struct LayerNormOp {
    eps: f64,
}

/// Mean and 1/std of one row, in two passes (the mean, then the squares about it, so a large
/// mean costs no precision).
#[inline(always)]
fn row_stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = lanes::sum(row, |v| v) / n;
    let var = lanes::sum(row, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// One row normalised: `out = (x - mean)·istd·w + b`.
#[inline(always)]
fn forward_row(out: &mut [f32], row: &[f32], w: &[f32], b: &[f32], eps: f32) {
    let (mean, is) = row_stats(row, eps);
    for (((o, &v), &wv), &bv) in out.iter_mut().zip(row).zip(w).zip(b) {
        *o = (v - mean) * is * wv + bv;
    }
}

/// One row's input gradient into `out` and its terms of the weight and bias gradients added
/// into `dw` and `db` (f64, summed over a block of rows); `xhat` is scratch of the row's length.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_row(
    out: &mut [f32],
    row: &[f32],
    g: &[f32],
    w: &[f32],
    eps: f32,
    xhat: &mut [f32],
    dw: &mut [f64],
    db: &mut [f64],
) {
    let (mean, is) = row_stats(row, eps);
    let nf = row.len() as f32;
    for (h, &v) in xhat.iter_mut().zip(row) {
        *h = (v - mean) * is;
    }
    for (((dw, db), &gv), &h) in dw.iter_mut().zip(db.iter_mut()).zip(g).zip(xhat.iter()) {
        *dw += (gv * h) as f64;
        *db += gv as f64;
    }
    let sum_gw = lanes::sum2(g, w, |gv, wv| gv * wv);
    let sum_gw_xhat = lanes::sum3(g, w, xhat, |gv, wv, h| gv * wv * h);
    let k = is / nf;
    for (((o, &gv), &wv), &h) in out.iter_mut().zip(g).zip(w).zip(xhat.iter()) {
        *o = k * (nf * gv * wv - sum_gw - h * sum_gw_xhat);
    }
}

/// The row kernels compiled for AVX2 and FMA, chosen at run time where the CPU has them.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    /// [`super::forward_row`] over rows of `w.len()`, in AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn forward_rows(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
        super::forward_rows_generic(y, x, w, b, eps)
    }

    /// [`super::backward_rows_generic`] in AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn backward_rows(
        dx: &mut [f32],
        x: &[f32],
        g: &[f32],
        w: &[f32],
        eps: f32,
    ) -> (Vec<f64>, Vec<f64>) {
        super::backward_rows_generic(dx, x, g, w, eps)
    }
}

/// Rows of `w.len()` elements normalised.
#[inline(always)]
fn forward_rows_generic(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
    let n = w.len();
    for (row, out) in x.chunks(n).zip(y.chunks_mut(n)) {
        forward_row(out, row, w, b, eps);
    }
}

/// The input gradients of rows of `w.len()` elements, and the block's weight and bias gradients.
#[inline(always)]
fn backward_rows_generic(dx: &mut [f32], x: &[f32], g: &[f32], w: &[f32], eps: f32) -> (Vec<f64>, Vec<f64>) {
    let n = w.len();
    let (mut dw, mut db, mut xhat) = (vec![0f64; n], vec![0f64; n], vec![0f32; n]);
    for ((row, gr), out) in x.chunks(n).zip(g.chunks(n)).zip(dx.chunks_mut(n)) {
        backward_row(out, row, gr, w, eps, &mut xhat, &mut dw, &mut db);
    }
    (dw, db)
}

fn forward_rows(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked).
        return unsafe { avx2::forward_rows(y, x, w, b, eps) };
    }
    forward_rows_generic(y, x, w, b, eps)
}

fn backward_rows(dx: &mut [f32], x: &[f32], g: &[f32], w: &[f32], eps: f32) -> (Vec<f64>, Vec<f64>) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked).
        return unsafe { avx2::backward_rows(dx, x, g, w, eps) };
    }
    backward_rows_generic(dx, x, g, w, eps)
}

/// Rows `x` of `w.len()` elements normalised into `y` (same length), in parallel blocks of rows.
pub(crate) fn normalize(y: &mut [f32], x: &[f32], w: &[f32], b: &[f32], eps: f32) {
    let task = rows_per_task(w.len()) * w.len();
    y.par_chunks_mut(task).zip(x.par_chunks(task)).for_each(|(y, x)| forward_rows(y, x, w, b, eps));
}

/// The input gradient of [`normalize`] into `dx` from the output gradient `g`, and the weight and
/// bias gradients (each block of rows summed in f64, the blocks added in order: the result
/// depends on the thread count only).
pub(crate) fn normalize_backward(dx: &mut [f32], x: &[f32], g: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let n = w.len();
    let rows = x.len() / n.max(1);
    // One block of rows per thread: its input gradient rows and its partial weight and bias
    // gradients, added in block order below.
    let per = rows.div_ceil(rayon::current_num_threads().clamp(1, rows.max(1))).max(1) * n;
    let partials: Vec<(Vec<f64>, Vec<f64>)> = dx
        .par_chunks_mut(per)
        .zip(x.par_chunks(per).zip(g.par_chunks(per)))
        .map(|(dx, (x, g))| backward_rows(dx, x, g, w, eps))
        .collect();
    let (mut dw, mut db) = (vec![0f64; n], vec![0f64; n]);
    for (pw, pb) in partials {
        dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
    }
    let to32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    (to32(dw), to32(db))
}

impl ParamOp for LayerNormOp {
    const NAME: &'static str = "fused-layer-norm";

    fn cpu_fwd(&self, (s1, l1): Operand, (s2, l2): Operand, b: Option<Operand>) -> Result<(CpuStorage, Shape)> {
        let Some((s3, l3)) = b else { candle_core::bail!("fused-layer-norm: the bias is missing") };
        let x = f32_slice(s1, l1, "the input")?;
        let (w, b) = (f32_slice(s2, l2, "the weight")?, f32_slice(s3, l3, "the bias")?);
        let n = w.len();
        if l1.shape().dims().last() != Some(&n) || b.len() != n {
            candle_core::bail!("layer norm: input {:?} with weight [{n}] and bias [{}]", l1.shape().dims(), b.len());
        }
        let mut y = super::buffer::zeroed::<f32>(x.len());
        normalize(&mut y, x, w, b, self.eps as f32);
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, _res: &Tensor, grad: &Tensor) -> Result<Grads3> {
        let grad = grad_f32(grad)?;
        let ((xs, xl), (gs, gl), (wst, wl)) =
            (x.storage_and_layout(), grad.storage_and_layout(), weight.storage_and_layout());
        let xs = slice_of::<f32>(&xs, xl, "layer norm input")?;
        let gs = slice_of::<f32>(&gs, gl, "layer norm gradient")?;
        let ws = slice_of::<f32>(&wst, wl, "layer norm weight")?;
        let n = ws.len();
        let mut dx = super::buffer::zeroed::<f32>(xs.len());
        let (dw, db) = normalize_backward(&mut dx, xs, gs, ws, self.eps as f32);
        let dev = x.device();
        let dx = if x.track_op() { Some(Tensor::from_vec(dx, x.shape(), dev)?) } else { None };
        let dw = if weight.track_op() { Some(Tensor::from_vec(dw, n, dev)?) } else { None };
        let db = if bias.is_some_and(Tensor::track_op) { Some(Tensor::from_vec(db, n, dev)?) } else { None };
        Ok((dx, dw, db))
    }
}

//! Layer normalisation over the last dimension with exact gradients for the input, the weight and
//! the bias, in parallel blocks of rows (the weight and bias gradients are summed per block and
//! the blocks added in order, so the result depends only on the thread count). candle's fused
//! layer norm has no backward pass.
//! The fused path runs for contiguous f32 tensors on the CPU when [`super::cpu::fused_ok`] says
//! so; elsewhere (other devices and dtypes, second-order gradients) elementary candle ops compute
//! the same math.

use super::cpu::{f32_slice, fused_ok, grad_f32, rows_per_task, slice_of};
use super::half::{in_f32, is_half};
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

/// Mean and 1/std of one row.
fn row_stats(row: &[f32], eps: f64) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
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
        let mut y = vec![0f32; x.len()];
        let task = rows_per_task(n) * n;
        y.par_chunks_mut(task).zip(x.par_chunks(task)).for_each(|(y, x)| {
            for (row, out) in x.chunks(n).zip(y.chunks_mut(n)) {
                let (mean, is) = row_stats(row, self.eps);
                for (((o, &v), &wv), &bv) in out.iter_mut().zip(row).zip(w).zip(b) {
                    *o = (((v as f64 - mean) * is) * wv as f64 + bv as f64) as f32;
                }
            }
        });
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
        let nf = n as f64;
        let rows = xs.len() / n.max(1);
        // One block of rows per thread: its input gradient rows and its partial weight and bias
        // gradients, added in block order below.
        let per = rows.div_ceil(rayon::current_num_threads().clamp(1, rows.max(1))).max(1) * n;
        let mut dx = vec![0f32; xs.len()];
        let partials: Vec<(Vec<f64>, Vec<f64>)> = dx
            .par_chunks_mut(per)
            .zip(xs.par_chunks(per).zip(gs.par_chunks(per)))
            .map(|(dx, (xs, gs))| {
                let (mut dw, mut db) = (vec![0f64; n], vec![0f64; n]);
                let mut xhat = vec![0f64; n];
                for ((row, gr), out) in xs.chunks(n).zip(gs.chunks(n)).zip(dx.chunks_mut(n)) {
                    let (mean, is) = row_stats(row, self.eps);
                    let (mut sum_gw, mut sum_gw_xhat) = (0f64, 0f64);
                    for j in 0..n {
                        xhat[j] = (row[j] as f64 - mean) * is;
                        let g = gr[j] as f64;
                        dw[j] += g * xhat[j];
                        db[j] += g;
                        let gw = g * ws[j] as f64;
                        sum_gw += gw;
                        sum_gw_xhat += gw * xhat[j];
                    }
                    for j in 0..n {
                        let gw = gr[j] as f64 * ws[j] as f64;
                        out[j] = (is / nf * (nf * gw - sum_gw - xhat[j] * sum_gw_xhat)) as f32;
                    }
                }
                (dw, db)
            })
            .collect();
        let (mut dw, mut db) = (vec![0f64; n], vec![0f64; n]);
        for (pw, pb) in partials {
            dw.iter_mut().zip(pw).for_each(|(a, b)| *a += b);
            db.iter_mut().zip(pb).for_each(|(a, b)| *a += b);
        }
        let dev = x.device();
        let to32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
        let dx = if x.track_op() { Some(Tensor::from_vec(dx, x.shape(), dev)?) } else { None };
        let dw = if weight.track_op() { Some(Tensor::from_vec(to32(dw), n, dev)?) } else { None };
        let db = if bias.is_some_and(Tensor::track_op) { Some(Tensor::from_vec(to32(db), n, dev)?) } else { None };
        Ok((dx, dw, db))
    }
}

//! BatchNorm's kernels over images `[N, C, H, W]` (the layer, with its running statistics, is
//! `models::batch_norm`).
//!
//! In training mode on the CPU (f32) the normalisation, and the ReLU that usually follows it, are
//! one fused operation with its own backward pass: two passes over the input forward, two
//! backward (the statistics of the forward pass are kept for it), instead of the dozen full-size
//! tensors that elementary ops (or candle-nn's `BatchNorm`, which also transposes and copies the
//! input) create; BatchNorm was more than half of a CIFAR ResNet's training step before. Sums
//! run over each plane in f32 lanes and across planes in f64. Where [`super::cpu::fused_ok`]
//! says no (other devices, other dtypes, second-order gradients) the same math runs from
//! elementary ops ([`batch_norm_train_ops`]).

use super::cpu::{f32_slice, fused_ok, grad_f32, slice_of};
use super::param_op::{self, Grads3, Operand, ParamOp};
use candle_core::{CpuStorage, DType, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Training-mode BatchNorm with the batch's statistics, followed by a ReLU when `relu`: the
/// output and the batch mean and biased variance per channel (for the running statistics; the
/// output's gradient flows through the batch statistics).
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let c = x.dim(1)?;
    if fused_ok(x) && weight.dtype() == DType::F32 {
        let stats = Arc::new(Mutex::new(Stats::default()));
        let op = FusedBatchNorm { eps, relu, stats: stats.clone() };
        let y = param_op::apply(&x.contiguous()?, weight, Some(bias), op)?;
        let s = stats.lock().map_err(|_| candle_core::Error::Msg("batch norm statistics lock poisoned".into()))?;
        let mean = Tensor::from_slice(&s.mean, c, x.device())?;
        let var = Tensor::from_slice(&s.var, c, x.device())?;
        return Ok((y, mean, var));
    }
    let (y, mean, var) = batch_norm_train_ops(x, weight, bias, eps)?;
    let y = if relu { super::relu(&y)? } else { y };
    Ok((y, mean, var))
}

/// Training mode from elementary ops, without a ReLU: the output, and the batch mean and
/// (biased) variance per channel. The reference for the fused operation, and the path where it
/// does not apply.
pub fn batch_norm_train_ops(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let (n, c, h, w) = x.dims4()?;
    let m = (n * h * w) as f64;
    let xr = x.reshape((n, c, h * w))?;
    let mean = (xr.sum_keepdim(2)?.sum_keepdim(0)? / m)?;
    let centred = xr.broadcast_sub(&mean)?;
    let var = (centred.sqr()?.sum_keepdim(2)?.sum_keepdim(0)? / m)?;
    let scale = (&var + eps)?.sqrt()?.recip()?.broadcast_mul(&weight.reshape((1, c, 1))?)?;
    let y = centred.broadcast_mul(&scale)?.broadcast_add(&bias.reshape((1, c, 1))?)?;
    Ok((y.reshape((n, c, h, w))?, mean.flatten_all()?, var.flatten_all()?))
}

/// Evaluation-mode BatchNorm: normalises with the given running statistics (no gradient flows
/// into them).
pub fn batch_norm_eval(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    running_mean: &Tensor,
    running_var: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let xr = x.reshape((n, c, h * w))?;
    let rm = running_mean.detach().reshape((1, c, 1))?;
    let rv = running_var.detach().reshape((1, c, 1))?;
    let scale = (rv + eps)?.sqrt()?.recip()?.broadcast_mul(&weight.reshape((1, c, 1))?)?;
    let shift = bias.reshape((1, c, 1))?.broadcast_sub(&rm.broadcast_mul(&scale)?)?;
    xr.broadcast_mul(&scale)?.broadcast_add(&shift)?.reshape((n, c, h, w))
}

/// Batch statistics per channel from a training-mode forward pass: the mean and biased variance
/// (for the running statistics) and, in f64, the mean and 1/sqrt(var + eps) for the backward pass.
#[derive(Clone, Debug, Default)]
pub(crate) struct Stats {
    /// The mean per channel.
    pub(crate) mean: Vec<f32>,
    /// The biased variance per channel.
    pub(crate) var: Vec<f32>,
    mean64: Vec<f64>,
    invstd: Vec<f64>,
}

/// The layout of an `[N, C, H, W]` tensor: `n` samples of `c` planes of `hw` values.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Planes {
    /// Samples.
    pub(crate) n: usize,
    /// Channels.
    pub(crate) c: usize,
    /// Values per plane (H·W).
    pub(crate) hw: usize,
}

impl Planes {
    /// The layout of `dims` `[N, C, H, W]`.
    pub(crate) fn of(dims: &[usize]) -> Result<Self> {
        match dims {
            &[n, c, h, w] => Ok(Self { n, c, hw: h * w }),
            _ => candle_core::bail!("batch norm: expected [N, C, H, W], got {dims:?}"),
        }
    }
}

/// `y = relu?((x - mean) / sqrt(var + eps) * weight + bias + residual?)` with the batch's
/// statistics (the residual, when given, has `x`'s layout), and those statistics.
pub(crate) fn normalize_train(
    x: &[f32],
    p: Planes,
    (weight, bias): (&[f32], &[f32]),
    eps: f64,
    relu: bool,
    residual: Option<&[f32]>,
) -> (Vec<f32>, Stats) {
    let Planes { n, c, hw } = p;
    let (mean, var) = channel_stats(x, n, c, hw);
    let invstd: Vec<f64> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let affine: Vec<(f32, f32)> = (0..c)
        .map(|ch| {
            let scale = weight[ch] as f64 * invstd[ch];
            (scale as f32, (bias[ch] as f64 - mean[ch] * scale) as f32)
        })
        .collect();
    let residual = residual.unwrap_or(&[]);
    let act = move |v: f32| if relu { v.max(0.0) } else { v };
    let y = if residual.is_empty() {
        super::buffer::par_from_chunks(x.len(), hw, |r| {
            let (scale, shift) = affine[r.start / hw % c];
            x[r].iter().map(move |&v| act(v * scale + shift))
        })
    } else {
        super::buffer::par_from_chunks(x.len(), hw, |r| {
            let (scale, shift) = affine[r.start / hw % c];
            x[r.clone()].iter().zip(&residual[r]).map(move |(&v, &r)| act(v * scale + shift + r))
        })
    };
    let stats = Stats {
        mean: mean.iter().map(|&v| v as f32).collect(),
        var: var.iter().map(|&v| v as f32).collect(),
        mean64: mean,
        invstd,
    };
    (y, stats)
}

/// Gradients of [`normalize_train`] from the output's gradient `g`, gated by `mask > 0` where a
/// ReLU followed (`mask` the ReLU's output, of `x`'s layout): the input's (when `need_dx`), and
/// the weight's and the bias's per channel.
pub(crate) fn normalize_backward(
    x: &[f32],
    g: &[f32],
    mask: Option<&[f32]>,
    p: Planes,
    weight: &[f32],
    stats: &Stats,
    need_dx: bool,
) -> (Option<Vec<f32>>, Vec<f32>, Vec<f32>) {
    let Planes { n, c, hw } = p;
    let m = (n * hw) as f64;
    let (mean, invstd) = (&stats.mean64, &stats.invstd);
    let (relu, ys) = match mask {
        Some(y) => (true, y),
        None => (false, g),
    };
    // The gradient before the ReLU.
    let gz = move |g: f32, y: f32| if !relu || y > 0.0 { g } else { 0.0 };
    // Per channel: Σdz and Σ(dz·xhat).
    let (db, dw): (Vec<f64>, Vec<f64>) = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mu, is) = (mean[ch] as f32, invstd[ch] as f32);
            let (mut db, mut dw) = (0f64, 0f64);
            for ((gp, xp), yp) in planes(g, n, c, hw, ch).zip(planes(x, n, c, hw, ch)).zip(planes(ys, n, c, hw, ch)) {
                db += lane_sum3(gp, yp, yp, |g, y, _| gz(g, y));
                dw += lane_sum3(gp, yp, xp, |g, y, x| gz(g, y) * (x - mu) * is);
            }
            (db, dw)
        })
        .unzip();
    // dx = w·invstd/m · (m·dz − Σdz − xhat·Σ(dz·xhat))
    let dx = need_dx.then(|| {
        super::buffer::par_from_chunks(x.len(), hw, |r| {
            let ch = r.start / hw % c;
            let (mu, is) = (mean[ch] as f32, invstd[ch] as f32);
            let k = (weight[ch] as f64 * invstd[ch] / m) as f32;
            let (a, b) = ((m * k as f64) as f32, k * db[ch] as f32);
            let cx = k * dw[ch] as f32;
            let (gp, xp, yp) = (&g[r.clone()], &x[r.clone()], &ys[r]);
            gp.iter().zip(xp).zip(yp).map(move |((&g, &x), &y)| a * gz(g, y) - b - (x - mu) * is * cx)
        })
    });
    let to32 = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect::<Vec<f32>>();
    (dx, to32(dw), to32(db))
}

/// `y = relu?((x - mean) / sqrt(var + eps) * weight + bias)` over `[N, C, H, W]` with the batch's
/// statistics, and its exact backward pass.
struct FusedBatchNorm {
    eps: f64,
    relu: bool,
    stats: Arc<Mutex<Stats>>,
}

/// The `n` planes of channel `ch` in `[n, c, hw]` data.
fn planes(x: &[f32], n: usize, c: usize, hw: usize, ch: usize) -> impl Iterator<Item = &[f32]> {
    (0..n).map(move |i| &x[(i * c + ch) * hw..(i * c + ch + 1) * hw])
}

/// `Σ f(a, b, c)` in f32 lanes ([`super::lanes::sum3`]), returned in f64 for the sums across planes.
#[inline]
fn lane_sum3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f64 {
    super::lanes::sum3(a, b, c, f) as f64
}

/// `Σ f(v)` over a slice, as [`lane_sum3`].
#[inline]
fn lane_sum(a: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    super::lanes::sum(a, f) as f64
}

/// Per channel: the mean and the biased variance, in one pass over memory (channels in
/// parallel, each summed in a fixed order). Each plane is summed, then its squared deviations
/// from its own (f32) mean are summed while it is still in cache, both in f32 lanes; the planes
/// combine exactly in f64: `Σ(v − μ)² = Σ_p [q_p + 2(μ_p − μ)(s_p − hw·μ_p) + hw·(μ_p − μ)²]`
/// with `s_p` the plane's sum, `μ_p` its f32 mean and `q_p = Σ(v − μ_p)²`. (Two passes over
/// the channel, one for the mean and one for the deviations, read every activation twice.)
fn channel_stats(x: &[f32], n: usize, c: usize, hw: usize) -> (Vec<f64>, Vec<f64>) {
    let m = (n * hw) as f64;
    let hw64 = hw as f64;
    (0..c)
        .into_par_iter()
        .map(|ch| {
            let parts: Vec<(f64, f64, f64)> = planes(x, n, c, hw, ch)
                .map(|p| {
                    let s = lane_sum(p, |v| v);
                    let mu_p = (s / hw64) as f32;
                    (s, mu_p as f64, lane_sum(p, |v| (v - mu_p) * (v - mu_p)))
                })
                .collect();
            let mean = parts.iter().map(|p| p.0).sum::<f64>() / m;
            let var = parts
                .iter()
                .map(|&(s, mu_p, q)| {
                    let d = mu_p - mean;
                    q + 2.0 * d * (s - hw64 * mu_p) + hw64 * d * d
                })
                .sum::<f64>()
                / m;
            (mean, var.max(0.0))
        })
        .unzip()
}

impl ParamOp for FusedBatchNorm {
    const NAME: &'static str = "fused-batch-norm";

    fn cpu_fwd(&self, (s1, l1): Operand, (s2, l2): Operand, b: Option<Operand>) -> Result<(CpuStorage, Shape)> {
        let Some((s3, l3)) = b else { candle_core::bail!("fused-batch-norm: the bias is missing") };
        let p = Planes::of(l1.shape().dims())?;
        let x = f32_slice(s1, l1, "the input")?;
        let weight = f32_slice(s2, l2, "the weight")?;
        let bias = f32_slice(s3, l3, "the bias")?;
        let (y, stats) = normalize_train(x, p, (weight, bias), self.eps, self.relu, None);
        *self.stats.lock().map_err(|_| candle_core::Error::Msg("batch norm statistics lock poisoned".into()))? = stats;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, y: &Tensor, grad: &Tensor) -> Result<Grads3> {
        let p = Planes::of(x.dims())?;
        let grad = grad_f32(grad)?;
        let stats =
            self.stats.lock().map_err(|_| candle_core::Error::Msg("batch norm statistics lock poisoned".into()))?;
        if stats.invstd.len() != p.c {
            candle_core::bail!("batch norm backward: the statistics of the forward pass are missing");
        }
        let ((xs, xl), (gs, gl), (ys, yl), (ws, wl)) =
            (x.storage_and_layout(), grad.storage_and_layout(), y.storage_and_layout(), weight.storage_and_layout());
        let xs = slice_of::<f32>(&xs, xl, "batch norm input")?;
        let gs = slice_of::<f32>(&gs, gl, "batch norm gradient")?;
        let ys = slice_of::<f32>(&ys, yl, "batch norm output")?;
        let ws = slice_of::<f32>(&ws, wl, "batch norm weight")?;
        let mask = self.relu.then_some(ys);
        let (dx, dw, db) = normalize_backward(xs, gs, mask, p, ws, &stats, x.track_op());
        let dev = x.device();
        let dx = dx.map(|dx| Tensor::from_vec(dx, x.shape(), dev)).transpose()?;
        let dw = if weight.track_op() { Some(Tensor::from_vec(dw, p.c, dev)?) } else { None };
        let db = if bias.is_some_and(Tensor::track_op) { Some(Tensor::from_vec(db, p.c, dev)?) } else { None };
        Ok((dx, dw, db))
    }
}

//! Pooling over `[N, C, H, W]` with PyTorch's output sizes (`floor((H + 2p - k) / s) + 1`):
//! the 2x2 max-pool and windows that tile the input take their fast ops; any other window,
//! stride or padding is composed from strided views, so its gradient is exact wherever candle's
//! pooling backward is not defined (window ≠ stride).

use crate::ops::half::{in_f32, is_half};
use candle_core::{Result, Tensor};

/// Max or mean over each window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolKind {
    /// The maximum (padding is -inf).
    Max,
    /// The mean over the k·k window, zero padding counted (`count_include_pad`).
    Avg,
}

/// PyTorch's output size of a window `k`, stride `s`, padding `p` over `n` values.
fn out_size(what: &str, n: usize, k: usize, s: usize, p: usize) -> Result<usize> {
    if n + 2 * p < k {
        candle_core::bail!("{what}: a window of {k} does not fit an input of {n} (padding {p})");
    }
    Ok((n + 2 * p - k) / s + 1)
}

/// `x[:, :, off + s·i, ...]` for `i < count` along `dim` (2 or 3): a narrow and, for s > 1, a
/// reshape that keeps the first of every `s` values.
fn strided(x: &Tensor, dim: usize, off: usize, count: usize, s: usize) -> Result<Tensor> {
    if s == 1 {
        return x.narrow(dim, off, count);
    }
    let avail = x.dim(dim)? - off;
    let len = count * s;
    let x = if avail >= len {
        x.narrow(dim, off, len)?
    } else {
        x.narrow(dim, off, avail)?.pad_with_zeros(dim, 0, len - avail)?
    };
    let mut shape = x.dims().to_vec();
    shape[dim] = count;
    shape.insert(dim + 1, s);
    x.reshape(shape)?.narrow(dim + 1, 0, 1)?.squeeze(dim + 1)
}

/// Pads dimensions 2 and 3 by `p` on every side with `value`.
fn pad(x: &Tensor, p: usize, value: f64) -> Result<Tensor> {
    if p == 0 {
        return Ok(x.clone());
    }
    if value == 0.0 {
        return x.pad_with_zeros(2, p, p)?.pad_with_zeros(3, p, p);
    }
    let (n, c, h, w) = x.dims4()?;
    let rows = Tensor::full(value as f32, (n, c, p, w), x.device())?.to_dtype(x.dtype())?;
    let x = Tensor::cat(&[&rows, x, &rows], 2)?;
    let cols = Tensor::full(value as f32, (n, c, h + 2 * p, p), x.device())?.to_dtype(x.dtype())?;
    Tensor::cat(&[&cols, &x, &cols], 3)
}

/// Pools `x` `[N, C, H, W]` over `k`x`k` windows with stride `s` and padding `p`.
pub fn pool2d(x: &Tensor, kind: PoolKind, k: usize, s: usize, p: usize) -> Result<Tensor> {
    if is_half(x) {
        return in_f32(x, |x| pool2d(x, kind, k, s, p));
    }
    let what = match kind {
        PoolKind::Max => "max_pool2d",
        PoolKind::Avg => "avg_pool2d",
    };
    let (_, _, h, w) = x
        .dims4()
        .map_err(|_| candle_core::Error::Msg(format!("{what} expects images [N, C, H, W], got {:?}", x.dims())))?;
    let (oh, ow) = (out_size(what, h, k, s, p)?, out_size(what, w, k, s, p)?);
    if p == 0 && k == s {
        // Windows that tile the input (after dropping what PyTorch drops): fast ops.
        let x = x.narrow(2, 0, oh * k)?.narrow(3, 0, ow * k)?;
        return match kind {
            PoolKind::Max if k == 2 => crate::ops::max_pool2(&x),
            PoolKind::Max => x.max_pool2d(k),
            PoolKind::Avg => x.avg_pool2d(k),
        };
    }
    let x = pad(x, p, if kind == PoolKind::Max { f64::NEG_INFINITY } else { 0.0 })?;
    let mut acc: Option<Tensor> = None;
    for a in 0..k {
        let rows = strided(&x, 2, a, oh, s)?;
        for b in 0..k {
            let v = strided(&rows, 3, b, ow, s)?;
            acc = Some(match (acc, kind) {
                (None, _) => v,
                (Some(m), PoolKind::Max) => m.maximum(&v)?,
                (Some(m), PoolKind::Avg) => (m + v)?,
            });
        }
    }
    let acc = acc.ok_or_else(|| candle_core::Error::Msg(format!("{what}: empty window")))?;
    match kind {
        PoolKind::Max => Ok(acc),
        PoolKind::Avg => acc.affine(1.0 / (k * k) as f64, 0.0),
    }
}

/// PyTorch's `adaptive_avg_pool2d` to `[oh, ow]` when the input size is a multiple of it
/// (then the windows tile the input); `[1, 1]` is the global average.
pub fn adaptive_avg_pool2d(x: &Tensor, oh: usize, ow: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4().map_err(|_| {
        candle_core::Error::Msg(format!("adaptive_avg_pool2d expects images [N, C, H, W], got {:?}", x.dims()))
    })?;
    if oh == 1 && ow == 1 {
        return super::super::layers::global_avg_pool(x)?.unsqueeze(2)?.unsqueeze(3);
    }
    if h % oh != 0 || w % ow != 0 {
        candle_core::bail!(
            "adaptive_avg_pool2d: an input of {h}x{w} is not a multiple of the output {oh}x{ow} (use avg_pool2d \
             with an explicit window)"
        );
    }
    if is_half(x) {
        return in_f32(x, |x| adaptive_avg_pool2d(x, oh, ow));
    }
    // Windows of (h/oh)x(w/ow) that tile the input: the mean over each block.
    let (n, c) = (x.dim(0)?, x.dim(1)?);
    x.reshape((n, c, oh, h / oh, ow, w / ow))?.mean(5)?.mean(3)
}

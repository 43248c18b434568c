//! Multi-head self-attention's core, `softmax(q·kᵀ·scale)·v` per head, as one op over the rows of
//! the fused query/key/value projection `[b·n, 3·hidden]` (`[q | k | v]`, each head's `d =
//! hidden/heads` columns in order), giving the context rows `[b·n, hidden]` with the heads side by
//! side again.
//!
//! Composed from candle's ops the same math is fifteen graph nodes per layer (three head splits of
//! reshape, transpose and copy, the scores, their scaling, the softmax, the context product and its
//! merge back to rows), each with its own pass over memory and, in the backward pass, a gradient
//! added into a zero-filled tensor. Here the forward pass reads `q`, `k` and `v` in place through
//! their strides, keeps the probabilities for the backward pass, and writes each head's context
//! straight into its columns of the output; the backward pass writes `dq`, `dk` and `dv` into their
//! columns of one gradient. On CPUs with AVX2 every (sequence, head) pair is one task on the
//! register tiles of `tiled.rs` and `panel.rs`; elsewhere the sequences run in parallel, each
//! head's products through the `gemm` crate on one thread. On other devices and dtypes, and for
//! second-order gradients, the caller composes candle's ops.

#[cfg(target_arch = "x86_64")]
mod panel;
#[cfg(target_arch = "x86_64")]
mod tiled;

use super::cpu::{f32_slice, fused_ok, grad_f32, slice_of};
use super::gemm::matmul;
use super::softmax::{softmax_grad_in_place, softmax_in_place};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Whether [`attention`] runs fused for `qkv` (f32 on the CPU, first-order gradients).
pub fn fused(qkv: &Tensor) -> bool {
    fused_ok(qkv)
}

/// The context rows `[b·n, hidden]` of self-attention over `qkv` `[b·n, 3·hidden]` with `heads`
/// heads and `batch` = b sequences of n tokens; the scores are scaled by `scale` (1/sqrt(d) in a
/// transformer) before the softmax. For the fused path only (see [`fused`]).
pub fn attention(qkv: &Tensor, batch: usize, heads: usize, scale: f64) -> Result<Tensor> {
    let (rows, width) = qkv.dims2()?;
    if batch == 0
        || heads == 0
        || !rows.is_multiple_of(batch)
        || !width.is_multiple_of(3 * heads)
        || rows == 0
        || width == 0
    {
        candle_core::bail!("attention: rows [{rows}, {width}] do not split into {batch} sequences of {heads} heads");
    }
    if !(scale.is_finite() && scale > 0.0) {
        candle_core::bail!("attention: the scale of the scores must be positive, got {scale}");
    }
    if !fused(qkv) {
        candle_core::bail!("attention: the fused op takes f32 CPU tensors");
    }
    let dims = Dims { batch, n: rows / batch, heads, d: width / (3 * heads) };
    qkv.contiguous()?.apply_op1(Attention { dims, scale: scale as f32, probs: Mutex::new(None) })
}

/// The sizes: `batch` sequences of `n` tokens, `heads` heads of width `d`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    /// Sequences.
    pub batch: usize,
    /// Tokens per sequence.
    pub n: usize,
    /// Heads.
    pub heads: usize,
    /// Width of a head.
    pub d: usize,
}

impl Dims {
    /// The context rows `[b·n, hidden]` and the probabilities `[b, heads, n, n]` (rows of
    /// [`Dims::stride`] values, zeros past n) of attention over the projection rows `qkv`
    /// `[b·n, 3·hidden]`, scores scaled by `scale`: on the register tiles of `tiled.rs` where
    /// the CPU has AVX2, else through the `gemm` crate.
    pub(crate) fn forward(&self, qkv: &[f32], scale: f32) -> (Vec<f32>, Vec<f32>) {
        #[cfg(target_arch = "x86_64")]
        if tiled::applies() {
            return tiled::forward(self, qkv, scale);
        }
        self.forward_gemm(qkv, scale)
    }

    /// The gradient `[b·n, 3·hidden]` of the projection rows `x` from the context's gradient `g`
    /// and the forward pass's probabilities, on the same kernels as [`Dims::forward`].
    pub(crate) fn backward(&self, x: &[f32], probs: &[f32], g: &[f32], scale: f32) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        if tiled::applies() {
            return tiled::backward(self, x, probs, g, scale);
        }
        self.backward_gemm(x, probs, g, scale)
    }

    /// [`Dims::forward`] through the `gemm` crate, each sequence's heads on one thread.
    fn forward_gemm(&self, qkv: &[f32], scale: f32) -> (Vec<f32>, Vec<f32>) {
        let Dims { batch, n, d, .. } = *self;
        let (h, w, np) = (self.hidden(), 3 * self.hidden(), self.stride());
        let (hi, wi, npi) = (h as isize, w as isize, np as isize);
        let mut out = super::buffer::zeroed::<f32>(batch * n * h);
        let mut probs = super::buffer::zeroed::<f32>(batch * self.probs_len());
        out.par_chunks_mut(n * h)
            .zip(probs.par_chunks_mut(self.probs_len()))
            .zip(qkv.par_chunks(self.qkv_len()))
            .for_each(|((out, probs), x)| {
                for (head, p) in probs.chunks_mut(n * np).enumerate() {
                    let (q, k, v) = (head * d, h + head * d, 2 * h + head * d);
                    // scores = q·kᵀ: kᵀ's element (c, j) is k[j, c].
                    matmul((n, n, d), p, (npi, 1), &x[q..], (wi, 1), &x[k..], (1, wi), false, false);
                    p.chunks_mut(np).for_each(|row| softmax_in_place(&mut row[..n], scale));
                    // context = p·v, into this head's columns of the output rows.
                    matmul((n, d, n), &mut out[head * d..], (hi, 1), p, (npi, 1), &x[v..], (wi, 1), false, false);
                }
            });
        (out, probs)
    }

    /// [`Dims::backward`] through the `gemm` crate, each sequence's heads on one thread.
    fn backward_gemm(&self, x: &[f32], probs: &[f32], g: &[f32], scale: f32) -> Vec<f32> {
        let Dims { n, d, .. } = *self;
        let (h, w, np) = (self.hidden(), 3 * self.hidden(), self.stride());
        let (ni, hi, wi, npi) = (n as isize, h as isize, w as isize, np as isize);
        let mut dx = super::buffer::zeroed::<f32>(x.len());
        dx.par_chunks_mut(self.qkv_len())
            .zip(x.par_chunks(self.qkv_len()))
            .zip(g.par_chunks(n * h).zip(probs.par_chunks(self.probs_len())))
            .for_each(|((dx, x), (g, probs))| {
                let mut ds = vec![0f32; n * n];
                for (head, p) in probs.chunks(n * np).enumerate() {
                    let (q, k, v, c) = (head * d, h + head * d, 2 * h + head * d, head * d);
                    // dp = dctx·vᵀ.
                    matmul((n, n, d), &mut ds, (ni, 1), &g[c..], (hi, 1), &x[v..], (1, wi), false, false);
                    // dv = pᵀ·dctx.
                    matmul((n, d, n), &mut dx[v..], (wi, 1), p, (1, npi), &g[c..], (hi, 1), false, false);
                    // ds = p ⊙ (dp - rowsum(dp ⊙ p)) · scale, the gradient of the scaled scores.
                    for (dr, pr) in ds.chunks_mut(n).zip(p.chunks(np)) {
                        softmax_grad_in_place(dr, &pr[..n], scale);
                    }
                    // dq = ds·k, dk = dsᵀ·q.
                    matmul((n, d, n), &mut dx[q..], (wi, 1), &ds, (ni, 1), &x[k..], (wi, 1), false, false);
                    matmul((n, d, n), &mut dx[k..], (wi, 1), &ds, (1, ni), &x[q..], (wi, 1), false, false);
                }
            });
        dx
    }

    /// Token width.
    pub(crate) fn hidden(&self) -> usize {
        self.heads * self.d
    }

    /// Elements of one sequence's rows of the projection.
    fn qkv_len(&self) -> usize {
        self.n * 3 * self.hidden()
    }

    /// The row stride of the probabilities: n rounded up to a whole register tile of columns
    /// (16, `panel::NR`), which both paths share.
    pub(crate) fn stride(&self) -> usize {
        self.n.next_multiple_of(16)
    }

    /// Elements of one sequence's probabilities, every head's `n` rows of [`Dims::stride`].
    fn probs_len(&self) -> usize {
        self.heads * self.n * self.stride()
    }
}

/// The op, holding the forward pass's probabilities `[b, heads, n, n]` for its backward pass.
struct Attention {
    dims: Dims,
    scale: f32,
    probs: Mutex<Option<Vec<f32>>>,
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "samhost-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = f32_slice(s, l, "attention input")?;
        let (out, probs) = self.dims.forward(qkv, self.scale);
        *self.probs.lock().unwrap_or_else(|e| e.into_inner()) = Some(probs);
        Ok((CpuStorage::F32(out), Shape::from((self.dims.batch * self.dims.n, self.dims.hidden()))))
    }

    fn bwd(&self, qkv: &Tensor, _ctx: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !qkv.track_op() {
            return Ok(None);
        }
        let guard = self.probs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(probs) = guard.as_ref() else {
            candle_core::bail!("attention: the backward pass ran before the forward pass")
        };
        let grad = grad_f32(grad)?;
        let ((xs, xl), (gs, gl)) = (qkv.storage_and_layout(), grad.storage_and_layout());
        let x = slice_of::<f32>(&xs, xl, "attention input")?;
        let g = slice_of::<f32>(&gs, gl, "attention gradient")?;
        let dx = self.dims.backward(x, probs, g, self.scale);
        Ok(Some(Tensor::from_vec(dx, qkv.shape(), qkv.device())?))
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::Dims;

    /// The register tiles against the `gemm` crate's products (each checked against f64 math in
    /// `tests/it/ops.rs`): context, probabilities and gradient to 1e-5 relative, over sequences
    /// with a partial tile of rows and of columns, heads narrower than a tile, and ViT-S/14's
    /// 257 tokens of 6 heads of 64.
    #[test]
    fn the_tiles_match_the_gemm_path() {
        if !super::tiled::applies() {
            return;
        }
        let value = |i: usize, salt: usize| (((i * 7919 + salt) % 1009) as f32 - 504.0) / 300.0;
        for (batch, n, heads, d) in [(2, 5, 1, 4), (3, 17, 6, 8), (1, 65, 2, 16), (2, 257, 6, 64), (1, 30, 3, 24)] {
            let dims = Dims { batch, n, heads, d };
            let (h, scale) = (heads * d, 1.0 / (d as f32).sqrt());
            let x: Vec<f32> = (0..batch * n * 3 * h).map(|i| value(i, 1)).collect();
            let g: Vec<f32> = (0..batch * n * h).map(|i| value(i, 2)).collect();
            let (out, probs) = super::tiled::forward(&dims, &x, scale);
            let (out_ref, probs_ref) = dims.forward_gemm(&x, scale);
            let dx = super::tiled::backward(&dims, &x, &probs, &g, scale);
            let dx_ref = dims.backward_gemm(&x, &probs_ref, &g, scale);
            for (what, a, b) in
                [("context", &out, &out_ref), ("probabilities", &probs, &probs_ref), ("gradient", &dx, &dx_ref)]
            {
                assert_eq!(a.len(), b.len(), "{what}");
                let top = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let worst = a.iter().zip(b.iter()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(worst <= 1e-5 * top, "b{batch} n{n} heads{heads} d{d}: {what} off by {worst:e} of {top:e}");
            }
        }
    }
}

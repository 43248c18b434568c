//! A whole pre-norm transformer encoder layer (ViT's `ViTLayer`, DINOv2's `Dinov2Layer`) without
//! dropout or stochastic depth as one op over token rows `[b·n, hidden]`:
//!
//! ```text
//! x1  = x  + s1 ⊙ (attention(layer_norm1(x))·W_oᵀ + b_o)
//! out = x1 + s2 ⊙ (gelu(layer_norm2(x1)·W_1ᵀ + b_1)·W_2ᵀ + b_2)
//! ```
//!
//! with DINOv2's LayerScale vectors `s1`, `s2` (ViT has none).
//!
//! Composed from the fused ops the layer is ten nodes in candle's graph, and candle's backward
//! pass adds the gradient of every node's input into a freshly zero-filled tensor: eleven
//! activation-sized memsets and adds per layer (about 12.8 M floats at ViT-S, 112 px, batch
//! 32), and two residual sums in the forward pass. Here the layer is one node: the backward
//! pass sums the residual gradients in place and hands every parameter's gradient over through
//! [`super::param_grads`], so only the layer's input gradient goes back to candle.
//!
//! The parameters are not operands of the op (candle's custom ops take at most three), so the op
//! runs only where their gradients are sure to be collected: in the training code's
//! forward-backward pass ([`super::param_grads::capture_ahead`]), or where no parameter takes a
//! gradient (evaluation, a frozen backbone). One trainable parameter is passed as the second
//! operand, so the output joins the graph even when the input is data. Elsewhere (other devices
//! and dtypes, dropout or stochastic depth in training, another activation) the caller composes the
//! layer from the single ops, which compute the same math; `SAMHOST_FUSED_ENCODER=0` makes it
//! do so everywhere.

use super::attention::Dims;
use super::cpu::{add_into, f32_slice, fused_ok, grad_f32, named_slices, rows_per_task, slice_of, BLOCK};
use super::gemm::matmul_new;
use super::linear::column_sums;
use super::param_grads::{capture_ahead, deliver};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// The tensors of one encoder layer, PyTorch's layouts (weights `[out, in]`), as the layer reads
/// them for this pass ([`crate::models::no_grad::param`]: frozen ones detached).
pub struct EncoderTensors {
    /// The first layer norm's weight and bias `[hidden]`.
    pub ln1: [Tensor; 2],
    /// The query, key and value weights `[hidden, hidden]`.
    pub qkv: [Tensor; 3],
    /// Their biases `[hidden]`, when they have them.
    pub qkv_bias: Option<[Tensor; 3]>,
    /// The attention output projection's weight `[hidden, hidden]` and bias.
    pub out: [Tensor; 2],
    /// The second layer norm's weight and bias.
    pub ln2: [Tensor; 2],
    /// The MLP's first layer, `[intermediate, hidden]` and `[intermediate]`.
    pub fc1: [Tensor; 2],
    /// The MLP's second layer, `[hidden, intermediate]` and `[hidden]`.
    pub fc2: [Tensor; 2],
    /// LayerScale of the attention and the MLP branch `[hidden]` (DINOv2), when the layer has it.
    pub scales: Option<[Tensor; 2]>,
}

/// Positions of the tensors in the op's list.
const LN1_W: usize = 0;
const LN1_B: usize = 1;
const Q_W: usize = 2;
const OUT_W: usize = 5;
const OUT_B: usize = 6;
const LN2_W: usize = 7;
const LN2_B: usize = 8;
const FC1_W: usize = 9;
const FC1_B: usize = 10;
const FC2_W: usize = 11;
const FC2_B: usize = 12;
/// The LayerScale vectors (absent in ViT).
const S1: usize = 13;
const S2: usize = 14;
/// The query bias (the key's and value's follow; absent without biases).
const Q_B: usize = 15;
/// The list's length.
const SLOTS: usize = 18;

/// Names of the tensors at those positions, for errors.
const NAMES: [&str; SLOTS] = [
    "layer norm 1 weight",
    "layer norm 1 bias",
    "query weight",
    "key weight",
    "value weight",
    "attention output weight",
    "attention output bias",
    "layer norm 2 weight",
    "layer norm 2 bias",
    "MLP weight 1",
    "MLP bias 1",
    "MLP weight 2",
    "MLP bias 2",
    "attention LayerScale",
    "MLP LayerScale",
    "query bias",
    "key bias",
    "value bias",
];

impl EncoderTensors {
    /// The tensors at their positions (`None` for absent optional ones).
    fn list(&self) -> Vec<Option<Tensor>> {
        let fixed = [&self.ln1[..], &self.qkv[..], &self.out[..], &self.ln2[..], &self.fc1[..], &self.fc2[..]].concat();
        let optional = |o: Option<&[Tensor]>, n: usize| -> Vec<Option<Tensor>> {
            match o {
                Some(t) => t.iter().cloned().map(Some).collect(),
                None => vec![None; n],
            }
        };
        let mut v: Vec<Option<Tensor>> = fixed.into_iter().map(Some).collect();
        v.extend(optional(self.scales.as_ref().map(|s| &s[..]), 2));
        v.extend(optional(self.qkv_bias.as_ref().map(|b| &b[..]), 3));
        v
    }
}

/// The layer's output rows `[b·n, hidden]` for token rows `x` `[b·n, hidden]` (`batch` = b
/// sequences), `heads` attention heads and the two layer norms' epsilons; `None` where the fused
/// op does not apply (see the module documentation) and the caller composes the layer.
pub fn encoder_layer(
    x: &Tensor,
    t: &EncoderTensors,
    batch: usize,
    heads: usize,
    eps: (f64, f64),
) -> Result<Option<Tensor>> {
    if !enabled() {
        return Ok(None);
    }
    let p = t.list();
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous();
    if !fused_ok(x) || !p.iter().flatten().all(f32_cpu) {
        return Ok(None);
    }
    let Ok((rows, h)) = x.dims2() else { return Ok(None) };
    let inter = t.fc1[1].elem_count();
    let shapes_fit = batch > 0
        && heads > 0
        && rows > 0
        && h > 0
        && inter > 0
        && rows.is_multiple_of(batch)
        && h.is_multiple_of(heads)
        && p.iter().enumerate().all(|(i, t)| t.as_ref().is_none_or(|t| t.dims() == expected_dims(i, h, inter)));
    if !shapes_fit {
        return Ok(None);
    }
    let tracked: Vec<usize> = (0..SLOTS).filter(|&i| p[i].as_ref().is_some_and(Tensor::track_op)).collect();
    let collected = capture_ahead() && tracked.iter().all(|&i| p[i].as_ref().is_some_and(Tensor::is_variable));
    if !(tracked.is_empty() || collected) {
        return Ok(None);
    }
    let dims = Dims { batch, n: rows / batch, heads, d: h / heads };
    let anchor = tracked.first().and_then(|&i| p[i].clone().map(|t| (i, t)));
    let op = EncoderOp {
        dims,
        eps: (eps.0 as f32, eps.1 as f32),
        scale: (1.0 / (dims.d as f64).sqrt()) as f32,
        keep: x.track_op() || !tracked.is_empty(),
        anchor: anchor.as_ref().map(|(i, _)| *i),
        saved: Mutex::new(None),
        p,
    };
    let x = x.contiguous()?;
    match anchor {
        Some((_, a)) => x.apply_op2(&a, op).map(Some),
        None => x.apply_op1(op).map(Some),
    }
}

/// Whether the fused layer may run: not when `SAMHOST_FUSED_ENCODER=0` (for comparisons with the
/// composed layer; read once per process).
fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| crate::ops::cpu::env_switch("SAMHOST_FUSED_ENCODER"))
}

/// The shape the tensor at `index` must have.
fn expected_dims(index: usize, h: usize, inter: usize) -> Vec<usize> {
    match index {
        Q_W..=OUT_W => vec![h, h],
        FC1_W => vec![inter, h],
        FC1_B => vec![inter],
        FC2_W => vec![h, inter],
        _ => vec![h],
    }
}

/// What the forward pass keeps for the backward pass.
struct Saved {
    /// The first layer norm's output `[M, H]`.
    ln1: Vec<f32>,
    /// The query, key and value weights stacked `[3H, H]`.
    wqkv: Vec<f32>,
    /// The projection rows `[M, 3H]`.
    qkv: Vec<f32>,
    /// The attention probabilities `[b, heads, n, n]` (rows of `Dims::stride` values).
    probs: Vec<f32>,
    /// The attention context `[M, H]`.
    ctx: Vec<f32>,
    /// The two branches' outputs before LayerScale `[M, H]` (with LayerScale only).
    branches: Option<(Vec<f32>, Vec<f32>)>,
    /// The residual stream after the attention branch `[M, H]`.
    x1: Vec<f32>,
    /// The second layer norm's output `[M, H]`.
    ln2: Vec<f32>,
    /// The MLP's pre-activation `[M, I]`.
    z: Vec<f32>,
    /// Its GELU `[M, I]`.
    act: Vec<f32>,
}

/// The op: the layer's tensors, its sizes, and (when a backward pass may follow) what the forward
/// pass keeps.
struct EncoderOp {
    p: Vec<Option<Tensor>>,
    dims: Dims,
    eps: (f32, f32),
    scale: f32,
    keep: bool,
    /// The position of the parameter passed as the op's second operand.
    anchor: Option<usize>,
    saved: Mutex<Option<Saved>>,
}

/// `y[r] = y[r] + bias` for every row `r` of `bias.len()` elements.
fn add_bias(y: &mut [f32], bias: &[f32]) {
    let n = bias.len();
    let task = rows_per_task(n) * n;
    y.par_chunks_mut(task)
        .for_each(|y| y.chunks_mut(n).for_each(|row| row.iter_mut().zip(bias).for_each(|(v, &b)| *v += b)));
}

/// A residual branch's output: `residual + scale ⊙ branch` row by row (`residual + branch`
/// without a scale).
fn branch_sum(branch: &[f32], scale: Option<&[f32]>, residual: &[f32]) -> Vec<f32> {
    let mut y = residual.to_vec();
    match scale {
        None => add_into(&mut y, branch),
        Some(s) => {
            let task = rows_per_task(s.len()) * s.len();
            y.par_chunks_mut(task).zip(branch.par_chunks(task)).for_each(|(y, b)| {
                for (yr, br) in y.chunks_mut(s.len()).zip(b.chunks(s.len())) {
                    yr.iter_mut().zip(br).zip(s).for_each(|((y, &b), &s)| *y += s * b);
                }
            });
        }
    }
    y
}

/// Through LayerScale backwards: the branch's gradient `g ⊙ scale` per row, and the scale's,
/// the column sums of `g ⊙ branch`.
fn scale_backward(g: &[f32], scale: &[f32], branch: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let n = scale.len();
    let mut dg = g.to_vec();
    let task = rows_per_task(n) * n;
    dg.par_chunks_mut(task)
        .for_each(|d| d.chunks_mut(n).for_each(|r| r.iter_mut().zip(scale).for_each(|(v, &s)| *v *= s)));
    let mut prod = g.to_vec();
    mul_into(&mut prod, branch);
    (dg, column_sums(&prod, n))
}

/// `y ⊙= a`, in parallel blocks.
fn mul_into(y: &mut [f32], a: &[f32]) {
    y.par_chunks_mut(BLOCK).zip(a.par_chunks(BLOCK)).for_each(|(y, a)| y.iter_mut().zip(a).for_each(|(y, &a)| *y *= a));
}

impl EncoderOp {
    /// Whether the tensor at `i` takes a gradient in this pass.
    fn tracks(&self, i: usize) -> bool {
        self.p[i].as_ref().is_some_and(Tensor::track_op)
    }

    fn forward(&self, x: &[f32]) -> Result<(Vec<f32>, Shape)> {
        let guards: Vec<_> = self.p.iter().map(|t| t.as_ref().map(Tensor::storage_and_layout)).collect();
        let w = named_slices(&guards, &NAMES)?;
        let h = self.dims.hidden();
        let (m, inter) = (x.len() / h, w[FC1_B].len());
        let (scaled, hi, ii) = (!w[S1].is_empty(), h as isize, inter as isize);
        let mut ln1 = super::buffer::zeroed::<f32>(m * h);
        super::layer_norm::normalize(&mut ln1, x, w[LN1_W], w[LN1_B], self.eps.0);
        let wqkv: Vec<f32> = w[Q_W..Q_W + 3].concat();
        let mut qkv = matmul_new((m, 3 * h, h), &ln1, (hi, 1), &wqkv, (1, hi), true);
        if !w[Q_B].is_empty() {
            add_bias(&mut qkv, &w[Q_B..Q_B + 3].concat());
        }
        let (ctx, probs) = self.dims.forward(&qkv, self.scale);
        let mut a = matmul_new((m, h, h), &ctx, (hi, 1), w[OUT_W], (1, hi), true);
        add_bias(&mut a, w[OUT_B]);
        let x1 = branch_sum(&a, scaled.then_some(w[S1]), x);
        let mut ln2 = super::buffer::zeroed::<f32>(m * h);
        super::layer_norm::normalize(&mut ln2, &x1, w[LN2_W], w[LN2_B], self.eps.1);
        let mut z = matmul_new((m, inter, h), &ln2, (hi, 1), w[FC1_W], (1, hi), true);
        add_bias(&mut z, w[FC1_B]);
        let mut act = super::buffer::zeroed::<f32>(m * inter);
        super::gelu::forward_all(&mut act, &z);
        let mut mlp = matmul_new((m, h, inter), &act, (ii, 1), w[FC2_W], (1, ii), true);
        add_bias(&mut mlp, w[FC2_B]);
        let out = branch_sum(&mlp, scaled.then_some(w[S2]), &x1);
        if self.keep {
            let branches = scaled.then_some((a, mlp));
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Saved { ln1, wqkv, qkv, probs, ctx, branches, x1, ln2, z, act });
        }
        Ok((out, Shape::from((m, h))))
    }

    /// The input's gradient (when `x` tracks one) from the output's gradient `g`; the
    /// parameters' gradients are handed over, except the anchor's, returned second.
    fn backward(&self, x: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let guard = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(s) = guard.as_ref() else {
            candle_core::bail!("encoder layer: the backward pass ran before the forward pass")
        };
        let g = grad_f32(g)?;
        let ((xs, xl), (gs, gl)) = (x.storage_and_layout(), g.storage_and_layout());
        let (xv, g) =
            (slice_of::<f32>(&xs, xl, "encoder layer input")?, slice_of::<f32>(&gs, gl, "encoder layer gradient")?);
        let guards: Vec<_> = self.p.iter().map(|t| t.as_ref().map(Tensor::storage_and_layout)).collect();
        let w = named_slices(&guards, &NAMES)?;
        let h = self.dims.hidden();
        let (m, inter) = (xv.len() / h, w[FC1_B].len());
        let (hi, ii) = (h as isize, inter as isize);
        let x_tr = x.track_op();
        // Whether the input or a tensor among the first `n` positions (or the optional ones
        // `extra`) takes a gradient: then the backward pass goes on below.
        let below = |n: usize, extra: &[usize]| x_tr || (0..n).chain(extra.iter().copied()).any(|i| self.tracks(i));
        let upper_opt = [S1, Q_B, Q_B + 1, Q_B + 2];
        let mut grads: Vec<Option<Vec<f32>>> = vec![None; SLOTS];
        let mut dx = None;
        // The MLP branch.
        let mlp = s.branches.as_ref().map(|(_, mlp)| &mlp[..]);
        let dmlp = self.branch_backward(g, mlp, &w, (S2, FC2_W), &s.act, &mut grads);
        let dmlp = &dmlp[..];
        if below(FC2_W, &upper_opt) {
            let dact = matmul_new((m, inter, h), dmlp, (hi, 1), w[FC2_W], (ii, 1), true);
            let mut dz = super::buffer::zeroed::<f32>(m * inter);
            super::gelu::backward_all(&mut dz, &s.z, &dact);
            drop(dact);
            if self.tracks(FC1_W) {
                grads[FC1_W] = Some(matmul_new((inter, h, m), &dz, (1, ii), &s.ln2, (hi, 1), true));
            }
            if self.tracks(FC1_B) {
                grads[FC1_B] = Some(column_sums(&dz, inter));
            }
            if below(FC1_W, &upper_opt) {
                let dln2 = matmul_new((m, h, inter), &dz, (ii, 1), w[FC1_W], (hi, 1), true);
                drop(dz);
                // The residual stream's gradient after the attention branch: through the second
                // layer norm, plus the skip connection's.
                let mut dx1 = super::buffer::zeroed::<f32>(m * h);
                let (dw, db) = super::layer_norm::normalize_backward(&mut dx1, &s.x1, &dln2, w[LN2_W], self.eps.1);
                drop(dln2);
                add_into(&mut dx1, g);
                (grads[LN2_W], grads[LN2_B]) = (self.tracks(LN2_W).then_some(dw), self.tracks(LN2_B).then_some(db));
                self.attention_backward(s, &w, xv, &dx1, x_tr, &mut grads, &mut dx)?;
            }
        }
        drop(guards);
        let dev = x.device();
        let mut anchor_grad = None;
        for (i, grad) in grads.into_iter().enumerate() {
            let (Some(grad), Some(p)) = (grad, self.p[i].as_ref()) else { continue };
            let back = deliver(p, Tensor::from_vec(grad, p.shape(), dev)?)?;
            if Some(i) == self.anchor {
                anchor_grad = back;
            } else if back.is_some() {
                candle_core::bail!(
                    "encoder layer: the gradient of the {} has nowhere to go (the fused layer runs only in a \
                     forward-backward pass that collects parameter gradients)",
                    NAMES[i]
                );
            }
        }
        let dx = dx.map(|v| Tensor::from_vec(v, x.shape(), dev)).transpose()?;
        Ok((dx, anchor_grad))
    }

    /// A residual branch's last linear layer backwards from the residual stream's gradient `g`:
    /// through the LayerScale at position `scale` when the layer has one (`branch` is then the
    /// branch's output before it), then the gradients of the weight at position `weight` (whose
    /// input rows are `input`) and of the bias after it. Returns the gradient of the layer's
    /// output.
    fn branch_backward<'g>(
        &self,
        g: &'g [f32],
        branch: Option<&[f32]>,
        w: &[&[f32]],
        (scale, weight): (usize, usize),
        input: &[f32],
        grads: &mut [Option<Vec<f32>>],
    ) -> std::borrow::Cow<'g, [f32]> {
        let d = match branch {
            Some(branch) => {
                let (d, ds) = scale_backward(g, w[scale], branch);
                grads[scale] = self.tracks(scale).then_some(ds);
                std::borrow::Cow::Owned(d)
            }
            None => std::borrow::Cow::Borrowed(g),
        };
        let h = self.dims.hidden();
        let (m, k) = (g.len() / h, input.len() / (g.len() / h).max(1));
        if self.tracks(weight) {
            grads[weight] = Some(matmul_new((h, k, m), &d, (1, h as isize), input, (k as isize, 1), true));
        }
        if self.tracks(weight + 1) {
            grads[weight + 1] = Some(column_sums(&d, h));
        }
        d
    }

    /// The attention branch's backward pass from `dx1`, the gradient of the residual stream
    /// after it: its parameters' gradients into `grads`, the layer input's into `dx`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        s: &Saved,
        w: &[&[f32]],
        x: &[f32],
        dx1: &[f32],
        x_tr: bool,
        grads: &mut [Option<Vec<f32>>],
        dx: &mut Option<Vec<f32>>,
    ) -> Result<()> {
        let h = self.dims.hidden();
        let m = x.len() / h;
        let (hi, h3) = (h as isize, 3 * h as isize);
        let a = s.branches.as_ref().map(|(a, _)| &a[..]);
        let da = self.branch_backward(dx1, a, w, (S1, OUT_W), &s.ctx, grads);
        let da = &da[..];
        let qkv_ids = [Q_W, Q_W + 1, Q_W + 2, Q_B, Q_B + 1, Q_B + 2];
        if !(x_tr || self.tracks(LN1_W) || self.tracks(LN1_B) || qkv_ids.iter().any(|&i| self.tracks(i))) {
            return Ok(());
        }
        let dctx = matmul_new((m, h, h), da, (hi, 1), w[OUT_W], (hi, 1), true);
        let dqkv = self.dims.backward(&s.qkv, &s.probs, &dctx, self.scale);
        drop(dctx);
        if (Q_W..Q_W + 3).any(|i| self.tracks(i)) {
            let dw = matmul_new((3 * h, h, m), &dqkv, (1, h3), &s.ln1, (hi, 1), true);
            for (j, part) in dw.chunks(h * h).enumerate() {
                grads[Q_W + j] = self.tracks(Q_W + j).then(|| part.to_vec());
            }
        }
        if (Q_B..Q_B + 3).any(|i| self.tracks(i)) {
            let db = column_sums(&dqkv, 3 * h);
            for (j, part) in db.chunks(h).enumerate() {
                grads[Q_B + j] = self.tracks(Q_B + j).then(|| part.to_vec());
            }
        }
        if x_tr || self.tracks(LN1_W) || self.tracks(LN1_B) {
            let dln1 = matmul_new((m, h, 3 * h), &dqkv, (h3, 1), &s.wqkv, (hi, 1), true);
            drop(dqkv);
            let mut d = super::buffer::zeroed::<f32>(m * h);
            let (dw, db) = super::layer_norm::normalize_backward(&mut d, x, &dln1, w[LN1_W], self.eps.0);
            (grads[LN1_W], grads[LN1_B]) = (self.tracks(LN1_W).then_some(dw), self.tracks(LN1_B).then_some(db));
            if x_tr {
                add_into(&mut d, dx1);
                *dx = Some(d);
            }
        }
        Ok(())
    }
}

impl CustomOp1 for EncoderOp {
    fn name(&self) -> &'static str {
        "samhost-encoder-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out, shape) = self.forward(f32_slice(s, l, "encoder layer input")?)?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.backward(x, grad)?.0)
    }
}

impl CustomOp2 for EncoderOp {
    fn name(&self) -> &'static str {
        "samhost-encoder-layer"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out, shape) = self.forward(f32_slice(s, l, "encoder layer input")?)?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.backward(x, grad)
    }
}

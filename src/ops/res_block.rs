//! The CIFAR ResNet's post-activation basic block (He et al. 2016) in training mode as one op
//! over images `[N, C, H, W]`:
//!
//! ```text
//! out = relu(bn2(conv2(relu(bn1(conv1(x))))) + skip(x))
//! ```
//!
//! with 3x3 convolutions (padding 1, the first one strided), BatchNorm with the batch's
//! statistics, and a skip that is the identity, option A (subsample by 2 and pad the new channels
//! with zeros) or option B (a strided 1x1 convolution and BatchNorm).
//!
//! Composed from the fused convolution and BatchNorm ops the block is six nodes in candle's
//! graph, and candle's backward pass adds the gradient of every node's input into a freshly
//! zero-filled tensor: six activation-sized memsets and adds per block (the block's input takes
//! two gradients), about a tenth of ResNet-20's SGD step. Here the block is one node: the skip's
//! gradient is added into the input's in place, the second BatchNorm adds the skip in its own
//! pass (the sum before the ReLU is never stored), its backward pass reads the ReLU's gate off
//! the block's output, and the parameters' gradients are handed over through
//! [`super::param_grads`], so only the block's input gradient goes back to candle.
//!
//! As the fused encoder layer ([`super::encoder_layer`]), the op keeps the parameters out of
//! candle's graph but one (the anchor), so it runs only where their gradients are sure to be
//! collected (the training code's forward-backward pass) or where none takes a gradient.
//! Elsewhere (evaluation mode, other devices and dtypes, other shapes) the caller composes the
//! block from the single ops, which compute the same; `SAMHOST_FUSED_BLOCK=0` makes it do so
//! everywhere. The batch statistics are returned for the caller to move the running statistics.

use super::batch_norm::{normalize_backward, normalize_train, Planes, Stats};
use super::conv2d::SliceConv;
use super::cpu::{f32_slice, fused_ok, grad_f32, slice_of, BLOCK};
use super::param_grads::{capture_ahead, deliver};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// The skip connection of a block.
pub enum BlockSkip {
    /// The input itself (same width and resolution).
    Identity,
    /// Option A: the input subsampled by 2 with `left` and `right` zero channels around it.
    Pad {
        /// Zero channels before the input's.
        left: usize,
        /// Zero channels after them.
        right: usize,
    },
    /// Option B: a 1x1 convolution `[O, C, 1, 1]` with the block's stride, then BatchNorm
    /// (weight and bias `[O]`, and its epsilon).
    Conv {
        /// The convolution's kernel.
        kernel: Tensor,
        /// The BatchNorm's weight and bias.
        bn: [Tensor; 2],
        /// The BatchNorm's epsilon.
        eps: f64,
    },
}

/// The tensors and settings of one block as this pass reads them (frozen ones detached,
/// [`crate::models::no_grad::param`]).
pub struct BlockTensors {
    /// The first convolution's kernel `[O, C, 3, 3]`.
    pub conv1: Tensor,
    /// The first BatchNorm's weight and bias `[O]`.
    pub bn1: [Tensor; 2],
    /// The second convolution's kernel `[O, O, 3, 3]`.
    pub conv2: Tensor,
    /// The second BatchNorm's weight and bias `[O]`.
    pub bn2: [Tensor; 2],
    /// The two BatchNorms' epsilons.
    pub eps: (f64, f64),
    /// The first convolution's (and the projection's) stride.
    pub stride: usize,
    /// The skip connection.
    pub skip: BlockSkip,
}

/// The block's output and the batch statistics of its BatchNorms: `(mean, biased variance)`
/// `[O]` of the first, the second and (option B) the skip's, each over `count` values.
pub struct BlockOutput {
    /// The block's output `[N, O, Ho, Wo]`.
    pub y: Tensor,
    /// The statistics of each BatchNorm, in the order above.
    pub stats: Vec<(Tensor, Tensor)>,
    /// Values per channel the statistics are taken over (N·Ho·Wo).
    pub count: usize,
}

/// Positions of the tensors in the op's list.
const CONV1: usize = 0;
const BN1_W: usize = 1;
const BN1_B: usize = 2;
const CONV2: usize = 3;
const BN2_W: usize = 4;
const BN2_B: usize = 5;
const SKIP_CONV: usize = 6;
const SKIP_W: usize = 7;
const SKIP_B: usize = 8;
/// The list's length.
const SLOTS: usize = 9;

/// Names of the tensors at those positions, for errors.
const NAMES: [&str; SLOTS] = [
    "first convolution",
    "first BatchNorm weight",
    "first BatchNorm bias",
    "second convolution",
    "second BatchNorm weight",
    "second BatchNorm bias",
    "projection convolution",
    "projection BatchNorm weight",
    "projection BatchNorm bias",
];

/// The skip's kind, without its tensors (those are in the op's list).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Skip {
    Identity,
    Pad { left: usize },
    Conv,
}

/// The block in training mode as one op, or `None` where it does not apply (see the module
/// documentation) and the caller composes the block.
pub fn res_block_train(x: &Tensor, t: &BlockTensors) -> Result<Option<BlockOutput>> {
    if !enabled() || !fused_ok(x) || x.rank() != 4 {
        return Ok(None);
    }
    let (skip, skip_eps, mut p) = match &t.skip {
        BlockSkip::Identity => (Skip::Identity, 0.0, vec![None; 3]),
        BlockSkip::Pad { left, .. } => (Skip::Pad { left: *left }, 0.0, vec![None; 3]),
        BlockSkip::Conv { kernel, bn, eps } => {
            (Skip::Conv, *eps, vec![Some(kernel.clone()), Some(bn[0].clone()), Some(bn[1].clone())])
        }
    };
    let mut list = vec![t.conv1.clone(), t.bn1[0].clone(), t.bn1[1].clone()];
    list.extend([t.conv2.clone(), t.bn2[0].clone(), t.bn2[1].clone()]);
    let mut all: Vec<Option<Tensor>> = list.into_iter().map(Some).collect();
    all.append(&mut p);
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous();
    if !all.iter().flatten().all(f32_cpu) {
        return Ok(None);
    }
    let Some(geometry) = Geometry::new(x.dims(), &all, t.stride, skip, &t.skip)? else { return Ok(None) };
    let tracked: Vec<usize> = (0..SLOTS).filter(|&i| all[i].as_ref().is_some_and(Tensor::track_op)).collect();
    let collected = capture_ahead() && tracked.iter().all(|&i| all[i].as_ref().is_some_and(Tensor::is_variable));
    if !(tracked.is_empty() || collected) {
        return Ok(None);
    }
    let anchor = tracked.first().and_then(|&i| all[i].clone().map(|t| (i, t)));
    let [n, _, ho, wo] = geometry.out;
    let shared = Arc::new(Mutex::new(None));
    let op = BlockOp {
        p: all,
        geometry,
        skip,
        eps: [t.eps.0, t.eps.1, skip_eps],
        keep: x.track_op() || !tracked.is_empty(),
        anchor: anchor.as_ref().map(|(i, _)| *i),
        saved: shared.clone(),
    };
    let x = x.contiguous()?;
    let y = match anchor {
        Some((_, a)) => x.apply_op2(&a, op)?,
        None => x.apply_op1(op)?,
    };
    let guard = shared.lock().map_err(|_| candle_core::Error::Msg("residual block: poisoned lock".into()))?;
    let Some(saved) = guard.as_ref() else { candle_core::bail!("residual block: the forward pass kept no statistics") };
    let dev = x.device();
    let stats = saved
        .stats
        .iter()
        .map(|s| Ok((Tensor::from_slice(&s.mean, s.mean.len(), dev)?, Tensor::from_slice(&s.var, s.var.len(), dev)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(BlockOutput { y, stats, count: n * ho * wo }))
}

/// Whether the fused block may run: not when `SAMHOST_FUSED_BLOCK=0` (for comparisons with the
/// composed block; read once per process).
fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("SAMHOST_FUSED_BLOCK").map_or(true, |v| v != "0"))
}

/// The block's shapes: its input, its output and its convolutions.
struct Geometry {
    input: [usize; 4],
    out: [usize; 4],
    conv1: SliceConv,
    conv2: SliceConv,
    /// The projection (option B).
    proj: Option<SliceConv>,
}

impl Geometry {
    /// The shapes, or `None` where the tensors do not make the block this op computes.
    fn new(x: &[usize], p: &[Option<Tensor>], stride: usize, skip: Skip, spec: &BlockSkip) -> Result<Option<Self>> {
        let &[n, c, h, w] = x else { return Ok(None) };
        let dims = |i: usize| p[i].as_ref().map(|t| t.dims().to_vec()).unwrap_or_default();
        let o = dims(CONV1).first().copied().unwrap_or(0);
        let fits = stride > 0
            && dims(CONV1) == [o, c, 3, 3]
            && dims(CONV2) == [o, o, 3, 3]
            && [BN1_W, BN1_B, BN2_W, BN2_B].iter().all(|&i| dims(i) == [o])
            && h + 2 > 3
            && w + 2 > 3;
        if !fits {
            return Ok(None);
        }
        let conv1 = SliceConv::new(x, &dims(CONV1), stride, 1)?;
        let out = conv1.out_dims();
        let conv2 = SliceConv::new(&out, &dims(CONV2), 1, 1)?;
        let (ho, wo) = (out[2], out[3]);
        let skip_fits = match (skip, spec) {
            (Skip::Identity, _) => stride == 1 && c == o,
            (Skip::Pad { left }, BlockSkip::Pad { right, .. }) => {
                stride == 2 && left + c + right == o && ho == h.div_ceil(2) && wo == w.div_ceil(2)
            }
            (Skip::Conv, _) => dims(SKIP_CONV) == [o, c, 1, 1] && [SKIP_W, SKIP_B].iter().all(|&i| dims(i) == [o]),
            _ => false,
        };
        // Training-mode BatchNorm needs two values per channel (the composed block says so).
        if !skip_fits || n * ho * wo < 2 {
            return Ok(None);
        }
        let proj = match skip {
            Skip::Conv => {
                let proj = SliceConv::new(x, &dims(SKIP_CONV), stride, 0)?;
                if proj.out_dims() != out {
                    return Ok(None);
                }
                Some(proj)
            }
            _ => None,
        };
        Ok(Some(Self { input: [n, c, h, w], out, conv1, conv2, proj }))
    }
}

/// What the forward pass keeps: the statistics always (for the running statistics), the
/// activations when a backward pass may follow.
struct Saved {
    /// The statistics of the first, the second and the projection's BatchNorm.
    stats: Vec<Stats>,
    /// The first convolution's output, the first BatchNorm-ReLU's output, the second
    /// convolution's output, the projection's output (option B); empty when not kept.
    acts: Vec<Vec<f32>>,
}

/// The op: the block's tensors, its shapes, and what the forward pass keeps.
struct BlockOp {
    p: Vec<Option<Tensor>>,
    geometry: Geometry,
    skip: Skip,
    /// The epsilons of the first, the second and the projection's BatchNorm.
    eps: [f64; 3],
    keep: bool,
    /// The position of the parameter passed as the op's second operand.
    anchor: Option<usize>,
    saved: Arc<Mutex<Option<Saved>>>,
}

/// `dst[i] += src[i]` where `gate[i] > 0`, in parallel blocks.
fn add_gated(dst: &mut [f32], src: &[f32], gate: &[f32]) {
    dst.par_chunks_mut(BLOCK).zip(src.par_chunks(BLOCK).zip(gate.par_chunks(BLOCK))).for_each(|(d, (s, g))| {
        d.iter_mut().zip(s.iter().zip(g)).for_each(|(d, (&s, &g))| {
            if g > 0.0 {
                *d += s
            }
        })
    });
}

impl BlockOp {
    /// Whether the tensor at `i` takes a gradient in this pass.
    fn tracks(&self, i: usize) -> bool {
        self.p[i].as_ref().is_some_and(Tensor::track_op)
    }

    /// The block's tensors' elements (an empty slice for absent ones), read under `guards`.
    fn slices<'a, G: std::ops::Deref<Target = candle_core::Storage>>(
        guards: &'a [Option<(G, &Layout)>],
    ) -> Result<Vec<&'a [f32]>> {
        guards
            .iter()
            .zip(NAMES)
            .map(|(g, what)| match g {
                Some((s, l)) => slice_of::<f32>(s, l, what),
                None => Ok(&[][..]),
            })
            .collect()
    }

    /// Option A's skip: the input subsampled by 2 into channels `left..left + C` of an
    /// output-shaped tensor, zeros elsewhere.
    fn padded_skip(&self, x: &[f32], left: usize) -> Vec<f32> {
        let ([_, c, h, w], [_, o, ho, wo]) = (self.geometry.input, self.geometry.out);
        let mut s = super::buffer::zeroed::<f32>(self.geometry.out.iter().product());
        s.par_chunks_mut(o * ho * wo).zip(x.par_chunks(c * h * w)).for_each(|(s, x)| {
            for ch in 0..c {
                let (dst, src) = (&mut s[(left + ch) * ho * wo..][..ho * wo], &x[ch * h * w..][..h * w]);
                for (i, row) in dst.chunks_exact_mut(wo).enumerate() {
                    let src_row = &src[2 * i * w..];
                    row.iter_mut().enumerate().for_each(|(j, v)| *v = src_row[2 * j]);
                }
            }
        });
        s
    }

    fn forward(&self, x: &[f32]) -> Result<(Vec<f32>, Shape)> {
        let guards: Vec<_> = self.p.iter().map(|t| t.as_ref().map(Tensor::storage_and_layout)).collect();
        let w = Self::slices(&guards)?;
        let g = &self.geometry;
        let planes = Planes::of(&g.out)?;
        let c1 = g.conv1.forward(x, w[CONV1]);
        let (a1, s1) = normalize_train(&c1, planes, (w[BN1_W], w[BN1_B]), self.eps[0], true, None);
        let c2 = g.conv2.forward(&a1, w[CONV2]);
        let (skip, proj) = match (self.skip, &g.proj) {
            (Skip::Pad { left }, _) => (Some(self.padded_skip(x, left)), None),
            (Skip::Conv, Some(proj)) => {
                let cs = proj.forward(x, w[SKIP_CONV]);
                let (s, stats) = normalize_train(&cs, planes, (w[SKIP_W], w[SKIP_B]), self.eps[2], false, None);
                (Some(s), Some((cs, stats)))
            }
            _ => (None, None),
        };
        let residual = skip.as_deref().unwrap_or(x);
        let (out, s2) = normalize_train(&c2, planes, (w[BN2_W], w[BN2_B]), self.eps[1], true, Some(residual));
        let mut stats = vec![s1, s2];
        let mut acts = if self.keep { vec![c1, a1, c2] } else { Vec::new() };
        if let Some((cs, s)) = proj {
            stats.push(s);
            if self.keep {
                acts.push(cs);
            }
        }
        *self.saved.lock().map_err(|_| candle_core::Error::Msg("residual block: poisoned lock".into()))? =
            Some(Saved { stats, acts });
        Ok((out, Shape::from(g.out.to_vec())))
    }

    /// The input's gradient (when `x` tracks one) from the output `out` and its gradient; the
    /// parameters' gradients are handed over, except the anchor's, returned second.
    fn backward(&self, x: &Tensor, out: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let guard = self.saved.lock().map_err(|_| candle_core::Error::Msg("residual block: poisoned lock".into()))?;
        let Some(saved) = guard.as_ref().filter(|s| s.acts.len() >= 3) else {
            candle_core::bail!("residual block: the backward pass ran without the forward pass's activations")
        };
        let grad = grad_f32(grad)?;
        let ((xs, xl), (gs, gl), (os, ol)) =
            (x.storage_and_layout(), grad.storage_and_layout(), out.storage_and_layout());
        let xv = slice_of::<f32>(&xs, xl, "residual block input")?;
        let g = slice_of::<f32>(&gs, gl, "residual block gradient")?;
        let out = slice_of::<f32>(&os, ol, "residual block output")?;
        let guards: Vec<_> = self.p.iter().map(|t| t.as_ref().map(Tensor::storage_and_layout)).collect();
        let w = Self::slices(&guards)?;
        let geo = &self.geometry;
        let planes = Planes::of(&geo.out)?;
        let (c1, a1, c2) = (&saved.acts[0], &saved.acts[1], &saved.acts[2]);
        let need_x = x.track_op();
        let need_c1 = need_x || self.tracks(CONV1);
        let need_a1 = need_c1 || self.tracks(BN1_W) || self.tracks(BN1_B);
        let need_c2 = need_a1 || self.tracks(CONV2);
        let mut grads: Vec<Option<Vec<f32>>> = vec![None; SLOTS];
        // Through the ReLU (gated by the output) and the second BatchNorm.
        let (dc2, dw, db) = normalize_backward(c2, g, Some(out), planes, w[BN2_W], &saved.stats[1], need_c2);
        (grads[BN2_W], grads[BN2_B]) = (self.tracks(BN2_W).then_some(dw), self.tracks(BN2_B).then_some(db));
        let mut dx = None;
        if let Some(dc2) = dc2 {
            let (da1, dk2) = geo.conv2.backward([a1, w[CONV2], c2, &dc2], need_a1, self.tracks(CONV2));
            drop(dc2);
            grads[CONV2] = dk2;
            if let Some(da1) = da1 {
                let (dc1, dw, db) = normalize_backward(c1, &da1, Some(a1), planes, w[BN1_W], &saved.stats[0], need_c1);
                drop(da1);
                (grads[BN1_W], grads[BN1_B]) = (self.tracks(BN1_W).then_some(dw), self.tracks(BN1_B).then_some(db));
                if let Some(dc1) = dc1 {
                    let (gx, dk1) = geo.conv1.backward([xv, w[CONV1], c1, &dc1], need_x, self.tracks(CONV1));
                    grads[CONV1] = dk1;
                    dx = gx;
                }
            }
        }
        // The skip's gradient, added into the input's.
        match (self.skip, &geo.proj) {
            (Skip::Identity, _) => {
                if let Some(dx) = dx.as_mut() {
                    add_gated(dx, g, out);
                }
            }
            (Skip::Pad { left }, _) => {
                if let Some(dx) = dx.as_mut() {
                    self.pad_backward(dx, g, out, left);
                }
            }
            (Skip::Conv, Some(proj)) => {
                let (Some(cs), Some(stats)) = (saved.acts.get(3), saved.stats.get(2)) else {
                    candle_core::bail!("residual block: the projection's activations are missing")
                };
                let need_cs = need_x || self.tracks(SKIP_CONV);
                let (dcs, dw, db) = normalize_backward(cs, g, Some(out), planes, w[SKIP_W], stats, need_cs);
                (grads[SKIP_W], grads[SKIP_B]) = (self.tracks(SKIP_W).then_some(dw), self.tracks(SKIP_B).then_some(db));
                if let Some(dcs) = dcs {
                    let (gx, dk) = proj.backward([xv, w[SKIP_CONV], cs, &dcs], need_x, self.tracks(SKIP_CONV));
                    grads[SKIP_CONV] = dk;
                    if let (Some(dx), Some(gx)) = (dx.as_mut(), gx) {
                        dx.par_chunks_mut(BLOCK)
                            .zip(gx.par_chunks(BLOCK))
                            .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d += s));
                    }
                }
            }
            (Skip::Conv, None) => candle_core::bail!("residual block: the projection is missing"),
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
                    "residual block: the gradient of the {} has nowhere to go (the fused block runs only in a \
                     forward-backward pass that collects parameter gradients)",
                    NAMES[i]
                );
            }
        }
        let dx = dx.map(|dx| Tensor::from_vec(dx, x.shape(), dev)).transpose()?;
        Ok((dx, anchor_grad))
    }

    /// Option A's skip backwards: the output's gradient, gated by the output, at the kept channels
    /// added into the input's gradient at the subsampled positions.
    fn pad_backward(&self, dx: &mut [f32], g: &[f32], out: &[f32], left: usize) {
        let ([_, c, h, w], [_, o, ho, wo]) = (self.geometry.input, self.geometry.out);
        let per_out = o * ho * wo;
        dx.par_chunks_mut(c * h * w).enumerate().for_each(|(b, dx)| {
            for ch in 0..c {
                let at = b * per_out + (left + ch) * ho * wo;
                let (gp, op) = (&g[at..][..ho * wo], &out[at..][..ho * wo]);
                let dst = &mut dx[ch * h * w..][..h * w];
                for i in 0..ho {
                    for j in 0..wo {
                        if op[i * wo + j] > 0.0 {
                            dst[2 * i * w + 2 * j] += gp[i * wo + j];
                        }
                    }
                }
            }
        });
    }
}

impl CustomOp1 for BlockOp {
    fn name(&self) -> &'static str {
        "samhost-res-block"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out, shape) = self.forward(f32_slice(s, l, "residual block input")?)?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, x: &Tensor, out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.backward(x, out, grad)?.0)
    }
}

impl CustomOp2 for BlockOp {
    fn name(&self) -> &'static str {
        "samhost-res-block"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out, shape) = self.forward(f32_slice(s, l, "residual block input")?)?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.backward(x, out, grad)
    }
}

//! The post-activation block of the CIFAR ResNets:
//! `out = relu(bn2(conv2(relu(bn1(conv1(x))))) + skip(x))`; its statistics are those of `bn1`,
//! `bn2` and (option B) the projection's BatchNorm.

use super::{admissible, run, BlockOutput, Form, FormGrads, Pass, Saved};
use crate::ops::batch_norm::{normalize_backward, normalize_train, Planes};
use crate::ops::conv2d::SliceConv;
use crate::ops::cpu::{add_into, BLOCK};
use candle_core::{Result, Tensor};
use rayon::prelude::*;

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
    let p = tensor_list(t);
    if !admissible(x, &p) {
        return Ok(None);
    }
    let Some(form) = Post::new(x.dims(), &p, t)? else { return Ok(None) };
    run(x, p, form)
}

/// Consecutive blocks in training mode as one op (a network's residual trunk, [`super::chain`]):
/// the last block's output and every block's statistics in block order, or `None` where the
/// fused block does not apply to one of them (or fewer than two are given), and the caller runs
/// them one by one. `SAMHOST_FUSED_CHAIN=0` makes it decline (for comparisons).
pub fn res_chain_train(x: &Tensor, blocks: &[BlockTensors]) -> Result<Option<BlockOutput>> {
    super::chain::chain_train(x, blocks, tensor_list, Post::new)
}

/// The block's tensors at their positions in the op's list.
fn tensor_list(t: &BlockTensors) -> Vec<Option<Tensor>> {
    let extra = match &t.skip {
        BlockSkip::Conv { kernel, bn, .. } => [Some(kernel.clone()), Some(bn[0].clone()), Some(bn[1].clone())],
        _ => [None, None, None],
    };
    [&t.conv1, &t.bn1[0], &t.bn1[1], &t.conv2, &t.bn2[0], &t.bn2[1]]
        .into_iter()
        .map(|t| Some(t.clone()))
        .chain(extra)
        .collect()
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

/// The form: its shapes, its skip, and the epsilons of the first, the second and the
/// projection's BatchNorm. The activations kept: the first convolution's output, the first
/// BatchNorm-ReLU's, the second convolution's and (option B) the projection's.
struct Post {
    geometry: Geometry,
    skip: Skip,
    eps: [f64; 3],
}

/// `dst[i] += src[i]` where `gate[i] > 0`, in parallel blocks. (Written as a select, not a
/// conditional add, so that it vectorises: the conditional store did not, and took 5 % of a
/// ResNet-20 step.)
fn add_gated(dst: &mut [f32], src: &[f32], gate: &[f32]) {
    dst.par_chunks_mut(BLOCK).zip(src.par_chunks(BLOCK).zip(gate.par_chunks(BLOCK))).for_each(|(d, (s, g))| {
        d.iter_mut().zip(s.iter().zip(g)).for_each(|(d, (&s, &g))| *d += if g > 0.0 { s } else { 0.0 })
    });
}

impl Post {
    /// The form for an input of dimensions `x` and the tensors `p` ([`tensor_list`]), or `None`
    /// where they do not make the block this op computes.
    fn new(x: &[usize], p: &[Option<Tensor>], t: &BlockTensors) -> Result<Option<Self>> {
        let (skip, skip_eps) = match &t.skip {
            BlockSkip::Identity => (Skip::Identity, 0.0),
            BlockSkip::Pad { left, .. } => (Skip::Pad { left: *left }, 0.0),
            BlockSkip::Conv { eps, .. } => (Skip::Conv, *eps),
        };
        let Some(geometry) = Geometry::new(x, p, t.stride, skip, &t.skip)? else { return Ok(None) };
        Ok(Some(Self { geometry, skip, eps: [t.eps.0, t.eps.1, skip_eps] }))
    }

    /// Option A's skip: the input subsampled by 2 into channels `left..left + C` of an
    /// output-shaped tensor, zeros elsewhere.
    fn padded_skip(&self, x: &[f32], left: usize) -> Vec<f32> {
        let ([_, c, h, w], [_, o, ho, wo]) = (self.geometry.input, self.geometry.out);
        let mut s = crate::ops::buffer::zeroed::<f32>(self.geometry.out.iter().product());
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

impl Form for Post {
    fn names(&self) -> &[&'static str] {
        &NAMES
    }

    fn out_dims(&self) -> [usize; 4] {
        self.geometry.out
    }

    fn counts(&self) -> Vec<usize> {
        let [n, _, ho, wo] = self.geometry.out;
        vec![n * ho * wo; if self.skip == Skip::Conv { 3 } else { 2 }]
    }

    fn forward(&self, x: &[f32], w: &[&[f32]], keep: bool) -> Result<(Vec<f32>, Saved)> {
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
        let mut acts = if keep { vec![c1, a1, c2] } else { Vec::new() };
        if let Some((cs, s)) = proj {
            stats.push(s);
            if keep {
                acts.push(cs);
            }
        }
        Ok((out, Saved { stats, acts, inner: Vec::new() }))
    }

    fn backward(&self, Pass { x: xv, out, g, w, saved, need_x, tracks }: Pass) -> Result<FormGrads> {
        let geo = &self.geometry;
        let planes = Planes::of(&geo.out)?;
        let [c1, a1, c2] = [0, 1, 2].map(|i| saved.acts.get(i).map_or(&[][..], |v| &v[..]));
        if c2.is_empty() || saved.stats.len() < 2 {
            candle_core::bail!("residual block: the forward pass's activations are missing");
        }
        let need_c1 = need_x || tracks(CONV1);
        let need_a1 = need_c1 || tracks(BN1_W) || tracks(BN1_B);
        let need_c2 = need_a1 || tracks(CONV2);
        let mut grads: Vec<Option<Vec<f32>>> = vec![None; SLOTS];
        // Through the ReLU (gated by the output) and the second BatchNorm.
        let (dc2, dw, db) = normalize_backward(c2, g, Some(out), planes, w[BN2_W], &saved.stats[1], need_c2);
        (grads[BN2_W], grads[BN2_B]) = (tracks(BN2_W).then_some(dw), tracks(BN2_B).then_some(db));
        let mut dx = None;
        if let Some(dc2) = dc2 {
            let (da1, dk2) = geo.conv2.backward([a1, w[CONV2], c2, &dc2], need_a1, tracks(CONV2));
            drop(dc2);
            grads[CONV2] = dk2;
            if let Some(da1) = da1 {
                let (dc1, dw, db) = normalize_backward(c1, &da1, Some(a1), planes, w[BN1_W], &saved.stats[0], need_c1);
                drop(da1);
                (grads[BN1_W], grads[BN1_B]) = (tracks(BN1_W).then_some(dw), tracks(BN1_B).then_some(db));
                if let Some(dc1) = dc1 {
                    let (gx, dk1) = geo.conv1.backward([xv, w[CONV1], c1, &dc1], need_x, tracks(CONV1));
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
                let need_cs = need_x || tracks(SKIP_CONV);
                let (dcs, dw, db) = normalize_backward(cs, g, Some(out), planes, w[SKIP_W], stats, need_cs);
                (grads[SKIP_W], grads[SKIP_B]) = (tracks(SKIP_W).then_some(dw), tracks(SKIP_B).then_some(db));
                if let Some(dcs) = dcs {
                    let (gx, dk) = proj.backward([xv, w[SKIP_CONV], cs, &dcs], need_x, tracks(SKIP_CONV));
                    grads[SKIP_CONV] = dk;
                    if let (Some(dx), Some(gx)) = (dx.as_mut(), gx) {
                        add_into(dx, &gx);
                    }
                }
            }
            (Skip::Conv, None) => candle_core::bail!("residual block: the projection is missing"),
        }
        Ok((dx, grads))
    }
}

//! The pre-activation block of the WideResNets without dropout:
//! `a = relu(bn1(x))`, `out = conv2(relu(bn2(conv1(a)))) + skip` with the skip `x` or, where the
//! block changes shape, a strided 1x1 convolution of `a`; its statistics are those of `bn1` and
//! `bn2`.

use super::{admissible, run, BlockOutput, Form, FormGrads, Pass, Saved};
use crate::ops::batch_norm::{normalize_backward, normalize_train, Planes};
use crate::ops::conv2d::SliceConv;
use crate::ops::cpu::add_into;
use candle_core::{Result, Tensor};

/// The tensors and settings of one pre-activation block as this pass reads them (frozen ones
/// detached, [`crate::models::no_grad::param`]).
pub struct PreActTensors {
    /// The first BatchNorm's weight and bias `[C]`.
    pub bn1: [Tensor; 2],
    /// The first convolution's kernel `[O, C, 3, 3]`.
    pub conv1: Tensor,
    /// The second BatchNorm's weight and bias `[O]`.
    pub bn2: [Tensor; 2],
    /// The second convolution's kernel `[O, O, 3, 3]`.
    pub conv2: Tensor,
    /// The shortcut's 1x1 kernel `[O, C, 1, 1]` of a block that changes shape (`None`: the
    /// identity).
    pub shortcut: Option<Tensor>,
    /// The two BatchNorms' epsilons.
    pub eps: (f64, f64),
    /// The first convolution's (and the shortcut's) stride.
    pub stride: usize,
}

/// Positions of the tensors in the op's list.
const BN1_W: usize = 0;
const BN1_B: usize = 1;
const CONV1: usize = 2;
const BN2_W: usize = 3;
const BN2_B: usize = 4;
const CONV2: usize = 5;
const SHORTCUT: usize = 6;

/// Names of the tensors at those positions, for errors.
const NAMES: [&str; 7] = [
    "first BatchNorm weight",
    "first BatchNorm bias",
    "first convolution",
    "second BatchNorm weight",
    "second BatchNorm bias",
    "second convolution",
    "shortcut convolution",
];

/// The pre-activation block in training mode as one op, or `None` where it does not apply (see
/// the module documentation) and the caller composes the block.
pub fn preact_block_train(x: &Tensor, t: &PreActTensors) -> Result<Option<BlockOutput>> {
    let p = tensor_list(t);
    if !admissible(x, &p) {
        return Ok(None);
    }
    let Some(form) = Pre::new(x.dims(), &p, t.stride, [t.eps.0, t.eps.1])? else { return Ok(None) };
    run(x, p, form)
}

/// Consecutive pre-activation blocks in training mode as one op (a WideResNet's blocks,
/// [`super::chain`]): the last block's output and every block's statistics in block order, or
/// `None` where the fused block does not apply to one of them (or fewer than two are given), and
/// the caller runs them one by one. `SAMHOST_FUSED_CHAIN=0` makes it decline (for comparisons).
pub fn preact_chain_train(x: &Tensor, blocks: &[PreActTensors]) -> Result<Option<BlockOutput>> {
    super::chain::chain_train(x, blocks, tensor_list, |dims, list, t| {
        Pre::new(dims, list, t.stride, [t.eps.0, t.eps.1])
    })
}

/// The block's tensors at their positions in the op's list.
fn tensor_list(t: &PreActTensors) -> Vec<Option<Tensor>> {
    [&t.bn1[0], &t.bn1[1], &t.conv1, &t.bn2[0], &t.bn2[1], &t.conv2]
        .into_iter()
        .map(|t| Some(t.clone()))
        .chain(std::iter::once(t.shortcut.clone()))
        .collect()
}

/// The form: its shapes and the two BatchNorms' epsilons. The activations kept: the first
/// BatchNorm-ReLU's output, the first convolution's and the second BatchNorm-ReLU's.
struct Pre {
    input: [usize; 4],
    out: [usize; 4],
    conv1: SliceConv,
    conv2: SliceConv,
    shortcut: Option<SliceConv>,
    eps: [f64; 2],
}

impl Pre {
    /// The shapes, or `None` where the tensors do not make the block this op computes.
    fn new(x: &[usize], p: &[Option<Tensor>], stride: usize, eps: [f64; 2]) -> Result<Option<Self>> {
        let &[n, c, h, w] = x else { return Ok(None) };
        let dims = |i: usize| p[i].as_ref().map(|t| t.dims().to_vec()).unwrap_or_default();
        let o = dims(CONV1).first().copied().unwrap_or(0);
        let fits = stride > 0
            && dims(CONV1) == [o, c, 3, 3]
            && dims(CONV2) == [o, o, 3, 3]
            && dims(BN1_W) == [c]
            && dims(BN1_B) == [c]
            && dims(BN2_W) == [o]
            && dims(BN2_B) == [o]
            && h + 2 > 3
            && w + 2 > 3
            && n * h * w >= 2;
        if !fits {
            return Ok(None);
        }
        let conv1 = SliceConv::new(x, &dims(CONV1), stride, 1)?;
        let out = conv1.out_dims();
        let conv2 = SliceConv::new(&out, &dims(CONV2), 1, 1)?;
        let shortcut = match &p[SHORTCUT] {
            None if stride == 1 && c == o => None,
            None => return Ok(None),
            Some(k) if k.dims() == [o, c, 1, 1] => {
                let s = SliceConv::new(x, k.dims(), stride, 0)?;
                if s.out_dims() != out {
                    return Ok(None);
                }
                Some(s)
            }
            Some(_) => return Ok(None),
        };
        if out[0] * out[2] * out[3] < 2 {
            return Ok(None);
        }
        Ok(Some(Self { input: [n, c, h, w], out, conv1, conv2, shortcut, eps }))
    }
}

impl Form for Pre {
    fn names(&self) -> &[&'static str] {
        &NAMES
    }

    fn out_dims(&self) -> [usize; 4] {
        self.out
    }

    fn counts(&self) -> Vec<usize> {
        let ([n, _, h, w], [_, _, ho, wo]) = (self.input, self.out);
        vec![n * h * w, n * ho * wo]
    }

    fn forward(&self, x: &[f32], w: &[&[f32]], keep: bool) -> Result<(Vec<f32>, Saved)> {
        let (inp, mid) = (Planes::of(&self.input)?, Planes::of(&self.out)?);
        let (a, s1) = normalize_train(x, inp, (w[BN1_W], w[BN1_B]), self.eps[0], true, None);
        let c1 = self.conv1.forward(&a, w[CONV1]);
        let (a2, s2) = normalize_train(&c1, mid, (w[BN2_W], w[BN2_B]), self.eps[1], true, None);
        let mut out = self.conv2.forward(&a2, w[CONV2]);
        match &self.shortcut {
            None => add_into(&mut out, x),
            Some(s) => add_into(&mut out, &s.forward(&a, w[SHORTCUT])),
        }
        let acts = if keep { vec![a, c1, a2] } else { Vec::new() };
        Ok((out, Saved { stats: vec![s1, s2], acts, inner: Vec::new() }))
    }

    fn backward(&self, Pass { x, out, g, w, saved, need_x, tracks }: Pass) -> Result<FormGrads> {
        let (inp, mid) = (Planes::of(&self.input)?, Planes::of(&self.out)?);
        let [a, c1, a2] = [0, 1, 2].map(|i| saved.acts.get(i).map_or(&[][..], |v| &v[..]));
        if a2.is_empty() || saved.stats.len() < 2 {
            candle_core::bail!("residual block: the forward pass's activations are missing");
        }
        let need_a = need_x || tracks(BN1_W) || tracks(BN1_B);
        let need_c1 = need_a || tracks(CONV1);
        let need_a2 = need_c1 || tracks(BN2_W) || tracks(BN2_B);
        let mut grads: Vec<Option<Vec<f32>>> = vec![None; NAMES.len()];
        // The second convolution's output gradient is the block's (the skip adds after it); the
        // output stands in for the convolution's own, which no pass without an epilogue reads.
        let (da2, dk2) = self.conv2.backward([a2, w[CONV2], out, g], need_a2, tracks(CONV2));
        grads[CONV2] = dk2;
        let mut da = None;
        if let Some(da2) = da2 {
            let (dc1, dw, db) = normalize_backward(c1, &da2, Some(a2), mid, w[BN2_W], &saved.stats[1], need_c1);
            drop(da2);
            (grads[BN2_W], grads[BN2_B]) = (tracks(BN2_W).then_some(dw), tracks(BN2_B).then_some(db));
            if let Some(dc1) = dc1 {
                let (ga, dk1) = self.conv1.backward([a, w[CONV1], c1, &dc1], need_a, tracks(CONV1));
                grads[CONV1] = dk1;
                da = ga;
            }
        }
        if let Some(s) = &self.shortcut {
            let (ga, dk) = s.backward([a, w[SHORTCUT], out, g], need_a, tracks(SHORTCUT));
            grads[SHORTCUT] = dk;
            if let (Some(da), Some(ga)) = (da.as_mut(), ga) {
                add_into(da, &ga);
            }
        }
        let mut dx = None;
        if let Some(da) = da {
            let (gx, dw, db) = normalize_backward(x, &da, Some(a), inp, w[BN1_W], &saved.stats[0], need_x);
            (grads[BN1_W], grads[BN1_B]) = (tracks(BN1_W).then_some(dw), tracks(BN1_B).then_some(db));
            dx = gx;
        }
        if self.shortcut.is_none() {
            if let Some(dx) = dx.as_mut() {
                add_into(dx, g);
            }
        }
        Ok((dx, grads))
    }
}

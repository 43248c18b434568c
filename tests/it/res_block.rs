//! The fused residual blocks (`ops::res_block`, post- and pre-activation) against an f64 composition of candle's own ops
//! (candle's convolution, BatchNorm from elementary ops, its ReLU and padding): the output, the
//! batch statistics, and the gradients of the input and of every tensor, to 1e-5 relative.

use candle_core::{DType, Device, Tensor, Var};
use samhost::ops::param_grads::CaptureAhead;
use samhost::ops::res_block::{
    preact_block_train, preact_chain_train, res_block_train, res_chain_train, BlockOutput, BlockSkip, BlockTensors,
    PreActTensors,
};
use samhost::rng::HostRng;

fn rand(rng: &HostRng, dims: &[usize], scale: f64, mean: f64) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(rng.normal(n, mean, scale), dims, &Device::Cpu).unwrap()
}

/// The largest magnitude in `t`.
fn largest(t: &Tensor) -> f64 {
    t.abs().unwrap().max_all().unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// The largest difference relative to the largest magnitude of `want` (at least `floor`).
fn off(got: &Tensor, want: &Tensor, floor: f64) -> f64 {
    let diff = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap()).unwrap();
    largest(&diff) / largest(want).max(floor).max(1e-12)
}

/// Training-mode BatchNorm in f64 from elementary ops: the output and the biased variance.
fn bn_reference(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> (Tensor, Tensor, Tensor) {
    let c = x.dim(1).unwrap();
    let mean = x.mean_keepdim(0).unwrap().mean_keepdim(2).unwrap().mean_keepdim(3).unwrap();
    let centred = x.broadcast_sub(&mean).unwrap();
    let var = centred.sqr().unwrap().mean_keepdim(0).unwrap().mean_keepdim(2).unwrap().mean_keepdim(3).unwrap();
    let y = centred
        .broadcast_div(&(var.clone() + eps).unwrap().sqrt().unwrap())
        .unwrap()
        .broadcast_mul(&w.reshape((1, c, 1, 1)).unwrap())
        .unwrap()
        .broadcast_add(&b.reshape((1, c, 1, 1)).unwrap())
        .unwrap();
    (y, mean.flatten_all().unwrap(), var.flatten_all().unwrap())
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    Identity,
    Pad,
    Conv,
}

/// The block composed in f64: the output and the statistics of each BatchNorm.
fn block_reference(x: &Tensor, p: &[Tensor], stride: usize, kind: Kind, eps: f64) -> Composed {
    let c1 = x.conv2d(&p[0], 1, stride, 1, 1).unwrap();
    let (a1, m1, v1) = bn_reference(&c1, &p[1], &p[2], eps);
    let a1 = a1.relu().unwrap();
    let c2 = a1.conv2d(&p[3], 1, 1, 1, 1).unwrap();
    let (b2, m2, v2) = bn_reference(&c2, &p[4], &p[5], eps);
    let mut stats = vec![(m1, v1), (m2, v2)];
    let skip = match kind {
        Kind::Identity => x.clone(),
        Kind::Pad => {
            let (n, c, h, w) = x.dims4().unwrap();
            let xp = x.pad_with_zeros(2, 0, h % 2).unwrap().pad_with_zeros(3, 0, w % 2).unwrap();
            let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
            let sub = xp.reshape((n, c, h2, 2, w2, 2)).unwrap().narrow(3, 0, 1).unwrap().narrow(5, 0, 1).unwrap();
            let sub = sub.reshape((n, c, h2, w2)).unwrap();
            let extra = p[3].dim(0).unwrap() - c;
            sub.pad_with_zeros(1, extra / 2, extra - extra / 2).unwrap()
        }
        Kind::Conv => {
            let cs = x.conv2d(&p[6], 0, stride, 1, 1).unwrap();
            let (s, m, v) = bn_reference(&cs, &p[7], &p[8], eps);
            stats.push((m, v));
            s
        }
    };
    ((b2 + skip).unwrap().relu().unwrap(), stats)
}

/// The block's tensors `[conv1, bn1 w, bn1 b, conv2, bn2 w, bn2 b, (proj, proj bn w, b)]`.
fn tensors(p: &[Tensor], stride: usize, kind: Kind, c: usize, o: usize, eps: f64) -> BlockTensors {
    let skip = match kind {
        Kind::Identity => BlockSkip::Identity,
        Kind::Pad => BlockSkip::Pad { left: (o - c) / 2, right: o - c - (o - c) / 2 },
        Kind::Conv => BlockSkip::Conv { kernel: p[6].clone(), bn: [p[7].clone(), p[8].clone()], eps },
    };
    BlockTensors {
        conv1: p[0].clone(),
        bn1: [p[1].clone(), p[2].clone()],
        conv2: p[3].clone(),
        bn2: [p[4].clone(), p[5].clone()],
        eps: (eps, eps),
        stride,
        skip,
    }
}

/// A block's output and the (mean, biased variance) of each of its BatchNorms.
type Composed = (Tensor, Vec<(Tensor, Tensor)>);

/// A block's parameters and how each side computes it: the fused op on f32 tensors (`None` where
/// it declines), the f64 composition (output and statistics).
struct Case<'a> {
    name: String,
    x: Var,
    params: Vec<Tensor>,
    fused: &'a dyn Fn(&Tensor, &[Tensor]) -> Option<BlockOutput>,
    reference: &'a dyn Fn(&Tensor, &[Tensor]) -> Composed,
    /// The values per channel of each statistic.
    counts: Vec<usize>,
}

/// The fused op's output, statistics and gradients against the f64 composition, to 1e-5
/// relative; then with the first three tensors frozen (detached) and the input data: those get
/// no gradient, the rest the same. Outside the training code's forward-backward pass, trainable
/// tensors keep the op out.
fn check(rng: &HostRng, case: Case) {
    let Case { name, x, params, fused, reference, counts } = case;
    let vars: Vec<Var> = params.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let to64 = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap();
    let (x64, p64): (Var, Vec<Var>) = (to64(x.as_tensor()), params.iter().map(to64).collect());
    let t64: Vec<Tensor> = p64.iter().map(|v| v.as_tensor().clone()).collect();
    let (want, want_stats) = reference(x64.as_tensor(), &t64);
    let r = rand(rng, want.dims(), 1.0, 0.0);
    let g64 = (&want * r.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
    let live: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    assert!(fused(x.as_tensor(), &live).is_none(), "{name}: no collecting pass ahead, so the op declines");
    let ahead = CaptureAhead::new();
    let got = fused(x.as_tensor(), &live).unwrap();
    assert!(off(&got.y, &want, 0.0) < 1e-5, "{name}: output off by {:e}", off(&got.y, &want, 0.0));
    assert_eq!(got.count, counts, "{name}: values per statistic");
    assert_eq!(got.stats.len(), want_stats.len());
    for (i, ((m, v), (wm, wv))) in got.stats.iter().zip(&want_stats).enumerate() {
        assert!(off(m, wm, 1e-2) < 1e-5 && off(v, wv, 0.0) < 1e-5, "{name}: statistics of BatchNorm {i}");
    }
    let named: Vec<(String, Var)> = std::iter::once(x.clone())
        .chain(vars.iter().cloned())
        .enumerate()
        .map(|(i, v)| (format!("slot {i}"), v))
        .collect();
    let want_grads: Vec<Tensor> =
        std::iter::once(&x64).chain(&p64).map(|v| g64.get(v.as_tensor()).unwrap().clone()).collect();
    // A BatchNorm bias before a ReLU may get a gradient near zero: each gradient is compared
    // relative to at least a hundredth of the largest one.
    let floor = 1e-2 * want_grads.iter().map(largest).fold(0.0, f64::max);
    let loss = (&got.y * &r).unwrap().sum_all().unwrap();
    let grads = samhost::train::grads::gradients(&loss, &named).unwrap();
    for (i, (g, want)) in grads.iter().zip(&want_grads).enumerate() {
        let e = off(g, want, floor);
        assert!(e < 1e-5, "{name}: gradient of slot {i} off by {e:e}");
    }
    // Frozen: the first three tensors detached, the input data.
    let frozen = |i: usize| i < 3;
    let mixed: Vec<Tensor> =
        live.iter().enumerate().map(|(i, t)| if frozen(i) { t.detach() } else { t.clone() }).collect();
    let got = fused(&x.as_tensor().detach(), &mixed).unwrap();
    let loss = (&got.y * &r).unwrap().sum_all().unwrap();
    let grads = samhost::train::grads::gradients(&loss, &named).unwrap();
    drop(ahead);
    for (i, (g, want)) in grads.iter().zip(&want_grads).enumerate() {
        let want = if i == 0 || frozen(i - 1) { want.zeros_like().unwrap() } else { want.clone() };
        let e = off(g, &want, floor);
        assert!(e < 1e-5, "{name}, frozen: gradient of slot {i} off by {e:e}");
    }
}

/// A He-normal kernel `[o, c, s, s]`.
fn kernel(rng: &HostRng, o: usize, c: usize, s: usize) -> Tensor {
    rand(rng, &[o, c, s, s], (2.0 / (c * s * s) as f64).sqrt(), 0.0)
}

/// A BatchNorm's weight (around 1) and bias (around 0.1) of `c` channels.
fn norm(rng: &HostRng, c: usize) -> [Tensor; 2] {
    [rand(rng, &[c], 0.3, 1.0), rand(rng, &[c], 0.2, 0.1)]
}

/// A post-activation block's tensors in the op's order: both 3x3 kernels with their BatchNorms,
/// and option B's 1x1 kernel with its BatchNorm.
fn post_params(rng: &HostRng, c: usize, o: usize, kind: Kind) -> Vec<Tensor> {
    let mut params = vec![kernel(rng, o, c, 3)];
    params.extend(norm(rng, o));
    params.push(kernel(rng, o, o, 3));
    params.extend(norm(rng, o));
    if matches!(kind, Kind::Conv) {
        params.push(kernel(rng, o, c, 1));
        params.extend(norm(rng, o));
    }
    params
}

/// The post-activation block (ResNet) on shapes through the direct kernels (widths a multiple of
/// 8) and im2col (others), with the identity, option A (also on an odd size) and option B.
#[test]
fn fused_residual_block_matches_an_f64_composition() {
    let rng = HostRng::new(21);
    let eps = 1e-5;
    // (n, c, o, h, w, stride, skip)
    for (n, c, o, h, w, stride, kind) in [
        (3, 4, 4, 6, 5, 1, Kind::Identity),
        (2, 16, 16, 8, 16, 1, Kind::Identity),
        (2, 4, 8, 9, 7, 2, Kind::Pad),
        (3, 16, 32, 16, 16, 2, Kind::Pad),
        (2, 3, 6, 8, 8, 2, Kind::Conv),
        (2, 8, 16, 16, 16, 2, Kind::Conv),
    ] {
        let params = post_params(&rng, c, o, kind);
        let (ho, wo) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
        let stats = if matches!(kind, Kind::Conv) { 3 } else { 2 };
        let fused = |x: &Tensor, p: &[Tensor]| res_block_train(x, &tensors(p, stride, kind, c, o, eps)).unwrap();
        let reference = |x: &Tensor, p: &[Tensor]| block_reference(x, p, stride, kind, eps);
        check(
            &rng,
            Case {
                name: format!("post-activation n={n} c={c} o={o} {h}x{w} stride={stride} {kind:?}"),
                x: Var::from_tensor(&rand(&rng, &[n, c, h, w], 1.0, 0.0)).unwrap(),
                params,
                fused: &fused,
                reference: &reference,
                counts: vec![n * ho * wo; stats],
            },
        );
    }
}

/// The consecutive blocks' tensors, `lens[i]` for block `i`, out of one list.
fn split_blocks(p: &[Tensor], lens: &[usize]) -> Vec<Vec<Tensor>> {
    let mut at = 0;
    lens.iter()
        .map(|&l| {
            at += l;
            p[at - l..at].to_vec()
        })
        .collect()
}

/// Consecutive post-activation blocks as one op (a ResNet's trunk in training): the identity, option
/// A and option B in turn, against the same blocks composed in f64 one after the other; with the
/// first block's convolution and BatchNorm frozen, the gradient still reaches the input through
/// it. Fewer than two blocks make it decline.
#[test]
fn a_chain_of_blocks_matches_the_blocks_composed_in_turn() {
    let rng = HostRng::new(22);
    let eps = 1e-5;
    // (c, o, stride, skip) per block, on 2 images of 16x16.
    let blocks =
        [(16, 16, 1, Kind::Identity), (16, 32, 2, Kind::Pad), (32, 64, 2, Kind::Conv), (64, 64, 1, Kind::Identity)];
    let mut params = Vec::new();
    let mut lens = Vec::new();
    for &(c, o, _, kind) in &blocks {
        let block = post_params(&rng, c, o, kind);
        lens.push(block.len());
        params.extend(block);
    }
    let split = |p: &[Tensor]| split_blocks(p, &lens);
    let fused = |x: &Tensor, p: &[Tensor]| {
        let ts: Vec<BlockTensors> =
            split(p).iter().zip(&blocks).map(|(bp, &(c, o, s, kind))| tensors(bp, s, kind, c, o, eps)).collect();
        assert!(res_chain_train(x, &ts[..1]).unwrap().is_none(), "one block is no chain");
        res_chain_train(x, &ts).unwrap()
    };
    let reference = |x: &Tensor, p: &[Tensor]| {
        let mut h = x.clone();
        let mut stats = Vec::new();
        for (bp, &(_, _, s, kind)) in split(p).iter().zip(&blocks) {
            let (y, st) = block_reference(&h, bp, s, kind, eps);
            h = y;
            stats.extend(st);
        }
        (h, stats)
    };
    let counts: Vec<usize> = [2 * 16 * 16; 2].into_iter().chain([2 * 8 * 8; 2]).chain([2 * 4 * 4; 5]).collect();
    check(
        &rng,
        Case {
            name: "a chain of 4 post-activation blocks".into(),
            x: Var::from_tensor(&rand(&rng, &[2, 16, 16, 16], 1.0, 0.0)).unwrap(),
            params,
            fused: &fused,
            reference: &reference,
            counts,
        },
    );
}

/// The pre-activation block (WideResNet) composed in f64: the output and the statistics of its
/// two BatchNorms.
fn preact_reference(x: &Tensor, p: &[Tensor], stride: usize, eps: f64) -> Composed {
    let (a, m1, v1) = bn_reference(x, &p[0], &p[1], eps);
    let a = a.relu().unwrap();
    let c1 = a.conv2d(&p[2], 1, stride, 1, 1).unwrap();
    let (a2, m2, v2) = bn_reference(&c1, &p[3], &p[4], eps);
    let c2 = a2.relu().unwrap().conv2d(&p[5], 1, 1, 1, 1).unwrap();
    let skip = match p.get(6) {
        Some(k) => a.conv2d(k, 0, stride, 1, 1).unwrap(),
        None => x.clone(),
    };
    ((c2 + skip).unwrap(), vec![(m1, v1), (m2, v2)])
}

/// A pre-activation block's tensors in the op's order: the first BatchNorm, the first kernel,
/// the second BatchNorm and kernel, and the 1x1 shortcut where the block changes shape.
fn pre_params(rng: &HostRng, c: usize, o: usize, stride: usize) -> Vec<Tensor> {
    let mut params = norm(rng, c).to_vec();
    params.push(kernel(rng, o, c, 3));
    params.extend(norm(rng, o));
    params.push(kernel(rng, o, o, 3));
    if stride != 1 || c != o {
        params.push(kernel(rng, o, c, 1));
    }
    params
}

/// The fused op's view of a pre-activation block's tensors `p` (as [`pre_params`] orders them).
fn pre_tensors(p: &[Tensor], stride: usize, eps: f64) -> PreActTensors {
    PreActTensors {
        bn1: [p[0].clone(), p[1].clone()],
        conv1: p[2].clone(),
        bn2: [p[3].clone(), p[4].clone()],
        conv2: p[5].clone(),
        shortcut: p.get(6).cloned(),
        eps: (eps, eps),
        stride,
    }
}

/// The pre-activation block (WideResNet, no dropout) with the identity and the 1x1 shortcut, on
/// shapes through the direct kernels, im2col and (128 channels) Winograd's F(2x2, 3x3).
#[test]
fn fused_preactivation_block_matches_an_f64_composition() {
    let rng = HostRng::new(22);
    let eps = 1e-5;
    // (n, c, o, h, w, stride)
    for (n, c, o, h, w, stride) in [
        (3, 4, 4, 6, 5, 1),
        (2, 16, 16, 8, 16, 1),
        (2, 3, 6, 9, 7, 2),
        (2, 8, 16, 16, 16, 2),
        (2, 4, 8, 8, 8, 1),
        (2, 128, 128, 8, 8, 1),
        (3, 64, 128, 16, 16, 2),
    ] {
        let params = pre_params(&rng, c, o, stride);
        let (ho, wo) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
        let fused = |x: &Tensor, p: &[Tensor]| preact_block_train(x, &pre_tensors(p, stride, eps)).unwrap();
        let reference = |x: &Tensor, p: &[Tensor]| preact_reference(x, p, stride, eps);
        check(
            &rng,
            Case {
                name: format!("pre-activation n={n} c={c} o={o} {h}x{w} stride={stride}"),
                x: Var::from_tensor(&rand(&rng, &[n, c, h, w], 1.0, 0.0)).unwrap(),
                params,
                fused: &fused,
                reference: &reference,
                counts: vec![n * h * w, n * ho * wo],
            },
        );
    }
}

/// Consecutive pre-activation blocks as one op (a WideResNet's blocks in training): shortcut
/// and identity blocks, strided and not, against the same blocks composed in f64 one after the
/// other, frozen tensors included. Fewer than two blocks make it decline.
#[test]
fn a_chain_of_preactivation_blocks_matches_the_blocks_composed_in_turn() {
    let rng = HostRng::new(23);
    let eps = 1e-5;
    // (c, o, stride) per block, on 2 images of 8x8.
    let blocks = [(16, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1)];
    let mut params = Vec::new();
    let mut lens = Vec::new();
    for &(c, o, stride) in &blocks {
        let block = pre_params(&rng, c, o, stride);
        lens.push(block.len());
        params.extend(block);
    }
    let fused = |x: &Tensor, p: &[Tensor]| {
        let ts: Vec<PreActTensors> =
            split_blocks(p, &lens).iter().zip(&blocks).map(|(bp, &(_, _, s))| pre_tensors(bp, s, eps)).collect();
        assert!(preact_chain_train(x, &ts[..1]).unwrap().is_none(), "one block is no chain");
        preact_chain_train(x, &ts).unwrap()
    };
    let reference = |x: &Tensor, p: &[Tensor]| {
        let mut h = x.clone();
        let mut stats = Vec::new();
        for (bp, &(_, _, s)) in split_blocks(p, &lens).iter().zip(&blocks) {
            let (y, st) = preact_reference(&h, bp, s, eps);
            h = y;
            stats.extend(st);
        }
        (h, stats)
    };
    let counts: Vec<usize> = [2 * 8 * 8; 5].into_iter().chain([2 * 4 * 4; 3]).collect();
    check(
        &rng,
        Case {
            name: "a chain of 4 pre-activation blocks".into(),
            x: Var::from_tensor(&rand(&rng, &[2, 16, 8, 8], 1.0, 0.0)).unwrap(),
            params,
            fused: &fused,
            reference: &reference,
            counts,
        },
    );
}

//! The CPU custom ops against candle's own ops: values and gradients on random shapes, to 1e-5
//! relative (of the largest magnitude).

use candle_core::{DType, Device, Tensor, Var};
use samhost::ops::conv2d;
use samhost::rng::HostRng;

fn rand(rng: &HostRng, dims: &[usize], dtype: DType) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(rng.normal(n, 0.0, 1.0), dims, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
    let b = b.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(&b).map(|(x, y)| (x - y).abs() / scale).fold(0.0, f64::max)
}

#[test]
fn conv2d_matches_candle_values_and_gradients() {
    let rng = HostRng::new(3);
    // (n, c, h, w, o, k, stride, padding)
    let shapes = [
        (2, 3, 8, 8, 4, 3, 1, 1),
        (3, 5, 9, 7, 6, 3, 2, 1),
        (1, 2, 6, 6, 3, 1, 1, 0),
        (4, 4, 10, 10, 8, 3, 2, 0),
        (2, 3, 7, 9, 5, 5, 1, 2),
        (5, 16, 8, 8, 16, 3, 1, 1),
        (2, 1, 5, 5, 2, 2, 2, 0),
        // Padding 0, 1 and 2 of 3x3 and 5x5 kernels on non-square images.
        (3, 4, 9, 11, 5, 3, 1, 0),
        (6, 16, 8, 8, 16, 3, 1, 1),
        (2, 3, 6, 5, 4, 5, 1, 2),
        (2, 3, 6, 6, 4, 3, 1, 2),
        // The direct kernels (stride 1, widths a multiple of 8): an odd number of 8-position
        // vectors and 7 or 13 output channels (tiles of 6 with a short last one), 5x5 with
        // padding 2, 1x1, a non-square image, 3 input channels.
        (3, 5, 5, 8, 7, 3, 1, 1),
        (2, 4, 8, 16, 13, 5, 1, 2),
        (2, 8, 8, 8, 3, 1, 1, 0),
        (2, 3, 16, 24, 9, 3, 1, 1),
        // 20 output (or, for the input gradient, input) channels: tiles of 5 channels, with 5
        // or 7 vectors of positions per plane (a last tile of one vector).
        (2, 4, 5, 8, 20, 3, 1, 1),
        (2, 20, 7, 8, 8, 3, 1, 1),
        // Strides 2 and 3 (the input split into column phases; the input gradient by im2col;
        // sizes that candle's own backward pass, the reference, gets right: no output padding),
        // a strided 1x1, and stride 1 without padding (a direct forward pass, the input
        // gradient by im2col).
        (2, 4, 15, 15, 8, 3, 2, 1),
        (3, 5, 17, 15, 6, 3, 2, 1),
        (2, 8, 15, 15, 12, 1, 2, 0),
        (2, 3, 10, 22, 4, 5, 3, 2),
        (2, 4, 6, 10, 5, 3, 1, 0),
        // Stride 1 and padding 2 of a 3x3 kernel, widths 8 and 10: left to im2col.
        (2, 6, 3, 8, 5, 3, 1, 2),
        // Winograd's F(2x2, 3x3) (3x3, stride 1, padding 1, even sides, 128 channels and more):
        // square, non-square with an odd number of tile columns, 4x4, and 9 samples in groups
        // of 4 (a short last one).
        (2, 128, 8, 8, 128, 3, 1, 1),
        (3, 128, 6, 10, 136, 3, 1, 1),
        (2, 144, 4, 4, 128, 3, 1, 1),
        (9, 128, 16, 16, 128, 3, 1, 1),
    ];
    for dtype in [DType::F32, DType::F64] {
        for &(n, c, h, w, o, k, s, p) in &shapes {
            let x = Var::from_tensor(&rand(&rng, &[n, c, h, w], dtype)).unwrap();
            let kern = Var::from_tensor(&rand(&rng, &[o, c, k, k], dtype)).unwrap();
            let ours = conv2d(x.as_tensor(), kern.as_tensor(), s, p).unwrap();
            let theirs = x.as_tensor().conv2d(kern.as_tensor(), p, s, 1, 1).unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
            let what = format!("{dtype:?} n{n} c{c} {h}x{w} o{o} k{k} s{s} p{p}");
            assert!(max_rel(&ours, &theirs) < tol, "values {what}: {:e}", max_rel(&ours, &theirs));
            let r = rand(&rng, ours.dims(), dtype);
            let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g_theirs = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("input", &x), ("kernel", &kern)] {
                let (a, b) = (g_ours.get(v.as_tensor()).unwrap(), g_theirs.get(v.as_tensor()).unwrap());
                assert!(max_rel(a, b) < tol, "{name} gradient {what}: {:e}", max_rel(a, b));
            }
        }
    }
}

#[test]
fn conv2d_rejects_bad_shapes_with_a_message() {
    let x = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
    let k = Tensor::zeros((2, 4, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let e = conv2d(&x, &k, 1, 1).unwrap_err().to_string();
    assert!(e.contains("3 channels") && e.contains("expects 4"), "{e}");
}

/// The single-pass ReLU and 2x2 max-pool against candle's elementary ops: values and gradients.
#[test]
fn relu_and_max_pool_match_elementary_ops() {
    let rng = HostRng::new(9);
    for dims in [[2usize, 3, 8, 8], [3, 2, 7, 5], [1, 4, 2, 3]] {
        let x = Var::from_tensor(&rand(&rng, &dims, DType::F32)).unwrap();
        let (n, c, h, w) = (dims[0], dims[1], dims[2], dims[3]);
        // relu
        let r = rand(&rng, &dims, DType::F32);
        let ours = samhost::ops::relu(x.as_tensor()).unwrap();
        let theirs = x.as_tensor().relu().unwrap();
        assert_eq!(max_rel(&ours, &theirs), 0.0);
        let ga = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(max_rel(ga.get(x.as_tensor()).unwrap(), gb.get(x.as_tensor()).unwrap()), 0.0, "relu grad {dims:?}");
        // max-pool: reshape + max over the cropped input as the reference
        let ours = samhost::ops::max_pool2(x.as_tensor()).unwrap();
        let cropped = x.as_tensor().narrow(2, 0, h - h % 2).unwrap().narrow(3, 0, w - w % 2).unwrap();
        let theirs = cropped.reshape((n, c, h / 2, 2, w / 2, 2)).unwrap().max(5).unwrap().max(3).unwrap();
        assert_eq!(ours.dims(), theirs.dims());
        assert_eq!(max_rel(&ours, &theirs), 0.0, "max-pool values {dims:?}");
        let r = rand(&rng, ours.dims(), DType::F32);
        let ga = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
        // Each window's gradient goes to its maximum (random inputs: no ties).
        let (a, b) = (ga.get(x.as_tensor()).unwrap(), gb.get(x.as_tensor()).unwrap());
        assert!(max_rel(a, b) < 1e-6, "max-pool grad {dims:?}: {:e}", max_rel(a, b));
    }
}

/// The one-gemm linear op against candle's `x.matmul(&w.t())`: values and the gradients of the
/// input and the weight, on shapes with odd sizes and a rank-3 input, to 1e-5 relative (of the
/// largest magnitude); an input that is not tracked gets no gradient and the weight still does.
#[test]
fn linear_matches_candle_values_and_gradients() {
    let rng = HostRng::new(5);
    for dims in [vec![4, 6], vec![1, 1], vec![33, 17], vec![3, 5, 7], vec![128, 300]] {
        let k = *dims.last().unwrap();
        let n = [5, 1, 9, 4, 64][dims.len() % 5 + dims[0] % 3];
        let x = Var::from_tensor(&rand(&rng, &dims, DType::F32)).unwrap();
        let w = Var::from_tensor(&rand(&rng, &[n, k], DType::F32)).unwrap();
        let r = rand(&rng, &[&dims[..dims.len() - 1], &[n]].concat(), DType::F32);
        let ours = samhost::ops::linear::linear(x.as_tensor(), w.as_tensor()).unwrap();
        let theirs = x.as_tensor().broadcast_matmul(&w.as_tensor().t().unwrap()).unwrap();
        assert_eq!(ours.dims(), theirs.dims());
        assert!(max_rel(&ours, &theirs) < 1e-5, "{dims:?} x {n}: values");
        let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (what, v) in [("input", &x), ("weight", &w)] {
            let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
            assert!(max_rel(a, b) < 1e-5, "{dims:?} x {n}: {what} gradient off by {}", max_rel(a, b));
        }
        // A data batch (no variable behind it): only the weight gets a gradient.
        let data = x.as_tensor().detach();
        let y = samhost::ops::linear::linear(&data, w.as_tensor()).unwrap();
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&data).is_none());
        assert!(max_rel(g.get(w.as_tensor()).unwrap(), g2.get(w.as_tensor()).unwrap()) < 1e-5);
    }
}

/// A parameter broadcast over a tensor (conv bias, linear bias, position embedding, a shape the
/// fast path does not take) against candle's `broadcast_add`: values and both gradients to 1e-5
/// relative (of the largest magnitude).
#[test]
fn broadcast_parameter_add_matches_candle() {
    let rng = HostRng::new(8);
    let cases: [(&[usize], &[usize]); 5] = [
        (&[4, 3, 5, 5], &[1, 3, 1, 1]),
        (&[7, 9], &[9]),
        (&[3, 4, 6], &[1, 4, 6]),
        (&[2, 3, 4], &[3, 1]),
        (&[5, 1], &[1]),
    ];
    for (ydims, pdims) in cases {
        let y = Var::from_tensor(&rand(&rng, ydims, DType::F32)).unwrap();
        let p = Var::from_tensor(&rand(&rng, pdims, DType::F32)).unwrap();
        let r = rand(&rng, ydims, DType::F32);
        let ours = samhost::ops::bias::add_broadcast(y.as_tensor(), p.as_tensor()).unwrap();
        let theirs = y.as_tensor().broadcast_add(p.as_tensor()).unwrap();
        assert!(max_rel(&ours, &theirs) < 1e-6, "{ydims:?} + {pdims:?}: values");
        let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (what, v) in [("y", &y), ("p", &p)] {
            let (a, b) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
            assert_eq!(a.dims(), b.dims(), "{ydims:?} + {pdims:?}: {what} gradient shape");
            assert!(max_rel(a, b) < 1e-5, "{ydims:?} + {pdims:?}: {what} gradient off by {}", max_rel(a, b));
        }
    }
}

/// The reference for the fused convolution block, from candle's ops alone: `conv2d`,
/// `broadcast_add`, `relu` and a 2x2 max over reshaped windows.
fn block_reference(x: &Tensor, k: &Tensor, b: Option<&Tensor>, s: usize, p: usize, relu: bool, pool: bool) -> Tensor {
    let mut y = x.conv2d(k, p, s, 1, 1).unwrap();
    if let Some(b) = b {
        y = y.broadcast_add(&b.reshape((1, b.elem_count(), 1, 1)).unwrap()).unwrap();
    }
    if relu {
        y = y.relu().unwrap();
    }
    if pool {
        let (n, c, h, w) = y.dims4().unwrap();
        let cropped = y.narrow(2, 0, h - h % 2).unwrap().narrow(3, 0, w - w % 2).unwrap();
        y = cropped.reshape((n, c, h / 2, 2, w / 2, 2)).unwrap().max(5).unwrap().max(3).unwrap();
    }
    y
}

/// The fused convolution block (bias, ReLU, 2x2 max-pooling in every combination) against the
/// composition of candle's ops: values and the gradients of input, kernel and bias, in f32 and
/// f64, on batches that split into several sample groups with a short last one; the gradients
/// handed over to `gradients()` equal those in candle's store, and a data batch gets none.
#[test]
fn conv2d_block_matches_candle_composition() {
    use samhost::ops::{conv2d_block, ConvBlockOptions};
    use samhost::train::grads::gradients;
    let rng = HostRng::new(11);
    // (n, c, h, w, o, k, stride, padding): 8x8 outputs make groups of 8 samples (21 = 8 + 8 + 5);
    // 16x16 ones groups of 2 whose rows (512 and, for the last sample, 256 values) are padded
    // apart by a cache line.
    let shapes = [
        (21, 3, 8, 8, 4, 3, 1, 1),
        (3, 5, 9, 7, 6, 3, 2, 1),
        (2, 4, 33, 32, 5, 3, 1, 1),
        (10, 2, 7, 7, 3, 2, 1, 0),
        (3, 4, 16, 16, 8, 3, 1, 1),
        (3, 4, 32, 32, 8, 3, 2, 1),
        // Winograd's F(2x2, 3x3): 128 channels, the epilogue on its output transform.
        (5, 128, 8, 8, 128, 3, 1, 1),
    ];
    for dtype in [DType::F32, DType::F64] {
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
        for &(n, c, h, w, o, k, s, p) in &shapes {
            for (bias, relu, pool) in [
                (true, true, true),
                (true, false, false),
                (false, true, false),
                (false, false, true),
                (true, true, false),
            ] {
                let case = format!("{dtype:?} {:?} bias {bias} relu {relu} pool {pool}", (n, c, h, w, o, k, s, p));
                let x = Var::from_tensor(&rand(&rng, &[n, c, h, w], dtype)).unwrap();
                let kern = Var::from_tensor(&rand(&rng, &[o, c, k, k], dtype)).unwrap();
                let b = Var::from_tensor(&rand(&rng, &[o], dtype)).unwrap();
                let bt = bias.then(|| b.as_tensor());
                let opts = ConvBlockOptions { stride: s, padding: p, relu, pool };
                let ours = conv2d_block(x.as_tensor(), kern.as_tensor(), bt, opts).unwrap();
                let theirs = block_reference(x.as_tensor(), kern.as_tensor(), bt, s, p, relu, pool);
                assert_eq!(ours.dims(), theirs.dims(), "{case}");
                assert!(max_rel(&ours, &theirs) < tol, "{case}: values off by {:e}", max_rel(&ours, &theirs));
                let r = rand(&rng, ours.dims(), dtype);
                let loss = (&ours * &r).unwrap().sum_all().unwrap();
                let g1 = loss.backward().unwrap();
                let g2 = (&theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let mut vars = vec![("input", &x), ("kernel", &kern)];
                if bias {
                    vars.push(("bias", &b));
                }
                for &(what, v) in &vars {
                    let (a, e) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                    assert!(max_rel(a, e) < tol, "{case}: {what} gradient off by {:e}", max_rel(a, e));
                }
                let params: Vec<(String, Var)> = vars.iter().map(|(n, v)| (n.to_string(), (*v).clone())).collect();
                for ((what, v), g) in params.iter().zip(gradients(&loss, &params).unwrap()) {
                    assert_eq!(max_rel(&g, g1.get(v.as_tensor()).unwrap()), 0.0, "{case}: captured {what} gradient");
                }
                // A data batch: no input gradient, the same kernel gradient.
                let data = x.as_tensor().detach();
                let y = conv2d_block(&data, kern.as_tensor(), bt, opts).unwrap();
                let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                assert!(g.get(&data).is_none(), "{case}");
                assert_eq!(max_rel(g.get(kern.as_tensor()).unwrap(), g1.get(kern.as_tensor()).unwrap()), 0.0, "{case}");
            }
        }
    }
}

/// The fused linear layer `act(x·wᵀ + b)` (none, ReLU, exact GELU) against candle's matmul,
/// broadcast add and activation: values and all three gradients; a weight used twice gets the
/// sum of both uses, also when its gradients are handed over to `gradients()`.
#[test]
fn dense_matches_candle_composition() {
    use samhost::ops::linear::{dense, dense_act, Act};
    use samhost::train::grads::gradients;
    let rng = HostRng::new(12);
    // 128 and 150 rows: the bias gradient sums blocks of 64 rows, the last one short in 150.
    // (4, 6, 5) and (1, 1, 1) are wider than their batch (the transposed forward pass).
    let acts = [(true, Act::Relu), (true, Act::None), (false, Act::Relu), (true, Act::Gelu), (false, Act::Gelu)];
    for (m, k, n) in [(4, 6, 5), (33, 17, 9), (128, 300, 64), (150, 7, 3), (1, 1, 1)] {
        for (bias, act) in acts {
            let case = format!("{m}x{k} -> {n}, bias {bias} {act:?}");
            let x = Var::from_tensor(&rand(&rng, &[m, k], DType::F32)).unwrap();
            let w = Var::from_tensor(&rand(&rng, &[n, k], DType::F32)).unwrap();
            let b = Var::from_tensor(&rand(&rng, &[n], DType::F32)).unwrap();
            let bt = bias.then(|| b.as_tensor());
            let ours = dense_act(x.as_tensor(), w.as_tensor(), bt, act).unwrap();
            let mut theirs = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
            if bias {
                theirs = theirs.broadcast_add(b.as_tensor()).unwrap();
            }
            theirs = match act {
                Act::None => theirs,
                Act::Relu => theirs.relu().unwrap(),
                Act::Gelu => theirs.gelu_erf().unwrap(),
            };
            assert!(max_rel(&ours, &theirs) < 1e-5, "{case}: values");
            let r = rand(&rng, &[m, n], DType::F32);
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let mut vars = vec![("input", &x), ("weight", &w)];
            if bias {
                vars.push(("bias", &b));
            }
            for &(what, v) in &vars {
                let (a, e) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert!(max_rel(a, e) < 1e-5, "{case}: {what} gradient off by {:e}", max_rel(a, e));
            }
        }
    }
    // A square weight applied twice: y = w·relu(w·x + b) + b.
    let x = rand(&rng, &[7, 5], DType::F32);
    let w = Var::from_tensor(&rand(&rng, &[5, 5], DType::F32)).unwrap();
    let b = Var::from_tensor(&rand(&rng, &[5], DType::F32)).unwrap();
    let h = dense(&x, w.as_tensor(), Some(b.as_tensor()), true).unwrap();
    let loss = dense(&h, w.as_tensor(), Some(b.as_tensor()), false).unwrap().sqr().unwrap().sum_all().unwrap();
    let wt = w.as_tensor().t().unwrap();
    let h2 = x.matmul(&wt).unwrap().broadcast_add(b.as_tensor()).unwrap().relu().unwrap();
    let reference = h2.matmul(&wt).unwrap().broadcast_add(b.as_tensor()).unwrap().sqr().unwrap().sum_all().unwrap();
    let expected = reference.backward().unwrap();
    let params = vec![("w".to_string(), w.clone()), ("b".to_string(), b.clone())];
    for ((name, v), g) in params.iter().zip(gradients(&loss, &params).unwrap()) {
        let e = expected.get(v.as_tensor()).unwrap();
        assert!(max_rel(&g, e) < 1e-5, "shared {name}: off by {:e}", max_rel(&g, e));
    }
}

/// The residual sum with its ReLU against candle's add and relu: values and both gradients, also
/// when one operand is data (no gradient) and when both operands are one tensor.
#[test]
fn add_relu_matches_elementary_ops() {
    let rng = HostRng::new(13);
    for dims in [[2usize, 3, 8, 8], [5, 7, 1, 3]] {
        let a = Var::from_tensor(&rand(&rng, &dims, DType::F32)).unwrap();
        let b = Var::from_tensor(&rand(&rng, &dims, DType::F32)).unwrap();
        let r = rand(&rng, &dims, DType::F32);
        let ours = samhost::ops::add_relu(a.as_tensor(), b.as_tensor()).unwrap();
        let theirs = (a.as_tensor() + b.as_tensor()).unwrap().relu().unwrap();
        assert_eq!(max_rel(&ours, &theirs), 0.0, "{dims:?}: values");
        let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&a, &b] {
            assert_eq!(max_rel(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap()), 0.0, "{dims:?}");
        }
        let data = b.as_tensor().detach();
        let g = (samhost::ops::add_relu(a.as_tensor(), &data).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&data).is_none());
        assert_eq!(max_rel(g.get(a.as_tensor()).unwrap(), g2.get(a.as_tensor()).unwrap()), 0.0);
        // y = relu(a + a): a gets twice the masked gradient.
        let twice = samhost::ops::add_relu(a.as_tensor(), a.as_tensor()).unwrap();
        let reference = (a.as_tensor() + a.as_tensor()).unwrap().relu().unwrap();
        let g3 = (&twice * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g4 = (&reference * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(max_rel(g3.get(a.as_tensor()).unwrap(), g4.get(a.as_tensor()).unwrap()), 0.0, "{dims:?}: a + a");
    }
}

/// The batched products `a·b` and `a·bᵀ` against candle's matmul: values and both gradients on
/// batches of odd-sized matrices, to 1e-5 relative.
#[test]
fn batched_matmul_matches_candle() {
    let rng = HostRng::new(14);
    for (batch, m, k, n) in [(vec![2usize, 3], 5usize, 7usize, 4usize), (vec![1], 1, 1, 1), (vec![4], 17, 8, 17)] {
        for transpose_b in [false, true] {
            let case = format!("{batch:?} {m}x{k}x{n} transposed {transpose_b}");
            let a = Var::from_tensor(&rand(&rng, &[&batch[..], &[m, k]].concat(), DType::F32)).unwrap();
            let b_dims = if transpose_b { [n, k] } else { [k, n] };
            let b = Var::from_tensor(&rand(&rng, &[&batch[..], &b_dims].concat(), DType::F32)).unwrap();
            let ours = samhost::ops::bmm::bmm(a.as_tensor(), b.as_tensor(), transpose_b).unwrap();
            let bt = if transpose_b { b.as_tensor().t().unwrap().contiguous().unwrap() } else { b.as_tensor().clone() };
            let theirs = a.as_tensor().matmul(&bt).unwrap();
            assert_eq!(ours.dims(), theirs.dims(), "{case}");
            assert!(max_rel(&ours, &theirs) < 1e-5, "{case}: values");
            let r = rand(&rng, ours.dims(), DType::F32);
            let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (&theirs * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (what, v) in [("a", &a), ("b", &b)] {
                let (x, y) = (g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap());
                assert!(max_rel(x, y) < 1e-5, "{case}: gradient of {what} off by {:e}", max_rel(x, y));
            }
        }
    }
}

/// With `CANDLE_GRAD_DO_NOT_DETACH` set (second-order gradients) every fused op steps aside for
/// candle's differentiable ones: SAM steps on a cnn (convolution block, linear + ReLU), a
/// ResNet (BatchNorm + ReLU, residual sum) and a ViT (fused attention, linear + GELU, layer norm;
/// initialised wide enough that the attention scores matter: a 1.2x error in their scale fails
/// this) run and give the fused path's losses to 1e-4.
#[test]
fn second_order_mode_uses_candles_ops_and_agrees() {
    use crate::common::{samhost, stderr, stdout, write};
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "s.rhai",
        r#"
let shape = [3, 8, 8];
let d = synthetic(#{ n: 16, classes: 3, shape: shape, seed: 1 });
let vt = vit(#{ hidden_size: 8, num_hidden_layers: 2, num_attention_heads: 2, intermediate_size: 16, image_size: 8,
                patch_size: 2, num_labels: 3, initializer_range: 0.5 });
for m in [cnn(#{ channels: [4, 6], hidden: 8, classes: 3, input: shape }), resnet(8, 3), vt] {
    let opt = sgd(m, #{ lr: 0.1, momentum: 0.9 });
    for epoch in 0..3 {
        for b in d.batches(16, #{ seed: 1, epoch: epoch }) {
            let s = sam_step(m, opt, b, #{ rho: 0.05 });
            print(`${s.loss} ${s.sharp_loss}`);
        }
    }
}
"#,
    );
    let losses = |second_order: bool| -> Vec<f64> {
        let mut c = samhost();
        c.current_dir(dir.path()).args(["run", "s.rhai", "--seed", "5"]);
        if second_order {
            c.env("CANDLE_GRAD_DO_NOT_DETACH", "1");
        }
        let o = c.output().expect("samhost runs");
        assert!(o.status.success(), "second order {second_order}: {}", stderr(&o));
        stdout(&o).split_whitespace().filter_map(|v| v.parse().ok()).collect()
    };
    let (fused, plain) = (losses(false), losses(true));
    assert_eq!(fused.len(), 18, "{fused:?}");
    for (a, b) in fused.iter().zip(&plain) {
        assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "fused {fused:?} against candle's ops {plain:?}");
    }
}

/// Attention from candle's elementary ops in f64: heads split out of `[q | k | v]` rows, scaled
/// scores, softmax, context, heads merged back to rows.
fn attention_reference(qkv: &Tensor, b: usize, heads: usize, scale: f64) -> Tensor {
    let (rows, w) = qkv.dims2().unwrap();
    let (n, h) = (rows / b, w / 3);
    let split = |i: usize| {
        qkv.narrow(1, i * h, h)
            .unwrap()
            .reshape((b, n, heads, h / heads))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
    };
    let (q, k, v) = (split(0), split(1), split(2));
    let scores = (q.matmul(&k.t().unwrap().contiguous().unwrap()).unwrap() * scale).unwrap();
    let probs = candle_nn::ops::softmax(&scores, candle_core::D::Minus1).unwrap();
    probs.matmul(&v).unwrap().transpose(1, 2).unwrap().contiguous().unwrap().reshape((rows, h)).unwrap()
}

/// The fused attention op against the f64 composition of candle's ops: values and the gradient
/// of `[q | k | v]` to 1e-5 relative, over sequence lengths with and without a partial register
/// tile of rows and of columns, heads narrower than a tile, one and several heads, a batch smaller
/// than the thread pool, and ViT-S/14's 257 tokens at 224 px.
#[test]
fn fused_attention_matches_an_f64_composition() {
    let rng = HostRng::new(11);
    for (b, n, heads, d) in [(2, 5, 1, 4), (3, 17, 6, 8), (1, 65, 2, 16), (4, 9, 3, 64), (1, 257, 2, 64)] {
        let case = format!("b={b} n={n} heads={heads} d={d}");
        let x = Var::from_tensor(&rand(&rng, &[b * n, 3 * heads * d], DType::F32)).unwrap();
        let x64 = Var::from_tensor(&x.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
        let scale = 1.0 / (d as f64).sqrt();
        let ours = samhost::ops::attention::attention(x.as_tensor(), b, heads, scale).unwrap();
        let theirs = attention_reference(x64.as_tensor(), b, heads, scale);
        assert_eq!(ours.dims(), theirs.dims(), "{case}");
        assert!(max_rel(&ours, &theirs) < 1e-5, "{case}: values off by {:e}", max_rel(&ours, &theirs));
        let r = rand(&rng, ours.dims(), DType::F32);
        let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * r.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, c) = (g1.get(x.as_tensor()).unwrap(), g2.get(x64.as_tensor()).unwrap());
        assert!(max_rel(a, c) < 1e-5, "{case}: gradient off by {:e}", max_rel(a, c));
    }
    let x = rand(&rng, &[10, 12], DType::F32);
    let err = samhost::ops::attention::attention(&x, 3, 2, 0.5).unwrap_err().to_string();
    assert!(err.contains("do not split into 3 sequences"), "{err}");
    let empty = Tensor::zeros((4, 0), DType::F32, &Device::Cpu).unwrap();
    let err = samhost::ops::attention::attention(&empty, 2, 2, 0.5).unwrap_err().to_string();
    assert!(err.contains("do not split into 2 sequences"), "{err}");
}

/// The fused layer norm against the f64 composition of candle's ops at a transformer's widths,
/// on rows whose mean is far from zero (where a one-pass f32 variance loses its digits): values to
/// 1e-5 and gradients of the input, weight and bias to 1e-5 relative.
#[test]
fn layer_norm_matches_an_f64_composition_at_transformer_widths() {
    let rng = HostRng::new(12);
    for (rows, n, offset) in [(700, 384, 20.0), (33, 1024, -5.0), (9, 13, 0.0)] {
        let case = format!("rows={rows} n={n} offset={offset}");
        let x = rand(&rng, &[rows, n], DType::F32).affine(1.0, offset).unwrap();
        let (x, w, b) = (
            Var::from_tensor(&x).unwrap(),
            Var::from_tensor(&rand(&rng, &[n], DType::F32)).unwrap(),
            Var::from_tensor(&rand(&rng, &[n], DType::F32)).unwrap(),
        );
        let f64_var = |v: &Var| Var::from_tensor(&v.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
        let (x64, w64, b64) = (f64_var(&x), f64_var(&w), f64_var(&b));
        let ours = samhost::ops::layer_norm::layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-6).unwrap();
        let theirs =
            samhost::ops::layer_norm::layer_norm_ops(x64.as_tensor(), w64.as_tensor(), b64.as_tensor(), 1e-6).unwrap();
        assert!(max_rel(&ours, &theirs) < 1e-5, "{case}: values off by {:e}", max_rel(&ours, &theirs));
        let r = rand(&rng, ours.dims(), DType::F32);
        let g1 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&theirs * r.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
        for (what, a, c) in [("x", &x, &x64), ("weight", &w, &w64), ("bias", &b, &b64)] {
            let (a, c) = (g1.get(a.as_tensor()).unwrap(), g2.get(c.as_tensor()).unwrap());
            assert!(max_rel(a, c) < 1e-5, "{case}: gradient of {what} off by {:e}", max_rel(a, c));
        }
    }
}

/// The fused BatchNorm's batch mean and variance (one pass over memory, planes combined in f64)
/// against a float64 computation, on planes whose means differ (sample and channel offsets up to
/// ±40 around 100, unit spread): the variance to 1e-5 relative, the mean to 1e-6.
#[test]
fn batch_norm_statistics_match_f64_on_offset_planes() {
    use samhost::ops::batch_norm::batch_norm_train;
    let rng = HostRng::new(21);
    for (n, c, h, w) in [(7, 3, 5, 5), (16, 4, 32, 32), (3, 2, 1, 9)] {
        let hw = h * w;
        let noise = rng.normal(n * c * hw, 0.0, 1.0);
        let offsets = rng.normal(n * c, 0.0, 20.0);
        let x: Vec<f32> = (0..n * c * hw).map(|i| 100.0 + offsets[i / hw] * 2.0 + noise[i]).collect();
        let xt = Tensor::from_vec(x.clone(), (n, c, h, w), &Device::Cpu).unwrap();
        let (ones, zeros) =
            (Tensor::ones(c, DType::F32, &Device::Cpu).unwrap(), Tensor::zeros(c, DType::F32, &Device::Cpu).unwrap());
        let (_, mean, var) = batch_norm_train(&xt, &ones, &zeros, 1e-5, false).unwrap();
        let (mean, var) = (mean.to_vec1::<f32>().unwrap(), var.to_vec1::<f32>().unwrap());
        for ch in 0..c {
            let vals: Vec<f64> = (0..n).flat_map(|b| x[(b * c + ch) * hw..][..hw].iter().map(|&v| v as f64)).collect();
            let m = vals.iter().sum::<f64>() / vals.len() as f64;
            let v = vals.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / vals.len() as f64;
            let case = format!("{:?} channel {ch}", (n, c, h, w));
            assert!((mean[ch] as f64 - m).abs() <= 1e-6 * m.abs(), "{case}: mean {} against {m}", mean[ch]);
            assert!((var[ch] as f64 - v).abs() <= 1e-5 * v, "{case}: variance {} against {v}", var[ch]);
        }
    }
}

/// One pre-norm encoder layer (ViT's, or DINOv2's with LayerScale) from candle's elementary ops,
/// in the dtype of its inputs: `p` holds 18 slots in the order of [`encoder_tensors`] (the layer
/// norms, the query/key/value weights, the output projection, the MLP, then the optional
/// LayerScale vectors and query/key/value biases).
fn encoder_reference(x: &Tensor, p: &[Option<Tensor>], b: usize, heads: usize, eps: f64) -> Tensor {
    let t = |i: usize| p[i].as_ref().unwrap();
    let lin = |x: &Tensor, w: &Tensor, bias: Option<&Tensor>| {
        let y = x.matmul(&w.t().unwrap()).unwrap();
        match bias {
            Some(bias) => y.broadcast_add(bias).unwrap(),
            None => y,
        }
    };
    let scaled = |y: Tensor, i: usize| match &p[i] {
        Some(s) => y.broadcast_mul(s).unwrap(),
        None => y,
    };
    let h = x.dim(1).unwrap();
    let ln1 = samhost::ops::layer_norm_ops(x, t(0), t(1), eps).unwrap();
    let qkv: Vec<Tensor> = (0..3).map(|i| lin(&ln1, t(2 + i), p[15 + i].as_ref())).collect();
    let ctx = attention_reference(&Tensor::cat(&qkv, 1).unwrap(), b, heads, 1.0 / ((h / heads) as f64).sqrt());
    let x1 = (scaled(lin(&ctx, t(5), Some(t(6))), 13) + x).unwrap();
    let ln2 = samhost::ops::layer_norm_ops(&x1, t(7), t(8), eps).unwrap();
    let act = lin(&ln2, t(9), Some(t(10))).gelu_erf().unwrap();
    (scaled(lin(&act, t(11), Some(t(12))), 14) + x1).unwrap()
}

/// The layer's tensors from the 18 slots `p` (the order of [`encoder_reference`]).
fn encoder_tensors(p: &[Option<Tensor>]) -> samhost::ops::encoder_layer::EncoderTensors {
    let c = |i: usize| p[i].clone().unwrap();
    samhost::ops::encoder_layer::EncoderTensors {
        ln1: [c(0), c(1)],
        qkv: [c(2), c(3), c(4)],
        qkv_bias: p[15].is_some().then(|| [c(15), c(16), c(17)]),
        out: [c(5), c(6)],
        ln2: [c(7), c(8)],
        fc1: [c(9), c(10)],
        fc2: [c(11), c(12)],
        scales: p[13].is_some().then(|| [c(13), c(14)]),
    }
}

/// Random tensors of one encoder layer (hidden `h`, MLP width `inter`) in 18 slots: weights
/// scaled by 1/sqrt(fan-in), layer-norm weights around 1, biases of 0.1, LayerScale around 0.5.
fn encoder_params(rng: &HostRng, h: usize, inter: usize, scales: bool, qkv_bias: bool) -> Vec<Option<Var>> {
    let w = |o: usize, i: usize| rand(rng, &[o, i], DType::F32).affine(1.0 / (i as f64).sqrt(), 0.0).unwrap();
    let v = |n: usize, mean: f64, std: f64| rand(rng, &[n], DType::F32).affine(std, mean).unwrap();
    let mut p = vec![v(h, 1.0, 0.3), v(h, 0.0, 0.1), w(h, h), w(h, h), w(h, h), w(h, h), v(h, 0.0, 0.1)];
    p.extend([v(h, 1.0, 0.3), v(h, 0.0, 0.1), w(inter, h), v(inter, 0.0, 0.1), w(h, inter), v(h, 0.0, 0.1)]);
    let mut slots: Vec<Option<Tensor>> = p.into_iter().map(Some).collect();
    slots.extend((0..2).map(|_| scales.then(|| v(h, 0.5, 0.2))));
    slots.extend((0..3).map(|_| qkv_bias.then(|| v(h, 0.0, 0.1))));
    slots.into_iter().map(|t| t.map(|t| Var::from_tensor(&t).unwrap())).collect()
}

/// The fused encoder layer against the f64 composition of candle's ops: the output and the
/// gradients of the input and of every tensor to 1e-5 relative (of the largest magnitude), with
/// and without query/key/value biases and LayerScale, from one head of width 4 to ViT-S's 6
/// heads of 64; then with the first layer norm and the attention frozen (detached) and the input
/// data: those get no gradient, the rest the same. Where a trainable parameter's gradient could
/// not be collected (no forward-backward pass of the training code), the op declines.
#[test]
fn fused_encoder_layer_matches_an_f64_composition() {
    use samhost::ops::encoder_layer::encoder_layer;
    use samhost::ops::param_grads::CaptureAhead;
    let rng = HostRng::new(14);
    for (b, n, heads, h, inter, scales, qkv_bias) in [
        (2, 5, 1, 4, 8, false, true),
        (3, 17, 2, 16, 40, true, false),
        (2, 65, 6, 384, 1536, false, true),
        (2, 9, 3, 24, 48, true, true),
    ] {
        let case = format!("b={b} n={n} heads={heads} hidden={h} mlp={inter} scales={scales} qkv_bias={qkv_bias}");
        let eps = 1e-6;
        let x = Var::from_tensor(&rand(&rng, &[b * n, h], DType::F32)).unwrap();
        let p = encoder_params(&rng, h, inter, scales, qkv_bias);
        let to64 = |v: &Var| Var::from_tensor(&v.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
        let (x64, p64): (Var, Vec<Option<Var>>) = (to64(&x), p.iter().map(|v| v.as_ref().map(to64)).collect());
        let tensors: Vec<Option<Tensor>> = p.iter().map(|v| v.as_ref().map(|v| v.as_tensor().clone())).collect();
        let t64: Vec<Option<Tensor>> = p64.iter().map(|v| v.as_ref().map(|v| v.as_tensor().clone())).collect();
        let theirs = encoder_reference(x64.as_tensor(), &t64, b, heads, eps);
        let r = rand(&rng, theirs.dims(), DType::F32);
        let g64 = (&theirs * r.to_dtype(DType::F64).unwrap()).unwrap().sum_all().unwrap().backward().unwrap();
        // Without a collecting pass ahead, trainable parameters keep the op out.
        assert!(encoder_layer(x.as_tensor(), &encoder_tensors(&tensors), b, heads, (eps, eps)).unwrap().is_none());
        let ahead = CaptureAhead::new();
        let ours = encoder_layer(x.as_tensor(), &encoder_tensors(&tensors), b, heads, (eps, eps)).unwrap().unwrap();
        assert!(max_rel(&ours, &theirs) < 1e-5, "{case}: values off by {:e}", max_rel(&ours, &theirs));
        let loss = (&ours * &r).unwrap().sum_all().unwrap();
        // Slot 0 is the input, slot i + 1 the tensor at position i.
        let mut named: Vec<(usize, Var, &Var)> = vec![(0, x.clone(), &x64)];
        named.extend(
            p.iter().zip(&p64).enumerate().filter_map(|(i, (v, v64))| Some((i + 1, v.clone()?, v64.as_ref()?))),
        );
        let vars: Vec<(String, Var)> = named.iter().map(|(i, v, _)| (format!("slot {i}"), v.clone())).collect();
        let largest = |t: &Tensor| t.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        // The key bias's gradient is zero (a constant added to every score of a row), so each
        // gradient is compared relative to at least a hundredth of the largest gradient.
        let floor = named.iter().map(|(_, _, v)| largest(g64.get(v.as_tensor()).unwrap())).fold(0.0, f64::max) * 1e-2;
        let off = |got: &Tensor, want: &Tensor| {
            let diff = (got.to_dtype(DType::F64).unwrap() - want).unwrap();
            largest(&diff) / largest(want).max(floor)
        };
        let grads = samhost::train::grads::gradients(&loss, &vars).unwrap();
        for ((i, _, v64), got) in named.iter().zip(&grads) {
            let err = off(got, g64.get(v64.as_tensor()).unwrap());
            assert!(err < 1e-5, "{case}: gradient of slot {i} off by {err:e}");
        }
        // Frozen: the first layer norm and the query/key/value tensors detached, the input data.
        let frozen = |i: usize| !(5..15).contains(&i);
        let mixed: Vec<Option<Tensor>> = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| t.as_ref().map(|t| if frozen(i) { t.detach() } else { t.clone() }))
            .collect();
        let ours =
            encoder_layer(&x.as_tensor().detach(), &encoder_tensors(&mixed), b, heads, (eps, eps)).unwrap().unwrap();
        let loss = (&ours * &r).unwrap().sum_all().unwrap();
        let grads = samhost::train::grads::gradients(&loss, &vars).unwrap();
        drop(ahead);
        for ((i, _, v64), got) in named.iter().zip(&grads) {
            let want = g64.get(v64.as_tensor()).unwrap();
            let want = if *i == 0 || frozen(i - 1) { want.zeros_like().unwrap() } else { want.clone() };
            let err = off(got, &want);
            assert!(err < 1e-5, "{case}, frozen: gradient of slot {i} off by {err:e}");
        }
    }
}

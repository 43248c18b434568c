//! The fast CPU conv2d against candle's own conv2d: values and both gradients on random shapes,
//! to 1e-5 relative (of the largest magnitude).

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

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

//! Sums over f32 slices in eight partial sums, one AVX register of lanes, so that the compiler
//! vectorises them (a plain `iter().sum()` is one serial chain of adds). The order of the adds is
//! fixed by the slice length alone, so a result does not depend on the thread count. Used by the
//! row and plane kernels of BatchNorm, layer norm and softmax.

/// Lanes of the partial sums.
pub const LANES: usize = 8;

/// `Σ f(a, b, c)` over matching elements of three equally long slices.
#[inline(always)]
pub fn sum3(a: &[f32], b: &[f32], c: &[f32], f: impl Fn(f32, f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb, cc) = (a.chunks_exact(LANES), b.chunks_exact(LANES), c.chunks_exact(LANES));
    let tail: f32 =
        ca.remainder().iter().zip(cb.remainder()).zip(cc.remainder()).map(|((&x, &y), &z)| f(x, y, z)).sum();
    for ((x, y), z) in ca.zip(cb).zip(cc) {
        for l in 0..LANES {
            acc[l] += f(x[l], y[l], z[l]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `Σ f(a, b)` over matching elements of two equally long slices, as [`sum3`].
#[inline(always)]
pub fn sum2(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    sum3(a, b, b, |x, y, _| f(x, y))
}

/// `Σ f(v)` over a slice, as [`sum3`].
#[inline(always)]
pub fn sum(a: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    sum3(a, a, a, |x, _, _| f(x))
}

#[cfg(test)]
mod tests {
    #[test]
    fn partial_sums_cover_every_element_and_the_tail() {
        for n in [0usize, 1, 7, 8, 9, 23, 64] {
            let a: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let b: Vec<f32> = (0..n).map(|i| 2.0 + i as f32).collect();
            let exact = |f: &dyn Fn(usize) -> f64| (0..n).map(f).sum::<f64>();
            assert_eq!(super::sum(&a, |v| v) as f64, exact(&|i| i as f64), "n={n}");
            assert_eq!(super::sum2(&a, &b, |x, y| x * y) as f64, exact(&|i| (i * (i + 2)) as f64), "n={n}");
            let c = super::sum3(&a, &b, &a, |x, y, z| x + y - z) as f64;
            assert_eq!(c, exact(&|i| (i + 2) as f64), "n={n}");
        }
    }
}

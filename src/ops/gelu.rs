//! Exact GELU (`x·Φ(x)`, Hugging Face's `gelu`) as one pass forward and one backward, in
//! parallel blocks; candle's GELU backward from elementary ops makes six full-size temporaries.
//! The fused path runs for contiguous f32 tensors on the CPU when [`super::cpu::fused_ok`] says
//! so; elsewhere (other devices and dtypes, second-order gradients) elementary candle ops compute
//! the same math.

use super::cpu::{f32_slice, fused_ok, grad_f32, slice_of, BLOCK};
use super::fast_exp::exp_nonpositive;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `Φ(v)`, the standard normal CDF, in f32: `erfc` by Abramowitz & Stegun 7.1.26 (absolute error
/// of erf below 1.5e-7, the approximation PyTorch's vectorised CPU `erf` uses), evaluated on the
/// side that keeps it free of cancellation. Straight-line f32 code, so the loops vectorise.
#[inline(always)]
pub fn normal_cdf(v: f32) -> f32 {
    cdf_with(v, exp_nonpositive(-0.5 * v * v))
}

/// `Φ(v)` given `e = exp(-v²/2)`, which the normal density shares.
#[inline(always)]
fn cdf_with(v: f32, e: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [0.254_829_6, -0.284_496_74, 1.421_413_8, -1.453_152_1, 1.061_405_4];
    let z = v.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + P * z);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let half_erfc = 0.5 * poly * e;
    if v >= 0.0 {
        1.0 - half_erfc
    } else {
        half_erfc
    }
}

/// `y = x·Φ(x)` over a block.
#[inline(always)]
fn forward_block(y: &mut [f32], x: &[f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = v * normal_cdf(v);
    }
}

/// `dx = g·(Φ(x) + x·φ(x))` over a block; one exponential serves the CDF and the density.
#[inline(always)]
fn backward_block(dx: &mut [f32], x: &[f32], g: &[f32]) {
    for ((o, &v), &g) in dx.iter_mut().zip(x).zip(g) {
        let e = exp_nonpositive(-0.5 * v * v);
        *o = g * (cdf_with(v, e) + v * FRAC_1_SQRT_2PI * e);
    }
}

/// The blocks compiled for AVX2 and FMA, chosen at run time where the CPU has them.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    /// [`super::forward_block`] in AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn forward_block(y: &mut [f32], x: &[f32]) {
        super::forward_block(y, x)
    }

    /// [`super::backward_block`] in AVX2.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn backward_block(dx: &mut [f32], x: &[f32], g: &[f32]) {
        super::backward_block(dx, x, g)
    }
}

/// `y = gelu(x)` over a block (AVX2 where the CPU has it).
pub(crate) fn forward(y: &mut [f32], x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked).
        return unsafe { avx2::forward_block(y, x) };
    }
    forward_block(y, x)
}

/// `dx = g·gelu'(x)` over a block (AVX2 where the CPU has it).
pub(crate) fn backward(dx: &mut [f32], x: &[f32], g: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu::has_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked).
        return unsafe { avx2::backward_block(dx, x, g) };
    }
    backward_block(dx, x, g)
}

/// `y = gelu(x)` over whole buffers, in parallel blocks.
pub(crate) fn forward_all(y: &mut [f32], x: &[f32]) {
    y.par_chunks_mut(BLOCK).zip(x.par_chunks(BLOCK)).for_each(|(y, x)| forward(y, x));
}

/// `dx = g·gelu'(x)` over whole buffers, in parallel blocks.
pub(crate) fn backward_all(dx: &mut [f32], x: &[f32], g: &[f32]) {
    dx.par_chunks_mut(BLOCK)
        .zip(x.par_chunks(BLOCK).zip(g.par_chunks(BLOCK)))
        .for_each(|(dx, (x, g))| backward(dx, x, g));
}

/// Exact GELU, `x·Φ(x)` (Hugging Face's `gelu`).
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(GeluErf)
    } else {
        x.gelu_erf()
    }
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "fused-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "the input")?;
        let mut y = super::buffer::zeroed::<f32>(x.len());
        forward_all(&mut y, x);
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_f32(grad)?;
        let ((xs, xl), (gs, gl)) = (arg.storage_and_layout(), grad.storage_and_layout());
        let (x, g) = (slice_of::<f32>(&xs, xl, "gelu input")?, slice_of::<f32>(&gs, gl, "gelu gradient")?);
        let mut dx = super::buffer::zeroed::<f32>(x.len());
        backward_all(&mut dx, x, g);
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The f32 CDF against candle's f64 erf over [-12, 12]: the CDF and GELU (relative to
    /// max(1, |x|)) within 4e-7 absolute (measured 2.9e-7 and 2.1e-7; f32 rounds values near 1 by
    /// 6e-8).
    #[test]
    fn the_f32_cdf_matches_the_f64_erf() {
        let mut worst = (0f64, 0f64);
        for i in -120_000..=120_000 {
            let v = i as f64 * 1e-4;
            let exact = 0.5 * (1.0 + candle_core::cpu::erf::erf_f64(v / std::f64::consts::SQRT_2));
            let cdf = normal_cdf(v as f32) as f64;
            worst.0 = worst.0.max((cdf - exact).abs());
            let gelu = v as f32 * normal_cdf(v as f32);
            worst.1 = worst.1.max((gelu as f64 - v * exact).abs() / v.abs().max(1.0));
        }
        assert!(worst.0 < 4e-7 && worst.1 < 4e-7, "{worst:?}");
    }
}

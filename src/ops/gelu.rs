//! Exact GELU (`x·Φ(x)`, Hugging Face's `gelu`) as one pass forward and one backward, in
//! parallel blocks; candle's GELU backward from elementary ops makes six full-size temporaries.
//! The fused path runs for contiguous f32 tensors on the CPU when [`super::cpu::fused_ok`] says
//! so; elsewhere (other devices and dtypes, second-order gradients) elementary candle ops compute
//! the same math.

use super::cpu::{f32_slice, fused_ok, grad_f32, slice_of, BLOCK};
use candle_core::cpu::erf::erf_f64;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

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
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(BLOCK).zip(x.par_chunks(BLOCK)).for_each(|(y, x)| {
            for (o, &v) in y.iter_mut().zip(x) {
                let v = v as f64;
                *o = (0.5 * v * (1.0 + erf_f64(v * std::f64::consts::FRAC_1_SQRT_2))) as f32;
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad_f32(grad)?;
        let ((xs, xl), (gs, gl)) = (arg.storage_and_layout(), grad.storage_and_layout());
        let (x, g) = (slice_of::<f32>(&xs, xl, "gelu input")?, slice_of::<f32>(&gs, gl, "gelu gradient")?);
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(BLOCK).zip(x.par_chunks(BLOCK).zip(g.par_chunks(BLOCK))).for_each(|(dx, (x, g))| {
            for ((o, &v), &g) in dx.iter_mut().zip(x).zip(g) {
                let v = v as f64;
                let cdf = 0.5 * (1.0 + erf_f64(v * std::f64::consts::FRAC_1_SQRT_2));
                let pdf = FRAC_1_SQRT_2PI * (-0.5 * v * v).exp();
                *o = (g as f64 * (cdf + v * pdf)) as f32;
            }
        });
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

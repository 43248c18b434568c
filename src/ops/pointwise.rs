//! ReLU and 2x2 max-pooling on CPU as single-pass custom ops with single-pass backward passes.
//!
//! Built from candle's elementary ops, ReLU's backward is a compare, a cast and a multiply (three
//! full-size temporaries) and max-pooling through `reshape` + `max` builds equality masks; here
//! each direction is one pass over contiguous f32 data. Other devices and dtypes use candle.

use super::cpu::{f32_slice, fused_ok};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// `max(x, 0)` element-wise.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if fused_ok(x) {
        x.contiguous()?.apply_op1(Relu)
    } else {
        x.relu()
    }
}

struct Relu;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "samhost-relu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        Ok((CpuStorage::F32(x.iter().map(|&v| v.max(0.0)).collect()), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &ReluGrad)?))
    }
}

/// `(relu output, grad) -> grad where output > 0`.
struct ReluGrad;

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "samhost-relu-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?);
        let dx = y.iter().zip(g).map(|(&y, &g)| if y > 0.0 { g } else { 0.0 }).collect();
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// 2x2 max-pooling with stride 2 over `[N, C, H, W]`; an odd last row or column is dropped
/// (PyTorch's `max_pool2d(x, 2)`).
pub fn max_pool2(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h < 2 || w < 2 {
        candle_core::bail!("2x2 max-pooling needs an input of at least 2x2, got {h}x{w}");
    }
    let low = matches!(x.dtype(), DType::BF16 | DType::F16);
    if low && x.device().is_cpu() {
        // bf16 values are exact in f32, so this picks the same maximum as the f32 path.
        max_pool2(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
    } else if fused_ok(x) {
        x.contiguous()?.apply_op1(MaxPool2)
    } else {
        // One element per window through `gather`, so the gradient goes to one input even when
        // the window has ties (frequent in bf16), where `max`'s backward would give it to each.
        let (n, c) = (x.dim(0)?, x.dim(1)?);
        let (h2, w2) = (h / 2, w / 2);
        let x = x.narrow(2, 0, 2 * h2)?.narrow(3, 0, 2 * w2)?;
        let windows = x.reshape((n, c, h2, 2, w2, 2))?.permute((0, 1, 2, 4, 3, 5))?.contiguous()?;
        let windows = windows.reshape((n, c, h2, w2, 4))?;
        windows.gather(&windows.argmax_keepdim(4)?, 4)?.squeeze(4)
    }
}

/// For output cell (plane, oy, ox) the input index of the maximum of its 2x2 window (the first
/// one on ties, in row-major order).
#[inline]
fn window_argmax(x: &[f32], base: usize, w: usize, oy: usize, ox: usize) -> usize {
    let i0 = base + 2 * oy * w + 2 * ox;
    let mut best = i0;
    for i in [i0 + 1, i0 + w, i0 + w + 1] {
        if x[i] > x[best] {
            best = i;
        }
    }
    best
}

struct MaxPool2;

impl CustomOp1 for MaxPool2 {
    fn name(&self) -> &'static str {
        "samhost-max-pool2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        let (n, c, h, w) = l.shape().dims4()?;
        let (ho, wo) = (h / 2, w / 2);
        let mut y = Vec::with_capacity(n * c * ho * wo);
        for p in 0..n * c {
            let base = p * h * w;
            for oy in 0..ho {
                for ox in 0..wo {
                    y.push(x[window_argmax(x, base, w, oy, ox)]);
                }
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((n, c, ho, wo))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &MaxPool2Grad)?))
    }
}

/// `(input, grad of output) -> grad of input`: each output gradient goes to its window's maximum.
struct MaxPool2Grad;

impl CustomOp2 for MaxPool2Grad {
    fn name(&self) -> &'static str {
        "samhost-max-pool2-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?);
        let (n, c, h, w) = l1.shape().dims4()?;
        let (ho, wo) = (h / 2, w / 2);
        if l2.shape().dims() != [n, c, ho, wo] {
            candle_core::bail!("max-pool backward: gradient {:?} does not match the output", l2.shape());
        }
        let mut dx = vec![0f32; x.len()];
        for p in 0..n * c {
            let base = p * h * w;
            for oy in 0..ho {
                for ox in 0..wo {
                    dx[window_argmax(x, base, w, oy, ox)] = g[(p * ho + oy) * wo + ox];
                }
            }
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

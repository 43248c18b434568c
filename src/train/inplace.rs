//! Element-wise optimizer updates written in place on the CPU (one pass over each array, no
//! temporaries), for f32 contiguous tensors. Other devices and dtypes use the tensor-op path.

use crate::ops::cpu::{f32_slice, f32_slice_mut};
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

/// Whether the fast path applies to these tensors.
pub fn applies(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32 && t.is_contiguous())
}

/// `buf ← momentum·buf + (1 − dampening)·(g + wd·p)`, or `buf ← g + wd·p` on the first step.
struct MomentumUpdate {
    momentum: f32,
    dampening: f32,
    weight_decay: f32,
    first: bool,
}

impl InplaceOp3 for MomentumUpdate {
    fn name(&self) -> &'static str {
        "sgd-momentum"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let buf = f32_slice_mut(s1, l1, self.name())?;
        let (g, p) = (f32_slice(s2, l2, self.name())?, f32_slice(s3, l3, self.name())?);
        let (m, keep, wd) = (self.momentum, 1.0 - self.dampening, self.weight_decay);
        for ((b, &g), &p) in buf.iter_mut().zip(g).zip(p) {
            let d = g + wd * p;
            *b = if self.first { d } else { m * *b + keep * d };
        }
        Ok(())
    }
}

/// `p ← p − lr·u`, with `u = buf` (or `g + wd·p + momentum·buf` for Nesterov).
struct MomentumApply {
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    nesterov: bool,
}

impl InplaceOp3 for MomentumApply {
    fn name(&self) -> &'static str {
        "sgd-apply"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let p = f32_slice_mut(s1, l1, self.name())?;
        let (g, buf) = (f32_slice(s2, l2, self.name())?, f32_slice(s3, l3, self.name())?);
        let (lr, m, wd) = (self.lr, self.momentum, self.weight_decay);
        for ((p, &g), &b) in p.iter_mut().zip(g).zip(buf) {
            let u = if self.nesterov { g + wd * *p + m * b } else { b };
            *p -= lr * u;
        }
        Ok(())
    }
}

/// `p ← p − lr·(g + wd·p)` (SGD without momentum).
struct PlainApply {
    lr: f32,
    weight_decay: f32,
}

impl InplaceOp2 for PlainApply {
    fn name(&self) -> &'static str {
        "sgd-plain"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let p = f32_slice_mut(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        for (p, &g) in p.iter_mut().zip(g) {
            *p -= self.lr * (g + self.weight_decay * *p);
        }
        Ok(())
    }
}

/// One SGD update of `p` in place with PyTorch's semantics; `buf` (when momentum is used) is
/// updated in place too, or created when `None`. Returns the momentum buffer.
#[allow(clippy::too_many_arguments)]
pub fn sgd(
    p: &Tensor,
    g: &Tensor,
    buf: Option<Tensor>,
    lr: f64,
    momentum: f64,
    dampening: f64,
    nesterov: bool,
    weight_decay: f64,
) -> Result<Option<Tensor>> {
    let g = g.contiguous()?;
    if momentum == 0.0 {
        p.inplace_op2(&g, &PlainApply { lr: lr as f32, weight_decay: weight_decay as f32 })?;
        return Ok(None);
    }
    let (buf, first) = match buf {
        Some(b) => (b, false),
        None => (p.zeros_like()?, true),
    };
    let update = MomentumUpdate {
        momentum: momentum as f32,
        dampening: dampening as f32,
        weight_decay: weight_decay as f32,
        first,
    };
    buf.inplace_op3(&g, p, &update)?;
    let apply = MomentumApply { lr: lr as f32, momentum: momentum as f32, weight_decay: weight_decay as f32, nesterov };
    p.inplace_op3(&g, &buf, &apply)?;
    Ok(Some(buf))
}

/// `p ← p + a·g`.
struct Axpy {
    a: f32,
}

impl InplaceOp2 for Axpy {
    fn name(&self) -> &'static str {
        "axpy"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let p = f32_slice_mut(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        for (p, &g) in p.iter_mut().zip(g) {
            *p += self.a * g;
        }
        Ok(())
    }
}

/// `p ← p + a·g` in place (CPU, f32, contiguous: check with [`applies`]).
pub fn axpy(p: &Tensor, g: &Tensor, a: f64) -> Result<()> {
    p.inplace_op2(g, &Axpy { a: a as f32 })
}

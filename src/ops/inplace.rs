//! Element-wise optimizer updates written in place on the CPU (one pass over each array, no
//! temporaries), for f32 contiguous tensors. Other devices and dtypes use the tensor-op path.

use super::cpu::{f32_slice, f32_slice_mut};
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

/// Elements per parallel task of an update.
const BLOCK: usize = 1 << 15;

/// `f` over matching blocks of `a` (written) and `b`, in parallel.
fn par_zip2(a: &mut [f32], b: &[f32], f: impl Fn(&mut [f32], &[f32]) + Sync) {
    a.par_chunks_mut(BLOCK).zip(b.par_chunks(BLOCK)).for_each(|(a, b)| f(a, b));
}

/// `f` over matching blocks of `a` (written), `b` and `c`, in parallel.
fn par_zip3(a: &mut [f32], b: &[f32], c: &[f32], f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync) {
    a.par_chunks_mut(BLOCK).zip(b.par_chunks(BLOCK).zip(c.par_chunks(BLOCK))).for_each(|(a, (b, c))| f(a, b, c));
}

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
        if self.first {
            par_zip3(buf, g, p, move |buf, g, p| {
                buf.iter_mut().zip(g).zip(p).for_each(|((b, &g), &p)| *b = g + wd * p);
            });
        } else {
            par_zip3(buf, g, p, move |buf, g, p| {
                buf.iter_mut().zip(g).zip(p).for_each(|((b, &g), &p)| *b = m * *b + keep * (g + wd * p));
            });
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
        if self.nesterov {
            par_zip3(p, g, buf, move |p, g, buf| {
                p.iter_mut().zip(g).zip(buf).for_each(|((p, &g), &b)| *p -= lr * (g + wd * *p + m * b));
            });
        } else {
            par_zip3(p, g, buf, move |p, _, buf| p.iter_mut().zip(buf).for_each(|(p, &b)| *p -= lr * b));
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
        let (lr, wd) = (self.lr, self.weight_decay);
        par_zip2(p, g, move |p, g| p.iter_mut().zip(g).for_each(|(p, &g)| *p -= lr * (g + wd * *p)));
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

/// `p ← p + a·g`, keeping the values `p` had before in `saved`.
struct AxpySaving {
    a: f32,
    saved: std::sync::Mutex<Vec<f32>>,
}

impl InplaceOp2 for AxpySaving {
    fn name(&self) -> &'static str {
        "axpy-saving"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let p = f32_slice_mut(s1, l1, self.name())?;
        let g = f32_slice(s2, l2, self.name())?;
        let a = self.a;
        let mut saved = Vec::with_capacity(p.len());
        let spare = &mut saved.spare_capacity_mut()[..p.len()];
        spare.par_chunks_mut(BLOCK).zip(p.par_chunks_mut(BLOCK).zip(g.par_chunks(BLOCK))).for_each(|(s, (p, g))| {
            for ((s, p), &g) in s.iter_mut().zip(p.iter_mut()).zip(g) {
                s.write(*p);
                *p += a * g;
            }
        });
        // SAFETY: the loop above wrote every one of the p.len() elements.
        unsafe { saved.set_len(p.len()) };
        *self.saved.lock().map_err(|_| candle_core::Error::Msg("axpy: poisoned lock".into()))? = saved;
        Ok(())
    }
}

/// `p ← p + a·g` in place, returning a copy of `p` from before, in one pass over both (CPU, f32,
/// contiguous: check with [`applies`]).
pub fn axpy_saving(p: &Tensor, g: &Tensor, a: f64) -> Result<Tensor> {
    if p.shape() != g.shape() {
        candle_core::bail!("axpy: shape {:?} into {:?}", g.dims(), p.dims());
    }
    let op = AxpySaving { a: a as f32, saved: std::sync::Mutex::new(Vec::new()) };
    p.inplace_op2(g, &op)?;
    let saved = op.saved.into_inner().map_err(|_| candle_core::Error::Msg("axpy: poisoned lock".into()))?;
    Tensor::from_vec(saved, p.shape(), p.device())
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
        if p.len() != g.len() {
            candle_core::bail!("axpy: {} elements into {}", g.len(), p.len());
        }
        let a = self.a;
        par_zip2(p, g, move |p, g| p.iter_mut().zip(g).for_each(|(p, &g)| *p += a * g));
        Ok(())
    }
}

/// `p ← p + a·g` in place, in parallel blocks (CPU, f32, contiguous: check with [`applies`]).
pub fn axpy(p: &Tensor, g: &Tensor, a: f64) -> Result<()> {
    if p.shape() != g.shape() {
        candle_core::bail!("axpy: shape {:?} into {:?}", g.dims(), p.dims());
    }
    p.inplace_op2(g, &Axpy { a: a as f32 })
}

/// `p ← src`.
struct CopyFrom;

impl InplaceOp2 for CopyFrom {
    fn name(&self) -> &'static str {
        "copy-from"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let p = f32_slice_mut(s1, l1, self.name())?;
        let src = f32_slice(s2, l2, self.name())?;
        if p.len() != src.len() {
            candle_core::bail!("copy: {} elements into {}", src.len(), p.len());
        }
        par_zip2(p, src, |p, s| p.copy_from_slice(s));
        Ok(())
    }
}

/// `p ← src` in place, in parallel blocks (CPU, f32, contiguous: check with [`applies`]).
pub fn copy_into(p: &Tensor, src: &Tensor) -> Result<()> {
    if p.shape() != src.shape() {
        candle_core::bail!("copy: shape {:?} into {:?}", src.dims(), p.dims());
    }
    p.inplace_op2(src, &CopyFrom)
}

//! ReLU, a residual sum with its ReLU, and 2x2 max-pooling on CPU as single-pass custom ops with
//! single-pass backward passes.
//!
//! Built from candle's elementary ops, ReLU's backward is a compare, a cast and a multiply (three
//! full-size temporaries) and max-pooling through `reshape` + `max` builds equality masks; here
//! each direction is one pass over contiguous f32 data. Other devices and dtypes use candle.

use super::cpu::{f32_slice, fused_ok};
use super::half::{in_f32, is_half};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements per parallel task of the element-wise passes.
const CHUNK: usize = 1 << 16;

/// `n` values written in chunks of [`CHUNK`] on the pool, the chunk of elements `r` from
/// `values(r)` ([`super::buffer::par_from_chunks`]: no zero fill first).
fn par_map<I: Iterator<Item = f32>>(n: usize, values: impl Fn(std::ops::Range<usize>) -> I + Sync) -> Vec<f32> {
    super::buffer::par_from_chunks(n, CHUNK, values)
}

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
        let y = par_map(x.len(), |r| x[r].iter().map(|&v| v.max(0.0)));
        Ok((CpuStorage::F32(y), l.shape().clone()))
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
        if g.len() != y.len() {
            candle_core::bail!("relu backward: gradient of {} values for {}", g.len(), y.len());
        }
        let dx = par_map(y.len(), |r| y[r.clone()].iter().zip(&g[r]).map(|(&y, &g)| if y > 0.0 { g } else { 0.0 }));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `max(a + b, 0)` element-wise (a residual connection and its ReLU) for tensors of one shape.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused_ok(a) && fused_ok(b) && a.shape() == b.shape() {
        a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)
    } else {
        relu(&(a + b)?)
    }
}

/// `(a, b) -> max(a + b, 0)`; both operands get the gradient where the output is positive.
struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "samhost-add-relu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?);
        if a.len() != b.len() {
            candle_core::bail!("add-relu: operands of {} and {} values", a.len(), b.len());
        }
        let y = par_map(a.len(), |r| a[r.clone()].iter().zip(&b[r]).map(|(&a, &b)| (a + b).max(0.0)));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !a.track_op() && !b.track_op() {
            return Ok((None, None));
        }
        let g = res.apply_op2_no_bwd(&grad.contiguous()?, &ReluGrad)?;
        Ok((a.track_op().then(|| g.clone()), b.track_op().then_some(g)))
    }
}

/// 2x2 max-pooling with stride 2 over `[N, C, H, W]`; an odd last row or column is dropped
/// (PyTorch's `max_pool2d(x, 2)`).
pub fn max_pool2(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h < 2 || w < 2 {
        candle_core::bail!("2x2 max-pooling needs an input of at least 2x2, got {h}x{w}");
    }
    if is_half(x) && x.device().is_cpu() {
        // bf16 values are exact in f32, so this picks the same maximum as the f32 path.
        in_f32(x, max_pool2)
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

/// The two input rows `2·oy` and `2·oy + 1` of a plane of width `w`, cut to `2·wo` columns.
#[inline]
fn row_pair(plane: &[f32], w: usize, wo: usize, oy: usize) -> (&[f32], &[f32]) {
    let r0 = &plane[2 * oy * w..];
    (&r0[..2 * wo], &r0[w..w + 2 * wo])
}

/// Which of the window `[a0, a1; b0, b1]` is its maximum (0..4, row-major), the first one on
/// ties.
#[inline]
fn argmax4(a: &[f32], b: &[f32]) -> usize {
    let mut best = 0;
    let mut v = a[0];
    for (k, x) in [(1, a[1]), (2, b[0]), (3, b[1])] {
        if x > v {
            best = k;
            v = x;
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
        let mut y = super::buffer::zeroed::<f32>(n * c * ho * wo);
        if ho * wo > 0 {
            y.par_chunks_mut(ho * wo).zip(x.par_chunks(h * w)).for_each(|(y_p, x_p)| {
                for (oy, y_row) in y_p.chunks_mut(wo).enumerate() {
                    let (r0, r1) = row_pair(x_p, w, wo, oy);
                    for ((out, a), b) in y_row.iter_mut().zip(r0.chunks_exact(2)).zip(r1.chunks_exact(2)) {
                        *out = [a[0], a[1], b[0], b[1]][argmax4(a, b)];
                    }
                }
            });
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
        let mut dx = super::buffer::zeroed::<f32>(x.len());
        if ho * wo > 0 {
            dx.par_chunks_mut(h * w).zip(x.par_chunks(h * w)).zip(g.par_chunks(ho * wo)).for_each(
                |((dx_p, x_p), g_p)| {
                    for (oy, g_row) in g_p.chunks(wo).enumerate() {
                        let (r0, r1) = row_pair(x_p, w, wo, oy);
                        let (d0, d1) = dx_p[2 * oy * w..].split_at_mut(w);
                        for (ox, &gv) in g_row.iter().enumerate() {
                            let k = argmax4(&r0[2 * ox..2 * ox + 2], &r1[2 * ox..2 * ox + 2]);
                            let row = if k < 2 { &mut *d0 } else { &mut *d1 };
                            row[2 * ox + (k & 1)] = gv;
                        }
                    }
                },
            );
        }
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

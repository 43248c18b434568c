//! Batched matrix products `a·b` and `a·bᵀ` on CPU (attention's scores and context), one gemm
//! per batch element with the batch spread over the threads.
//!
//! candle's CPU matmul runs the batch elements one after another, each as a gemm too small for
//! the gemm to split over threads (ViT-S/16: 48 products of 197×64 by 64×197 per layer), so the
//! second core sat idle; it also needs `kᵀ` copied contiguous. Here the transposed operand is
//! read through its strides. Other devices and dtypes use candle's matmul.

use super::cpu::{f32_slice, fused_ok, slice_of};
use super::gemm::matmul;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// `a·b` (`transpose_b` false: `b` is `[.., K, N]`) or `a·bᵀ` (`b` is `[.., N, K]`) for `a`
/// `[.., M, K]`, over equal leading (batch) dimensions.
pub fn bmm(a: &Tensor, b: &Tensor, transpose_b: bool) -> Result<Tensor> {
    let (ra, rb) = (a.rank(), b.rank());
    if ra < 2 || ra != rb || a.dims()[..ra - 2] != b.dims()[..rb - 2] {
        candle_core::bail!("batched matmul: shapes {:?} and {:?} do not match", a.dims(), b.dims());
    }
    let fast = fused_ok(a) && fused_ok(b) && a.elem_count() > 0 && b.elem_count() > 0;
    if !fast {
        return if transpose_b { a.matmul(&b.t()?.contiguous()?) } else { a.matmul(b) };
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    a.apply_op2(&b, Bmm { transpose_b })
}

/// The product's sizes.
#[derive(Clone, Copy)]
struct Dims {
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
}

/// `(a, b) -> a·b` or `a·bᵀ`, per batch element.
struct Bmm {
    transpose_b: bool,
}

impl Bmm {
    fn dims(&self, a: &[usize], b: &[usize]) -> Result<Dims> {
        let r = a.len();
        let (m, k) = (a[r - 2], a[r - 1]);
        let (bk, n) = if self.transpose_b { (b[r - 1], b[r - 2]) } else { (b[r - 2], b[r - 1]) };
        if bk != k {
            candle_core::bail!("batched matmul: {a:?} times {b:?} (transposed: {})", self.transpose_b);
        }
        Ok(Dims { batch: a[..r - 2].iter().product(), m, k, n })
    }

    /// `b`'s (row, column) strides as a K×N matrix.
    fn b_strides(&self, d: Dims) -> (isize, isize) {
        if self.transpose_b {
            (1, d.k as isize)
        } else {
            (d.n as isize, 1)
        }
    }
}

/// `f(i, block)` for every batch element in parallel, each writing its `len`-element block of
/// the result.
fn per_batch(batch: usize, len: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = super::buffer::zeroed::<f32>(batch * len);
    out.par_chunks_mut(len.max(1)).enumerate().for_each(|(i, o)| f(i, o));
    out
}

impl CustomOp2 for Bmm {
    fn name(&self) -> &'static str {
        "samhost-bmm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let d = self.dims(l1.dims(), l2.dims())?;
        let (a, b) = (f32_slice(s1, l1, self.name())?, f32_slice(s2, l2, self.name())?);
        let (ka, kb) = (d.m * d.k, d.k * d.n);
        let y = per_batch(d.batch, d.m * d.n, |i, y| {
            let (ai, bi) = (&a[i * ka..(i + 1) * ka], &b[i * kb..(i + 1) * kb]);
            matmul((d.m, d.n, d.k), y, (d.n as isize, 1), ai, (d.k as isize, 1), bi, self.b_strides(d), false, false);
        });
        let mut shape = l1.dims().to_vec();
        let r = shape.len();
        shape[r - 1] = d.n;
        Ok((CpuStorage::F32(y), Shape::from(shape)))
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(a.dims(), b.dims())?;
        let g = g.contiguous()?;
        let ((as_, al), (bs, bl), (gs, gl)) = (a.storage_and_layout(), b.storage_and_layout(), g.storage_and_layout());
        let av = slice_of::<f32>(&as_, al, "batched matmul left")?;
        let bv = slice_of::<f32>(&bs, bl, "batched matmul right")?;
        let gv = slice_of::<f32>(&gs, gl, "batched matmul gradient")?;
        let (ka, kb, kg) = (d.m * d.k, d.k * d.n, d.m * d.n);
        let (k, n) = (d.k as isize, d.n as isize);
        // da = g·opbᵀ (m×k): opbᵀ is n×k.
        let da = a.track_op().then(|| {
            let bt = if self.transpose_b { (k, 1) } else { (1, n) };
            per_batch(d.batch, ka, |i, da| {
                let (gi, bi) = (&gv[i * kg..(i + 1) * kg], &bv[i * kb..(i + 1) * kb]);
                matmul((d.m, d.k, d.n), da, (k, 1), gi, (n, 1), bi, bt, false, false);
            })
        });
        // db = aᵀ·g (k×n), or gᵀ·a (n×k) when b is transposed.
        let db = b.track_op().then(|| {
            per_batch(d.batch, kb, |i, db| {
                let (ai, gi) = (&av[i * ka..(i + 1) * ka], &gv[i * kg..(i + 1) * kg]);
                if self.transpose_b {
                    matmul((d.n, d.k, d.m), db, (k, 1), gi, (1, n), ai, (k, 1), false, false);
                } else {
                    matmul((d.k, d.n, d.m), db, (n, 1), ai, (1, k), gi, (n, 1), false, false);
                }
            })
        });
        let dev = a.device();
        Ok((
            da.map(|v| Tensor::from_vec(v, a.shape(), dev)).transpose()?,
            db.map(|v| Tensor::from_vec(v, b.shape(), dev)).transpose()?,
        ))
    }
}

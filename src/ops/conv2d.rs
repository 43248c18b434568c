//! 2-D convolution on CPU as im2col + gemm, batch-parallel, with both backward passes.
//!
//! candle 0.11 runs CPU conv2d as a direct loop and its backward through `conv_transpose2d` and a
//! batch-transposed convolution, well below its matmul rate. Here each sample is unfolded
//! (im2col: `[C·KH·KW, Ho·Wo]`) into a per-thread buffer and multiplied with the weight matrix
//! `[O, C·KH·KW]` by the same gemm candle uses for matmul; the input gradient multiplies by the
//! transposed weights and folds back (col2im), the weight gradient accumulates
//! `grad_out · colsᵀ` per thread. Only the input and the weights are kept for the backward pass
//! (no unfolded copy of the batch lives beyond one sample per thread).
//!
//! Other devices and dtypes fall back to candle's own `conv2d`.

use super::gemm::{matmul, Float};
use super::half::{in_f32, is_half};
use candle_core::{backend::BackendStorage, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Geometry of one convolution.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    ho: usize,
    wo: usize,
}

impl Geometry {
    fn new(x: &[usize], k: &[usize], stride: usize, padding: usize) -> Result<Self> {
        let (&[n, c, h, w], &[o, kc, kh, kw]) = (x, k) else {
            candle_core::bail!("conv2d: input {x:?} and kernel {k:?} must both have rank 4");
        };
        if kc != c {
            candle_core::bail!("conv2d: input {x:?} has {c} channels, the kernel {k:?} expects {kc}");
        }
        if [n, c, h, w, o, kh, kw].contains(&0) {
            candle_core::bail!("conv2d: empty input {x:?} or kernel {k:?}");
        }
        if stride == 0 {
            candle_core::bail!("conv2d: stride must be > 0");
        }
        if h + 2 * padding < kh || w + 2 * padding < kw {
            candle_core::bail!("conv2d: kernel {kh}x{kw} larger than the padded input {h}x{w} (padding {padding})");
        }
        let ho = (h + 2 * padding - kh) / stride + 1;
        let wo = (w + 2 * padding - kw) / stride + 1;
        Ok(Self { n, c, h, w, o, kh, kw, stride, padding, ho, wo })
    }

    /// Rows of the unfolded matrix: C·KH·KW.
    fn ckk(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Columns of the unfolded matrix: Ho·Wo.
    fn l(&self) -> usize {
        self.ho * self.wo
    }

    fn in_len(&self) -> usize {
        self.c * self.h * self.w
    }

    /// For each unfolded row `(c, i, j)` and output row `oy`, the run of output columns whose
    /// input lies inside the image: calls `f(col_offset, input_offset, len)` where the run covers
    /// unfolded elements `col_offset..col_offset + len` and input elements `input_offset`,
    /// `input_offset + stride`, … (padding positions are skipped).
    #[inline]
    fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize)) {
        let (s, p) = (self.stride, self.padding);
        let l = self.l();
        for c in 0..self.c {
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let row = (c * self.kh + i) * self.kw + j;
                    // Output columns ox with 0 <= ox·s + j - p < w.
                    let ox0 = p.saturating_sub(j).div_ceil(s);
                    let ox1 = if self.w + p > j { ((self.w + p - j - 1) / s + 1).min(self.wo) } else { 0 };
                    if ox0 >= ox1 {
                        continue;
                    }
                    for oy in 0..self.ho {
                        let iy = (oy * s + i) as isize - p as isize;
                        if iy < 0 || iy >= self.h as isize {
                            continue;
                        }
                        let base_in = (c * self.h + iy as usize) * self.w;
                        f(row * l + oy * self.wo + ox0, base_in + ox0 * s + j - p, ox1 - ox0);
                    }
                }
            }
        }
    }
}

fn im2col<T: Float>(g: &Geometry, x: &[T], cols: &mut [T]) {
    cols.iter_mut().for_each(|v| *v = T::default());
    let s = g.stride;
    g.for_each_run(|col, at, len| {
        let dst = &mut cols[col..col + len];
        if s == 1 {
            dst.copy_from_slice(&x[at..at + len]);
        } else {
            dst.iter_mut().zip(x[at..].iter().step_by(s)).for_each(|(d, &v)| *d = v);
        }
    });
}

fn col2im_add<T: Float>(g: &Geometry, cols: &[T], gx: &mut [T]) {
    let s = g.stride;
    g.for_each_run(|col, at, len| {
        let src = &cols[col..col + len];
        if s == 1 {
            gx[at..at + len].iter_mut().zip(src).for_each(|(d, &v)| *d += v);
        } else {
            gx[at..].iter_mut().step_by(s).zip(src).for_each(|(d, &v)| *d += v);
        }
    });
}

fn forward<T: Float>(g: &Geometry, x: &[T], k: &[T]) -> Vec<T> {
    let (ckk, l) = (g.ckk(), g.l());
    let mut out = vec![T::default(); g.n * g.o * l];
    out.par_chunks_mut(g.o * l).zip(x.par_chunks(g.in_len())).for_each_init(
        || vec![T::default(); ckk * l],
        |cols, (out_n, x_n)| {
            im2col(g, x_n, cols);
            let l_i = l as isize;
            matmul((g.o, l, ckk), out_n, (l_i, 1), k, (ckk as isize, 1), cols, (l_i, 1), false, false);
        },
    );
    out
}

fn grad_input<T: Float>(g: &Geometry, k: &[T], gout: &[T]) -> Vec<T> {
    let (ckk, l) = (g.ckk(), g.l());
    let mut gx = vec![T::default(); g.n * g.in_len()];
    gx.par_chunks_mut(g.in_len()).zip(gout.par_chunks(g.o * l)).for_each_init(
        || vec![T::default(); ckk * l],
        |gcols, (gx_n, gout_n)| {
            let l_i = l as isize;
            // gcols(ckk×l) = kᵀ(ckk×o) · gout_n(o×l)
            matmul((ckk, l, g.o), gcols, (l_i, 1), k, (1, ckk as isize), gout_n, (l_i, 1), false, false);
            col2im_add(g, gcols, gx_n);
        },
    );
    gx
}

fn grad_kernel<T: Float>(g: &Geometry, x: &[T], gout: &[T]) -> Vec<T> {
    let (ckk, l) = (g.ckk(), g.l());
    // One partial sum per worker over a fixed range of samples, added in order: the same result
    // on every run with the same number of threads (rayon's fold would group by work stealing).
    let parts = rayon::current_num_threads().clamp(1, g.n);
    let per = g.n.div_ceil(parts);
    let partials: Vec<Vec<T>> = (0..parts)
        .into_par_iter()
        .map(|part| {
            let mut gk = vec![T::default(); g.o * ckk];
            let mut cols = vec![T::default(); ckk * l];
            let l_i = l as isize;
            for i in part * per..((part + 1) * per).min(g.n) {
                let x_n = &x[i * g.in_len()..(i + 1) * g.in_len()];
                let gout_n = &gout[i * g.o * l..(i + 1) * g.o * l];
                im2col(g, x_n, &mut cols);
                // gk(o×ckk) += gout_n(o×l) · colsᵀ(l×ckk)
                matmul((g.o, ckk, l), &mut gk, (ckk as isize, 1), gout_n, (l_i, 1), &cols, (1, l_i), true, false);
            }
            gk
        })
        .collect();
    let mut parts = partials.into_iter();
    let mut gk = parts.next().unwrap_or_else(|| vec![T::default(); g.o * ckk]);
    for p in parts {
        gk.iter_mut().zip(&p).for_each(|(a, b)| *a += *b);
    }
    gk
}

fn slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("conv2d: expected a contiguous tensor"),
    }
}

/// The forward op: `(x, kernel) -> y`.
struct Conv2dOp {
    stride: usize,
    padding: usize,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "samhost-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1.dims(), l2.dims(), self.stride, self.padding)?;
        let shape = Shape::from((g.n, g.o, g.ho, g.wo));
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(forward(&g, slice::<f32>(s1, l1)?, slice::<f32>(s2, l2)?)),
            DType::F64 => CpuStorage::F64(forward(&g, slice::<f64>(s1, l1)?, slice::<f64>(s2, l2)?)),
            d => candle_core::bail!("conv2d: unsupported dtype {d:?}"),
        };
        Ok((out, shape))
    }

    fn bwd(&self, x: &Tensor, k: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let gx = k.apply_op2_no_bwd(&grad, &GradInputOp { input: x.dims().to_vec(), conv: self.geometry() })?;
        let gk = x.apply_op2_no_bwd(&grad, &GradKernelOp { kernel: k.dims().to_vec(), conv: self.geometry() })?;
        Ok((Some(gx), Some(gk)))
    }
}

impl Conv2dOp {
    fn geometry(&self) -> (usize, usize) {
        (self.stride, self.padding)
    }
}

/// `(kernel, grad_out) -> grad_input`.
struct GradInputOp {
    input: Vec<usize>,
    conv: (usize, usize),
}

impl CustomOp2 for GradInputOp {
    fn name(&self) -> &'static str {
        "samhost-conv2d-grad-input"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(&self.input, l1.dims(), self.conv.0, self.conv.1)?;
        if l2.dims() != [g.n, g.o, g.ho, g.wo] {
            candle_core::bail!("conv2d backward: gradient {:?} does not match the output", l2.dims());
        }
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(grad_input(&g, slice::<f32>(s1, l1)?, slice::<f32>(s2, l2)?)),
            DType::F64 => CpuStorage::F64(grad_input(&g, slice::<f64>(s1, l1)?, slice::<f64>(s2, l2)?)),
            d => candle_core::bail!("conv2d: unsupported dtype {d:?}"),
        };
        Ok((out, Shape::from(self.input.clone())))
    }
}

/// `(input, grad_out) -> grad_kernel`.
struct GradKernelOp {
    kernel: Vec<usize>,
    conv: (usize, usize),
}

impl CustomOp2 for GradKernelOp {
    fn name(&self) -> &'static str {
        "samhost-conv2d-grad-kernel"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1.dims(), &self.kernel, self.conv.0, self.conv.1)?;
        if l2.dims() != [g.n, g.o, g.ho, g.wo] {
            candle_core::bail!("conv2d backward: gradient {:?} does not match the output", l2.dims());
        }
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(grad_kernel(&g, slice::<f32>(s1, l1)?, slice::<f32>(s2, l2)?)),
            DType::F64 => CpuStorage::F64(grad_kernel(&g, slice::<f64>(s1, l1)?, slice::<f64>(s2, l2)?)),
            d => candle_core::bail!("conv2d: unsupported dtype {d:?}"),
        };
        Ok((out, Shape::from(self.kernel.clone())))
    }
}

/// 2-D convolution of `x` `[N, C, H, W]` with `kernel` `[O, C, KH, KW]` (square stride and
/// symmetric zero padding, no dilation, one group). CPU f32/f64 use the im2col + gemm path;
/// CPU bf16/f16 use it too, on the operands widened to f32 (products accumulate in f32, the
/// result is rounded back, as on tensor cores); anything else uses candle's `conv2d`.
pub fn conv2d(x: &Tensor, kernel: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if x.device().is_cpu() && is_half(x) && kernel.dtype() == x.dtype() {
        return in_f32(x, |x| conv2d(x, &kernel.to_dtype(DType::F32)?, stride, padding));
    }
    let fast = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.dtype() == kernel.dtype();
    if !fast {
        return x.conv2d(kernel, padding, stride, 1, 1);
    }
    let x = x.contiguous()?;
    let kernel = kernel.contiguous()?;
    x.apply_op2(&kernel, Conv2dOp { stride, padding })
}

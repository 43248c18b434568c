//! 2-D convolution on CPU as im2col + gemm, with an optional fused epilogue (bias, ReLU, 2x2
//! max-pooling) and its backward pass.
//!
//! candle 0.11 runs CPU conv2d as a direct loop and its backward through `conv_transpose2d` and a
//! batch-transposed convolution, well below its matmul rate. Here a group of samples is unfolded
//! (im2col: `[C·KH·KW, B·Ho·Wo]`, enough samples that the product has at least
//! [`MIN_COLUMNS`] columns) into a per-thread buffer and multiplied with the weight matrix
//! `[O, C·KH·KW]` by the gemm candle uses for matmul; the input gradient multiplies by the
//! transposed weights and folds back (col2im), the weight gradient accumulates `grad·colsᵀ` per
//! thread over a fixed range of samples (the same sum on every run with the same thread count).
//!
//! The epilogue runs on each group's product while it is in cache: add the bias, clamp at zero,
//! pool. With pooling only the pooled output and the position of each window's maximum are kept,
//! and the backward pass scatters the incoming gradient straight into the group's buffer: no
//! full-size intermediate or its gradient exists, where candle's graph would hold three (and add
//! each gradient into a zero-filled tensor). The input gradient is computed only when the input
//! needs one (not for a data batch), and the parameters' gradients go to [`super::param_grads`].
//!
//! Other devices and dtypes fall back to candle's `conv2d` and the separate ops.

use super::cpu::slice_of;
use super::gemm::{matmul, Float};
use super::half::{in_f32, is_half};
use super::param_grads::deliver;
use candle_core::{backend::BackendStorage, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// Columns one gemm of a group of samples spans at least (fewer samples per group when one
/// sample's output has that many positions).
pub const MIN_COLUMNS: usize = 512;

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

    /// For each unfolded row `(c, i, j)` and output row `oy`, the run of output positions whose
    /// input lies inside the image: calls `f(row, position, input_offset, len)` where the run
    /// covers positions `position..position + len` of unfolded row `row` and input elements
    /// `input_offset`, `input_offset + stride`, … (padding positions are skipped).
    #[inline]
    fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize, usize)) {
        let (s, p) = (self.stride, self.padding);
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
                        f(row, oy * self.wo + ox0, base_in + ox0 * s + j - p, ox1 - ox0);
                    }
                }
            }
        }
    }

    /// Samples per gemm.
    fn group(&self) -> usize {
        MIN_COLUMNS.div_ceil(self.l()).clamp(1, self.n)
    }
}

/// What runs on the convolution's output before it is stored.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Epilogue {
    bias: bool,
    relu: bool,
    pool: bool,
}

impl Epilogue {
    /// Output positions per channel: Ho·Wo, or (Ho/2)·(Wo/2) after pooling.
    fn out_len(&self, g: &Geometry) -> usize {
        if self.pool {
            (g.ho / 2) * (g.wo / 2)
        } else {
            g.l()
        }
    }
}

/// Copies a short run: whole blocks of 8 as fixed-size copies (kept inline, where
/// `copy_from_slice` on a run of 8 to 32 values calls `memmove`), then the rest.
#[inline]
fn copy_run<T: Copy>(dst: &mut [T], src: &[T]) {
    let (mut d, mut s) = (dst.chunks_exact_mut(8), src.chunks_exact(8));
    for (d, s) in (&mut d).zip(&mut s) {
        let block: &[T; 8] = s.try_into().expect("a chunk of 8");
        d.copy_from_slice(block);
    }
    d.into_remainder().iter_mut().zip(s.remainder()).for_each(|(d, &v)| *d = v);
}

/// A per-thread buffer of unfolded samples `[C·KH·KW, bs·L]` (row stride `bs·L`). Positions
/// that fall on the padding are never written, so the buffer is zero-filled only when its
/// layout (`bs`) changes.
struct Unfolded<T> {
    cols: Vec<T>,
    ld: usize,
}

impl<T: Float> Unfolded<T> {
    fn new(g: &Geometry) -> Self {
        Self { cols: vec![T::default(); g.ckk() * g.group() * g.l()], ld: 0 }
    }

    /// Unfolds the `bs` samples of `x`.
    fn fill(&mut self, g: &Geometry, x: &[T], bs: usize) -> &[T] {
        let (l, ld, s) = (g.l(), bs * g.l(), g.stride);
        let cols = &mut self.cols[..g.ckk() * ld];
        if self.ld != ld {
            cols.fill(T::default());
            self.ld = ld;
        }
        for (b, x_b) in x.chunks_exact(g.in_len()).take(bs).enumerate() {
            g.for_each_run(|row, pos, at, len| {
                let dst = &mut cols[row * ld + b * l + pos..][..len];
                if s == 1 {
                    copy_run(dst, &x_b[at..at + len]);
                } else {
                    dst.iter_mut().zip(x_b[at..].iter().step_by(s)).for_each(|(d, &v)| *d = v);
                }
            });
        }
        cols
    }
}

/// Folds `cols` `[C·KH·KW, bs·L]` back onto the `bs` samples of `gx`, adding to it (zero on
/// entry: each input element gathers the contributions of every kernel position over it).
fn col2im<T: Float>(g: &Geometry, cols: &[T], bs: usize, gx: &mut [T]) {
    let (l, ld, s) = (g.l(), bs * g.l(), g.stride);
    for (b, gx_b) in gx.chunks_exact_mut(g.in_len()).take(bs).enumerate() {
        g.for_each_run(|row, pos, at, len| {
            let src = &cols[row * ld + b * l + pos..][..len];
            if s == 1 {
                gx_b[at..at + len].iter_mut().zip(src).for_each(|(d, &v)| *d += v);
            } else {
                gx_b[at..].iter_mut().step_by(s).zip(src).for_each(|(d, &v)| *d += v);
            }
        });
    }
}

/// `max(v, 0)`.
#[inline]
fn relu<T: Float>(v: T) -> T {
    if v > T::default() {
        v
    } else {
        T::default()
    }
}

/// 2x2 max-pooling of one `ho`×`wo` plane into `out` with the window position of each maximum
/// (0..4, row-major, the first one on ties).
fn pool_plane<T: Float>(plane: &[T], (ho, wo): (usize, usize), out: &mut [T], argmax: &mut [u8]) {
    let pw = wo / 2;
    for (py, (out_row, am_row)) in out.chunks_exact_mut(pw).zip(argmax.chunks_exact_mut(pw)).take(ho / 2).enumerate() {
        let r0 = &plane[2 * py * wo..][..2 * pw];
        let r1 = &plane[(2 * py + 1) * wo..][..2 * pw];
        for (px, (o, a)) in out_row.iter_mut().zip(am_row.iter_mut()).enumerate() {
            let mut best = (0u8, r0[2 * px]);
            for (k, v) in [(1u8, r0[2 * px + 1]), (2, r1[2 * px]), (3, r1[2 * px + 1])] {
                if v > best.1 {
                    best = (k, v);
                }
            }
            (*a, *o) = best;
        }
    }
}

/// The forward pass: the output `[N, O, ·]` and, when pooling, each window's argmax.
fn forward<T: Float>(g: &Geometry, ep: Epilogue, x: &[T], k: &[T], bias: Option<&[T]>) -> (Vec<T>, Vec<u8>) {
    let (ckk, l, bsz) = (g.ckk(), g.l(), g.group());
    let out_per = g.o * ep.out_len(g);
    let mut out = vec![T::default(); g.n * out_per];
    let mut argmax = vec![0u8; if ep.pool { g.n * out_per } else { 0 }];
    let mut am_chunks: Vec<Option<&mut [u8]>> = if ep.pool {
        argmax.chunks_mut(bsz * out_per).map(Some).collect()
    } else {
        (0..g.n.div_ceil(bsz)).map(|_| None).collect()
    };
    out.par_chunks_mut(bsz * out_per).zip(am_chunks.par_iter_mut()).zip(x.par_chunks(bsz * g.in_len())).for_each_init(
        || (Unfolded::new(g), vec![T::default(); g.o * bsz * l]),
        |(unfolded, prod), ((out_g, am_g), x_g)| {
            let bs = x_g.len() / g.in_len();
            let ld = bs * l;
            let cols = unfolded.fill(g, x_g, bs);
            matmul((g.o, ld, ckk), prod, (ld as isize, 1), k, (ckk as isize, 1), cols, (ld as isize, 1), false, false);
            for b in 0..bs {
                for c in 0..g.o {
                    let z = &mut prod[c * ld + b * l..][..l];
                    if let Some(bias) = bias {
                        z.iter_mut().for_each(|v| *v += bias[c]);
                    }
                    let at = (b * g.o + c) * ep.out_len(g);
                    let dst = &mut out_g[at..at + ep.out_len(g)];
                    match am_g.as_deref_mut() {
                        Some(am) => pool_plane(z, (g.ho, g.wo), dst, &mut am[at..at + ep.out_len(g)]),
                        None => dst.copy_from_slice(z),
                    }
                    if ep.relu {
                        dst.iter_mut().for_each(|v| *v = relu(*v));
                    }
                }
            }
        },
    );
    (out, argmax)
}

/// What the backward pass reads: the operands, the output, its gradient and the pooling positions.
struct Saved<'a, T> {
    x: &'a [T],
    k: &'a [T],
    y: &'a [T],
    dy: &'a [T],
    argmax: &'a [u8],
}

/// Which gradients the backward pass computes.
#[derive(Clone, Copy)]
struct Needs {
    input: bool,
    kernel: bool,
    bias: bool,
}

/// Gradients of the input, the kernel and the bias (those asked for).
type Grads<T> = (Option<Vec<T>>, Option<Vec<T>>, Option<Vec<T>>);

/// Writes the gradient of the convolution's raw output for samples `b0..b0 + bs` into `gz`
/// `[O, bs·L]`, from the output `y`, its gradient `dy` and the pooling positions.
#[allow(clippy::too_many_arguments)]
fn output_grad<T: Float>(
    g: &Geometry,
    ep: Epilogue,
    y: &[T],
    dy: &[T],
    argmax: &[u8],
    b0: usize,
    bs: usize,
    gz: &mut [T],
) {
    let (l, out_len) = (g.l(), ep.out_len(g));
    let ld = bs * l;
    if ep.pool {
        gz[..g.o * ld].fill(T::default());
    }
    let pw = g.wo / 2;
    for b in 0..bs {
        for c in 0..g.o {
            let at = ((b0 + b) * g.o + c) * out_len;
            let (y_p, dy_p) = (&y[at..at + out_len], &dy[at..at + out_len]);
            let dst = &mut gz[c * ld + b * l..][..l];
            if ep.pool {
                for (q, ((&yv, &dv), &a)) in y_p.iter().zip(dy_p).zip(&argmax[at..at + out_len]).enumerate() {
                    if !ep.relu || yv > T::default() {
                        let (iy, ix) = (2 * (q / pw) + (a as usize >> 1), 2 * (q % pw) + (a as usize & 1));
                        dst[iy * g.wo + ix] = dv;
                    }
                }
            } else if ep.relu {
                dst.iter_mut().zip(y_p.iter().zip(dy_p)).for_each(|(d, (&yv, &dv))| {
                    *d = if yv > T::default() { dv } else { T::default() };
                });
            } else {
                dst.copy_from_slice(dy_p);
            }
        }
    }
}

/// The backward pass over fixed ranges of samples, one per thread, in groups of
/// [`Geometry::group`] samples.
fn backward<T: Float>(g: &Geometry, ep: Epilogue, saved: Saved<T>, needs: Needs) -> Grads<T> {
    let Saved { x, k, y, dy, argmax } = saved;
    let (ckk, l, bsz) = (g.ckk(), g.l(), g.group());
    let groups = g.n.div_ceil(bsz);
    let per = groups.div_ceil(rayon::current_num_threads().clamp(1, groups)) * bsz;
    let parts = g.n.div_ceil(per);
    let mut gx = vec![T::default(); if needs.input { g.n * g.in_len() } else { 0 }];
    let gx_parts: Vec<Option<&mut [T]>> = if needs.input {
        gx.chunks_mut(per * g.in_len()).map(Some).collect()
    } else {
        (0..parts).map(|_| None).collect()
    };
    let partials: Vec<(Vec<T>, Vec<T>)> = gx_parts
        .into_par_iter()
        .enumerate()
        .map(|(part, mut gx_part)| {
            let mut gk = vec![T::default(); if needs.kernel { g.o * ckk } else { 0 }];
            let mut gb = vec![T::default(); if needs.bias { g.o } else { 0 }];
            let mut gz_buf = vec![T::default(); g.o * bsz * l];
            let mut unfolded = Unfolded::new(g);
            let mut gcols = vec![T::default(); if needs.input { ckk * bsz * l } else { 0 }];
            let (s0, s1) = (part * per, ((part + 1) * per).min(g.n));
            for b0 in (s0..s1).step_by(bsz) {
                let bs = bsz.min(s1 - b0);
                let ld = bs * l;
                let ld_i = ld as isize;
                // A single sample with nothing after the convolution: the incoming gradient
                // already has the [O, L] layout.
                let gz: &[T] = if bs == 1 && !ep.pool && !ep.relu {
                    &dy[b0 * g.o * l..(b0 + 1) * g.o * l]
                } else {
                    output_grad(g, ep, y, dy, argmax, b0, bs, &mut gz_buf);
                    &gz_buf
                };
                if needs.bias {
                    for (s, row) in gb.iter_mut().zip(gz.chunks_exact(ld)) {
                        *s += row.iter().fold(T::default(), |a, &v| a + v);
                    }
                }
                if needs.kernel {
                    let cols = unfolded.fill(g, &x[b0 * g.in_len()..], bs);
                    // gkᵀ(ckk×o) += cols(ckk×ld) · gzᵀ(ld×o), kept transposed: with the output
                    // contiguous along o the gemm packs the small gz, not the unfolded columns.
                    matmul((ckk, g.o, ld), &mut gk, (g.o as isize, 1), cols, (ld_i, 1), gz, (1, ld_i), true, false);
                }
                if let Some(gx_part) = gx_part.as_deref_mut() {
                    // cols(ckk×ld) = kᵀ(ckk×o) · gz(o×ld)
                    matmul((ckk, ld, g.o), &mut gcols, (ld_i, 1), k, (1, ckk as isize), gz, (ld_i, 1), false, false);
                    col2im(g, &gcols, bs, &mut gx_part[(b0 - s0) * g.in_len()..]);
                }
            }
            (gk, gb)
        })
        .collect();
    let mut sums = partials.into_iter();
    let (mut gk, mut gb) = sums.next().unwrap_or_default();
    for (pk, pb) in sums {
        gk.iter_mut().zip(&pk).for_each(|(a, &b)| *a += b);
        gb.iter_mut().zip(&pb).for_each(|(a, &b)| *a += b);
    }
    // gkᵀ [ckk, o] to the kernel's layout [o, ckk].
    let gk = needs.kernel.then(|| (0..g.o * ckk).map(|i| gk[(i % ckk) * g.o + i / ckk]).collect());
    (needs.input.then_some(gx), gk, needs.bias.then_some(gb))
}

/// The op: `(x, kernel[, bias]) -> epilogue(conv(x, kernel))`.
struct ConvBlock {
    stride: usize,
    padding: usize,
    ep: Epilogue,
    /// Each pooling window's argmax, written by the forward pass for the backward pass.
    argmax: Mutex<Vec<u8>>,
}

impl ConvBlock {
    fn out_shape(&self, g: &Geometry) -> Shape {
        if self.ep.pool {
            Shape::from((g.n, g.o, g.ho / 2, g.wo / 2))
        } else {
            Shape::from((g.n, g.o, g.ho, g.wo))
        }
    }

    fn cpu(
        &self,
        x: (&CpuStorage, &Layout),
        k: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(x.1.dims(), k.1.dims(), self.stride, self.padding)?;
        fn typed<'a, T: Float>(s: (&'a CpuStorage, &Layout)) -> Result<&'a [T]> {
            match s.1.contiguous_offsets() {
                Some((a, b)) => Ok(&s.0.as_slice::<T>()?[a..b]),
                None => candle_core::bail!("conv2d: expected a contiguous tensor"),
            }
        }
        let (out, argmax) = match x.0.dtype() {
            DType::F32 => {
                let (o, a) = forward(&g, self.ep, typed(x)?, typed(k)?, b.map(typed).transpose()?);
                (CpuStorage::F32(o), a)
            }
            DType::F64 => {
                let (o, a) = forward(&g, self.ep, typed(x)?, typed(k)?, b.map(typed).transpose()?);
                (CpuStorage::F64(o), a)
            }
            d => candle_core::bail!("conv2d: unsupported dtype {d:?}"),
        };
        *self.argmax.lock().map_err(|_| candle_core::Error::Msg("conv2d: poisoned lock".into()))? = argmax;
        Ok((out, self.out_shape(&g)))
    }

    fn grads<T: Float>(
        &self,
        g: &Geometry,
        x: &Tensor,
        k: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        needs: Needs,
    ) -> Result<Grads<T>> {
        let ((xs, xl), (ks, kl)) = (x.storage_and_layout(), k.storage_and_layout());
        let ((ys, yl), (ds, dl)) = (y.storage_and_layout(), dy.storage_and_layout());
        let argmax = self.argmax.lock().map_err(|_| candle_core::Error::Msg("conv2d: poisoned lock".into()))?;
        if self.ep.pool && argmax.len() != y.elem_count() {
            candle_core::bail!("conv2d backward: the pooling positions of the forward pass are missing");
        }
        let (xv, kv) = (slice_of::<T>(&xs, xl, "conv2d input")?, slice_of::<T>(&ks, kl, "conv2d kernel")?);
        let (yv, dv) = (slice_of::<T>(&ys, yl, "conv2d output")?, slice_of::<T>(&ds, dl, "conv2d gradient")?);
        Ok(backward(g, self.ep, Saved { x: xv, k: kv, y: yv, dy: dv, argmax: &argmax }, needs))
    }

    fn backward(&self, x: &Tensor, k: &Tensor, b: Option<&Tensor>, y: &Tensor, dy: &Tensor) -> Result<TensorGrads> {
        let g = Geometry::new(x.dims(), k.dims(), self.stride, self.padding)?;
        let dy = dy.contiguous()?;
        if dy.shape() != y.shape() {
            candle_core::bail!("conv2d backward: gradient {:?} does not match the output {:?}", dy.dims(), y.dims());
        }
        let needs = Needs { input: x.track_op(), kernel: k.track_op(), bias: b.is_some_and(|b| b.track_op()) };
        let dev = x.device();
        fn wrap<T: Float>(v: Option<Vec<T>>, shape: &[usize], dev: &candle_core::Device) -> Result<Option<Tensor>> {
            v.map(|v| Tensor::from_vec(v, shape, dev)).transpose()
        }
        let (gx, gk, gb) = match x.dtype() {
            DType::F32 => {
                let (gx, gk, gb) = self.grads::<f32>(&g, x, k, y, &dy, needs)?;
                (wrap(gx, x.dims(), dev)?, wrap(gk, k.dims(), dev)?, wrap(gb, &[g.o], dev)?)
            }
            DType::F64 => {
                let (gx, gk, gb) = self.grads::<f64>(&g, x, k, y, &dy, needs)?;
                (wrap(gx, x.dims(), dev)?, wrap(gk, k.dims(), dev)?, wrap(gb, &[g.o], dev)?)
            }
            d => candle_core::bail!("conv2d: unsupported dtype {d:?}"),
        };
        let gk = gk.map(|t| deliver(k, t)).transpose()?.flatten();
        let gb = match (b, gb) {
            (Some(b), Some(t)) => deliver(b, t)?,
            _ => None,
        };
        Ok((gx, gk, gb))
    }
}

/// Gradients of up to three operands.
type TensorGrads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

impl CustomOp2 for ConvBlock {
    fn name(&self) -> &'static str {
        "samhost-conv2d"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu((s1, l1), (s2, l2), None)
    }

    fn bwd(&self, x: &Tensor, k: &Tensor, y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (gx, gk, _) = self.backward(x, k, None, y, dy)?;
        Ok((gx, gk))
    }
}

impl CustomOp3 for ConvBlock {
    fn name(&self) -> &'static str {
        "samhost-conv2d-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(&self, x: &Tensor, k: &Tensor, b: &Tensor, y: &Tensor, dy: &Tensor) -> Result<TensorGrads> {
        self.backward(x, k, Some(b), y, dy)
    }
}

/// Options of [`conv2d_block`]: the convolution's stride and padding and what follows it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ConvBlockOptions {
    /// Square stride (0 means 1).
    pub stride: usize,
    /// Symmetric zero padding.
    pub padding: usize,
    /// Clamp the output at zero.
    pub relu: bool,
    /// 2x2 max-pooling with stride 2 after the ReLU (an odd last row or column is dropped).
    pub pool: bool,
}

/// 2-D convolution of `x` `[N, C, H, W]` with `kernel` `[O, C, KH, KW]` (square stride and
/// symmetric zero padding, no dilation, one group). CPU f32/f64 use the im2col + gemm path;
/// CPU bf16/f16 use it too, on the operands widened to f32 (products accumulate in f32, the
/// result is rounded back, as on tensor cores); anything else uses candle's `conv2d`.
pub fn conv2d(x: &Tensor, kernel: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    conv2d_block(x, kernel, None, ConvBlockOptions { stride, padding, ..Default::default() })
}

/// `pool?(relu?(conv2d(x, kernel) + bias))` as one op on the CPU in f32/f64 (bias `[O]`); other
/// dtypes and devices compose [`conv2d`], the broadcast add, [`super::relu`] and
/// [`super::max_pool2`], which compute the same.
pub fn conv2d_block(x: &Tensor, kernel: &Tensor, bias: Option<&Tensor>, opts: ConvBlockOptions) -> Result<Tensor> {
    let stride = opts.stride.max(1);
    let same = |t: &Tensor| t.dtype() == x.dtype() && t.device().same_device(x.device());
    let fast = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && same(kernel)
        && bias.is_none_or(same)
        && std::env::var_os("CANDLE_GRAD_DO_NOT_DETACH").is_none();
    if !fast {
        let y = if x.device().is_cpu() && is_half(x) && kernel.dtype() == x.dtype() {
            in_f32(x, |x| conv2d(x, &kernel.to_dtype(DType::F32)?, stride, opts.padding))?
        } else if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && same(kernel) {
            conv2d(x, kernel, stride, opts.padding)?
        } else {
            x.conv2d(kernel, opts.padding, stride, 1, 1)?
        };
        let y = match bias {
            Some(b) => super::bias::add_broadcast(&y, &b.reshape((1, b.elem_count(), 1, 1))?)?,
            None => y,
        };
        let y = if opts.relu { super::relu(&y)? } else { y };
        return if opts.pool { super::max_pool2(&y) } else { Ok(y) };
    }
    let g = Geometry::new(x.dims(), kernel.dims(), stride, opts.padding)?;
    if opts.pool && (g.ho < 2 || g.wo < 2) {
        candle_core::bail!("2x2 max-pooling needs an input of at least 2x2, got {}x{}", g.ho, g.wo);
    }
    let ep = Epilogue { bias: bias.is_some(), relu: opts.relu, pool: opts.pool };
    let op = ConvBlock { stride, padding: opts.padding, ep, argmax: Mutex::new(Vec::new()) };
    let (x, kernel) = (x.contiguous()?, kernel.contiguous()?);
    match bias {
        Some(b) => {
            if b.dims() != [g.o] {
                candle_core::bail!("conv2d: bias {:?} does not match the kernel's {} output channels", b.dims(), g.o);
            }
            x.apply_op3(&kernel, &b.contiguous()?, op)
        }
        None => x.apply_op2(&kernel, op),
    }
}

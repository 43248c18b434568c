//! The forward and backward passes of a convolution block on CPU slices.

use super::geometry::Geometry;
use super::unfold::{col2im, Unfolded};
use crate::ops::gemm::{matmul, Float};
use rayon::prelude::*;

/// What runs on the convolution's output before it is stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Epilogue {
    pub(super) relu: bool,
    pub(super) pool: bool,
}

impl Epilogue {
    /// Nothing after the convolution.
    pub(super) const NONE: Self = Self { relu: false, pool: false };

    /// Output positions per channel: Ho·Wo, or (Ho/2)·(Wo/2) after pooling.
    pub(super) fn out_len(&self, g: &Geometry) -> usize {
        if self.pool {
            (g.ho / 2) * (g.wo / 2)
        } else {
            g.l()
        }
    }
}

/// `max(v, 0)`.
#[inline]
pub(super) fn relu<T: Float>(v: T) -> T {
    if v > T::default() {
        v
    } else {
        T::default()
    }
}

/// 2x2 max-pooling of one `ho`×`wo` plane into `out` with the window position of each maximum
/// (0..4, row-major, the first one on ties).
pub(super) fn pool_plane<T: Float>(plane: &[T], (ho, wo): (usize, usize), out: &mut [T], argmax: &mut [u8]) {
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

/// The pooling epilogue of one sample: 2x2 max-pooling of its raw output `planes` `[O, Ho·Wo]`
/// into `out` `[O, ·]` with each window's argmax, then the ReLU if there is one (pool, then
/// clamp: the order of the im2col path's epilogue).
pub(super) fn pool_planes(g: &Geometry, ep: Epilogue, planes: &[f32], out: &mut [f32], argmax: &mut [u8]) {
    let n = ep.out_len(g);
    for (c, z) in planes.chunks_exact(g.l()).enumerate().take(g.o) {
        let dst = &mut out[c * n..][..n];
        pool_plane(z, (g.ho, g.wo), dst, &mut argmax[c * n..][..n]);
        if ep.relu {
            dst.iter_mut().for_each(|v| *v = relu(*v));
        }
    }
}

/// The forward pass: the output `[N, O, ·]` and, when pooling, each window's argmax.
pub(super) fn forward<T: Float>(g: &Geometry, ep: Epilogue, x: &[T], k: &[T], bias: Option<&[T]>) -> (Vec<T>, Vec<u8>) {
    let (ckk, l, bsz) = (g.ckk(), g.l(), g.group());
    let out_per = g.o * ep.out_len(g);
    let mut out = crate::ops::buffer::zeroed::<T>(g.n * out_per);
    let mut argmax = crate::ops::buffer::zeroed::<u8>(if ep.pool { g.n * out_per } else { 0 });
    let mut am_chunks: Vec<Option<&mut [u8]>> = if ep.pool {
        argmax.chunks_mut(bsz * out_per).map(Some).collect()
    } else {
        (0..g.n.div_ceil(bsz)).map(|_| None).collect()
    };
    out.par_chunks_mut(bsz * out_per).zip(am_chunks.par_iter_mut()).zip(x.par_chunks(bsz * g.in_len())).for_each_init(
        || (Unfolded::new(g), vec![T::default(); g.group_buffer::<T>(g.o)]),
        |(unfolded, prod), ((out_g, am_g), x_g)| {
            let bs = x_g.len() / g.in_len();
            let (ld, stride) = (bs * l, g.row_stride::<T>(bs) as isize);
            let cols = unfolded.fill(g, x_g, bs);
            if bs == 1 && !ep.pool {
                // One sample: the product's [O, L] layout is the output's, so the gemm writes it
                // in place (the unfolded rows are the ones whose stride matters).
                matmul((g.o, l, ckk), out_g, (l as isize, 1), k, (ckk as isize, 1), cols, (stride, 1), false, false);
                for (c, z) in out_g.chunks_exact_mut(l).enumerate() {
                    if let Some(bias) = bias {
                        z.iter_mut().for_each(|v| *v += bias[c]);
                    }
                    if ep.relu {
                        z.iter_mut().for_each(|v| *v = relu(*v));
                    }
                }
                return;
            }
            matmul((g.o, ld, ckk), prod, (stride, 1), k, (ckk as isize, 1), cols, (stride, 1), false, false);
            for b in 0..bs {
                for c in 0..g.o {
                    let z = &mut prod[c * stride as usize + b * l..][..l];
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
#[derive(Clone, Copy)]
pub(super) struct Saved<'a, T> {
    pub(super) x: &'a [T],
    pub(super) k: &'a [T],
    pub(super) y: &'a [T],
    pub(super) dy: &'a [T],
    pub(super) argmax: &'a [u8],
}

/// Which gradients the backward pass computes.
#[derive(Clone, Copy)]
pub(super) struct Needs {
    pub(super) input: bool,
    pub(super) kernel: bool,
    pub(super) bias: bool,
}

/// Gradients of the input, the kernel and the bias (those asked for).
pub(super) type Grads<T> = (Option<Vec<T>>, Option<Vec<T>>, Option<Vec<T>>);

/// Writes the gradient of the convolution's raw output for samples `b0..b0 + bs` into `gz`
/// `[O, bs·L]` (rows [`Geometry::row_stride`]`(bs)` apart), from the output `y`, its gradient
/// `dy` and the pooling positions.
#[allow(clippy::too_many_arguments)]
pub(super) fn output_grad<T: Float>(
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
    let ld = g.row_stride::<T>(bs);
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

/// Samples per thread in the backward passes: whole groups ([`Geometry::group`]), the batch
/// shared over the pool's threads in fixed ranges (so a gradient's sums are the same on every run
/// with the same thread count).
pub(super) fn samples_per_thread(g: &Geometry) -> usize {
    let groups = g.n.div_ceil(g.group());
    groups.div_ceil(rayon::current_num_threads().clamp(1, groups)) * g.group()
}

/// The input gradient `gx` (empty when not asked for) cut into one part per range of `per`
/// samples, or `None` per range when it is empty.
pub(super) fn input_grad_parts<'a, T>(g: &Geometry, gx: &'a mut [T], per: usize) -> Vec<Option<&'a mut [T]>> {
    if gx.is_empty() {
        (0..g.n.div_ceil(per)).map(|_| None).collect()
    } else {
        gx.chunks_mut(per * g.in_len()).map(Some).collect()
    }
}

/// The kernel and bias gradients summed over the ranges' partial sums, in range order.
pub(super) fn sum_partials<T: Float>(partials: Vec<(Vec<T>, Vec<T>)>) -> (Vec<T>, Vec<T>) {
    let mut sums = partials.into_iter();
    let (mut gk, mut gb) = sums.next().unwrap_or_default();
    for (pk, pb) in sums {
        // On the pool: a wide network's kernel gradient is megabytes (WRN-16-8's last 2.4M values).
        gk.par_iter_mut().zip(pk.par_iter()).with_min_len(1 << 14).for_each(|(a, &b)| *a += b);
        gb.iter_mut().zip(&pb).for_each(|(a, &b)| *a += b);
    }
    (gk, gb)
}

/// The backward pass over fixed ranges of samples, one per thread, in groups of
/// [`Geometry::group`] samples. (Four ranges per thread, tried 2026-12-01, made the SGD step
/// 3-14 % slower in 4 paired runs: each range zero-fills its own buffers.)
pub(super) fn backward<T: Float>(g: &Geometry, ep: Epilogue, saved: Saved<T>, needs: Needs) -> Grads<T> {
    let Saved { x, k, y, dy, argmax } = saved;
    let (ckk, l, bsz) = (g.ckk(), g.l(), g.group());
    let per = samples_per_thread(g);
    let mut gx = crate::ops::buffer::zeroed::<T>(if needs.input { g.n * g.in_len() } else { 0 });
    let gx_parts = input_grad_parts(g, &mut gx, per);
    let partials: Vec<(Vec<T>, Vec<T>)> = gx_parts
        .into_par_iter()
        .enumerate()
        .map(|(part, mut gx_part)| {
            let mut gk = vec![T::default(); if needs.kernel { g.o * ckk } else { 0 }];
            let mut gb = vec![T::default(); if needs.bias { g.o } else { 0 }];
            let mut gz_buf = vec![T::default(); g.group_buffer::<T>(g.o)];
            let mut unfolded = Unfolded::new(g);
            let mut gcols = vec![T::default(); if needs.input { g.group_buffer::<T>(ckk) } else { 0 }];
            let (s0, s1) = (part * per, ((part + 1) * per).min(g.n));
            for b0 in (s0..s1).step_by(bsz) {
                let bs = bsz.min(s1 - b0);
                let (ld, stride) = (bs * l, g.row_stride::<T>(bs));
                // A single sample with nothing after the convolution: the incoming gradient
                // already has the [O, L] layout (rows L apart).
                let (gz, gz_stride): (&[T], usize) = if bs == 1 && !ep.pool && !ep.relu {
                    (&dy[b0 * g.o * l..(b0 + 1) * g.o * l], l)
                } else {
                    output_grad(g, ep, y, dy, argmax, b0, bs, &mut gz_buf);
                    (&gz_buf, stride)
                };
                if needs.bias {
                    for (c, s) in gb.iter_mut().enumerate() {
                        *s += gz[c * gz_stride..][..ld].iter().fold(T::default(), |a, &v| a + v);
                    }
                }
                let (stride, gz_stride) = (stride as isize, gz_stride as isize);
                if needs.kernel {
                    let cols = unfolded.fill(g, &x[b0 * g.in_len()..], bs);
                    // gkᵀ(ckk×o) += cols(ckk×ld) · gzᵀ(ld×o), kept transposed: with the output
                    // contiguous along o the gemm packs the small gz, not the unfolded columns.
                    matmul(
                        (ckk, g.o, ld),
                        &mut gk,
                        (g.o as isize, 1),
                        cols,
                        (stride, 1),
                        gz,
                        (1, gz_stride),
                        true,
                        false,
                    );
                }
                if let Some(gx_part) = gx_part.as_deref_mut() {
                    // cols(ckk×ld) = kᵀ(ckk×o) · gz(o×ld)
                    matmul(
                        (ckk, ld, g.o),
                        &mut gcols,
                        (stride, 1),
                        k,
                        (1, ckk as isize),
                        gz,
                        (gz_stride, 1),
                        false,
                        false,
                    );
                    col2im(g, &mut gcols, bs, &mut gx_part[(b0 - s0) * g.in_len()..]);
                }
            }
            (gk, gb)
        })
        .collect();
    let (gk, gb) = sum_partials(partials);
    // gkᵀ [ckk, o] to the kernel's layout [o, ckk].
    let gk = needs.kernel.then(|| (0..g.o * ckk).map(|i| gk[(i % ckk) * g.o + i / ckk]).collect());
    (needs.input.then_some(gx), gk, needs.bias.then_some(gb))
}

//! Winograd's minimal filtering F(2x2, 3x3) for wide 3x3 convolutions with stride 1 and
//! padding 1, in f32: the forward pass and both gradients as 16 matrix products each, with
//! 2.25 times fewer multiply-adds than the direct convolution (Lavin & Gray, "Fast Algorithms for
//! Convolutional Neural Networks", CVPR 2016).
//!
//! The output is cut into 2x2 tiles, each computed from the 4x4 input patch around it:
//! `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` for kernel `g` and patch `d`. Over channels the element-wise
//! product becomes, for each of the 16 positions `ξ` of the 4x4 transform, one matrix product
//! `M_ξ [O, T] = U_ξ [O, C] · V_ξ [C, T]` over the `T` tiles of a group of samples, where `U` is
//! the transformed kernel and `V` the transformed input. The backward pass is the exact adjoint
//! of these linear maps: with `dM = A dY Aᵀ`, the kernel's gradient is `Gᵀ (Σ_T dM_ξ V_ξᵀ) G`
//! and the input's `B (U_ξᵀ dM_ξ) Bᵀ`, added back over the overlapping patches. So all three
//! passes run at the gemm's rate on well-shaped products (`O`, `C` of 64 and more), where the
//! direct kernels reach 65-75 % of it.
//!
//! The transforms only add and halve (entries 0, ±1, ±½), so the results differ from the direct
//! sum by rounding alone (checked against candle's convolution in `tests/it/ops.rs`). The speed
//! benchmark's census records the products im2col would make for the same convolution (as the
//! direct kernels do), so the floor stays the step's arithmetic at the gemm's rate and "x floor"
//! can fall below 1 here. `SAMHOST_WINOGRAD=0` turns this path off (for comparisons).

use super::direct::{record_gemms, Pass, Rows};
use super::geometry::Geometry;
use super::passes::{input_grad_parts, output_grad, pool_planes, relu, sum_partials, Epilogue, Grads, Needs, Saved};
use crate::ops::gemm::{matmul_uncounted, padded_stride, stride_padding};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Input and output channels from which this path runs: below, the 16 products are too narrow
/// for the gemm's rate to make up for the transforms.
const MIN_CHANNELS: usize = 64;

/// Tiles one group's products span at least (fewer samples per group where one sample has
/// that many tiles; never more samples than a thread's share of the batch).
const MIN_TILES: usize = 256;

/// The input transform `Bᵀ` (rows) of F(2x2, 3x3).
const BT: [[f32; 4]; 4] = [[1.0, 0.0, -1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, -1.0, 1.0, 0.0], [0.0, 1.0, 0.0, -1.0]];
/// The output transform `Aᵀ`.
const AT: [[f32; 4]; 2] = [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]];
/// The kernel transform `G`.
const G: [[f32; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];

/// Whether this path runs for the convolution: 3x3, stride 1, padding 1, an even height and
/// width, at least [`MIN_CHANNELS`] input and output channels, a CPU with AVX2 and FMA, and
/// unless `SAMHOST_WINOGRAD=0`.
pub(super) fn applies(g: &Geometry) -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    let enabled = *ENABLED
        .get_or_init(|| std::env::var("SAMHOST_WINOGRAD").map_or(true, |v| v != "0") && crate::ops::cpu::has_avx2());
    enabled
        && (g.kh, g.kw, g.stride, g.padding) == (3, 3, 1, 1)
        && g.h.is_multiple_of(2)
        && g.w.is_multiple_of(2)
        && g.c >= MIN_CHANNELS
        && g.o >= MIN_CHANNELS
}

/// How the tiles of one convolution are laid out.
#[derive(Clone, Copy)]
struct Tiling {
    /// Tile rows and columns per sample.
    th: usize,
    tw: usize,
    /// Samples per group (one set of 16 products).
    group: usize,
    /// Samples per thread (fixed ranges: the same sums on every run with the same thread count).
    per: usize,
}

impl Tiling {
    fn new(g: &Geometry) -> Self {
        let (th, tw) = (g.h / 2, g.w / 2);
        let per = g.n.div_ceil(rayon::current_num_threads().clamp(1, g.n));
        let group = MIN_TILES.div_ceil(th * tw).clamp(1, per);
        Self { th, tw, group, per }
    }

    /// Tiles per sample.
    fn tiles(&self) -> usize {
        self.th * self.tw
    }

    /// The row stride of a group's `[rows, T]` matrices for `bs` samples.
    fn ld(&self, bs: usize) -> usize {
        padded_stride::<f32>(bs * self.tiles())
    }

    /// Elements of a `[16, rows, T]` buffer for any group.
    fn buffer(&self, rows: usize) -> usize {
        16 * rows * (self.group * self.tiles() + stride_padding::<f32>())
    }
}

/// The transformed kernel `U` `[16, O, C]`: `G g Gᵀ` for each kernel `g = k[o, c]`.
fn kernel_transform(k: &[f32], o: usize, c: usize) -> Vec<f32> {
    let mut u = vec![0f32; 16 * o * c];
    for (oc, g) in k.chunks_exact(9).enumerate().take(o * c) {
        for i in 0..4 {
            for j in 0..4 {
                let mut s = 0f32;
                for a in 0..3 {
                    for b in 0..3 {
                        s += G[i][a] * G[j][b] * g[a * 3 + b];
                    }
                }
                u[(i * 4 + j) * o * c + oc] = s;
            }
        }
    }
    u
}

/// The kernel's gradient `[O, C, 3, 3]` from that of its transform `du` `[16, O, C]`: `Gᵀ dU G`.
fn kernel_transform_grad(du: &[f32], o: usize, c: usize) -> Vec<f32> {
    let mut gk = vec![0f32; o * c * 9];
    for (oc, dst) in gk.chunks_exact_mut(9).enumerate() {
        for a in 0..3 {
            for b in 0..3 {
                let mut s = 0f32;
                for i in 0..4 {
                    for j in 0..4 {
                        s += G[i][a] * G[j][b] * du[(i * 4 + j) * o * c + oc];
                    }
                }
                dst[a * 3 + b] = s;
            }
        }
    }
    gk
}

/// `dst[k] = Σ_t coef[t] · src[t][k]` (the transforms' coefficients are 0, ±1 and ±½).
#[inline(always)]
fn combine<const N: usize>(dst: &mut [f32], coef: [f32; N], src: [&[f32]; N]) {
    let n = dst.len();
    let src = src.map(|s| &s[..n]);
    for (k, d) in dst.iter_mut().enumerate() {
        let mut s = 0f32;
        for t in 0..N {
            if coef[t] != 0.0 {
                s += coef[t] * src[t][k];
            }
        }
        *d = s;
    }
}

/// Per-thread buffers.
struct Scratch {
    /// One channel's zero-bordered plane as two column phases `[2, H + 2, W/2 + 1]` (even and
    /// odd padded columns), whose border stays zero.
    phases: Vec<f32>,
    /// Rows of the transforms: 16 arrays of one sample's tiles (or of a padded row).
    rows: Vec<f32>,
}

impl Scratch {
    fn new(g: &Geometry, t: &Tiling) -> Self {
        let wq = t.tw + 1;
        Self { phases: vec![0f32; 2 * (g.h + 2) * wq], rows: vec![0f32; 32 * t.tiles().max(wq)] }
    }
}

/// Writes the transformed input `V` `[16, C, ld]` of the `bs` samples `x` (`[bs, C, H, W]`): for
/// sample `b`, channel `c` and tile `t`, `Bᵀ d B` at column `b·tiles + t`.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
fn input_transform(g: &Geometry, t: &Tiling, x: &[f32], bs: usize, ld: usize, v: &mut [f32], s: &mut Scratch) {
    let (h, w, tw, wq) = (g.h, g.w, t.tw, t.tw + 1);
    let rows_of = |p: usize, r: usize| (p * (h + 2) + r) * wq;
    for b in 0..bs {
        for c in 0..g.c {
            let plane = &x[(b * g.c + c) * h * w..][..h * w];
            // Padded column x + 1: even ones (phase 0) at (x + 1) / 2 hold the odd x.
            for (y, row) in plane.chunks_exact(w).enumerate() {
                let r = y + 1;
                let even = &mut s.phases[rows_of(0, r) + 1..][..tw];
                even.iter_mut().zip(row.iter().skip(1).step_by(2)).for_each(|(d, &v)| *d = v);
                let odd = &mut s.phases[rows_of(1, r)..][..tw];
                odd.iter_mut().zip(row.iter().step_by(2)).for_each(|(d, &v)| *d = v);
            }
            for ty in 0..t.th {
                // Bᵀ over the patch rows 2ty..2ty+4, for both phases: rows [i][p] of wq.
                let (tr, _) = s.rows.split_at_mut(8 * wq);
                for i in 0..4 {
                    for p in 0..2 {
                        let src = [0, 1, 2, 3].map(|a| &s.phases[rows_of(p, 2 * ty + a)..][..wq]);
                        combine(&mut tr[(i * 2 + p) * wq..][..wq], BT[i], src);
                    }
                }
                // · B over the patch columns: 2tx, 2tx + 1, 2tx + 2, 2tx + 3 are phase 0 at tx,
                // phase 1 at tx, phase 0 at tx + 1, phase 1 at tx + 1.
                let col = b * t.tiles() + ty * tw;
                for i in 0..4 {
                    let (e, o) = (&tr[i * 2 * wq..][..wq], &tr[(i * 2 + 1) * wq..][..wq]);
                    for j in 0..4 {
                        let dst = &mut v[((i * 4 + j) * g.c + c) * ld + col..][..tw];
                        combine(dst, BT[j], [e, o, &e[1..], &o[1..]]);
                    }
                }
            }
        }
    }
}

/// Writes sample `b`'s output planes `[O, H, W]` from the transformed products `m` `[16, O, ld]`:
/// `Aᵀ M A` per tile, plus the bias.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
#[allow(clippy::too_many_arguments)]
fn output_transform(
    g: &Geometry,
    t: &Tiling,
    m: &[f32],
    ld: usize,
    b: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    s: &mut Scratch,
) {
    let (n, tw, w) = (t.tiles(), t.tw, g.w);
    for o in 0..g.o {
        let at = |xi: usize| &m[(xi * g.o + o) * ld + b * n..][..n];
        let (sa, ya) = s.rows.split_at_mut(8 * n);
        // Aᵀ over rows: sa[a][j] = Σ_i Aᵀ[a][i] M_ij; then ya[a][c] = Σ_j Aᵀ[c][j] sa[a][j].
        for a in 0..2 {
            for j in 0..4 {
                combine(&mut sa[(a * 4 + j) * n..][..n], AT[a], [0, 1, 2, 3].map(|i| at(i * 4 + j)));
            }
        }
        for a in 0..2 {
            for c in 0..2 {
                let src = [0, 1, 2, 3].map(|j| &sa[(a * 4 + j) * n..][..n]);
                combine(&mut ya[(a * 2 + c) * n..][..n], AT[c], src);
            }
        }
        let add = bias.map_or(0.0, |bias| bias[o]);
        let plane = &mut out[o * g.h * w..][..g.h * w];
        for ty in 0..t.th {
            for a in 0..2 {
                let row = &mut plane[(2 * ty + a) * w..][..w];
                let (y0, y1) = (&ya[(a * 2) * n + ty * tw..][..tw], &ya[(a * 2 + 1) * n + ty * tw..][..tw]);
                for (pair, (&v0, &v1)) in row.chunks_exact_mut(2).zip(y0.iter().zip(y1)) {
                    pair[0] = v0 + add;
                    pair[1] = v1 + add;
                }
            }
        }
    }
}

/// Writes the gradient of the transformed products, `dM = A dY Aᵀ` `[16, O, ld]` at columns
/// `b·tiles..`, from sample `b`'s output gradient `rows`.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
fn output_transform_grad(g: &Geometry, t: &Tiling, rows: Rows, b: usize, ld: usize, dm: &mut [f32], s: &mut Scratch) {
    let (n, tw, w, l) = (t.tiles(), t.tw, g.w, g.l());
    for o in 0..g.o {
        let plane = rows.row(b, o, l);
        let (gab, pa) = s.rows.split_at_mut(4 * n);
        // gab[a][c]: the output gradient at tile position (a, c), over the tiles.
        for ty in 0..t.th {
            for a in 0..2 {
                let row = &plane[(2 * ty + a) * w..][..w];
                let (g0, rest) = gab[(a * 2) * n + ty * tw..].split_at_mut(n);
                let g1 = &mut rest[..tw];
                for ((pair, d0), d1) in row.chunks_exact(2).zip(g0[..tw].iter_mut()).zip(g1.iter_mut()) {
                    *d0 = pair[0];
                    *d1 = pair[1];
                }
            }
        }
        // pa[a][j] = Σ_c Aᵀ[c][j] gab[a][c]; then dM_ij = Σ_a Aᵀ[a][i] pa[a][j].
        for a in 0..2 {
            for j in 0..4 {
                let src = [&gab[(a * 2) * n..][..n], &gab[(a * 2 + 1) * n..][..n]];
                combine(&mut pa[(a * 4 + j) * n..][..n], [AT[0][j], AT[1][j]], src);
            }
        }
        for i in 0..4 {
            for j in 0..4 {
                let src = [&pa[j * n..][..n], &pa[(4 + j) * n..][..n]];
                combine(&mut dm[((i * 4 + j) * g.o + o) * ld + b * n..][..n], [AT[0][i], AT[1][i]], src);
            }
        }
    }
}

/// Adds to sample `b`'s input gradient `gx` `[C, H, W]` the gradient of its patches from that of
/// the transformed input, `dV` `[16, C, ld]`: `B dV Bᵀ` per tile, summed where patches overlap.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
fn input_transform_grad(g: &Geometry, t: &Tiling, dv: &[f32], ld: usize, b: usize, gx: &mut [f32], s: &mut Scratch) {
    let (n, tw, h, w) = (t.tiles(), t.tw, g.h, g.w);
    for c in 0..g.c {
        let at = |xi: usize| &dv[(xi * g.c + c) * ld + b * n..][..n];
        let (q, dd) = s.rows.split_at_mut(16 * n);
        // q[i][bb] = Σ_j Bᵀ[j][bb] dV_ij; then dd[a][bb] = Σ_i Bᵀ[i][a] q[i][bb].
        for i in 0..4 {
            for bb in 0..4 {
                let coef = [BT[0][bb], BT[1][bb], BT[2][bb], BT[3][bb]];
                combine(&mut q[(i * 4 + bb) * n..][..n], coef, [0, 1, 2, 3].map(|j| at(i * 4 + j)));
            }
        }
        for a in 0..4 {
            for bb in 0..4 {
                let coef = [BT[0][a], BT[1][a], BT[2][a], BT[3][a]];
                let src = [0, 1, 2, 3].map(|i| &q[(i * 4 + bb) * n..][..n]);
                combine(&mut dd[(a * 4 + bb) * n..][..n], coef, src);
            }
        }
        // Patch position (a, bb) of tile (ty, tx) is input (2ty + a - 1, 2tx + bb - 1).
        let plane = &mut gx[c * h * w..][..h * w];
        for ty in 0..t.th {
            for a in 0..4 {
                let Some(y) = (2 * ty + a).checked_sub(1).filter(|&y| y < h) else { continue };
                let row = &mut plane[y * w..][..w];
                for bb in 0..4 {
                    let src = &dd[(a * 4 + bb) * n + ty * tw..][..tw];
                    // Column 2tx + bb - 1 for tx in 0..tw, inside 0..w.
                    let tx0 = usize::from(bb == 0);
                    let tx1 = if bb == 3 { tw - 1 } else { tw };
                    for tx in tx0..tx1 {
                        row[2 * tx + bb - 1] += src[tx];
                    }
                }
            }
        }
    }
}

/// The 16 products of one group: `dst_ξ [m, n] (+)= lhs_ξ · rhs_ξ` for ξ in 0..16, each operand
/// `(slice, elements between ξ's, row stride, column stride)`.
fn products(
    (m, n, k): (usize, usize, usize),
    (dst, dst_step, dst_rs): (&mut [f32], usize, usize),
    (lhs, lhs_step, lhs_strides): (&[f32], usize, (usize, usize)),
    (rhs, rhs_step, rhs_strides): (&[f32], usize, (usize, usize)),
    accumulate: bool,
) {
    let st = |(r, c): (usize, usize)| (r as isize, c as isize);
    for xi in 0..16 {
        matmul_uncounted(
            (m, n, k),
            &mut dst[xi * dst_step..],
            (dst_rs as isize, 1),
            &lhs[xi * lhs_step..],
            st(lhs_strides),
            &rhs[xi * rhs_step..],
            st(rhs_strides),
            accumulate,
        );
    }
}

/// The forward pass: the output `[N, O, ·]` and, when pooling, each window's argmax.
pub(super) fn forward(g: &Geometry, ep: Epilogue, x: &[f32], k: &[f32], bias: Option<&[f32]>) -> (Vec<f32>, Vec<u8>) {
    let t = Tiling::new(g);
    let u = kernel_transform(k, g.o, g.c);
    record_gemms(g, Pass::Forward);
    let (l, out_per) = (g.l(), g.o * ep.out_len(g));
    let mut out = crate::ops::buffer::zeroed::<f32>(g.n * out_per);
    let mut argmax = crate::ops::buffer::zeroed::<u8>(if ep.pool { g.n * out_per } else { 0 });
    let mut am_chunks: Vec<Option<&mut [u8]>> = if ep.pool {
        argmax.chunks_mut(t.group * out_per).map(Some).collect()
    } else {
        (0..g.n.div_ceil(t.group)).map(|_| None).collect()
    };
    out.par_chunks_mut(t.group * out_per)
        .zip(am_chunks.par_iter_mut())
        .zip(x.par_chunks(t.group * g.in_len()))
        .for_each_init(
            || {
                let planes = vec![0f32; if ep.pool { g.o * l } else { 0 }];
                (Scratch::new(g, &t), vec![0f32; t.buffer(g.c)], vec![0f32; t.buffer(g.o)], planes)
            },
            |(s, v, m, planes), ((out_g, am_g), x_g)| {
                let bs = x_g.len() / g.in_len();
                let ld = t.ld(bs);
                // SAFETY: `applies` checked AVX2 and FMA (the transforms' target features).
                unsafe { input_transform(g, &t, x_g, bs, ld, v, s) };
                let cols = bs * t.tiles();
                products((g.o, cols, g.c), (m, g.o * ld, ld), (&u, g.o * g.c, (g.c, 1)), (v, g.c * ld, (ld, 1)), false);
                for b in 0..bs {
                    let out_b = &mut out_g[b * out_per..][..out_per];
                    let am_b = am_g.as_deref_mut().map(|am| &mut am[b * out_per..][..out_per]);
                    let dst = if ep.pool { &mut planes[..] } else { &mut *out_b };
                    // SAFETY: as above.
                    unsafe { output_transform(g, &t, m, ld, b, bias, dst, s) };
                    match am_b {
                        Some(am) => pool_planes(g, ep, planes, out_b, am),
                        None if ep.relu => out_b.iter_mut().for_each(|v| *v = relu(*v)),
                        None => {}
                    }
                }
            },
        );
    (out, argmax)
}

/// The backward pass over fixed ranges of samples, one per thread, in groups.
pub(super) fn backward(g: &Geometry, ep: Epilogue, saved: Saved<f32>, needs: Needs) -> Grads<f32> {
    let Saved { x, k, y, dy, argmax } = saved;
    let t = Tiling::new(g);
    let l = g.l();
    let u = if needs.input { kernel_transform(k, g.o, g.c) } else { Vec::new() };
    for (pass, needed) in [(Pass::Kernel, needs.kernel), (Pass::Input, needs.input)] {
        if needed {
            record_gemms(g, pass);
        }
    }
    let mut gx = crate::ops::buffer::zeroed::<f32>(if needs.input { g.n * g.in_len() } else { 0 });
    let gx_parts = input_grad_parts(g, &mut gx, t.per);
    let direct_gz = !ep.pool && !ep.relu;
    let partials: Vec<(Vec<f32>, Vec<f32>)> = gx_parts
        .into_par_iter()
        .enumerate()
        .map(|(part, mut gx_part)| {
            let mut du = vec![0f32; if needs.kernel { 16 * g.o * g.c } else { 0 }];
            let mut gb = vec![0f32; if needs.bias { g.o } else { 0 }];
            let mut gz_buf = vec![0f32; if direct_gz { 0 } else { g.o * (t.group * l + stride_padding::<f32>()) }];
            let mut s = Scratch::new(g, &t);
            let mut dm = vec![0f32; t.buffer(g.o)];
            let mut v = vec![0f32; if needs.kernel || needs.input { t.buffer(g.c) } else { 0 }];
            let (s0, s1) = (part * t.per, ((part + 1) * t.per).min(g.n));
            for b0 in (s0..s1).step_by(t.group) {
                let bs = t.group.min(s1 - b0);
                let (ld, cols) = (t.ld(bs), bs * t.tiles());
                let rows = if direct_gz {
                    Rows { data: &dy[b0 * g.o * l..(b0 + bs) * g.o * l], o_stride: l, b_stride: g.o * l }
                } else {
                    output_grad(g, ep, y, dy, argmax, b0, bs, &mut gz_buf);
                    Rows { data: &gz_buf, o_stride: g.row_stride::<f32>(bs), b_stride: l }
                };
                if needs.bias {
                    for b in 0..bs {
                        for (o, s) in gb.iter_mut().enumerate() {
                            *s += rows.row(b, o, l).iter().sum::<f32>();
                        }
                    }
                }
                if !(needs.kernel || needs.input) {
                    continue;
                }
                for b in 0..bs {
                    // SAFETY: `applies` checked AVX2 and FMA.
                    unsafe { output_transform_grad(g, &t, rows, b, ld, &mut dm, &mut s) };
                }
                if needs.kernel {
                    // SAFETY: as above.
                    unsafe { input_transform(g, &t, &x[b0 * g.in_len()..], bs, ld, &mut v, &mut s) };
                    // dU_ξ [O, C] += dM_ξ [O, T] · V_ξᵀ [T, C]
                    let (dmv, vv) = ((&dm[..], g.o * ld, (ld, 1)), (&v[..], g.c * ld, (1, ld)));
                    products((g.o, g.c, cols), (&mut du, g.o * g.c, g.c), dmv, vv, true);
                }
                if let Some(gx_part) = gx_part.as_deref_mut() {
                    // dV_ξ [C, T] = U_ξᵀ [C, O] · dM_ξ [O, T]
                    let (uv, dmv) = ((&u[..], g.o * g.c, (1, g.c)), (&dm[..], g.o * ld, (ld, 1)));
                    products((g.c, cols, g.o), (&mut v, g.c * ld, ld), uv, dmv, false);
                    for b in 0..bs {
                        let dst = &mut gx_part[(b0 - s0 + b) * g.in_len()..][..g.in_len()];
                        // SAFETY: as above.
                        unsafe { input_transform_grad(g, &t, &v, ld, b, dst, &mut s) };
                    }
                }
            }
            (du, gb)
        })
        .collect();
    let (du, gb) = sum_partials(partials);
    let gk = needs.kernel.then(|| kernel_transform_grad(&du, g.o, g.c));
    (needs.input.then_some(gx), gk, needs.bias.then_some(gb))
}

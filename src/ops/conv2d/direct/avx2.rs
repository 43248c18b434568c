//! The direct convolution's kernels, compiled for AVX2 and FMA and chosen at run time
//! ([`super::applies`]): the forward tile (also the stride-1 input gradient) and the
//! weight-gradient tile, with their dispatch over tile sizes.

// Register tiles are indexed by their (constant) row and column: the loops unroll into named
// registers, which iterator chains over two arrays at once would obscure.
#![allow(clippy::needless_range_loop)]

use super::{Plan, Rows, OB, V, WC, WO};
use std::arch::x86_64::*;

/// The sum of the eight lanes.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
}

/// What every forward tile of one channel tile shares: its kernel panel (`pw` values per kernel
/// row), the kernel rows' input offsets, the padded input, the bias per channel, the ReLU, and
/// where the tile's first channel's output plane (`l` positions) starts.
struct Tile<'a> {
    w: *const f32,
    pw: usize,
    off: &'a [usize],
    x: *const f32,
    init: [f32; OB],
    relu: bool,
    dst: *mut f32,
    l: usize,
}

/// One forward tile: `B` output channels by `NV` vectors of positions, whose padded input starts
/// at `t.x + base[v]`; written to `t.dst + i·l + pos[v]`.
///
/// # Safety
/// AVX2 and FMA; `t.x + base[v] + off[r] + 8` inside the input, `t.w` holding `off.len()` rows
/// of `pw >= B`, the destinations inside the output.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile<const B: usize, const NV: usize>(t: &Tile, base: [usize; NV], pos: [usize; NV]) {
    let mut acc = [[_mm256_setzero_ps(); NV]; B];
    for i in 0..B {
        for a in acc[i].iter_mut() {
            *a = _mm256_set1_ps(t.init[i]);
        }
    }
    let mut xb = [t.x; NV];
    for v in 0..NV {
        xb[v] = t.x.add(base[v]);
    }
    let mut wr = t.w;
    for &d in t.off {
        let mut a = [_mm256_setzero_ps(); NV];
        for v in 0..NV {
            a[v] = _mm256_loadu_ps(xb[v].add(d));
        }
        for i in 0..B {
            let wv = _mm256_broadcast_ss(&*wr.add(i));
            for v in 0..NV {
                acc[i][v] = _mm256_fmadd_ps(wv, a[v], acc[i][v]);
            }
        }
        wr = wr.add(t.pw);
    }
    let zero = _mm256_setzero_ps();
    for i in 0..B {
        for v in 0..NV {
            let r = if t.relu { _mm256_max_ps(acc[i][v], zero) } else { acc[i][v] };
            _mm256_storeu_ps(t.dst.add(i * t.l + pos[v]), r);
        }
    }
}

/// [`tile`] for the tile's `pw` (1 to [`OB`]) output channels.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn tile_of<const NV: usize>(t: &Tile, base: [usize; NV], pos: [usize; NV]) {
    match t.pw {
        6 => tile::<6, NV>(t, base, pos),
        5 => tile::<5, NV>(t, base, pos),
        4 => tile::<4, NV>(t, base, pos),
        3 => tile::<3, NV>(t, base, pos),
        2 => tile::<2, NV>(t, base, pos),
        _ => tile::<1, NV>(t, base, pos),
    }
}

/// [`Plan::run`] (its checks done).
///
/// # Safety
/// AVX2 and FMA; `xp` as large as [`Plan::run`] checks, `out` valid for writes of
/// `plan.out_ch · plan.l` values.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn conv(plan: &Plan, xp: &[f32], bias: Option<&[f32]>, relu: bool, out: *mut f32) {
    let (ckk, nv, l) = (plan.off.len(), plan.bases.len(), plan.l);
    let x = xp.as_ptr();
    for &(o0, b) in &plan.tiles {
        let mut init = [0f32; OB];
        if let Some(bias) = bias {
            init[..b].copy_from_slice(&bias[o0..o0 + b]);
        }
        let w = plan.panels.as_ptr().add(o0 * ckk);
        let t = Tile { w, pw: b, off: &plan.off, x, init, relu, dst: out.add(o0 * l), l };
        let mut v = 0;
        while v + 2 <= nv {
            tile_of::<2>(&t, [plan.bases[v], plan.bases[v + 1]], [v * V, (v + 1) * V]);
            v += 2;
        }
        if v < nv {
            tile_of::<1>(&t, [plan.bases[v]], [v * V]);
        }
    }
}

/// One weight-gradient tile: output channels `o0..o0 + B` by kernel rows `r0..r0 + R`,
/// summed over the positions of `bs` samples.
///
/// # Safety
/// AVX2 and FMA; the bounds [`super::weight_grad`] checks.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn wtile<const B: usize, const R: usize>(
    plan: &Plan,
    rows: Rows,
    xps: &[f32],
    bs: usize,
    (o0, r0): (usize, usize),
    gk: &mut [f32],
) {
    let ckk = plan.off.len();
    let mut acc = [[_mm256_setzero_ps(); R]; B];
    let mut off = [0usize; R];
    off.copy_from_slice(&plan.off[r0..r0 + R]);
    for s in 0..bs {
        let xb = xps.as_ptr().add(s * plan.in_len);
        let mut g = [rows.data.as_ptr(); B];
        for i in 0..B {
            g[i] = rows.data.as_ptr().add(s * rows.b_stride + (o0 + i) * rows.o_stride);
        }
        for (v, &base) in plan.bases.iter().enumerate() {
            let mut xv = [_mm256_setzero_ps(); R];
            for j in 0..R {
                xv[j] = _mm256_loadu_ps(xb.add(base + off[j]));
            }
            for i in 0..B {
                let gv = _mm256_loadu_ps(g[i].add(v * V));
                for j in 0..R {
                    acc[i][j] = _mm256_fmadd_ps(gv, xv[j], acc[i][j]);
                }
            }
        }
    }
    for i in 0..B {
        for j in 0..R {
            gk[(o0 + i) * ckk + r0 + j] += hsum(acc[i][j]);
        }
    }
}

/// [`super::weight_grad`] (its checks done).
///
/// # Safety
/// AVX2 and FMA; the bounds [`super::weight_grad`] checks.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn weight_grad(plan: &Plan, rows: Rows, xps: &[f32], bs: usize, o: usize, gk: &mut [f32]) {
    let ckk = plan.off.len();
    for o0 in (0..o).step_by(WO) {
        for r0 in (0..ckk).step_by(WC) {
            let at = (o0, r0);
            match ((o - o0).min(WO), (ckk - r0).min(WC)) {
                (4, 3) => wtile::<4, 3>(plan, rows, xps, bs, at, gk),
                (4, 2) => wtile::<4, 2>(plan, rows, xps, bs, at, gk),
                (4, _) => wtile::<4, 1>(plan, rows, xps, bs, at, gk),
                (3, 3) => wtile::<3, 3>(plan, rows, xps, bs, at, gk),
                (3, 2) => wtile::<3, 2>(plan, rows, xps, bs, at, gk),
                (3, _) => wtile::<3, 1>(plan, rows, xps, bs, at, gk),
                (2, 3) => wtile::<2, 3>(plan, rows, xps, bs, at, gk),
                (2, 2) => wtile::<2, 2>(plan, rows, xps, bs, at, gk),
                (2, _) => wtile::<2, 1>(plan, rows, xps, bs, at, gk),
                (_, 3) => wtile::<1, 3>(plan, rows, xps, bs, at, gk),
                (_, 2) => wtile::<1, 2>(plan, rows, xps, bs, at, gk),
                _ => wtile::<1, 1>(plan, rows, xps, bs, at, gk),
            }
        }
    }
}

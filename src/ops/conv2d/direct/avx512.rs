//! The direct convolution's tiles for AVX-512 (the forward pass, the stride-1 input gradient and
//! the weight gradient; chosen at run time, [`super::has_avx512`]): the AVX2 tiles with 16-lane
//! registers.
//! Two 8-position vectors of a plan that are neighbours in the padded input (the same row) form
//! one 16-lane vector; a vector without one (a row's odd last vector) is loaded into the lower
//! half with the upper lanes masked to zero and stored under the same mask. Plans whose vectors
//! do not all pair (8-wide rows) stay on AVX2: there the half-empty registers ran 1.5 times
//! slower (ResNet's 64-channel 8x8 convolution, forward 9.7 ms against 6.5 at batch 128). The
//! weight-gradient tile is 6 output channels by 4 kernel rows (AVX2's 4 by 3 gained nothing at 16
//! lanes: its 7 loads per 12 FMAs, most straddling two cache lines, bound it); it made WRN-16-8's
//! backward pass about 5 % faster.

// Register tiles are indexed by their (constant) row and column, as in the AVX2 kernels.
#![allow(clippy::needless_range_loop)]

use super::{Plan, Rows, OB, V};
use std::arch::x86_64::*;

/// One 16-lane vector of output positions: where its inputs start in the padded input, where
/// its outputs start in the plane, and its lanes (all 16, or the lower 8).
#[derive(Clone, Copy)]
pub(super) struct Lanes {
    base: usize,
    pos: usize,
    mask: __mmask16,
}

impl Lanes {
    /// Whether all 16 lanes are in use.
    pub(super) fn full(&self) -> bool {
        self.mask == 0xFFFF
    }
}

/// The plan's vectors, neighbours paired into 16 lanes.
pub(super) fn lanes(plan: &Plan) -> Vec<Lanes> {
    let b = &plan.bases;
    let mut out = Vec::with_capacity(b.len().div_ceil(2));
    let mut v = 0;
    while v < b.len() {
        let paired = v + 1 < b.len() && b[v + 1] == b[v] + V;
        out.push(Lanes { base: b[v], pos: v * V, mask: if paired { 0xFFFF } else { 0x00FF } });
        v += if paired { 2 } else { 1 };
    }
    out
}

/// What every forward tile of one channel tile shares (as the AVX2 kernel's).
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

/// One forward tile: `B` output channels by `NV` 16-lane vectors of positions.
///
/// # Safety
/// AVX-512F; every unmasked lane of `t.x + lanes[v].base + off[r]` inside the input (the plan's
/// check: its vectors' 8 positions, and a paired vector's neighbour's), `t.w` holding
/// `off.len()` rows of `pw >= B`, the unmasked destinations inside the output.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile<const B: usize, const NV: usize>(t: &Tile, lanes: [Lanes; NV]) {
    let mut acc = [[_mm512_setzero_ps(); NV]; B];
    for i in 0..B {
        for a in acc[i].iter_mut() {
            *a = _mm512_set1_ps(t.init[i]);
        }
    }
    let mut xb = [t.x; NV];
    for v in 0..NV {
        xb[v] = t.x.add(lanes[v].base);
    }
    let mut wr = t.w;
    for &d in t.off {
        let mut a = [_mm512_setzero_ps(); NV];
        for v in 0..NV {
            a[v] = _mm512_maskz_loadu_ps(lanes[v].mask, xb[v].add(d));
        }
        for i in 0..B {
            let wv = _mm512_set1_ps(*wr.add(i));
            for v in 0..NV {
                acc[i][v] = _mm512_fmadd_ps(wv, a[v], acc[i][v]);
            }
        }
        wr = wr.add(t.pw);
    }
    let zero = _mm512_setzero_ps();
    for i in 0..B {
        for v in 0..NV {
            let r = if t.relu { _mm512_max_ps(acc[i][v], zero) } else { acc[i][v] };
            _mm512_mask_storeu_ps(t.dst.add(i * t.l + lanes[v].pos), lanes[v].mask, r);
        }
    }
}

/// [`tile`] for the tile's `pw` (1 to [`OB`]) output channels.
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn tile_of<const NV: usize>(t: &Tile, lanes: [Lanes; NV]) {
    match t.pw {
        6 => tile::<6, NV>(t, lanes),
        5 => tile::<5, NV>(t, lanes),
        4 => tile::<4, NV>(t, lanes),
        3 => tile::<3, NV>(t, lanes),
        2 => tile::<2, NV>(t, lanes),
        _ => tile::<1, NV>(t, lanes),
    }
}

/// [`Plan::run`] (its checks done).
///
/// # Safety
/// AVX-512F; `xp` as large as [`Plan::run`] checks, `out` valid for writes of
/// `plan.out_ch · plan.l` values.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn conv(plan: &Plan, xp: &[f32], bias: Option<&[f32]>, relu: bool, out: *mut f32) {
    let (ckk, l) = (plan.off.len(), plan.l);
    let vectors = lanes(plan);
    let x = xp.as_ptr();
    for &(o0, b) in &plan.tiles {
        let mut init = [0f32; OB];
        if let Some(bias) = bias {
            init[..b].copy_from_slice(&bias[o0..o0 + b]);
        }
        let w = plan.panels.as_ptr().add(o0 * ckk);
        let t = Tile { w, pw: b, off: &plan.off, x, init, relu, dst: out.add(o0 * l), l };
        let mut pairs = vectors.chunks_exact(2);
        for p in &mut pairs {
            tile_of::<2>(&t, [p[0], p[1]]);
        }
        if let [last] = pairs.remainder() {
            tile_of::<1>(&t, [*last]);
        }
    }
}

/// Output channels by kernel rows of one weight-gradient tile at most: 24 accumulators, so that
/// the 10 vector loads per step (the kernel rows' inputs mostly straddle two cache lines) do not
/// outnumber the 24 FMAs' cycles.
const WB: usize = 6;
const WR: usize = 4;

/// One weight-gradient tile: output channels `o0..o0 + B` by kernel rows `r0..r0 + R`, summed
/// over the positions of `bs` samples.
///
/// # Safety
/// AVX-512F; the bounds [`super::weight_grad`] checks, and every vector paired
/// ([`Lanes::full`]: a paired vector reads its neighbour's 8 positions).
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn wtile<const B: usize, const R: usize>(
    plan: &Plan,
    vectors: &[Lanes],
    rows: Rows,
    xps: &[f32],
    bs: usize,
    (o0, r0): (usize, usize),
    gk: &mut [f32],
) {
    let ckk = plan.off.len();
    let mut acc = [[_mm512_setzero_ps(); R]; B];
    let mut off = [0usize; R];
    off.copy_from_slice(&plan.off[r0..r0 + R]);
    for s in 0..bs {
        let xb = xps.as_ptr().add(s * plan.in_len);
        let mut g = [rows.data.as_ptr(); B];
        for i in 0..B {
            g[i] = rows.data.as_ptr().add(s * rows.b_stride + (o0 + i) * rows.o_stride);
        }
        for lane in vectors {
            let mut xv = [_mm512_setzero_ps(); R];
            for j in 0..R {
                xv[j] = _mm512_loadu_ps(xb.add(lane.base + off[j]));
            }
            for i in 0..B {
                let gv = _mm512_loadu_ps(g[i].add(lane.pos));
                for j in 0..R {
                    acc[i][j] = _mm512_fmadd_ps(gv, xv[j], acc[i][j]);
                }
            }
        }
    }
    for i in 0..B {
        for j in 0..R {
            gk[(o0 + i) * ckk + r0 + j] += _mm512_reduce_add_ps(acc[i][j]);
        }
    }
}

/// [`wtile`] for `b` (1 to [`WB`]) output channels by `R` kernel rows.
#[target_feature(enable = "avx512f")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn wtile_of<const R: usize>(
    plan: &Plan,
    v: &[Lanes],
    rows: Rows,
    xps: &[f32],
    bs: usize,
    b: usize,
    at: (usize, usize),
    gk: &mut [f32],
) {
    match b {
        6 => wtile::<6, R>(plan, v, rows, xps, bs, at, gk),
        5 => wtile::<5, R>(plan, v, rows, xps, bs, at, gk),
        4 => wtile::<4, R>(plan, v, rows, xps, bs, at, gk),
        3 => wtile::<3, R>(plan, v, rows, xps, bs, at, gk),
        2 => wtile::<2, R>(plan, v, rows, xps, bs, at, gk),
        _ => wtile::<1, R>(plan, v, rows, xps, bs, at, gk),
    }
}

/// [`super::weight_grad`] (its checks done) for a plan whose vectors all pair ([`Plan::wide`]).
///
/// # Safety
/// AVX-512F; the bounds [`super::weight_grad`] checks; `plan.wide`.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn weight_grad(plan: &Plan, rows: Rows, xps: &[f32], bs: usize, o: usize, gk: &mut [f32]) {
    let ckk = plan.off.len();
    let v = lanes(plan);
    for o0 in (0..o).step_by(WB) {
        let b = (o - o0).min(WB);
        for r0 in (0..ckk).step_by(WR) {
            let at = (o0, r0);
            match (ckk - r0).min(WR) {
                4 => wtile_of::<4>(plan, &v, rows, xps, bs, b, at, gk),
                3 => wtile_of::<3>(plan, &v, rows, xps, bs, b, at, gk),
                2 => wtile_of::<2>(plan, &v, rows, xps, bs, b, at, gk),
                _ => wtile_of::<1>(plan, &v, rows, xps, bs, b, at, gk),
            }
        }
    }
}

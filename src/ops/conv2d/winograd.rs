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
//! passes run at the gemm's rate on well-shaped products (`O` and `C` of 128 and more), where the
//! direct kernels reach 65-75 % of it.
//!
//! The transforms only add and halve (entries 0, ±1, ±½), so the results differ from the direct
//! sum by rounding alone (checked against candle's convolution in `tests/it/ops.rs`). The speed
//! benchmark's census records the products im2col would make for the same convolution (as the
//! direct kernels do), so the floor stays the step's arithmetic at the gemm's rate and "x floor"
//! can fall below 1 here. `SAMHOST_WINOGRAD=0` turns this path off (for comparisons).

use super::direct::{record_gemms, Pass, Rows};
use super::geometry::Geometry;
use super::passes::{pool_planes, relu, Epilogue, Grads, Needs, Saved};
use crate::ops::gemm::{matmul_uncounted, padded_stride, stride_padding};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::OnceLock;

/// Input and output channels from which this path runs: below, the 16 products are too narrow
/// for the gemm's rate to make up for the transforms (ResNet-20 at batch 128 with its 64-channel
/// 8x8 layers on this path ran no faster in paired runs, December 2026). `SAMHOST_WINOGRAD_MIN`
/// sets another threshold for comparisons.
const MIN_CHANNELS: usize = 128;

/// Tiles one group's products span at least (fewer samples per group where one sample has
/// that many tiles).
const MIN_TILES: usize = 256;

/// Tiles times channels of one `[16, channels, tiles]` buffer at most (4 MiB), unless one
/// sample has more: the group then has fewer samples than [`MIN_TILES`] asks for.
const MAX_BUFFER: usize = 1 << 16;

// The transforms of F(2x2, 3x3): `Bᵀ` = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
// and `Aᵀ` = [[1, 1, 1, 0], [0, 1, -1, -1]], written out in the functions below (`bt`, the sums
// in `output_transform`), and `G`:
/// The kernel transform `G`.
const G: [[f32; 3]; 4] = [[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]];

/// Whether this path runs for the convolution: 3x3, stride 1, padding 1, an even height and
/// width, at least [`min_channels`] input and output channels, a CPU with AVX2 and FMA, and
/// unless `SAMHOST_WINOGRAD=0`.
pub(super) fn applies(g: &Geometry) -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    let enabled =
        *ENABLED.get_or_init(|| crate::ops::cpu::env_switch("SAMHOST_WINOGRAD") && crate::ops::cpu::has_avx2());
    enabled
        && (g.kh, g.kw, g.stride, g.padding) == (3, 3, 1, 1)
        && g.h.is_multiple_of(2)
        && g.w.is_multiple_of(2)
        && g.c.min(g.o) >= min_channels()
}

/// [`MIN_CHANNELS`], or `SAMHOST_WINOGRAD_MIN` where set (for comparisons; read once).
fn min_channels() -> usize {
    static MIN: OnceLock<usize> = OnceLock::new();
    *MIN.get_or_init(|| std::env::var("SAMHOST_WINOGRAD_MIN").ok().and_then(|v| v.parse().ok()).unwrap_or(MIN_CHANNELS))
}

/// How the tiles of one convolution are laid out.
#[derive(Clone, Copy)]
struct Tiling {
    /// Tile rows and columns per sample.
    th: usize,
    tw: usize,
    /// Samples per group (one set of 16 products).
    group: usize,
}

impl Tiling {
    fn new(g: &Geometry) -> Self {
        let (th, tw) = (g.h / 2, g.w / 2);
        let tiles = th * tw;
        let fits = MAX_BUFFER / (tiles * g.c.max(g.o));
        let group = MIN_TILES.div_ceil(tiles).min(fits).clamp(1, g.n);
        Self { th, tw, group }
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

/// `dst[k] = sa·a[k] + sb·b[k]`; with literal coefficients ±1 the products fold away.
#[inline(always)]
fn lin2(dst: &mut [f32], (sa, a): (f32, &[f32]), (sb, b): (f32, &[f32])) {
    let n = dst.len();
    for ((d, &a), &b) in dst.iter_mut().zip(&a[..n]).zip(&b[..n]) {
        *d = sa * a + sb * b;
    }
}

/// `dst[k] = sa·a[k] + sb·b[k] + sc·c[k]`, or `+=` that when `ADD`.
#[inline(always)]
fn lin3<const ADD: bool>(dst: &mut [f32], (sa, a): (f32, &[f32]), (sb, b): (f32, &[f32]), (sc, c): (f32, &[f32])) {
    let n = dst.len();
    for (((d, &a), &b), &c) in dst.iter_mut().zip(&a[..n]).zip(&b[..n]).zip(&c[..n]) {
        let v = sa * a + sb * b + sc * c;
        *d = if ADD { *d + v } else { v };
    }
}

/// `dst[k] = s·a[k]`, or `+=` that when `ADD`.
#[inline(always)]
fn lin1<const ADD: bool>(dst: &mut [f32], (s, a): (f32, &[f32])) {
    let n = dst.len();
    for (d, &a) in dst.iter_mut().zip(&a[..n]) {
        *d = if ADD { *d + s * a } else { s * a };
    }
}

/// `Bᵀ` applied along one axis: `out[i] = Σ_a Bᵀ[i][a] d[a]` for the four slices `d` (written
/// out: `d0 - d2`, `d1 + d2`, `d2 - d1`, `d1 - d3`).
#[inline(always)]
fn bt(out: [&mut [f32]; 4], d: [&[f32]; 4]) {
    let [o0, o1, o2, o3] = out;
    lin2(o0, (1.0, d[0]), (-1.0, d[2]));
    lin2(o1, (1.0, d[1]), (1.0, d[2]));
    lin2(o2, (1.0, d[2]), (-1.0, d[1]));
    lin2(o3, (1.0, d[1]), (-1.0, d[3]));
}

/// One channel's padded plane `(H + 2)×(W + 2)` as four parity planes `[row parity, column
/// parity, H/2 + 1, W/2 + 1]`: padded `(R, X)` at `[R % 2][X % 2][R / 2][X / 2]`. Row `2ty + a` of
/// tile row `ty`'s patches is then row `ty + a / 2` of parity `a % 2`, so each patch row over all
/// tiles is one contiguous run.
struct Parity {
    /// Rows and columns of each parity plane.
    rows: usize,
    cols: usize,
}

impl Parity {
    fn new(t: &Tiling) -> Self {
        Self { rows: t.th + 1, cols: t.tw + 1 }
    }

    fn len(&self) -> usize {
        4 * self.rows * self.cols
    }

    /// Where parity plane `(rp, cp)` starts.
    fn plane(&self, rp: usize, cp: usize) -> usize {
        (rp * 2 + cp) * self.rows * self.cols
    }

    /// Patch row `a` of every tile row, for column parity `cp`: `th` rows of `cols`.
    fn patch_rows(&self, a: usize, cp: usize) -> std::ops::Range<usize> {
        let at = self.plane(a % 2, cp) + (a / 2) * self.cols;
        at..at + (self.rows - 1) * self.cols
    }

    /// Input row `y`'s runs of `W/2` in `planes`: the one holding its even columns (padded
    /// column `x + 1` odd, at `x / 2`) and the one holding its odd ones (at `(x + 1) / 2`, from 1).
    fn input_row<'a>(&self, planes: &'a mut [f32], y: usize) -> (&'a mut [f32], &'a mut [f32]) {
        let (rp, r, n) = ((y + 1) % 2, y.div_ceil(2), self.cols - 1);
        let (odd_part, even_part) = planes.split_at_mut(self.plane(rp, 1));
        (&mut even_part[r * self.cols..][..n], &mut odd_part[self.plane(rp, 0) + r * self.cols + 1..][..n])
    }

    /// The four patch rows ([`Self::patch_rows`]) of column parity `cp`.
    fn patch_rows_of<'a>(&self, planes: &'a [f32], cp: usize) -> [&'a [f32]; 4] {
        let at = |a: usize| &planes[self.patch_rows(a, cp)];
        [at(0), at(1), at(2), at(3)]
    }
}

/// Per-thread buffers.
struct Scratch {
    /// One channel's parity planes ([`Parity`]) for the input transform; their zero border stays
    /// zero.
    planes: Vec<f32>,
    /// The same for the input gradient (border included).
    grad_planes: Vec<f32>,
    /// The transforms' intermediate rows.
    rows: Vec<f32>,
}

impl Scratch {
    fn new(t: &Tiling) -> Self {
        let p = Parity::new(t);
        Self {
            planes: vec![0f32; p.len()],
            grad_planes: vec![0f32; p.len()],
            rows: vec![0f32; 16 * t.tiles().max(p.rows * p.cols)],
        }
    }
}

/// Writes the transformed input `V` of channels `cs` of the `bs` samples `x` (`[bs, C, H, W]`)
/// into `v`, the rows `cs` of each of the 16 blocks `[C, ld]`: for sample `b`, channel `c` and
/// tile `t`, `Bᵀ d B` at row `c - cs.start`, column `b·tiles + t`.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
#[allow(clippy::too_many_arguments)]
fn input_transform(
    g: &Geometry,
    t: &Tiling,
    x: &[f32],
    bs: usize,
    cs: Range<usize>,
    ld: usize,
    v: &mut [&mut [f32]],
    s: &mut Scratch,
) {
    let (w, tw, p) = (g.w, t.tw, Parity::new(t));
    let span = t.th * p.cols;
    for b in 0..bs {
        for c in cs.clone() {
            let plane = &x[(b * g.c + c) * g.h * w..][..g.h * w];
            for (y, row) in plane.chunks_exact(w).enumerate() {
                let (even, odd) = p.input_row(&mut s.planes, y);
                for ((pair, e), o) in row.chunks_exact(2).zip(even.iter_mut()).zip(odd.iter_mut()) {
                    *e = pair[0];
                    *o = pair[1];
                }
            }
            // Bᵀ down the patch rows, for both column parities: tr[i·2 + cp], `th` rows of `cols`.
            let tr = &mut s.rows[..8 * span];
            for cp in 0..2 {
                let (t0, rest) = tr.split_at_mut(2 * span);
                let (t1, rest) = rest.split_at_mut(2 * span);
                let (t2, t3) = rest.split_at_mut(2 * span);
                let at = cp * span..(cp + 1) * span;
                let out = [&mut t0[at.clone()], &mut t1[at.clone()], &mut t2[at.clone()], &mut t3[at]];
                bt(out, p.patch_rows_of(&s.planes, cp));
            }
            // · B along the patch columns 2tx..2tx + 4: parity 0 at tx, parity 1 at tx, parity
            // 0 at tx + 1, parity 1 at tx + 1.
            for ty in 0..t.th {
                let col = b * t.tiles() + ty * tw;
                for i in 0..4 {
                    let e = &tr[(i * 2) * span + ty * p.cols..][..p.cols];
                    let o = &tr[(i * 2 + 1) * span + ty * p.cols..][..p.cols];
                    let at = (c - cs.start) * ld + col;
                    if let [d0, d1, d2, d3] = &mut v[i * 4..i * 4 + 4] {
                        let r = at..at + tw;
                        let out = [&mut d0[r.clone()], &mut d1[r.clone()], &mut d2[r.clone()], &mut d3[r]];
                        bt(out, [&e[..tw], &o[..tw], &e[1..], &o[1..]]);
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
        let mm: [&[f32]; 16] = std::array::from_fn(|xi| &m[(xi * g.o + o) * ld + b * n..][..n]);
        let (sa, ya) = s.rows.split_at_mut(8 * n);
        // Aᵀ down: sa[a·4 + j] = Σ_i Aᵀ[a][i] M_ij; then across: ya[a·2 + c] = Σ_j Aᵀ[c][j] sa[a·4 + j].
        for j in 0..4 {
            let (s0, s1) = sa.split_at_mut(4 * n);
            lin3::<false>(&mut s0[j * n..][..n], (1.0, mm[j]), (1.0, mm[4 + j]), (1.0, mm[8 + j]));
            lin3::<false>(&mut s1[j * n..][..n], (1.0, mm[4 + j]), (-1.0, mm[8 + j]), (-1.0, mm[12 + j]));
        }
        for a in 0..2 {
            let r = |j: usize| &sa[(a * 4 + j) * n..][..n];
            let (y0, y1) = ya[a * 2 * n..].split_at_mut(n);
            lin3::<false>(y0, (1.0, r(0)), (1.0, r(1)), (1.0, r(2)));
            lin3::<false>(&mut y1[..n], (1.0, r(1)), (-1.0, r(2)), (-1.0, r(3)));
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

/// Writes the gradient of the transformed products, `dM = A dY Aᵀ`, of channels `os` of the
/// `bs` samples' output gradient `rows` into `dm`, the rows `os` of each of the 16 blocks
/// `[O, ld]` (sample `b` at columns `b·tiles..`).
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
#[allow(clippy::too_many_arguments)]
fn output_transform_grad(
    g: &Geometry,
    t: &Tiling,
    rows: Rows,
    bs: usize,
    os: Range<usize>,
    ld: usize,
    dm: &mut [&mut [f32]],
    s: &mut Scratch,
) {
    let (n, tw, w, l) = (t.tiles(), t.tw, g.w, g.l());
    for (b, o) in (0..bs).flat_map(|b| os.clone().map(move |o| (b, o))) {
        let plane = rows.row(b, o, l);
        let (gab, pa) = s.rows.split_at_mut(4 * n);
        // gab[a·2 + c]: the output gradient at tile position (a, c), over the tiles.
        for ty in 0..t.th {
            for a in 0..2 {
                let row = &plane[(2 * ty + a) * w..][..w];
                let (g0, g1) = gab[(a * 2) * n..].split_at_mut(n);
                let (g0, g1) = (&mut g0[ty * tw..][..tw], &mut g1[ty * tw..][..tw]);
                for ((pair, d0), d1) in row.chunks_exact(2).zip(g0.iter_mut()).zip(g1.iter_mut()) {
                    *d0 = pair[0];
                    *d1 = pair[1];
                }
            }
        }
        // Across: pa[a·4 + j] = Σ_c Aᵀ[c][j] gab[a·2 + c] = (g0, g0 + g1, g0 - g1, -g1).
        for a in 0..2 {
            let (g0, g1) = (&gab[(a * 2) * n..][..n], &gab[(a * 2 + 1) * n..][..n]);
            let (p0, rest) = pa[a * 4 * n..].split_at_mut(n);
            let (p1, rest) = rest.split_at_mut(n);
            let (p2, p3) = rest[..2 * n].split_at_mut(n);
            lin1::<false>(p0, (1.0, g0));
            lin2(p1, (1.0, g0), (1.0, g1));
            lin2(p2, (1.0, g0), (-1.0, g1));
            lin1::<false>(p3, (-1.0, g1));
        }
        // Down: dM_ij = Σ_a Aᵀ[a][i] pa[a·4 + j] = (p0, p0 + p1, p0 - p1, -p1).
        for j in 0..4 {
            let (p0, p1) = (&pa[j * n..][..n], &pa[(4 + j) * n..][..n]);
            let at = (o - os.start) * ld + b * n;
            for i in 0..4 {
                let d = &mut dm[i * 4 + j][at..at + n];
                match i {
                    0 => lin1::<false>(d, (1.0, p0)),
                    1 => lin2(d, (1.0, p0), (1.0, p1)),
                    2 => lin2(d, (1.0, p0), (-1.0, p1)),
                    _ => lin1::<false>(d, (-1.0, p1)),
                }
            }
        }
    }
}

/// Writes sample `b`'s input gradient `gx` `[C, H, W]` from that of the transformed input,
/// `dV` `[16, C, ld]`: the adjoint of [`input_transform`], `B dV Bᵀ` per tile, summed where
/// patches overlap.
#[cfg_attr(target_arch = "x86_64", target_feature(enable = "avx2,fma"))]
fn input_transform_grad(g: &Geometry, t: &Tiling, dv: &[f32], ld: usize, b: usize, gx: &mut [f32], s: &mut Scratch) {
    let (n, tw, w, p) = (t.tiles(), t.tw, g.w, Parity::new(t));
    let span = t.th * p.cols;
    for c in 0..g.c {
        let dvc: [&[f32]; 16] = std::array::from_fn(|xi| &dv[(xi * g.c + c) * ld + b * n..][..n]);
        // Across, adjoint: the gradient of tr[i·2 + cp] (see `input_transform`), per tile row.
        let tr = &mut s.rows[..8 * span];
        for ty in 0..t.th {
            for i in 0..4 {
                let r = ty * tw..(ty + 1) * tw;
                let d = [
                    &dvc[i * 4][r.clone()],
                    &dvc[i * 4 + 1][r.clone()],
                    &dvc[i * 4 + 2][r.clone()],
                    &dvc[i * 4 + 3][r],
                ];
                let (e, o) = tr[(i * 2) * span + ty * p.cols..].split_at_mut(span);
                let (e, o) = (&mut e[..p.cols], &mut o[..p.cols]);
                // e[tx] from V_i0; e[tx + 1] from -V_i0 + V_i1 + V_i2; o[tx] from V_i1 - V_i2 +
                // V_i3; o[tx + 1] from -V_i3.
                e[..tw].copy_from_slice(d[0]);
                e[tw] = 0.0;
                lin3::<true>(&mut e[1..], (-1.0, d[0]), (1.0, d[1]), (1.0, d[2]));
                lin3::<false>(&mut o[..tw], (1.0, d[1]), (-1.0, d[2]), (1.0, d[3]));
                o[tw] = 0.0;
                lin1::<true>(&mut o[1..], (-1.0, d[3]));
            }
        }
        // Down, adjoint: patch row a of every tile row gets Σ_i Bᵀ[i][a] tr[i·2 + cp].
        s.grad_planes.fill(0.0);
        for cp in 0..2 {
            let row = |i: usize| &tr[(i * 2 + cp) * span..][..span];
            let d = [row(0), row(1), row(2), row(3)];
            lin1::<true>(&mut s.grad_planes[p.patch_rows(0, cp)], (1.0, d[0]));
            lin3::<true>(&mut s.grad_planes[p.patch_rows(1, cp)], (1.0, d[1]), (-1.0, d[2]), (1.0, d[3]));
            lin3::<true>(&mut s.grad_planes[p.patch_rows(2, cp)], (-1.0, d[0]), (1.0, d[1]), (1.0, d[2]));
            lin1::<true>(&mut s.grad_planes[p.patch_rows(3, cp)], (-1.0, d[3]));
        }
        let plane = &mut gx[c * g.h * w..][..g.h * w];
        for (y, row) in plane.chunks_exact_mut(w).enumerate() {
            let (even, odd) = p.input_row(&mut s.grad_planes, y);
            for ((pair, e), o) in row.chunks_exact_mut(2).zip(even.iter()).zip(odd.iter()) {
                pair[0] = *e;
                pair[1] = *o;
            }
        }
    }
}

/// Cuts the 16 blocks `[rows, ld]` of a `[16, rows, ld]` buffer into ranges of rows, for the
/// threads of a transform: per range, its rows and the 16 blocks' parts.
fn row_parts(buf: &mut [f32], rows: usize, ld: usize) -> Vec<(Range<usize>, Vec<&mut [f32]>)> {
    let per = rows.div_ceil(4 * rayon::current_num_threads()).max(8);
    let mut parts: Vec<(Range<usize>, Vec<&mut [f32]>)> =
        (0..rows.div_ceil(per)).map(|p| (p * per..((p + 1) * per).min(rows), Vec::with_capacity(16))).collect();
    for block in buf.chunks_mut(rows * ld).take(16) {
        for ((_, blocks), chunk) in parts.iter_mut().zip(block.chunks_mut(per * ld)) {
            blocks.push(chunk);
        }
    }
    parts
}

/// For each ξ in 0..16, on the pool: `dst_ξ [m, n] (+)= lhs_ξ · rhs_ξ`, each operand `(slice,
/// elements between ξ's, row and column strides)`.
fn products(
    (m, n, k): (usize, usize, usize),
    (dst, dst_step, dst_rs): (&mut [f32], usize, usize),
    (lhs, lhs_step, (lr, lc)): (&[f32], usize, (usize, usize)),
    (rhs, rhs_step, (rr, rc)): (&[f32], usize, (usize, usize)),
    accumulate: bool,
) {
    dst[..16 * dst_step].par_chunks_mut(dst_step).enumerate().for_each(|(xi, d)| {
        let (l, r) = (&lhs[xi * lhs_step..], &rhs[xi * rhs_step..]);
        let (ls, rs) = ((lr as isize, lc as isize), (rr as isize, rc as isize));
        matmul_uncounted((m, n, k), (d, (dst_rs as isize, 1)), (l, ls), (r, rs), accumulate, false);
    });
}

/// Writes the transformed input of samples `x` (`bs` of them) into `v` `[16, C, ld]`, channels
/// shared over the pool.
fn transform_inputs(g: &Geometry, t: &Tiling, x: &[f32], bs: usize, ld: usize, v: &mut [f32]) {
    row_parts(v, g.c, ld).into_par_iter().for_each_init(
        || Scratch::new(t),
        // SAFETY: `applies` checked AVX2 and FMA (the transforms' target features).
        |s, (cs, mut blocks)| unsafe { input_transform(g, t, x, bs, cs, ld, &mut blocks, s) },
    );
}

/// The forward pass: the output `[N, O, ·]` and, when pooling, each window's argmax. Groups of
/// samples in turn; in each, the input transform over channels, the 16 products and the output
/// transform over samples each share the pool.
pub(super) fn forward(g: &Geometry, ep: Epilogue, x: &[f32], k: &[f32], bias: Option<&[f32]>) -> (Vec<f32>, Vec<u8>) {
    let t = Tiling::new(g);
    let u = kernel_transform(k, g.o, g.c);
    record_gemms(g, Pass::Forward);
    let (l, out_per) = (g.l(), g.o * ep.out_len(g));
    let mut out = crate::ops::buffer::zeroed::<f32>(g.n * out_per);
    let mut argmax = crate::ops::buffer::zeroed::<u8>(if ep.pool { g.n * out_per } else { 0 });
    let (mut v, mut m) = (vec![0f32; t.buffer(g.c)], vec![0f32; t.buffer(g.o)]);
    for b0 in (0..g.n).step_by(t.group) {
        let bs = t.group.min(g.n - b0);
        let (ld, cols) = (t.ld(bs), bs * t.tiles());
        transform_inputs(g, &t, &x[b0 * g.in_len()..], bs, ld, &mut v);
        products((g.o, cols, g.c), (&mut m, g.o * ld, ld), (&u, g.o * g.c, (g.c, 1)), (&v, g.c * ld, (ld, 1)), false);
        let outs = out[b0 * out_per..(b0 + bs) * out_per].par_chunks_mut(out_per);
        let ams: Vec<Option<&mut [u8]>> = if ep.pool {
            argmax[b0 * out_per..(b0 + bs) * out_per].chunks_mut(out_per).map(Some).collect()
        } else {
            (0..bs).map(|_| None).collect()
        };
        outs.zip(ams).enumerate().for_each_init(
            || (Scratch::new(&t), vec![0f32; if ep.pool { g.o * l } else { 0 }]),
            |(s, planes), (b, (out_b, am_b))| {
                let dst = if ep.pool { &mut planes[..] } else { &mut *out_b };
                // SAFETY: `applies` checked AVX2 and FMA.
                unsafe { output_transform(g, &t, &m, ld, b, bias, dst, s) };
                match am_b {
                    Some(am) => pool_planes(g, ep, planes, out_b, am),
                    None if ep.relu => out_b.iter_mut().for_each(|v| *v = relu(*v)),
                    None => {}
                }
            },
        );
    }
    (out, argmax)
}

/// The backward pass, by groups of samples as the forward pass: per group the output gradient's
/// transform (over channels), the kernel gradient's and the input gradient's 16 products (over
/// ξ: each ξ's kernel gradient sums over the groups in order, the same sums for any thread
/// count), and the input gradient's transform (over samples).
pub(super) fn backward(g: &Geometry, ep: Epilogue, saved: Saved<f32>, needs: Needs) -> Grads<f32> {
    let (x, k) = (saved.x, saved.k);
    let t = Tiling::new(g);
    let l = g.l();
    let u = if needs.input { kernel_transform(k, g.o, g.c) } else { Vec::new() };
    for (pass, needed) in [(Pass::Kernel, needs.kernel), (Pass::Input, needs.input)] {
        if needed {
            record_gemms(g, pass);
        }
    }
    let mut gx = crate::ops::buffer::zeroed::<f32>(if needs.input { g.n * g.in_len() } else { 0 });
    let mut du = vec![0f32; if needs.kernel { 16 * g.o * g.c } else { 0 }];
    let mut gb = vec![0f32; if needs.bias { g.o } else { 0 }];
    let direct_gz = !ep.pool && !ep.relu;
    let mut gz_buf = vec![0f32; if direct_gz { 0 } else { g.o * (t.group * l + stride_padding::<f32>()) }];
    let weights = needs.kernel || needs.input;
    let mut dm = vec![0f32; if weights { t.buffer(g.o) } else { 0 }];
    let mut v = vec![0f32; if weights { t.buffer(g.c) } else { 0 }];
    for b0 in (0..g.n).step_by(t.group) {
        let bs = t.group.min(g.n - b0);
        let (ld, cols) = (t.ld(bs), bs * t.tiles());
        let rows = Rows::of_group(g, ep, saved, (b0, bs), &mut gz_buf);
        rows.add_sums(bs, l, &mut gb);
        if !weights {
            continue;
        }
        row_parts(&mut dm, g.o, ld).into_par_iter().for_each_init(
            || Scratch::new(&t),
            // SAFETY: `applies` checked AVX2 and FMA.
            |s, (os, mut blocks)| unsafe { output_transform_grad(g, &t, rows, bs, os, ld, &mut blocks, s) },
        );
        if needs.kernel {
            transform_inputs(g, &t, &x[b0 * g.in_len()..], bs, ld, &mut v);
            // dU_ξ [O, C] += dM_ξ [O, T] · V_ξᵀ [T, C]
            let (dmv, vv) = ((&dm[..], g.o * ld, (ld, 1)), (&v[..], g.c * ld, (1, ld)));
            products((g.o, g.c, cols), (&mut du, g.o * g.c, g.c), dmv, vv, true);
        }
        if needs.input {
            // dV_ξ [C, T] = U_ξᵀ [C, O] · dM_ξ [O, T]
            let (uv, dmv) = ((&u[..], g.o * g.c, (1, g.c)), (&dm[..], g.o * ld, (ld, 1)));
            products((g.c, cols, g.o), (&mut v, g.c * ld, ld), uv, dmv, false);
            gx[b0 * g.in_len()..(b0 + bs) * g.in_len()].par_chunks_mut(g.in_len()).enumerate().for_each_init(
                || Scratch::new(&t),
                // SAFETY: `applies` checked AVX2 and FMA.
                |s, (b, gx_b)| unsafe { input_transform_grad(g, &t, &v, ld, b, gx_b, s) },
            );
        }
    }
    let gk = needs.kernel.then(|| kernel_transform_grad(&du, g.o, g.c));
    (needs.input.then_some(gx), gk, needs.bias.then_some(gb))
}

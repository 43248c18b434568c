//! Direct convolution in f32 on AVX2: no unfolded columns, no gemm packing.
//!
//! A ResNet's 16- and 32-channel convolutions are too narrow for im2col + gemm: each unfolded
//! value takes part in only O multiply-adds, so writing the columns, the gemm packing them and
//! col2im folding the input gradient back cost about as much as the products (the 16-channel
//! forward product ran at 32-49 GFLOP/s on one core, against 68 for the weight gradient's).
//! Here each sample's input is copied once into a zero-bordered plane per channel, and the
//! kernel reads the shifted input rows straight from it: a tile of up to 6 output channels by
//! 16 output positions (two AVX2 vectors along a row) accumulates `Σ w[o, c, i, j] ·
//! x[c, y + i, x + j]` over `c, i, j` in twelve registers. For stride `s` the padded plane is
//! stored as `s` column phases, so that the inputs of 8 neighbouring outputs are again 8
//! consecutive values.
//!
//! The input gradient of a stride-1 convolution is itself one: the output gradient padded by
//! `K - 1 - p`, convolved with the kernel flipped and its channels swapped. (A strided one's
//! input gradient stays on im2col + gemm.) The weight gradient `Σ_positions gz[o, ·] ·
//! x[c, s·· + (i, j)]` runs as 4 output channels by 3 kernel rows of vector partial sums over
//! the positions of a group of samples, summed across lanes once.
//!
//! It applies to strides 1 to 4 and output widths that are multiples of 8 (whole vectors along
//! a row: CIFAR's 32, 16 and 8), on a CPU with AVX2 and FMA, and unless `SAMHOST_CONV_DIRECT=0`
//! (for comparisons); the input gradient also needs stride 1, an input width that is a multiple
//! of 8 and padding below the kernel size. Every other convolution takes im2col + gemm.

use super::geometry::Geometry;
use super::passes::{
    input_grad_parts, output_grad, pool_planes, samples_per_thread, sum_partials, Epilogue, Grads, Needs, Saved,
};
use super::unfold::copy_run;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Output channels per forward tile at most (by 2 vectors of positions: 12 accumulators). The
/// channels split into tiles as evenly as possible (16 as 6 + 5 + 5, not 6 + 6 + 4): a tile of
/// few channels has too few independent sums to keep both FMA units busy. (4 channels by 3
/// vectors, tried, needs all 16 registers and the compiler spilled one: 30 % slower.)
const OB: usize = 6;
/// Output channels per weight-gradient tile.
const WO: usize = 4;
/// Kernel rows `(c, i, j)` per weight-gradient tile.
const WC: usize = 3;

/// Positions per vector.
const V: usize = 8;

/// Whether the direct kernels run for this convolution's forward pass and weight gradient (see
/// the module documentation).
pub(super) fn applies(g: &Geometry) -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    let enabled =
        *ENABLED.get_or_init(|| crate::ops::cpu::env_switch("SAMHOST_CONV_DIRECT") && crate::ops::cpu::has_avx2());
    enabled && cfg!(target_arch = "x86_64") && (1..=MAX_STRIDE).contains(&g.stride) && g.wo.is_multiple_of(V)
}

/// Whether the direct kernel also computes the input gradient: stride 1, an input width that is
/// a multiple of 8, padding below the kernel size (else im2col + gemm does).
pub(super) fn applies_to_input(g: &Geometry) -> bool {
    applies(g) && g.stride == 1 && g.w.is_multiple_of(V) && g.padding < g.kh.min(g.kw)
}

/// The largest stride the direct kernels take (each stride splits the padded input into as many
/// column phases).
const MAX_STRIDE: usize = 4;

/// Which pass [`record_gemms`] stands for.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Pass {
    Forward,
    Kernel,
    Input,
}

/// Records in the gemm census ([`crate::ops::gemm::record`]) the products the im2col
/// path would make for `pass` over the batch, so the speed benchmark's floor still counts this
/// work at the gemm's rate on those shapes.
pub(super) fn record_gemms(g: &Geometry, pass: Pass) {
    let (ckk, l, bsz) = (g.ckk(), g.l(), g.group());
    for b0 in (0..g.n).step_by(bsz) {
        let cols = bsz.min(g.n - b0) * l;
        let (m, n, k) = match pass {
            Pass::Forward => (g.o, cols, ckk),
            Pass::Kernel => (ckk, g.o, cols),
            Pass::Input => (ckk, cols, g.o),
        };
        crate::ops::gemm::record(crate::ops::gemm::GemmCall { m, n, k, parallel: false });
    }
}

/// A convolution `[C_in, Hp, Wp] -> [C_out, Ho·Wo]` over zero-bordered planes, stride 1.
struct Plan {
    out_ch: usize,
    /// Offset in the padded input of each kernel row `(c, i, j)`: `(c·Hp + i)·Wp + j`.
    off: Vec<usize>,
    /// Offset in the padded input of each output vector's first position `(y, x)`: `y·Wp + x`.
    bases: Vec<usize>,
    /// The tiles of output channels: the first channel and how many (at most [`OB`]).
    tiles: Vec<(usize, usize)>,
    /// The kernel, tile after tile: `[c·i·j][b]` for a tile of `b` channels (starting at
    /// `o0·C·kh·kw`).
    panels: Vec<f32>,
    /// Elements of one padded input.
    in_len: usize,
    /// Positions of one output plane.
    l: usize,
    /// Whether the forward tile runs on AVX-512: the CPU has it ([`has_avx512`]) and every
    /// vector has its neighbour in the same row ([`avx512::lanes`]).
    wide: bool,
}

impl Plan {
    /// The plan for the kernel `[out_ch, in_ch, kh, kw]` whose value at output channel `o` and
    /// kernel row `r = (c·kh + i)·kw + j` is `weight(o, r)`, over padded planes `hp`×`wp` split
    /// into `s` column phases ([`pad_into`]) for stride `s`.
    fn new(
        weight: impl Fn(usize, usize) -> f32 + Sync,
        (out_ch, in_ch, kh, kw): (usize, usize, usize, usize),
        (hp, wp): (usize, usize),
        s: usize,
    ) -> Self {
        let (ho, wo) = ((hp - kh) / s + 1, (wp - kw) / s + 1);
        let wq = wp.div_ceil(s);
        let ckk = in_ch * kh * kw;
        // Input (c, y, x) lies in phase x % s at column x / s.
        let off: Vec<usize> = (0..in_ch)
            .flat_map(|c| (0..kh).flat_map(move |i| (0..kw).map(move |j| ((c * s + j % s) * hp + i) * wq + j / s)))
            .collect();
        let bases: Vec<usize> = (0..ho * wo / V).map(|v| (v * V / wo) * s * wq + (v * V) % wo).collect();
        let in_len = in_ch * s * hp * wq;
        // Every vector read lies inside one padded input: what the kernels' safety rests on.
        let last = bases.last().copied().unwrap_or(0) + off.iter().copied().max().unwrap_or(0) + V;
        assert!((ho * wo).is_multiple_of(V) && last <= in_len, "direct conv: a plan reads past its input");
        let count = out_ch.div_ceil(OB);
        let tiles: Vec<(usize, usize)> = (0..count)
            .map(|t| {
                let (size, extra) = (out_ch / count, out_ch % count);
                (t * size + t.min(extra), size + usize::from(t < extra))
            })
            .collect();
        let mut panels = vec![0f32; out_ch * ckk];
        // Packed on the pool: a wide network's kernels are megabytes (WRN-16-8's last 2.4M values).
        let mut chunks = Vec::with_capacity(count);
        let mut rest = panels.as_mut_slice();
        for &(o0, b) in &tiles {
            let (panel, tail) = rest.split_at_mut(b * ckk);
            chunks.push((o0, b, panel));
            rest = tail;
        }
        chunks.into_par_iter().for_each(|(o0, b, panel)| {
            for (r, lanes) in panel.chunks_exact_mut(b).enumerate() {
                for (lane, v) in lanes.iter_mut().enumerate() {
                    *v = weight(o0 + lane, r);
                }
            }
        });
        let mut plan = Self { out_ch, off, bases, tiles, panels, in_len, l: ho * wo, wide: false };
        #[cfg(target_arch = "x86_64")]
        {
            plan.wide = has_avx512() && avx512::lanes(&plan).iter().all(avx512::Lanes::full);
        }
        plan
    }

    /// `out` `[out_ch, Ho·Wo]` = the convolution of one padded input `xp`, plus `bias`, clamped
    /// at zero when `relu`.
    fn run(&self, xp: &[f32], bias: Option<&[f32]>, relu: bool, out: &mut [f32]) {
        assert!(out.len() >= self.out_ch * self.l, "direct conv: buffers too small");
        // SAFETY: `out` holds the `out_ch · l` values written.
        unsafe { self.run_raw(xp, bias, relu, out.as_mut_ptr()) }
    }

    /// [`Plan::run`] into memory not yet written: every one of the first `out_ch · l` values of
    /// `out` is written (the tiles cover every output channel, and their vectors every
    /// position: `Plan::new` checked that `l` is whole vectors).
    fn run_uninit(&self, xp: &[f32], bias: Option<&[f32]>, relu: bool, out: &mut [MaybeUninit<f32>]) {
        assert!(out.len() >= self.out_ch * self.l, "direct conv: buffers too small");
        // SAFETY: `out` holds the `out_ch · l` values written (`MaybeUninit<f32>` has `f32`'s layout).
        unsafe { self.run_raw(xp, bias, relu, out.as_mut_ptr().cast::<f32>()) }
    }

    /// The checks on `xp` and `bias`, and the kernel.
    ///
    /// # Safety
    /// `out` valid for writes of `out_ch · l` values.
    unsafe fn run_raw(&self, xp: &[f32], bias: Option<&[f32]>, relu: bool, out: *mut f32) {
        assert!(xp.len() >= self.in_len, "direct conv: buffers too small");
        assert!(bias.is_none_or(|b| b.len() >= self.out_ch), "direct conv: bias too short");
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `applies` checked AVX2 and FMA; every read lies inside `xp` (`Plan::new`
        // checked that the last vector's base plus the largest offset plus 8 is at most
        // `in_len`) and every write inside `out` (`out_ch` planes of `l`, the caller's promise).
        // With AVX-512 (`has_avx512`) a paired vector reads its neighbour's 8 positions, also
        // inside `xp` and `out`.
        unsafe {
            if self.wide {
                avx512::conv(self, xp, bias, relu, out)
            } else {
                avx2::conv(self, xp, bias, relu, out)
            }
        }
    }
}

/// A zero-bordered copy of `planes` (`ch` planes `h`×`w`, plane `c` at `src[c·plane_stride..]`,
/// rows `w` apart) into `dst` `[ch, h + 2·pt, w + 2·pl]`: only the interior is written, the
/// border stays as it was (zero from the allocation). For stride `s > 1` each padded plane is
/// stored as `s` column phases `[s, hp, ceil(wp / s)]` (column `x` in phase `x % s` at `x / s`),
/// so that a strided row of the input is a contiguous one.
fn pad_into(
    src: &[f32],
    (ch, h, w): (usize, usize, usize),
    plane_stride: usize,
    (pt, pl): (usize, usize),
    s: usize,
    dst: &mut [f32],
) {
    let (hp, wp) = (h + 2 * pt, w + 2 * pl);
    if s > 1 {
        let wq = wp.div_ceil(s);
        for c in 0..ch {
            let plane = &src[c * plane_stride..][..h * w];
            for (y, row) in plane.chunks_exact(w).enumerate() {
                for phase in 0..s {
                    // The row's columns x with (x + pl) % s == phase, at (x + pl) / s.
                    let x0 = (phase + s - pl % s) % s;
                    let q0 = (x0 + pl) / s;
                    let d = &mut dst[((c * s + phase) * hp + y + pt) * wq + q0..];
                    d.iter_mut().zip(row.iter().skip(x0).step_by(s)).for_each(|(d, &v)| *d = v);
                }
            }
        }
        return;
    }
    for c in 0..ch {
        let plane = &src[c * plane_stride..][..h * w];
        let d = &mut dst[c * hp * wp..][..hp * wp];
        for (y, row) in plane.chunks_exact(w).enumerate() {
            copy_run(&mut d[(y + pt) * wp + pl..][..w], row);
        }
    }
}

/// The forward pass: the output `[N, O, ·]` and, when pooling, each window's argmax.
pub(super) fn forward(g: &Geometry, ep: Epilogue, x: &[f32], k: &[f32], bias: Option<&[f32]>) -> (Vec<f32>, Vec<u8>) {
    let p = g.padding;
    let (hp, wp) = (g.h + 2 * p, g.w + 2 * p);
    let plan = Plan::new(|o, r| k[o * g.ckk() + r], (g.o, g.c, g.kh, g.kw), (hp, wp), g.stride);
    record_gemms(g, Pass::Forward);
    let l = g.l();
    let out_per = g.o * ep.out_len(g);
    assert!(x.len() == g.n * g.in_len() && k.len() >= g.o * g.ckk(), "direct conv: operands too small");
    if !ep.pool {
        // Every output value is the kernel's: the planes are written once, not zero-filled first.
        let mut out = Vec::with_capacity(g.n * out_per);
        out.spare_capacity_mut()[..g.n * out_per].par_chunks_mut(out_per).zip(x.par_chunks(g.in_len())).for_each_init(
            || vec![0f32; plan.in_len],
            |xp, (out_b, x_b)| {
                pad_into(x_b, (g.c, g.h, g.w), g.h * g.w, (p, p), g.stride, xp);
                plan.run_uninit(xp, bias, ep.relu, out_b);
            },
        );
        // SAFETY: `run_uninit` wrote each sample's `out_per = O·l` values (`x` has `n` samples:
        // the caller's geometry is the input's).
        unsafe { out.set_len(g.n * out_per) };
        return (out, Vec::new());
    }
    let mut out = crate::ops::buffer::zeroed::<f32>(g.n * out_per);
    let mut argmax = crate::ops::buffer::zeroed::<u8>(if ep.pool { g.n * out_per } else { 0 });
    let mut am_chunks: Vec<Option<&mut [u8]>> =
        if ep.pool { argmax.chunks_mut(out_per).map(Some).collect() } else { (0..g.n).map(|_| None).collect() };
    out.par_chunks_mut(out_per).zip(am_chunks.par_iter_mut()).zip(x.par_chunks(g.in_len())).for_each_init(
        || (vec![0f32; plan.in_len], vec![0f32; if ep.pool { g.o * l } else { 0 }]),
        |(xp, plane), ((out_b, am_b), x_b)| {
            pad_into(x_b, (g.c, g.h, g.w), g.h * g.w, (p, p), g.stride, xp);
            match am_b.as_deref_mut() {
                None => plan.run(xp, bias, ep.relu, out_b),
                Some(am) => {
                    plan.run(xp, bias, false, plane);
                    pool_planes(g, ep, plane, out_b, am);
                }
            }
        },
    );
    (out, argmax)
}

/// The output gradient of a group: where row `(b, o)` starts and how many elements it has.
#[derive(Clone, Copy)]
pub(super) struct Rows<'a> {
    pub(super) data: &'a [f32],
    pub(super) o_stride: usize,
    pub(super) b_stride: usize,
}

impl<'a> Rows<'a> {
    /// The gradient of the raw convolution output of samples `b0..b0 + bs`: the incoming
    /// gradient itself when nothing follows the convolution, else written into `buf` (at least
    /// `O` rows of [`Geometry::row_stride`]`(bs)`) by [`output_grad`].
    pub(super) fn of_group(
        g: &Geometry,
        ep: Epilogue,
        saved: Saved<'a, f32>,
        (b0, bs): (usize, usize),
        buf: &'a mut [f32],
    ) -> Self {
        let l = g.l();
        if !ep.pool && !ep.relu {
            return Rows { data: &saved.dy[b0 * g.o * l..(b0 + bs) * g.o * l], o_stride: l, b_stride: g.o * l };
        }
        output_grad(g, ep, saved.y, saved.dy, saved.argmax, b0, bs, buf);
        Rows { data: buf, o_stride: g.row_stride::<f32>(bs), b_stride: l }
    }

    pub(super) fn row(&self, b: usize, o: usize, l: usize) -> &[f32] {
        &self.data[b * self.b_stride + o * self.o_stride..][..l]
    }

    /// Adds each channel's sum over `bs` samples of `l` positions to `gb` (the bias gradient;
    /// nothing when `gb` is empty).
    pub(super) fn add_sums(&self, bs: usize, l: usize, gb: &mut [f32]) {
        for b in 0..bs {
            for (o, s) in gb.iter_mut().enumerate() {
                *s += self.row(b, o, l).iter().sum::<f32>();
            }
        }
    }
}

/// The backward pass over fixed ranges of samples, one per thread (the same sums on every run
/// with the same thread count), in groups of [`Geometry::group`] samples for the weight gradient.
pub(super) fn backward(g: &Geometry, ep: Epilogue, saved: Saved<f32>, needs: Needs) -> Grads<f32> {
    let (x, k) = (saved.x, saved.k);
    let (ckk, l, bsz, p) = (g.ckk(), g.l(), g.group(), g.padding);
    let (hp, wp) = (g.h + 2 * p, g.w + 2 * p);
    assert!(!needs.input || applies_to_input(g), "direct conv: the input gradient of {g:?}");
    // The input gradient: the output gradient padded by K - 1 - p, convolved with the kernel
    // flipped and its channels swapped, `[C, O, kh, kw]`.
    let (qt, ql) = if needs.input { (g.kh - 1 - p, g.kw - 1 - p) } else { (0, 0) };
    let (ghp, gwp) = (g.ho + 2 * qt, g.wo + 2 * ql);
    let dx_plan = needs.input.then(|| {
        let (kh, kw) = (g.kh, g.kw);
        // Output channel c, kernel row (o, i, j): the kernel's (o, c, kh - 1 - i, kw - 1 - j).
        let flipped = |c: usize, r: usize| {
            let (o, i, j) = (r / (kh * kw), (r / kw) % kh, r % kw);
            k[((o * g.c + c) * kh + kh - 1 - i) * kw + kw - 1 - j]
        };
        Plan::new(flipped, (g.c, g.o, kh, kw), (ghp, gwp), 1)
    });
    // The offsets of the weight gradient's shifted input rows and output vectors.
    let wplan = Plan::new(|_, _| 0.0, (0, g.c, g.kh, g.kw), (hp, wp), g.stride);
    for (pass, needed) in [(Pass::Kernel, needs.kernel), (Pass::Input, needs.input)] {
        if needed {
            record_gemms(g, pass);
        }
    }
    let per = samples_per_thread(g);
    assert!(x.len() == g.n * g.in_len(), "direct conv: input too small");
    // The input gradient is written sample by sample below, each value once: not zero-filled.
    let gx_len = if needs.input { g.n * g.in_len() } else { 0 };
    let mut gx: Vec<f32> = Vec::with_capacity(gx_len);
    let gx_parts = input_grad_parts(g, &mut gx.spare_capacity_mut()[..gx_len], per);
    let direct_gz = !ep.pool && !ep.relu;
    let partials: Vec<(Vec<f32>, Vec<f32>)> = gx_parts
        .into_par_iter()
        .enumerate()
        .map(|(part, mut gx_part)| {
            let mut gk = vec![0f32; if needs.kernel { g.o * ckk } else { 0 }];
            let mut gb = vec![0f32; if needs.bias { g.o } else { 0 }];
            let mut gz_buf = vec![0f32; if direct_gz { 0 } else { g.group_buffer::<f32>(g.o) }];
            let mut xps = vec![0f32; if needs.kernel { bsz * wplan.in_len } else { 0 }];
            let mut gzp = vec![0f32; if needs.input { g.o * ghp * gwp } else { 0 }];
            let (s0, s1) = (part * per, ((part + 1) * per).min(g.n));
            for b0 in (s0..s1).step_by(bsz) {
                let bs = bsz.min(s1 - b0);
                let rows = Rows::of_group(g, ep, saved, (b0, bs), &mut gz_buf);
                rows.add_sums(bs, l, &mut gb);
                if needs.kernel {
                    for b in 0..bs {
                        let x_b = &x[(b0 + b) * g.in_len()..][..g.in_len()];
                        pad_into(x_b, (g.c, g.h, g.w), g.h * g.w, (p, p), g.stride, &mut xps[b * wplan.in_len..]);
                    }
                    weight_grad(&wplan, rows, &xps, bs, g.o, &mut gk);
                }
                if let (Some(gx_part), Some(plan)) = (gx_part.as_deref_mut(), dx_plan.as_ref()) {
                    for b in 0..bs {
                        let src = &rows.data[b * rows.b_stride..];
                        pad_into(src, (g.o, g.ho, g.wo), rows.o_stride, (qt, ql), 1, &mut gzp);
                        let dst = &mut gx_part[(b0 - s0 + b) * g.in_len()..][..g.in_len()];
                        plan.run_uninit(&gzp, None, false, dst);
                    }
                }
            }
            (gk, gb)
        })
        .collect();
    // SAFETY: every sample's input gradient (`in_len` values) was written above: the parts
    // cover the samples `0..n` in ranges of `per`, each range every sample of it.
    unsafe { gx.set_len(gx_len) };
    let (gk, gb) = sum_partials(partials);
    (needs.input.then_some(gx), needs.kernel.then_some(gk), needs.bias.then_some(gb))
}

/// Adds to `gk` `[O, C·kh·kw]` the weight gradient of a group of `bs` samples: their output
/// gradient `rows` and their padded inputs `xps` (`plan.in_len` apart).
fn weight_grad(plan: &Plan, rows: Rows, xps: &[f32], bs: usize, o: usize, gk: &mut [f32]) {
    let ckk = plan.off.len();
    assert!(bs > 0 && o > 0 && plan.bases.len() * V == plan.l, "direct conv: empty weight gradient");
    assert!(
        rows.data.len() >= (bs - 1) * rows.b_stride + (o - 1) * rows.o_stride + plan.l
            && xps.len() >= bs * plan.in_len
            && gk.len() >= o * ckk,
        "direct conv: weight-gradient buffers too small"
    );
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `applies` checked AVX2 and FMA; the asserts above bound every read of `rows` and
    // `xps` (each padded input's reads stay inside it, as in `Plan::run`) and every write of `gk`.
    // On AVX-512 (`plan.wide`) every vector pairs with its neighbour, whose 8 positions the
    // plan's check covers too.
    unsafe {
        if plan.wide {
            avx512::weight_grad(plan, rows, xps, bs, o, gk)
        } else {
            avx2::weight_grad(plan, rows, xps, bs, o, gk)
        }
    }
}

/// Whether the AVX-512 kernels run: a CPU with AVX-512F, unless `SAMHOST_AVX512=0` (for
/// comparisons; read once per process).
fn has_avx512() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let detected = std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        let detected = false;
        detected && crate::ops::cpu::env_switch("SAMHOST_AVX512")
    })
}

/// The kernels, compiled for AVX2 and FMA and chosen at run time ([`applies`]).
#[cfg(target_arch = "x86_64")]
mod avx2;

/// The forward and weight-gradient tiles for AVX-512F, chosen at run time ([`Plan::wide`]).
#[cfg(target_arch = "x86_64")]
mod avx512;

//! The matrix products of one attention head, `c = a·b`, for operands of a few hundred rows by a
//! head's 64 columns: `a` is read in place through any pair of strides (a transposed operand
//! costs nothing), `b` is packed once per head into panels of [`NR`] columns ([`Packed`]), and
//! AVX2/FMA register tiles of up to [`MR`] rows by [`NR`] columns compute the products with
//! every `a` element broadcast from where it lies.
//!
//! The `gemm` crate packs both operands on every call, the probabilities' n×n matrix among them
//! (a second pass over it for each of the three products that read it), and at a ViT's head
//! shapes (257×257×64 at 224 px) its packing and dispatch were a fifth of attention's time
//! (`perf` of the attention op alone, one thread). Here only the operands of n×64 values are
//! packed, and the n×n ones are read where the softmax left them, in cache.

use std::arch::x86_64::*;

/// Columns of a panel and of a register tile: two AVX vectors.
pub(crate) const NR: usize = 16;
/// Rows of a full register tile.
pub(crate) const MR: usize = 6;
/// Panel alignment in `f32`s: one cache line, so each row of 16 values is one line.
const ALIGN: usize = 16;

/// A k×n matrix packed as panels of [`NR`] columns: panel `p` holds its k rows of the columns
/// `p·NR ..`, `NR` values each, zeros past column n, and products with it write `width >= n`
/// columns (zeros past n). The buffer is reused from head to head.
#[derive(Default)]
pub(crate) struct Packed {
    data: Vec<f32>,
    start: usize,
    k: usize,
    width: usize,
}

impl Packed {
    /// Packs the k×n matrix whose element (r, j) is `src[r·rs + j·cs]`, as a k×width matrix
    /// with zeros past column n.
    ///
    /// # Panics
    /// When the matrix does not lie inside `src`, is empty, or `width` is less than n.
    pub(crate) fn pack(&mut self, src: &[f32], (k, n): (usize, usize), (rs, cs): (usize, usize), width: usize) {
        assert!(
            k > 0 && n > 0 && (k - 1) * rs + (n - 1) * cs < src.len(),
            "attention: a packed operand lies outside its buffer"
        );
        assert!(width >= n, "attention: a packed operand narrower than its columns");
        let panels = width.div_ceil(NR);
        let len = panels * k * NR;
        if self.data.len() < len + ALIGN {
            self.data.resize(len + ALIGN, 0.0);
        }
        self.start = self.data.as_ptr().align_offset(ALIGN * 4).min(ALIGN);
        (self.k, self.width) = (k, width);
        let data = &mut self.data[self.start..self.start + len];
        for (p, panel) in data.chunks_exact_mut(k * NR).enumerate() {
            let cols = NR.min(n.saturating_sub(p * NR));
            if cols < NR {
                // The last panel's columns past n are zeros: its products give zeros there.
                panel.chunks_exact_mut(NR).for_each(|row| row[cols..].fill(0.0));
            }
            if cs == 1 && cols == NR {
                // Rows of the source are contiguous: copy them a panel row (one cache line) at a time.
                for (r, row) in panel.chunks_exact_mut(NR).enumerate() {
                    let at = r * rs + p * NR;
                    let from: &[f32; NR] = src[at..at + NR].try_into().expect("a panel row");
                    row.copy_from_slice(from);
                }
            } else if cs == 1 {
                for (r, row) in panel.chunks_exact_mut(NR).enumerate() {
                    let at = r * rs + p * NR;
                    row[..cols].copy_from_slice(&src[at..at + cols]);
                }
            } else if rs == 1 && crate::ops::cpu::has_avx2() {
                // The source's columns are contiguous (a transposed operand): 8×8 blocks
                // transposed in registers.
                let (rows8, cols8) = (k / 8 * 8, cols / 8 * 8);
                for j in (0..cols8).step_by(8) {
                    let base = (p * NR + j) * cs;
                    assert!(base + 7 * cs + k <= src.len(), "attention: a packed operand lies outside its buffer");
                    for r in (0..rows8).step_by(8) {
                        // SAFETY: AVX2 (checked); the 8 source columns' rows r..r+8 lie inside
                        // `src` (asserted above), the 8 panel rows r..r+8 hold columns j..j+8.
                        unsafe { transpose8(src.as_ptr().add(base + r), cs, panel.as_mut_ptr().add(r * NR + j), NR) };
                    }
                }
                for j in 0..cols {
                    let col = &src[(p * NR + j) * cs..];
                    let from = if j < cols8 { rows8 } else { 0 };
                    for r in from..k {
                        panel[r * NR + j] = col[r];
                    }
                }
            } else {
                // Read down the source's columns, one panel column at a time.
                for j in 0..cols {
                    let col = &src[(p * NR + j) * cs..];
                    for (r, row) in panel.chunks_exact_mut(NR).enumerate() {
                        row[j] = col[r * rs];
                    }
                }
            }
        }
    }

    /// Rows (the products' inner dimension).
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Columns a product writes.
    pub(crate) fn width(&self) -> usize {
        self.width
    }

    /// Panel `p`'s k·NR values.
    fn panel(&self, p: usize) -> &[f32] {
        let at = self.start + p * self.k * NR;
        &self.data[at..at + self.k * NR]
    }
}

/// The 8×8 block at `src` (8 rows of 8 values, rows `ls` apart) transposed to `dst` (rows `ld`
/// apart): `dst[c·ld + i] = src[i·ls + c]`.
///
/// # Safety
/// AVX2; both blocks inside their buffers.
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn transpose8(src: *const f32, ls: usize, dst: *mut f32, ld: usize) {
    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(src.add(i * ls)));
    let t = [
        _mm256_unpacklo_ps(r[0], r[1]),
        _mm256_unpackhi_ps(r[0], r[1]),
        _mm256_unpacklo_ps(r[2], r[3]),
        _mm256_unpackhi_ps(r[2], r[3]),
        _mm256_unpacklo_ps(r[4], r[5]),
        _mm256_unpackhi_ps(r[4], r[5]),
        _mm256_unpacklo_ps(r[6], r[7]),
        _mm256_unpackhi_ps(r[6], r[7]),
    ];
    let u = [
        _mm256_shuffle_ps::<0x44>(t[0], t[2]),
        _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
        _mm256_shuffle_ps::<0x44>(t[1], t[3]),
        _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
        _mm256_shuffle_ps::<0x44>(t[4], t[6]),
        _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
        _mm256_shuffle_ps::<0x44>(t[5], t[7]),
        _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
    ];
    for c in 0..4 {
        _mm256_storeu_ps(dst.add(c * ld), _mm256_permute2f128_ps::<0x20>(u[c], u[c + 4]));
        _mm256_storeu_ps(dst.add((c + 4) * ld), _mm256_permute2f128_ps::<0x31>(u[c], u[c + 4]));
    }
}

/// A strided matrix operand read in place: element (i, p) is `data[i·rs + p·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<'a> {
    /// The buffer it lies in.
    pub data: &'a [f32],
    /// Row stride.
    pub rs: usize,
    /// Column stride.
    pub cs: usize,
}

/// A destination written through a raw pointer: rows of `ldc` values, of which a product writes
/// the [`Packed`] operand's `width` columns from `ptr`. Raw so that the heads of one sequence, on
/// different threads, write their own columns of the same rows.
#[derive(Clone, Copy)]
pub(crate) struct Dest {
    /// The first element written.
    pub ptr: *mut f32,
    /// Row stride.
    pub ldc: usize,
}

/// `c = a·b` for the m rows of `a` (m×k) and `b` (k×n, packed): c's element (i, j) at
/// `c.ptr + i·ldc + j`, written (not accumulated).
///
/// # Safety
/// AVX2 and FMA; `c` must point to m rows of `ldc >= b.width()` writable values that no other thread
/// reads or writes meanwhile. `a` is bounds-checked here.
pub(crate) unsafe fn product(m: usize, a: Strided, b: &Packed, c: Dest) {
    let k = b.k();
    assert!(
        m > 0 && (m - 1) * a.rs + (k - 1) * a.cs < a.data.len(),
        "attention: a product's operand lies outside its buffer"
    );
    crate::ops::gemm::record(crate::ops::gemm::GemmCall { m, n: b.width(), k, parallel: false });
    for p in 0..b.width().div_ceil(NR) {
        let panel = b.panel(p).as_ptr();
        let cols = NR.min(b.width() - p * NR);
        let dst = c.ptr.add(p * NR);
        let mut i = 0;
        while i + MR <= m {
            tile::<MR>(k, a.data.as_ptr().add(i * a.rs), (a.rs, a.cs), panel, dst.add(i * c.ldc), (c.ldc, cols));
            i += MR;
        }
        let (ap, cp) = (a.data.as_ptr().add(i * a.rs), dst.add(i * c.ldc));
        match m - i {
            0 => {}
            1 => tile::<1>(k, ap, (a.rs, a.cs), panel, cp, (c.ldc, cols)),
            2 => tile::<2>(k, ap, (a.rs, a.cs), panel, cp, (c.ldc, cols)),
            3 => tile::<3>(k, ap, (a.rs, a.cs), panel, cp, (c.ldc, cols)),
            4 => tile::<4>(k, ap, (a.rs, a.cs), panel, cp, (c.ldc, cols)),
            _ => tile::<5>(k, ap, (a.rs, a.cs), panel, cp, (c.ldc, cols)),
        }
    }
}

/// One register tile: `R` rows of `a` from `a` (strides `rs`, `cs`) times one panel, over `k`;
/// the first `cols` of the tile's 16 columns stored to `c` (rows `ldc` apart).
///
/// # Safety
/// AVX2 and FMA; `a` holds R rows of k values at these strides, the panel k rows of 16, `c` R
/// rows of `cols` writable values.
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::needless_range_loop)]
unsafe fn tile<const R: usize>(
    k: usize,
    a: *const f32,
    (rs, cs): (usize, usize),
    panel: *const f32,
    c: *mut f32,
    (ldc, cols): (usize, usize),
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let (mut ap, mut bp) = (a, panel);
    for _ in 0..k {
        let (b0, b1) = (_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8)));
        for i in 0..R {
            let x = _mm256_broadcast_ss(&*ap.add(i * rs));
            acc[i][0] = _mm256_fmadd_ps(x, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(x, b1, acc[i][1]);
        }
        ap = ap.add(cs);
        bp = bp.add(NR);
    }
    for i in 0..R {
        let row = c.add(i * ldc);
        if cols == NR {
            _mm256_storeu_ps(row, acc[i][0]);
            _mm256_storeu_ps(row.add(8), acc[i][1]);
        } else {
            let mut tmp = [0f32; NR];
            _mm256_storeu_ps(tmp.as_mut_ptr(), acc[i][0]);
            _mm256_storeu_ps(tmp.as_mut_ptr().add(8), acc[i][1]);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), row, cols);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product against a plain f64 triple loop, over tails in every dimension and both kinds
    /// of strides.
    #[test]
    fn products_match_a_plain_loop() {
        if !crate::ops::cpu::has_avx2() {
            return;
        }
        let value = |i: usize| ((i * 7919 % 613) as f32 - 306.0) / 97.0;
        for (m, n, k) in [(1, 1, 1), (5, 17, 3), (6, 16, 64), (13, 40, 9), (257, 64, 257), (65, 65, 64)] {
            for transposed in [false, true] {
                let (rs, cs) = if transposed { (1, m + 3) } else { (k + 2, 1) };
                let a: Vec<f32> = (0..(m - 1) * rs + (k - 1) * cs + 1).map(value).collect();
                let src: Vec<f32> = (0..k * (n + 5)).map(|i| value(i + 11)).collect();
                // b's element (r, j): column-major in `src` when the a operand is transposed.
                let (brs, bcs) = if transposed { (1, k) } else { (n + 5, 1) };
                let mut b = Packed::default();
                let width = if transposed { n + 2 } else { n };
                b.pack(&src, (k, n), (brs, bcs), width);
                let ldc = n + 3;
                let mut c = vec![f32::NAN; m * ldc];
                // SAFETY: AVX2 checked; c holds m rows of ldc >= n values.
                unsafe { product(m, Strided { data: &a, rs, cs }, &b, Dest { ptr: c.as_mut_ptr(), ldc }) };
                for i in 0..m {
                    for j in 0..ldc {
                        let got = c[i * ldc + j];
                        if j >= width {
                            assert!(got.is_nan(), "m{m} n{n} k{k}: column {j} past the width was written");
                            continue;
                        }
                        if j >= n {
                            assert_eq!(got, 0.0, "m{m} n{n} k{k}: column {j} past n");
                            continue;
                        }
                        let want: f64 = (0..k).map(|p| a[i * rs + p * cs] as f64 * src[p * brs + j * bcs] as f64).sum();
                        let scale: f64 =
                            (0..k).map(|p| (a[i * rs + p * cs] * src[p * brs + j * bcs]).abs() as f64).sum();
                        assert!(
                            (got as f64 - want).abs() <= 1e-6 * scale.max(1.0),
                            "m{m} n{n} k{k} transposed {transposed}: ({i}, {j}) {got} against {want}"
                        );
                    }
                }
            }
        }
    }
}

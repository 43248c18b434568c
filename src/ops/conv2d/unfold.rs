//! im2col and col2im over groups of samples.

use super::geometry::Geometry;
use crate::ops::gemm::Float;

/// Copies a short run: whole blocks of 8 as fixed-size copies (kept inline, where
/// `copy_from_slice` on a run of 8 to 32 values calls `memmove`), then the rest.
#[inline]
pub(super) fn copy_run<T: Copy>(dst: &mut [T], src: &[T]) {
    let (mut d, mut s) = (dst.chunks_exact_mut(8), src.chunks_exact(8));
    for (d, s) in (&mut d).zip(&mut s) {
        let block: &[T; 8] = s.try_into().expect("a chunk of 8");
        d.copy_from_slice(block);
    }
    d.into_remainder().iter_mut().zip(s.remainder()).for_each(|(d, &v)| *d = v);
}

/// A per-thread buffer of unfolded samples `[C·KH·KW, bs·L]` (row stride
/// [`Geometry::row_stride`]). Positions that fall on the padding are never written, so the
/// buffer is zero-filled only when its layout (`bs`) changes.
pub(super) struct Unfolded<T> {
    cols: Vec<T>,
    ld: usize,
}

impl<T: Float> Unfolded<T> {
    pub(super) fn new(g: &Geometry) -> Self {
        Self { cols: vec![T::default(); g.group_buffer::<T>(g.ckk())], ld: 0 }
    }

    /// Unfolds the `bs` samples of `x` (rows [`Geometry::row_stride`]`(bs)` apart).
    pub(super) fn fill(&mut self, g: &Geometry, x: &[T], bs: usize) -> &[T] {
        let (l, ld, s) = (g.l(), g.row_stride::<T>(bs), g.stride);
        let cols = &mut self.cols[..g.ckk() * ld];
        if self.ld != ld {
            cols.fill(T::default());
            self.ld = ld;
        }
        if g.is_shift() {
            for (b, x_b) in x.chunks_exact(g.in_len()).take(bs).enumerate() {
                g.for_each_plane(|row, start, end, offset, dj| {
                    let dst = &mut cols[row * ld + b * l..][..l];
                    let from = (start as isize + offset) as usize;
                    dst[start..end].copy_from_slice(&x_b[from..from + end - start]);
                    zero_padding_columns(&mut dst[start..end], start, g.w, dj);
                });
            }
            return cols;
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

/// Zeroes the positions of `run` (positions `start..` of an unfolded row of output width `w`)
/// whose column falls on the padding of a shift by `dj` columns.
#[inline]
fn zero_padding_columns<T: Float>(run: &mut [T], start: usize, w: usize, dj: isize) {
    if dj == 0 {
        return;
    }
    let first_row = start / w;
    let rows = (start + run.len()).div_ceil(w) - first_row;
    for r in first_row..first_row + rows {
        let cols = if dj < 0 { 0..(-dj) as usize } else { w - dj as usize..w };
        for ox in cols {
            let pos = r * w + ox;
            if pos >= start && pos < start + run.len() {
                run[pos - start] = T::default();
            }
        }
    }
}

/// Folds `cols` `[C·KH·KW, bs·L]` (rows [`Geometry::row_stride`]`(bs)` apart) back onto the
/// `bs` samples of `gx`, adding to it (zero on entry: each input element gathers the
/// contributions of every kernel position over it).
/// `cols` is the gemm's output, a scratch buffer: its padding positions are zeroed on the way.
pub(super) fn col2im<T: Float>(g: &Geometry, cols: &mut [T], bs: usize, gx: &mut [T]) {
    let (l, ld, s) = (g.l(), g.row_stride::<T>(bs), g.stride);
    if g.is_shift() {
        for (b, gx_b) in gx.chunks_exact_mut(g.in_len()).take(bs).enumerate() {
            g.for_each_plane(|row, start, end, offset, dj| {
                let src = &mut cols[row * ld + b * l..][..l];
                zero_padding_columns(&mut src[start..end], start, g.w, dj);
                let to = (start as isize + offset) as usize;
                gx_b[to..to + end - start].iter_mut().zip(&src[start..end]).for_each(|(d, &v)| *d += v);
            });
        }
        return;
    }
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

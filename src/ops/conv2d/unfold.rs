//! im2col and col2im over groups of samples.

use super::geometry::Geometry;
use crate::ops::gemm::Float;

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
pub(super) struct Unfolded<T> {
    cols: Vec<T>,
    ld: usize,
}

impl<T: Float> Unfolded<T> {
    pub(super) fn new(g: &Geometry) -> Self {
        Self { cols: vec![T::default(); g.ckk() * g.group() * g.l()], ld: 0 }
    }

    /// Unfolds the `bs` samples of `x`.
    pub(super) fn fill(&mut self, g: &Geometry, x: &[T], bs: usize) -> &[T] {
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
pub(super) fn col2im<T: Float>(g: &Geometry, cols: &[T], bs: usize, gx: &mut [T]) {
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

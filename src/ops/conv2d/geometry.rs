//! The shape of one convolution and how its input unfolds into columns.

use candle_core::Result;

/// Columns one gemm of a group of samples spans at least (fewer samples per group when one
/// sample's output has that many positions).
pub const MIN_COLUMNS: usize = 512;

/// Geometry of one convolution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Geometry {
    pub(super) n: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) o: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) stride: usize,
    pub(super) padding: usize,
    pub(super) ho: usize,
    pub(super) wo: usize,
}

impl Geometry {
    pub(super) fn new(x: &[usize], k: &[usize], stride: usize, padding: usize) -> Result<Self> {
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
    pub(super) fn ckk(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Columns of the unfolded matrix: Ho·Wo.
    pub(super) fn l(&self) -> usize {
        self.ho * self.wo
    }

    pub(super) fn in_len(&self) -> usize {
        self.c * self.h * self.w
    }

    /// For each unfolded row `(c, i, j)` and output row `oy`, the run of output positions whose
    /// input lies inside the image: calls `f(row, position, input_offset, len)` where the run
    /// covers positions `position..position + len` of unfolded row `row` and input elements
    /// `input_offset`, `input_offset + stride`, … (padding positions are skipped).
    #[inline]
    pub(super) fn for_each_run(&self, mut f: impl FnMut(usize, usize, usize, usize)) {
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

    /// Whether every unfolded row is the input plane shifted by a constant (stride 1 and an
    /// output as large as the input: the "same" convolutions 3x3/1, 5x5/2, 1x1/0), so that
    /// [`Self::for_each_plane`] applies.
    pub(super) fn is_shift(&self) -> bool {
        self.stride == 1 && self.ho == self.h && self.wo == self.w
    }

    /// For a shift geometry ([`Self::is_shift`]), for each unfolded row `(c, i, j)`: calls
    /// `f(row, start, end, offset, dj)`, where positions `start..end` of the row hold input
    /// elements `position + offset` of channel `c`'s plane (clipped to the plane), except the
    /// positions whose column falls on the padding (`dj < 0`: the first `-dj` columns of each
    /// output row; `dj > 0`: the last `dj`), which must be zero. Positions outside `start..end`
    /// are padding too.
    #[inline]
    pub(super) fn for_each_plane(&self, mut f: impl FnMut(usize, usize, usize, isize, isize)) {
        let (h, w, p) = (self.h as isize, self.w as isize, self.padding as isize);
        for c in 0..self.c {
            for i in 0..self.kh {
                for j in 0..self.kw {
                    let row = (c * self.kh + i) * self.kw + j;
                    let (di, dj) = (i as isize - p, j as isize - p);
                    // Output rows whose input row lies inside the image.
                    let (oy0, oy1) = ((-di).max(0), (h - di).min(h));
                    let offset = di * w + dj + (c as isize) * h * w;
                    // Positions whose source lies inside the plane.
                    let start = (oy0 * w).max(-(di * w + dj));
                    let end = (oy1 * w).min(h * w - (di * w + dj));
                    if start < end {
                        f(row, start as usize, end as usize, offset, dj);
                    }
                }
            }
        }
    }

    /// Row stride of the `[rows, bs·L]` buffers of a group of `bs` samples (the unfolded columns,
    /// the raw output, their gradients): [`crate::ops::gemm::padded_stride`] of `bs·L`.
    pub(super) fn row_stride<T>(&self, bs: usize) -> usize {
        crate::ops::gemm::padded_stride::<T>(bs * self.l())
    }

    /// Elements a `[rows, ·]` group buffer needs for any `bs` up to [`Self::group`].
    pub(super) fn group_buffer<T>(&self, rows: usize) -> usize {
        rows * (self.group() * self.l() + crate::ops::gemm::stride_padding::<T>())
    }

    /// Samples per gemm.
    pub(super) fn group(&self) -> usize {
        MIN_COLUMNS.div_ceil(self.l()).clamp(1, self.n)
    }
}

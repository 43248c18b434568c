//! Matrix products on CPU slices through the `gemm` crate (the kernels candle's matmul uses), with
//! explicit strides so transposed operands need no copy; and a census of the products a step
//! makes ([`record_calls`]) with the time the machine's gemm takes for them ([`floor_seconds`]),
//! the floor the speed benchmark prints beside each step.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// One matrix product a step made: its sizes and whether it ran over the whole thread pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GemmCall {
    /// Rows of the result.
    pub m: usize,
    /// Columns of the result.
    pub n: usize,
    /// The inner dimension.
    pub k: usize,
    /// Whether it was split over the rayon pool (else one thread ran it, beside others).
    pub parallel: bool,
}

impl GemmCall {
    /// Its floating-point operations, 2·m·n·k.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64
    }
}

static RECORDING: AtomicBool = AtomicBool::new(false);
static CALLS: Mutex<Vec<GemmCall>> = Mutex::new(Vec::new());

/// Runs `f` and returns, with its result, every f32/f64 matrix product made through this module
/// meanwhile (on any thread). Not reentrant: one census at a time.
pub fn record_calls<R>(f: impl FnOnce() -> R) -> (R, Vec<GemmCall>) {
    CALLS.lock().unwrap_or_else(|p| p.into_inner()).clear();
    RECORDING.store(true, Ordering::SeqCst);
    let r = f();
    RECORDING.store(false, Ordering::SeqCst);
    let calls = std::mem::take(&mut *CALLS.lock().unwrap_or_else(|p| p.into_inner()));
    (r, calls)
}

/// Counts `call` in the census of [`record_calls`] when one runs: every product made here, and
/// those that kernels computing a matrix product's worth of work another way (the direct
/// convolution) stand for, so the floor still covers their work at the gemm's rate.
pub fn record(call: GemmCall) {
    if RECORDING.load(Ordering::Relaxed) {
        CALLS.lock().unwrap_or_else(|p| p.into_inner()).push(call);
    }
}

/// The time this machine's gemm takes for `calls` in f32 (row-major operands with
/// [`padded_stride`] rows): products that ran over the pool are timed so; those that ran on one
/// thread beside others (a convolution's per-sample products) are timed on one thread and shared
/// out over the pool's threads. Each distinct shape counts at the fastest of `reps` rounds, a
/// round timing every shape once in turn: other tenants' load only ever adds time, and a burst of
/// it then slows one round of every shape instead of every run of a few (the median of 3
/// consecutive runs per shape moved a ResNet's floor by a third from run to run on a shared VM).
pub fn floor_seconds(calls: &[GemmCall], reps: usize) -> f64 {
    let mut counts: std::collections::BTreeMap<GemmCall, usize> = Default::default();
    for c in calls {
        *counts.entry(*c).or_default() += 1;
    }
    let shapes: Vec<(GemmCall, usize)> = counts.into_iter().collect();
    let mut best = vec![f64::INFINITY; shapes.len()];
    for _ in 0..reps.max(1) {
        for (t, (c, _)) in best.iter_mut().zip(&shapes) {
            *t = t.min(time_once(c));
        }
    }
    let threads = rayon::current_num_threads().max(1) as f64;
    shapes.iter().zip(&best).map(|((c, n), t)| *n as f64 * if c.parallel { *t } else { t / threads }).sum()
}

/// One timed run of the product `c` (after one untimed run on the same buffers).
fn time_once(c: &GemmCall) -> f64 {
    // Row-major operands and result, their rows padded as the convolution pads them.
    let (ls, rs, ds) = (padded_stride::<f32>(c.k), padded_stride::<f32>(c.n), padded_stride::<f32>(c.n));
    let lhs: Vec<f32> = (0..c.m * ls).map(|i| (i % 7) as f32 * 0.1).collect();
    let rhs: Vec<f32> = (0..c.k * rs).map(|i| (i % 5) as f32 * 0.1).collect();
    let mut out = vec![0f32; c.m * ds];
    let (ls, rs, ds) = (ls as isize, rs as isize, ds as isize);
    let mut run = || {
        let t = std::time::Instant::now();
        matmul((c.m, c.n, c.k), &mut out, (ds, 1), &lhs, (ls, 1), &rhs, (rs, 1), false, c.parallel);
        std::hint::black_box(&out);
        t.elapsed().as_secs_f64()
    };
    run();
    run()
}

/// The row stride for a row-major buffer of `cols` columns: `cols`, plus one cache line when rows
/// `cols` apart would lie a multiple of 512 bytes apart. At such power-of-two strides the rows of
/// a gemm panel fall in the same few sets of the L1 cache and evict each other (on this machine
/// ResNet's 16-channel convolution, rows of 4 KiB, ran its forward gemm at half the rate).
pub fn padded_stride<T>(cols: usize) -> usize {
    if (cols * std::mem::size_of::<T>()).is_multiple_of(512) {
        cols + stride_padding::<T>()
    } else {
        cols
    }
}

/// The most [`padded_stride`] adds: one 64-byte cache line of `T`s.
pub fn stride_padding<T>() -> usize {
    64 / std::mem::size_of::<T>().max(1)
}

/// Element types the gemm path handles.
pub trait Float: candle_core::WithDType + Default + Send + Sync + std::ops::AddAssign + PartialOrd + 'static {
    /// 1.
    const ONE: Self;
}
impl Float for f32 {
    const ONE: Self = 1.0;
}
impl Float for f64 {
    const ONE: Self = 1.0;
}

/// A new row-major m×n matrix `lhs·rhs`, written by the gemm without zero-filling it first.
pub fn matmul_new<T: Float>(
    (m, n, k): (usize, usize, usize),
    lhs: &[T],
    lhs_strides: (isize, isize),
    rhs: &[T],
    rhs_strides: (isize, isize),
    parallel: bool,
) -> Vec<T> {
    check_operands((m, n, k), lhs, lhs_strides, rhs, rhs_strides);
    record(GemmCall { m, n, k, parallel });
    let mut dst = Vec::with_capacity(m * n);
    let out = dst.spare_capacity_mut()[..m * n].as_mut_ptr().cast::<T>();
    // SAFETY: the operands lie inside their slices (checked); the destination is the vector's
    // spare capacity of m·n elements (`MaybeUninit<T>` has `T`'s layout) with dense row-major
    // strides: gemm without `accumulate` writes every element and never reads one.
    unsafe { gemm_raw((m, n, k), out, (n as isize, 1), lhs, lhs_strides, rhs, rhs_strides, false, parallel) };
    // SAFETY: the gemm above initialised all m·n elements.
    unsafe { dst.set_len(m * n) };
    dst
}

/// Number of elements a rows×cols matrix with these (positive) strides spans, minus one.
fn span(rows: usize, cols: usize, rs: isize, cs: isize) -> usize {
    (rows - 1) * rs as usize + (cols - 1) * cs as usize
}

fn check_operands<T>((m, n, k): (usize, usize, usize), lhs: &[T], ls: (isize, isize), rhs: &[T], rs: (isize, isize)) {
    assert!(m > 0 && n > 0 && k > 0, "gemm: empty matrix product");
    assert!(lhs.len() > span(m, k, ls.0, ls.1), "gemm: left buffer too small");
    assert!(rhs.len() > span(k, n, rs.0, rs.1), "gemm: right buffer too small");
}

/// dst(m×n) = lhs(m×k)·rhs(k×n) (+ dst when `accumulate`), with explicit row/column strides;
/// `parallel` splits the product over the rayon pool (else one thread).
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Float>(
    mnk: (usize, usize, usize),
    dst: &mut [T],
    dst_strides: (isize, isize),
    lhs: &[T],
    lhs_strides: (isize, isize),
    rhs: &[T],
    rhs_strides: (isize, isize),
    accumulate: bool,
    parallel: bool,
) {
    record(GemmCall { m: mnk.0, n: mnk.1, k: mnk.2, parallel });
    matmul_uncounted(mnk, (dst, dst_strides), (lhs, lhs_strides), (rhs, rhs_strides), accumulate, parallel)
}

/// [`matmul`] without counting it in the census: for kernels that record the products their work
/// stands for instead (Winograd's convolution counts the im2col products). Each operand with its
/// row and column strides.
pub fn matmul_uncounted<T: Float>(
    mnk: (usize, usize, usize),
    (dst, dst_strides): (&mut [T], (isize, isize)),
    (lhs, lhs_strides): (&[T], (isize, isize)),
    (rhs, rhs_strides): (&[T], (isize, isize)),
    accumulate: bool,
    parallel: bool,
) {
    check_operands(mnk, lhs, lhs_strides, rhs, rhs_strides);
    assert!(dst.len() > span(mnk.0, mnk.1, dst_strides.0, dst_strides.1), "gemm: output buffer too small");
    // SAFETY: the asserts above check that each strided matrix lies inside its slice; gemm only
    // reads lhs and rhs and writes dst, which does not alias them (distinct borrows).
    unsafe { gemm_raw(mnk, dst.as_mut_ptr(), dst_strides, lhs, lhs_strides, rhs, rhs_strides, accumulate, parallel) }
}

/// The gemm call behind [`matmul`] and [`matmul_new`].
///
/// # Safety
/// The operands must lie inside their slices, `dst` must point to a writable m×n matrix with
/// these strides that aliases neither operand, and be initialised when `accumulate` is set.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    (dst_rs, dst_cs): (isize, isize),
    lhs: &[T],
    (lhs_rs, lhs_cs): (isize, isize),
    rhs: &[T],
    (rhs_rs, rhs_cs): (isize, isize),
    accumulate: bool,
    parallel: bool,
) {
    // SAFETY: guaranteed by the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_cs,
            dst_rs,
            accumulate,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            T::ONE,
            T::ONE,
            false,
            false,
            false,
            if parallel { gemm::Parallelism::Rayon(rayon::current_num_threads()) } else { gemm::Parallelism::None },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_a_multiple_of_512_bytes_apart_get_one_cache_line_more() {
        assert_eq!(padded_stride::<f32>(1024), 1040);
        assert_eq!(padded_stride::<f32>(128), 144);
        assert_eq!(padded_stride::<f64>(64), 72);
        assert_eq!(padded_stride::<f32>(1056), 1056);
        assert_eq!(padded_stride::<f32>(100), 100);
        // The padded product equals the dense one.
        let (m, n, k) = (3, 128, 5);
        let lhs: Vec<f64> = (0..m * k).map(|i| i as f64 * 0.5 - 2.0).collect();
        let rhs: Vec<f64> = (0..k * n).map(|i| (i % 11) as f64 - 5.0).collect();
        let dense = matmul_new((m, n, k), &lhs, (k as isize, 1), &rhs, (n as isize, 1), false);
        let ld = padded_stride::<f64>(n);
        let mut padded = vec![0f64; m * ld];
        matmul((m, n, k), &mut padded, (ld as isize, 1), &lhs, (k as isize, 1), &rhs, (n as isize, 1), false, false);
        for i in 0..m {
            assert_eq!(&padded[i * ld..i * ld + n], &dense[i * n..(i + 1) * n]);
        }
    }
}

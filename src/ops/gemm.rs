//! Matrix products on CPU slices through the `gemm` crate (the kernels candle's matmul uses), with
//! explicit strides so transposed operands need no copy.

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

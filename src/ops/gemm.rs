//! Matrix products on CPU slices through the `gemm` crate (the kernels candle's matmul uses), with
//! explicit strides so transposed operands need no copy.

/// Element types the gemm path handles.
pub trait Float: Copy + Default + Send + Sync + std::ops::AddAssign + 'static {
    /// 1.
    const ONE: Self;
}
impl Float for f32 {
    const ONE: Self = 1.0;
}
impl Float for f64 {
    const ONE: Self = 1.0;
}

/// dst(m×n) = lhs(m×k)·rhs(k×n) (+ dst when `accumulate`), with explicit row/column strides;
/// `parallel` splits the product over the rayon pool (else one thread).
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Float>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    (dst_rs, dst_cs): (isize, isize),
    lhs: &[T],
    (lhs_rs, lhs_cs): (isize, isize),
    rhs: &[T],
    (rhs_rs, rhs_cs): (isize, isize),
    accumulate: bool,
    parallel: bool,
) {
    // Number of elements a rows×cols matrix with these (positive) strides spans.
    let span = |rows: usize, cols: usize, rs: isize, cs: isize| (rows - 1) * rs as usize + (cols - 1) * cs as usize;
    assert!(m > 0 && n > 0 && k > 0, "gemm: empty matrix product");
    assert!(dst.len() > span(m, n, dst_rs, dst_cs), "gemm: output buffer too small");
    assert!(lhs.len() > span(m, k, lhs_rs, lhs_cs), "gemm: left buffer too small");
    assert!(rhs.len() > span(k, n, rhs_rs, rhs_cs), "gemm: right buffer too small");
    // SAFETY: the asserts above check that each strided matrix lies inside its slice; gemm only
    // reads lhs and rhs and writes dst, which does not alias them (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
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

//! Shared plumbing of the CPU custom ops: the one place that decides between the fused ops and
//! candle's elementary ops, the block sizes of their parallel passes, and typed views of candle's
//! CPU storage.

use candle_core::{CpuStorage, DType, Layout, Result, Tensor};
use std::sync::OnceLock;

/// Elements per parallel task of the element-wise passes.
pub const BLOCK: usize = 1 << 14;

/// Rows per parallel task for rows of `n` elements (about [`BLOCK`] elements).
pub fn rows_per_task(n: usize) -> usize {
    (BLOCK / n.max(1)).max(1)
}

/// Whether this process may use the fused ops at all: not when `CANDLE_GRAD_DO_NOT_DETACH` is set
/// (second-order gradients), since their backward passes are not themselves differentiable.
/// Read once per process, as candle reads that variable once per thread.
pub fn fused_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var_os("CANDLE_GRAD_DO_NOT_DETACH").is_none())
}

/// Whether `x` takes the fused CPU path: f32 on the CPU, and [`fused_enabled`]. Every layer asks
/// this (or [`fused_enabled`] with its own dtype rule); none decides for itself.
pub fn fused_ok(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && fused_enabled()
}

/// The elements of a contiguous f32 storage; `what` names the operand in the error.
pub fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: expected a contiguous f32 tensor"),
    }
}

/// The elements of a contiguous f32 storage, for writing in place.
pub fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{what}: expected a contiguous f32 tensor"),
    }
}

/// The elements of a contiguous CPU storage as `T`; `what` names the operand in the error.
pub fn typed_slice<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("{what}: expected a contiguous tensor"),
    }
}

/// The elements of `t`'s storage as `T`, a contiguous CPU tensor (`storage` and `layout` from
/// `t.storage_and_layout()`, inside a backward pass); `what` names the operand in the error.
pub fn slice_of<'a, T: candle_core::WithDType>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    match storage {
        candle_core::Storage::Cpu(s) => typed_slice(s, layout, what),
        _ => candle_core::bail!("{what}: expected a CPU tensor"),
    }
}

/// `grad` (a backward pass's incoming gradient) as a contiguous f32 tensor.
pub fn grad_f32(grad: &Tensor) -> Result<Tensor> {
    grad.to_dtype(DType::F32)?.contiguous()
}

/// Whether the comparison switch `var` (`SAMHOST_FUSED_BLOCK`, `SAMHOST_WINOGRAD`, ...) leaves its
/// kernel on: unset, or set to anything but `0`. Callers read it once per process.
pub fn env_switch(var: &str) -> bool {
    std::env::var(var).map_or(true, |v| v != "0")
}

/// Whether this CPU runs the kernels compiled for AVX2 and FMA (GELU, softmax rows): checked
/// at run time, since the binary targets plain x86-64.
pub fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst += src`, in parallel blocks of [`BLOCK`] elements.
pub fn add_into(dst: &mut [f32], src: &[f32]) {
    use rayon::prelude::*;
    dst.par_chunks_mut(BLOCK)
        .zip(src.par_chunks(BLOCK))
        .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d += s));
}

/// The f32 elements of the tensors an op reads under `guards` (from `storage_and_layout`; an
/// empty slice for an absent optional one), each named by `names` in errors.
pub fn named_slices<'a, G: std::ops::Deref<Target = candle_core::Storage>>(
    guards: &'a [Option<(G, &Layout)>],
    names: &[&str],
) -> Result<Vec<&'a [f32]>> {
    guards
        .iter()
        .zip(names)
        .map(|(g, what)| match g {
            Some((s, l)) => slice_of::<f32>(s, l, what),
            None => Ok(&[][..]),
        })
        .collect()
}

//! Shared plumbing of the CPU custom ops: when the fast path applies, and typed views of candle's
//! CPU storage.

use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

/// Whether `x` takes the fused CPU path: f32 on the CPU, and first-order gradients only
/// (with `CANDLE_GRAD_DO_NOT_DETACH` set the backward passes must themselves be differentiable,
/// which the fused ones are not).
pub fn fused_ok(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && std::env::var_os("CANDLE_GRAD_DO_NOT_DETACH").is_none()
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

/// Runs `f` on the elements of `t`, a contiguous f32 CPU tensor (inside a backward pass, where the
/// operands arrive as tensors rather than storages); `what` names the operand in the error.
pub fn with_f32<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cpu(s) => Ok(f(f32_slice(s, layout, what)?)),
        _ => candle_core::bail!("{what}: expected a CPU tensor"),
    }
}

/// The elements of `t`'s storage as `T`, a contiguous CPU tensor (`storage` and `layout` from
/// `t.storage_and_layout()`); `what` names the operand in the error.
pub fn slice_of<'a, T: candle_core::WithDType>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    match (storage, layout.contiguous_offsets()) {
        (candle_core::Storage::Cpu(s), Some((a, b))) => Ok(&s.as_slice::<T>()?[a..b]),
        _ => candle_core::bail!("{what}: expected a contiguous CPU tensor"),
    }
}

//! bf16/f16 inputs of operations that compute in f32: normalisations, softmax, pooled means (as
//! PyTorch's autocast does), and the CPU kernels, which exist for f32 only.

use candle_core::{DType, Result, Tensor};

/// Whether `x` is bf16 or f16.
pub fn is_half(x: &Tensor) -> bool {
    matches!(x.dtype(), DType::BF16 | DType::F16)
}

/// `f` applied to `x` widened to f32, its result rounded back to `x`'s type (gradients flow
/// through both casts).
pub fn in_f32(x: &Tensor, f: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    f(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype())
}

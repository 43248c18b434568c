//! [`Precision`]: the floating-point type a model computes in. Parameters, gradients and optimizer
//! state stay f32 whatever it is ("master weights"): in bf16 each layer casts its f32 weights to
//! the activations' type where it uses them, so the gradient arrives back in f32.
//!
//! float16 is refused: its range (smallest normal 6e-5) makes small gradients underflow to zero
//! unless the loss is scaled dynamically (PyTorch's GradScaler), which samhost does not do; bf16
//! has f32's range and runs as fast where f16 does.

use anyhow::{bail, Result};
use candle_core::DType;
use std::fmt;
use std::str::FromStr;

/// The type of a model's activations and of its forward and backward arithmetic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Mixed precision: forward and backward in bfloat16, master weights and optimizer in f32.
    Bf16,
}

impl Precision {
    /// The candle type of the activations.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }

    /// The name used on the command line and in scripts: `f32` or `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }

    /// Whether activations are narrower than the f32 master weights.
    pub fn is_mixed(self) -> bool {
        self != Self::F32
    }

    /// `x` in the activations' type (under f32 the tensor itself, no copy).
    pub fn cast(self, x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
        if self.is_mixed() {
            x.to_dtype(self.dtype())
        } else {
            Ok(x.clone())
        }
    }
}

impl FromStr for Precision {
    type Err = anyhow::Error;

    /// Parses `f32`/`float32` or `bf16`/`bfloat16`; `f16` is refused with the reason.
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Self::F32,
            "bf16" | "bfloat16" => Self::Bf16,
            "f16" | "float16" | "fp16" => bail!(
                "dtype `{s}`: float16 training needs dynamic loss scaling (small gradients underflow in f16), \
                 which samhost does not do; use bf16 (f32's range, the same speed on GPUs)"
            ),
            other => bail!("unknown dtype `{other}`: expected f32 or bf16"),
        })
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

//! A batch of examples: images `[N, C, H, W]` (f32) and integer labels `[N]` (u32).

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// A batch that `sam_step`, `train_step` and `evaluate` take.
#[derive(Clone, Debug)]
pub struct Batch {
    /// Inputs, first dimension the batch.
    pub images: Tensor,
    /// Class indices `[N]`, u32.
    pub labels: Tensor,
}

impl Batch {
    /// A batch from tensors; labels are converted to u32 and must match the images' first dim.
    pub fn new(images: Tensor, labels: Tensor) -> Result<Self> {
        if images.rank() == 0 {
            bail!("batch: images must have a batch dimension, got a scalar");
        }
        if labels.rank() != 1 || labels.dim(0)? != images.dim(0)? {
            bail!(
                "batch: labels must be [N] with N = images' first dimension; images {:?}, labels {:?}",
                images.dims(),
                labels.dims()
            );
        }
        let labels = if labels.dtype() == DType::U32 { labels } else { labels.to_dtype(DType::U32)? };
        Ok(Self { images, labels })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.images.dims()[0]
    }

    /// Whether the batch holds no example.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

//! Loss functions. All are built from differentiable candle ops (no fused kernel that would cut
//! the gradient: see ../shared/STACK.md).

use candle_core::{DType, Result, Tensor, D};

/// The loss a training step minimises.
pub enum LossFn<'a> {
    /// Mean cross-entropy over the batch, with label smoothing `ε` in [0, 1): the target is
    /// `(1-ε)·onehot + ε/K`, as PyTorch's `CrossEntropyLoss(label_smoothing=ε)`.
    CrossEntropy {
        /// The smoothing `ε`.
        label_smoothing: f64,
    },
    /// A loss computed by the caller from `(logits, labels)`; must return a scalar tensor.
    Custom(&'a dyn Fn(&Tensor, &Tensor) -> anyhow::Result<Tensor>),
}

impl Default for LossFn<'_> {
    fn default() -> Self {
        LossFn::CrossEntropy { label_smoothing: 0.0 }
    }
}

impl LossFn<'_> {
    /// The scalar loss of `logits` against `labels`.
    pub fn compute(&self, logits: &Tensor, labels: &Tensor) -> anyhow::Result<Tensor> {
        let loss = match self {
            LossFn::CrossEntropy { label_smoothing } => cross_entropy(logits, labels, *label_smoothing)?,
            LossFn::Custom(f) => f(logits, labels)?,
        };
        if loss.elem_count() != 1 {
            anyhow::bail!("the loss must be a scalar tensor, got shape {:?}", loss.dims());
        }
        Ok(loss.flatten_all()?.squeeze(0)?)
    }
}

/// `log_softmax` along the last dimension from elementary ops (differentiable).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    shifted.broadcast_sub(&lse)
}

/// One-hot rows `[N, K]` (in `dtype`) for integer `labels` `[N]`.
pub fn one_hot(labels: &Tensor, classes: usize, dtype: DType) -> Result<Tensor> {
    let ids = Tensor::arange(0u32, classes as u32, labels.device())?.unsqueeze(0)?;
    labels.to_dtype(DType::U32)?.unsqueeze(1)?.broadcast_eq(&ids)?.to_dtype(dtype)
}

/// The largest of integer `labels` (`None` when there are none).
pub fn max_label(labels: &Tensor) -> Result<Option<u32>> {
    if labels.elem_count() == 0 {
        return Ok(None);
    }
    Ok(Some(labels.flatten_all()?.to_dtype(DType::U32)?.max(0)?.to_scalar::<u32>()?))
}

/// Fails when a label is not one of `classes` classes: one-hot targets of such a label are all
/// zero, so it would train with loss 0 instead of failing.
pub fn check_label_range(labels: &Tensor, classes: usize) -> Result<()> {
    if let Some(max) = max_label(labels)? {
        if max as usize >= classes {
            candle_core::bail!(
                "label {max} is outside the {classes} classes of the logits (labels must be 0..{})",
                classes.saturating_sub(1)
            );
        }
    }
    Ok(())
}

/// Mean cross-entropy of `logits` `[N, K]` against integer `labels` `[N]`, with label smoothing.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor, label_smoothing: f64) -> Result<Tensor> {
    let (n, k) = logits.dims2()?;
    if labels.dims() != [n] {
        candle_core::bail!("cross_entropy: logits {:?} and labels {:?} do not match", logits.dims(), labels.dims());
    }
    if !(0.0..1.0).contains(&label_smoothing) {
        candle_core::bail!("label_smoothing must be in [0, 1), got {label_smoothing}");
    }
    check_label_range(labels, k)?;
    let logp = log_softmax(logits)?;
    let target = one_hot(labels, k, logp.dtype())?;
    let target =
        if label_smoothing > 0.0 { target.affine(1.0 - label_smoothing, label_smoothing / k as f64)? } else { target };
    (logp * target)?.sum_all()?.affine(-1.0 / n as f64, 0.0)
}

/// Per-example cross-entropy `[N]` of `logits` `[N, K]` against integer `labels` `[N]`, with
/// label smoothing (its mean is [`cross_entropy`]).
pub fn cross_entropy_per_example(logits: &Tensor, labels: &Tensor, label_smoothing: f64) -> Result<Tensor> {
    let (n, k) = logits.dims2()?;
    if labels.dims() != [n] {
        candle_core::bail!("cross_entropy: logits {:?} and labels {:?} do not match", logits.dims(), labels.dims());
    }
    check_label_range(labels, k)?;
    let logp = log_softmax(logits)?;
    let target = one_hot(labels, k, logp.dtype())?;
    let target =
        if label_smoothing > 0.0 { target.affine(1.0 - label_smoothing, label_smoothing / k as f64)? } else { target };
    (logp * target)?.sum(D::Minus1)?.neg()
}

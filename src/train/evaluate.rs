//! Evaluation of a model over a dataset, with the noisy-label breakdown.

use super::loss::cross_entropy;
use crate::data::loader::epoch_order;
use crate::data::{Batches, Dataset};
use crate::models::Model;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, D};

/// What `evaluate` measured. The noisy-label fields are present only for a dataset with label
/// noise.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EvalStats {
    /// Mean cross-entropy against the dataset's (possibly noisy) labels.
    pub loss: f64,
    /// Accuracy against the dataset's (possibly noisy) labels.
    pub accuracy: f64,
    /// Accuracy against the true labels.
    pub accuracy_clean: Option<f64>,
    /// Accuracy on the examples whose label was not corrupted.
    pub clean_part_accuracy: Option<f64>,
    /// Share of corrupted examples predicted as their wrong label (memorisation).
    pub noisy_part_fit: Option<f64>,
    /// Share of corrupted examples predicted as their true label.
    pub noisy_part_recovered: Option<f64>,
}

/// Evaluates `model` in evaluation mode on every example of `ds`, in order. The dataset's
/// deterministic transforms apply (normalization, resizing); its random ones (crops, flips,
/// cutout: [`Dataset::without_augmentation`]) only when `augment` (then drawn with seed 0,
/// epoch 0), so memorisation measured on a training set sees the images as stored.
pub fn evaluate(model: &Model, ds: &Dataset, batch_size: usize, device: &Device, augment: bool) -> Result<EvalStats> {
    if ds.is_empty() {
        bail!("evaluate: the dataset is empty");
    }
    let max = (0..ds.len()).map(|i| ds.label(i)).max().unwrap_or(0);
    model.check_max_label(max).with_context(|| {
        format!("the dataset's labels go up to {max} ({} examples, {} class names)", ds.len(), ds.classes().len())
    })?;
    let plain;
    let ds = if augment {
        ds
    } else {
        plain = ds.without_augmentation()?;
        &plain
    };
    let order = epoch_order(ds.len(), false, 0, 0);
    let batches = Batches::new(ds.clone(), order, batch_size, false, device.clone())?;
    let (mut loss_sum, mut pos) = (0.0, 0usize);
    let (mut hit, mut hit_clean, mut clean_n, mut clean_hit, mut noisy_n, mut fit, mut recovered) =
        (0usize, 0usize, 0usize, 0usize, 0usize, 0usize, 0usize);
    for batch in batches {
        let batch = batch?;
        let n = batch.len();
        let logits = model.forward_t(&batch.images, false)?;
        loss_sum += cross_entropy(&logits, &batch.labels, 0.0)?.to_dtype(DType::F64)?.to_scalar::<f64>()? * n as f64;
        let pred = logits.argmax(D::Minus1)?.to_device(&Device::Cpu)?.to_vec1::<u32>()?;
        for (j, &p) in pred.iter().enumerate() {
            let (y, c) = (ds.label(pos + j), ds.clean_label(pos + j));
            hit += (p == y) as usize;
            hit_clean += (p == c) as usize;
            if y == c {
                clean_n += 1;
                clean_hit += (p == c) as usize;
            } else {
                noisy_n += 1;
                fit += (p == y) as usize;
                recovered += (p == c) as usize;
            }
        }
        pos += n;
    }
    let total = pos as f64;
    let share = |a: usize, b: usize| if b == 0 { f64::NAN } else { a as f64 / b as f64 };
    let noisy = ds.is_noisy();
    Ok(EvalStats {
        loss: loss_sum / total,
        accuracy: hit as f64 / total,
        accuracy_clean: noisy.then(|| hit_clean as f64 / total),
        clean_part_accuracy: noisy.then(|| share(clean_hit, clean_n)),
        noisy_part_fit: noisy.then(|| share(fit, noisy_n)),
        noisy_part_recovered: noisy.then(|| share(recovered, noisy_n)),
    })
}

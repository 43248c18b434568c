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
    // With several ranks, each evaluates its share of every batch and the counts are summed.
    let order = epoch_order(ds.len(), false, 0, 0);
    let w = crate::dist::world();
    let plan = Batches::new(ds.clone(), order, batch_size, false, device.clone())?.shares(w.rank(), w.size())?;
    // loss sum, examples, hits, clean hits, clean examples, clean-part hits, noisy examples, fit, recovered
    let mut c = [0f64; 9];
    for (k, batch) in plan.clone().into_iter().enumerate() {
        let positions = plan.positions(k);
        if positions.is_empty() {
            continue;
        }
        let batch = batch?;
        let n = batch.len();
        let logits = model.forward_t(&batch.images, false)?;
        c[0] += cross_entropy(&logits, &batch.labels, 0.0)?.to_dtype(DType::F64)?.to_scalar::<f64>()? * n as f64;
        c[1] += n as f64;
        let pred = logits.argmax(D::Minus1)?.to_device(&Device::Cpu)?.to_vec1::<u32>()?;
        for (&p, &i) in pred.iter().zip(positions) {
            let (y, clean) = (ds.label(i), ds.clean_label(i));
            let hit = |a: u32| (p == a) as u8 as f64;
            c[2] += hit(y);
            c[3] += hit(clean);
            if y == clean {
                c[4] += 1.0;
                c[5] += hit(clean);
            } else {
                c[6] += 1.0;
                c[7] += hit(y);
                c[8] += hit(clean);
            }
        }
    }
    crate::dist::sum(&mut c)?;
    let [loss_sum, total, hit, hit_clean, clean_n, clean_hit, noisy_n, fit, recovered] = c;
    let share = |a: f64, b: f64| if b == 0.0 { f64::NAN } else { a / b };
    let noisy = ds.is_noisy();
    Ok(EvalStats {
        loss: loss_sum / total,
        accuracy: hit / total,
        accuracy_clean: noisy.then(|| hit_clean / total),
        clean_part_accuracy: noisy.then(|| share(clean_hit, clean_n)),
        noisy_part_fit: noisy.then(|| share(fit, noisy_n)),
        noisy_part_recovered: noisy.then(|| share(recovered, noisy_n)),
    })
}

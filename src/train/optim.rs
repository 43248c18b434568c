//! The optimizer interface shared by SGD and AdamW.

use anyhow::Result;
use candle_core::{Tensor, Var};
use std::collections::BTreeMap;

/// A first-order optimizer over named parameters. State is keyed by parameter name, so it can be
/// saved in a checkpoint and restored, and parameters may be frozen or unfrozen between steps.
pub trait Optimizer {
    /// Short name ("sgd", "adamw").
    fn name(&self) -> &'static str;

    /// Updates `params` in place from `grads` (same order and shapes).
    fn step(&mut self, params: &[(String, Var)], grads: &[Tensor]) -> Result<()>;

    /// The current learning rate.
    fn learning_rate(&self) -> f64;

    /// Changes the learning rate (schedules call this).
    fn set_learning_rate(&mut self, lr: f64);

    /// The state as named tensors (momentum buffers, moments, step count), for checkpoints.
    fn state(&self) -> Result<BTreeMap<String, Tensor>>;

    /// Restores a state written by [`Optimizer::state`].
    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()>;
}

/// Checks that `params` and `grads` line up.
pub(crate) fn check_aligned(params: &[(String, Var)], grads: &[Tensor]) -> Result<()> {
    if params.len() != grads.len() {
        anyhow::bail!("{} parameters but {} gradients", params.len(), grads.len());
    }
    for ((name, p), g) in params.iter().zip(grads) {
        if p.dims() != g.dims() {
            anyhow::bail!("gradient of {name} has shape {:?}, parameter {:?}", g.dims(), p.dims());
        }
    }
    Ok(())
}

/// Reads a scalar step counter stored as a one-element tensor.
pub(crate) fn read_count(state: &BTreeMap<String, Tensor>, key: &str) -> Result<u64> {
    match state.get(key) {
        Some(t) => Ok(t.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?[0] as u64),
        None => Ok(0),
    }
}

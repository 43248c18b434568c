//! The optimizer interface shared by SGD and AdamW.

use super::sam_state::SamState;
use super::tensor_set::TensorSet;
use crate::models::Model;
use anyhow::{bail, Context, Result};
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

    /// The SAM family's state kept with this optimizer (saved and restored with its state), if
    /// it keeps one; stateful variants (LookSAM, F-SAM, `every`, GSAM's rho schedule) need it.
    fn sam_state(&mut self) -> Option<&mut SamState> {
        None
    }

    /// The per-tensor learning-rate multipliers and weight decay, if the optimizer keeps them.
    fn groups(&self) -> Option<&super::param_groups::ParamGroups> {
        None
    }

    /// One step of `model`'s trainable parameters with the gradient `g`, matched by name: a
    /// trainable parameter missing from `g` is left alone this step (as PyTorch skips a
    /// parameter whose `.grad` is None); a name in `g` that is not a trainable parameter of the
    /// model is an error, and so is a shape that differs.
    fn step_set(&mut self, model: &Model, g: &TensorSet) -> Result<()> {
        let trainable = model.params().trainable();
        for name in g.names() {
            if !trainable.iter().any(|(n, _)| *n == name) {
                match model.params().get(&name) {
                    Some(_) => bail!("step: `{name}` is not trainable (frozen, or a buffer)"),
                    None => bail!("step: the model has no parameter `{name}`"),
                }
            }
        }
        let (params, grads): (Vec<(String, Var)>, Vec<Tensor>) =
            trainable.into_iter().filter_map(|(n, v)| g.get(&n).cloned().map(|t| ((n, v), t))).unzip();
        if params.is_empty() {
            bail!("step: the gradient holds none of the model's trainable parameters");
        }
        self.step(&params, &grads)
    }
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
        Some(t) => {
            let v = t.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
            let x = *v.first().with_context(|| format!("optimizer state `{key}`: an empty tensor"))?;
            if !(x >= 0.0 && x.is_finite()) {
                bail!("optimizer state `{key}`: {x} is not a step count");
            }
            Ok(x as u64)
        }
        None => Ok(0),
    }
}

/// Reads a scalar (the saved learning rate) stored as a one-element tensor, if present.
pub(crate) fn read_scalar(state: &BTreeMap<String, Tensor>, key: &str) -> Result<Option<f64>> {
    match state.get(key) {
        None => Ok(None),
        Some(t) => {
            let v = t.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
            let x = *v.first().with_context(|| format!("optimizer state `{key}`: an empty tensor"))?;
            if !(x >= 0.0 && x.is_finite()) {
                bail!("optimizer state `{key}`: {x} is not a learning rate");
            }
            Ok(Some(x))
        }
    }
}

/// Checks an optimizer state (as [`Optimizer::state`] writes it) against `model`: every
/// per-parameter tensor (`momentum.*`, `exp_avg.*`, `exp_avg_sq.*`, the SAM family's `sam.*/*`)
/// must name a parameter of the model and have its shape. The error names the tensor.
pub fn check_state_matches(state: &BTreeMap<String, Tensor>, model: &Model) -> Result<()> {
    for (key, t) in state {
        let name = ["momentum.", "exp_avg_sq.", "exp_avg."].iter().find_map(|p| key.strip_prefix(p)).or_else(|| {
            key.strip_prefix("sam.").and_then(|r| r.split_once('/')).filter(|(b, _)| *b != "scalar").map(|(_, n)| n)
        });
        let Some(name) = name else { continue };
        match model.params().get(name) {
            None => bail!("optimizer state `{key}`: the model has no parameter `{name}`"),
            Some(v) if v.dims() != t.dims() => {
                bail!("optimizer state `{key}` has shape {:?}, the parameter `{name}` {:?}", t.dims(), v.dims())
            }
            Some(_) => {}
        }
    }
    Ok(())
}

//! The parameters of a model: trainable weights, frozen weights and buffers (BatchNorm running
//! statistics), stored in a candle [`VarMap`] under Hugging Face tensor names.

use crate::fsutil::write_atomic;
use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Name suffixes of tensors that are state, not parameters: they take no gradient, are never
/// perturbed by SAM nor stepped by an optimizer, but are saved with the model.
pub const BUFFER_SUFFIXES: [&str; 3] = ["running_mean", "running_var", "num_batches_tracked"];

/// Whether the tensor called `name` is a buffer (see [`BUFFER_SUFFIXES`]).
pub fn is_buffer(name: &str) -> bool {
    BUFFER_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// A model's named tensors. Cloning shares the same variables and the same frozen set.
#[derive(Clone)]
pub struct Params {
    varmap: VarMap,
    frozen: Arc<Mutex<BTreeSet<String>>>,
}

impl Default for Params {
    fn default() -> Self {
        Self::new(VarMap::new())
    }
}

impl Params {
    /// Wraps a `VarMap` filled by a model constructor.
    pub fn new(varmap: VarMap) -> Self {
        Self { varmap, frozen: Arc::new(Mutex::new(BTreeSet::new())) }
    }

    /// The underlying variable map.
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// Every tensor, buffers included, sorted by name.
    pub fn all(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().unwrap_or_else(|p| p.into_inner());
        let sorted: BTreeMap<&String, &Var> = data.iter().collect();
        sorted.into_iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn frozen_set(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.frozen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The parameters that take gradients and get updated: not buffers, not frozen; sorted by name.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        let frozen = self.frozen_set();
        self.all().into_iter().filter(|(n, _)| !is_buffer(n) && !frozen.contains(n)).collect()
    }

    /// The buffers (BatchNorm running statistics), sorted by name.
    pub fn buffers(&self) -> Vec<(String, Var)> {
        self.all().into_iter().filter(|(n, _)| is_buffer(n)).collect()
    }

    /// Freezes every parameter whose name starts with `prefix`; returns how many were matched.
    pub fn freeze(&self, prefix: &str) -> usize {
        let names: Vec<String> =
            self.all().into_iter().map(|(n, _)| n).filter(|n| n.starts_with(prefix) && !is_buffer(n)).collect();
        let mut frozen = self.frozen_set();
        for n in &names {
            frozen.insert(n.clone());
        }
        names.len()
    }

    /// Unfreezes every parameter whose name starts with `prefix`; returns how many were matched.
    pub fn unfreeze(&self, prefix: &str) -> usize {
        let mut frozen = self.frozen_set();
        let before = frozen.len();
        frozen.retain(|n| !n.starts_with(prefix));
        before - frozen.len()
    }

    /// Number of scalar parameters, buffers excluded.
    pub fn num_parameters(&self) -> usize {
        self.all().iter().filter(|(n, _)| !is_buffer(n)).map(|(_, v)| v.elem_count()).sum()
    }

    /// Number of trainable scalar parameters.
    pub fn num_trainable(&self) -> usize {
        self.trainable().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The tensor called `name`, if there is one.
    pub fn get(&self, name: &str) -> Option<Var> {
        self.varmap.data().lock().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// Copies of the current values of every tensor, by name.
    pub fn snapshot(&self) -> Result<HashMap<String, Tensor>> {
        self.all().into_iter().map(|(n, v)| Ok((n, v.as_tensor().copy()?))).collect()
    }

    /// Sets tensors from `tensors` by name. Every tensor of the model must be present with the
    /// same shape unless `partial` is true; dtypes are converted. Unknown names are errors.
    pub fn assign(&self, tensors: &HashMap<String, Tensor>, partial: bool, source: &str) -> Result<()> {
        let all = self.all();
        let known: BTreeSet<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
        if let Some(extra) = tensors.keys().find(|k| !known.contains(k.as_str())) {
            bail!("{source}: tensor `{extra}` is not a parameter of this model");
        }
        for (name, var) in &all {
            match tensors.get(name) {
                Some(t) => {
                    if t.dims() != var.dims() {
                        bail!("{source}: tensor `{name}` has shape {:?}, the model expects {:?}", t.dims(), var.dims());
                    }
                    let t = t.to_dtype(var.dtype())?.to_device(var.device())?;
                    var.set(&t)?;
                }
                None if partial => {}
                None => bail!("{source}: tensor `{name}` is missing"),
            }
        }
        Ok(())
    }

    /// Writes every tensor (buffers included) to a safetensors file, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let tensors: BTreeMap<String, Tensor> =
            self.all().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
        save_safetensors(path, &tensors)
    }

    /// Restores every tensor from a safetensors file written by [`Params::save`].
    pub fn load(&self, path: &Path) -> Result<()> {
        let tensors = load_safetensors(path)?;
        self.assign(&tensors, false, &path.display().to_string())
    }
}

/// Writes named tensors to a safetensors file, atomically.
pub fn save_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    write_atomic(path, |tmp| {
        let owned: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.to_device(&candle_core::Device::Cpu)?.contiguous()?)))
            .collect::<Result<_>>()?;
        candle_core::safetensors::save(&owned.into_iter().collect::<HashMap<_, _>>(), tmp)
            .with_context(|| format!("{}: cannot write safetensors", path.display()))
    })
}

/// Reads every tensor of a safetensors file (on the CPU).
pub fn load_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    if !path.exists() {
        bail!("{}: no such file", path.display());
    }
    if path.extension().is_some_and(|e| e == "bin" || e == "pt" || e == "pth") {
        bail!(
            "{}: PyTorch pickle checkpoints are never read (they can run code); convert it to safetensors",
            path.display()
        );
    }
    candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .with_context(|| format!("{}: not a readable safetensors file", path.display()))
}

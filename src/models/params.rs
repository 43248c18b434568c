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

    /// Copies of the buffers (BatchNorm running statistics), to put back with
    /// [`Params::restore_buffers`].
    pub fn save_buffers(&self) -> Result<Vec<(Var, Tensor)>> {
        self.buffers().into_iter().map(|(_, v)| Ok((v.clone(), v.as_tensor().copy()?))).collect()
    }

    /// Puts back buffers saved by [`Params::save_buffers`].
    pub fn restore_buffers(&self, saved: &[(Var, Tensor)]) -> Result<()> {
        for (v, t) in saved {
            v.set(t)?;
        }
        Ok(())
    }

    /// Whether `name` is a normalization-layer parameter: the weight or bias of a BatchNorm
    /// (a module with `running_mean`) or of a layer norm (a module whose name contains `norm`,
    /// or is `ln`/`ln_*`), as SAM-ON (`perturb: "norm"`) picks them.
    pub fn is_norm_parameter(&self, name: &str) -> bool {
        let Some((module, leaf)) = name.rsplit_once('.') else { return false };
        if leaf != "weight" && leaf != "bias" {
            return false;
        }
        let last = module.rsplit('.').next().unwrap_or(module).to_ascii_lowercase();
        self.get(&format!("{module}.running_mean")).is_some()
            || last.contains("norm")
            || last == "ln"
            || last.starts_with("ln_")
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
    /// same shape unless `partial` is true; dtypes are converted. Unknown names are errors, except
    /// PyTorch's `num_batches_tracked`, which is skipped.
    pub fn assign(&self, tensors: &HashMap<String, Tensor>, partial: bool, source: &str) -> Result<()> {
        let all = self.all();
        let known: BTreeSet<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
        // PyTorch's BatchNorm counter (`num_batches_tracked`) is read only with momentum=None;
        // a state dict that has one loads into a model that keeps none.
        let extra = tensors.keys().find(|k| !known.contains(k.as_str()) && !k.ends_with(".num_batches_tracked"));
        if let Some(extra) = extra {
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

/// A tensor's bytes on the host, in the form the safetensors writer takes.
struct HostTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl HostTensor {
    /// Copies `t` to the host; f16 and bf16 are widened to f32.
    fn new(t: &Tensor) -> Result<Self> {
        use candle_core::DType;
        let flat = t.to_device(&candle_core::Device::Cpu)?.flatten_all()?;
        let (dtype, bytes): (safetensors::Dtype, Vec<u8>) = match t.dtype() {
            DType::F64 => {
                (safetensors::Dtype::F64, flat.to_vec1::<f64>()?.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            DType::U8 => (safetensors::Dtype::U8, flat.to_vec1::<u8>()?),
            DType::U32 => {
                (safetensors::Dtype::U32, flat.to_vec1::<u32>()?.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            DType::I64 => {
                (safetensors::Dtype::I64, flat.to_vec1::<i64>()?.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            _ => (
                safetensors::Dtype::F32,
                flat.to_dtype(DType::F32)?.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
        };
        Ok(Self { dtype, shape: t.dims().to_vec(), bytes })
    }
}

impl safetensors::View for &HostTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Writes named tensors to a safetensors file, atomically, with the `{"format": "pt"}`
/// metadata that Python's transformers expects of a checkpoint.
pub fn save_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let host: BTreeMap<&String, HostTensor> =
        tensors.iter().map(|(k, v)| Ok((k, HostTensor::new(v)?))).collect::<Result<_>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_atomic(path, |tmp| {
        safetensors::tensor::serialize_to_file(host.iter().map(|(k, v)| (k.as_str(), v)), Some(metadata), tmp)
            .with_context(|| format!("{}: cannot write safetensors", path.display()))?;
        // The writer creates its file private (0600); a checkpoint is readable like any output.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o644));
        }
        Ok(())
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

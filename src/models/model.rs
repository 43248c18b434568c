//! [`Model`]: an architecture ([`Network`]) with its parameters and its train/eval mode.

use super::params::Params;
use super::precision::Precision;
use super::trunk_cache::{TrunkCache, TrunkCacheScope};
use crate::rng::{HostRng, RngState};
use candle_core::{DType, Result, Tensor, Var};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

/// An architecture: the forward computation over parameters held in a [`Params`].
pub trait Network: Send + Sync {
    /// The logits for a batch `x`; `train` selects training behaviour (BatchNorm batch statistics
    /// and running-statistic updates, dropout). By default the head over the trunk's features
    /// ([`Network::features_t`], [`Network::head_t`]); networks not split so compute it here.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        match self.features_t(x, train)? {
            Some(features) => self.head_t(&features),
            None => candle_core::bail!("this network defines neither forward_t nor features_t"),
        }
    }

    /// The architecture's configuration as JSON (Hugging Face field names where they exist), so a
    /// saved model can be rebuilt.
    fn config(&self) -> serde_json::Value;

    /// The generator every dropout layer of the network draws its masks from (`None` without
    /// dropout).
    fn dropout_rng(&self) -> Option<HostRng> {
        None
    }

    /// The input of the classification head for a batch `x` (the trunk's output: everything the
    /// network computes before its last linear layer, whose parameters [`Model::head`] names), for
    /// networks split so; `None` for others.
    fn features_t(&self, x: &Tensor, train: bool) -> Result<Option<Tensor>> {
        let _ = (x, train);
        Ok(None)
    }

    /// The classification head applied to the output of [`Network::features_t`].
    fn head_t(&self, features: &Tensor) -> Result<Tensor> {
        let _ = features;
        candle_core::bail!("this network has no separate classification head")
    }
}

/// A model: a network, its parameters, whether it is in training mode and the precision it
/// computes in. Cloning gives another handle to the same model.
#[derive(Clone)]
pub struct Model {
    net: Arc<dyn Network>,
    params: Params,
    training: Arc<AtomicBool>,
    precision: Arc<AtomicU8>,
    /// The weights from before [`Model::perturb`], by name, until [`Model::restore`].
    saved: Arc<Mutex<BTreeMap<String, (Var, Tensor)>>>,
    /// The dropout-mask generator and where the last gradient at unperturbed weights started
    /// drawing from it (see [`Model::begin_gradient`]).
    dropout: Option<(HostRng, Arc<Mutex<Option<RngState>>>)>,
    /// The classification head: its tensor-name prefix and its number of classes.
    head: Option<(String, usize)>,
    /// The checkpoint's image preprocessing (`preprocessor_config.json`), if it had one.
    preprocess: Option<Arc<super::preprocess::Preprocessing>>,
    /// The trunk outputs kept while a step reuses them ([`Model::reuse_trunk`]).
    trunk_cache: Arc<Mutex<Option<TrunkCache>>>,
}

const PRECISIONS: [Precision; 2] = [Precision::F32, Precision::Bf16];

impl Model {
    /// A model in training mode, computing in f32.
    pub fn new(net: Arc<dyn Network>, params: Params) -> Self {
        let dropout = net.dropout_rng().map(|r| (r, Arc::new(Mutex::new(None))));
        let head = super::registry::ArchConfig::parse(&net.config(), false)
            .ok()
            .and_then(|c| Some((c.head_prefix(), c.num_classes()?)));
        Self {
            dropout,
            head,
            preprocess: None,
            net,
            params,
            training: Arc::new(AtomicBool::new(true)),
            precision: Arc::new(AtomicU8::new(0)),
            saved: Arc::new(Mutex::new(BTreeMap::new())),
            trunk_cache: Arc::new(Mutex::new(None)),
        }
    }

    /// The precision of the forward and backward passes (parameters stay f32).
    pub fn precision(&self) -> Precision {
        PRECISIONS.get(self.precision.load(Ordering::Relaxed) as usize).copied().unwrap_or_default()
    }

    /// Sets the precision of the forward and backward passes: with bf16 the input is cast
    /// to it, every layer casts its f32 weights at use, and the logits come back as f32 (so losses
    /// and metrics are computed in f32).
    pub fn set_precision(&self, precision: Precision) {
        let index = PRECISIONS.iter().position(|&p| p == precision).unwrap_or(0);
        self.precision.store(index as u8, Ordering::Relaxed)
    }

    /// The parameters (shared with this model).
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The architecture.
    pub fn network(&self) -> &dyn Network {
        self.net.as_ref()
    }

    /// Whether the model is in training mode.
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// Switches between training and evaluation mode.
    pub fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed)
    }

    /// The model with the image preprocessing of its checkpoint.
    pub fn with_preprocessing(mut self, p: super::preprocess::Preprocessing) -> Self {
        self.preprocess = Some(Arc::new(p));
        self
    }

    /// The checkpoint's image preprocessing, if it had one.
    pub fn preprocessing(&self) -> Option<&super::preprocess::Preprocessing> {
        self.preprocess.as_deref()
    }

    /// The input image size `[H, W]` and channels from the configuration (`image_size`,
    /// `num_channels`; a cnn's `input`), if the architecture fixes them.
    pub fn input_size(&self) -> Option<([usize; 2], usize)> {
        let cfg = self.net.config();
        let channels = cfg.get("num_channels").and_then(serde_json::Value::as_u64).unwrap_or(3) as usize;
        let size = match cfg.get("image_size")? {
            serde_json::Value::Number(n) => {
                let s = n.as_u64()? as usize;
                [s, s]
            }
            serde_json::Value::Array(a) if a.len() == 2 => [a[0].as_u64()? as usize, a[1].as_u64()? as usize],
            _ => return None,
        };
        Some((size, channels))
    }

    /// The classification head: its tensor-name prefix (e.g. `classifier.`) and its number of
    /// classes, for architectures that have one.
    pub fn head(&self) -> Option<(&str, usize)> {
        self.head.as_ref().map(|(p, k)| (p.as_str(), *k))
    }

    /// Fails when a label in `labels` is not a class of the head, naming the label and the head
    /// (such a label would otherwise train with loss 0: its one-hot target is all zeros).
    pub fn check_labels(&self, labels: &Tensor) -> anyhow::Result<()> {
        match crate::train::loss::max_label(labels)? {
            Some(max) => self.check_max_label(max),
            None => Ok(()),
        }
    }

    /// Fails when `max`, the largest label of some data, is not a class of the head (see
    /// [`Model::check_labels`]).
    pub fn check_max_label(&self, max: u32) -> anyhow::Result<()> {
        let Some((prefix, k)) = self.head() else { return Ok(()) };
        if max as usize >= k {
            let need = max + 1;
            anyhow::bail!(
                "label {max} is outside the model's head `{}` of {k} classes: the labels need at least {need} \
                 classes; build the model with {need} classes (from_pretrained(repo, #{{ num_classes: {need} }}) \
                 replaces the head)",
                prefix.trim_end_matches('.'),
            );
        }
        Ok(())
    }

    /// Where the dropout-mask generator stands (`None` for a model without dropout), for
    /// checkpoints.
    pub fn dropout_state(&self) -> Option<RngState> {
        self.dropout.as_ref().map(|(rng, _)| rng.state())
    }

    /// Moves the dropout-mask generator to a position saved by [`Model::dropout_state`] (nothing
    /// to do for a model without dropout).
    pub fn set_dropout_state(&self, state: &RngState) -> anyhow::Result<()> {
        match &self.dropout {
            Some((rng, mark)) => {
                *mark.lock().unwrap_or_else(|p| p.into_inner()) = None;
                rng.restore(state)
            }
            None => Ok(()),
        }
    }

    /// Called at the start of every gradient evaluation (one batch, or all micro-batches of one
    /// batch): at unperturbed weights it marks where the dropout masks start; at perturbed
    /// weights ([`Model::perturb`]) it rewinds to that mark, so the perturbed pass of a SAM step
    /// sees the first pass's masks: the sharpness of one sub-network, and `rho: 0` is the plain
    /// step exactly. A step then draws as many masks as a plain step.
    pub fn begin_gradient(&self) -> anyhow::Result<()> {
        let Some((rng, mark)) = &self.dropout else { return Ok(()) };
        let mut mark = mark.lock().unwrap_or_else(|p| p.into_inner());
        if self.is_perturbed() {
            if let Some(m) = mark.as_ref() {
                rng.restore(m)?;
            }
        } else {
            *mark = Some(rng.state());
        }
        Ok(())
    }

    /// Forward pass in the model's current mode.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, self.is_training())
    }

    /// Forward pass in an explicit mode, in the model's precision; the logits are f32. Inside
    /// [`Model::reuse_trunk`]'s scope a batch the trunk has already seen in this mode goes
    /// through the head alone.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let precision = self.precision();
        let cached = self.trunk_cache_lock().as_ref().map(|c| c.get(x.id(), train));
        let y = match cached {
            None => self.net.forward_t(&precision.cast(x)?, train)?,
            Some(Some((features, rng_after))) => {
                // The trunk drew its dropout masks here before: the generator moves on as if it had.
                if let (Some((rng, _)), Some(state)) = (&self.dropout, rng_after) {
                    rng.restore(&state).map_err(candle_core::Error::wrap)?;
                }
                self.net.head_t(&features)?
            }
            Some(None) => match self.net.features_t(&precision.cast(x)?, train)? {
                Some(features) => {
                    let features = features.detach();
                    if let Some(cache) = self.trunk_cache_lock().as_mut() {
                        cache.insert(x.id(), train, features.clone(), self.dropout_state());
                    }
                    self.net.head_t(&features)?
                }
                None => self.net.forward_t(&precision.cast(x)?, train)?,
            },
        };
        if precision.is_mixed() {
            y.to_dtype(DType::F32)
        } else {
            Ok(y)
        }
    }

    fn trunk_cache_lock(&self) -> std::sync::MutexGuard<'_, Option<TrunkCache>> {
        self.trunk_cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A scope in which the trunk's output for each batch is computed once and reused by later
    /// forward passes over the same batch tensor in the same mode, when every parameter in
    /// `params` (those the passes differentiate and perturb) lies in the classification head: a
    /// linear probe's SAM step then runs the frozen trunk once, not at `w` and again at `w + e`,
    /// for the same result (the trunk's weights are the same in both passes, and its dropout
    /// masks too, [`Model::begin_gradient`]; ESAM's selection pass at `w + e` also sees the first
    /// pass's features). The scope assumes the trunk's weights stay as they are while it lives.
    /// `None` (no reuse) when a parameter of `params` lies outside the head, the model has no
    /// head, or the trunk's output is kept already.
    pub fn reuse_trunk(&self, params: &[(String, Var)]) -> Option<TrunkCacheScope> {
        let (prefix, _) = self.head.as_ref()?;
        if params.is_empty() || !params.iter().all(|(n, _)| n.starts_with(prefix.as_str())) {
            return None;
        }
        TrunkCacheScope::open(&self.trunk_cache)
    }

    /// Moves parameters in place, `w ← w + scale·e` for every named tensor of `e` (any
    /// parameter, frozen ones too; buffers and unknown names are errors), keeping the weights
    /// from before the first perturbation (one copy, written in the same pass on the CPU) so that
    /// [`Model::restore`] gets them back bit-exactly. Perturbing again before a restore adds to
    /// the perturbation and still restores the original weights.
    pub fn perturb(&self, e: &crate::train::TensorSet, scale: f64) -> anyhow::Result<()> {
        use crate::ops::inplace::{applies, axpy, axpy_saving};
        let mut vars = Vec::with_capacity(e.len());
        for (name, t) in e.iter() {
            let var = match self.params.get(name) {
                Some(v) if !super::is_buffer(name) => v,
                Some(_) => anyhow::bail!("perturb: `{name}` is a buffer (running statistics), not a parameter"),
                None => anyhow::bail!("perturb: the model has no parameter `{name}`"),
            };
            if var.dims() != t.dims() {
                anyhow::bail!("perturb: `{name}` has shape {:?}, the perturbation {:?}", var.dims(), t.dims());
            }
            vars.push((name, var, t));
        }
        let mut saved = self.saved.lock().unwrap_or_else(|p| p.into_inner());
        for (name, var, t) in vars {
            let p = var.as_tensor();
            let t = if t.dtype() == p.dtype() { t.clone() } else { t.to_dtype(p.dtype())? };
            let first = !saved.contains_key(name);
            if applies(&[p, &t]) {
                if first {
                    saved.insert(name.clone(), (var.clone(), axpy_saving(p, &t, scale)?));
                } else {
                    axpy(p, &t, scale)?;
                }
                continue;
            }
            let w = p.copy()?;
            var.set(&(&w + t.affine(scale, 0.0)?)?)?;
            if first {
                saved.insert(name.clone(), (var.clone(), w));
            }
        }
        Ok(())
    }

    /// Whether [`Model::perturb`] moved the weights and they were not restored yet.
    pub fn is_perturbed(&self) -> bool {
        !self.saved.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// Puts back the weights saved by [`Model::perturb`], bit-exactly. Fails when the model is
    /// not perturbed.
    pub fn restore(&self) -> anyhow::Result<()> {
        let saved = std::mem::take(&mut *self.saved.lock().unwrap_or_else(|p| p.into_inner()));
        if saved.is_empty() {
            anyhow::bail!("restore: the model is not perturbed (call perturb first)");
        }
        for (_, (var, w)) in saved {
            if crate::ops::inplace::applies(&[var.as_tensor(), &w]) {
                crate::ops::inplace::copy_into(var.as_tensor(), &w)?;
            } else {
                var.set(&w)?;
            }
        }
        Ok(())
    }
}

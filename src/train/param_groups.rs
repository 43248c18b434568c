//! Per-tensor learning rates and weight decay: parameter groups as fine-tuning recipes use them
//! (PyTorch's `param_groups`), layer-wise learning-rate decay for transformers (BEiT, MAE), a
//! learning-rate multiplier for the head, and no weight decay on biases and normalization weights.
//!
//! Every factor is a multiplier of the optimizer's learning rate, so a schedule that changes the
//! rate scales every group together (as PyTorch's schedulers scale each group's initial rate).

use crate::models::Model;
use anyhow::{bail, Result};
use serde::Deserialize;
use std::collections::HashMap;

/// One group: the parameters whose names start with one of `params`, and their settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// Name prefixes of the group's parameters (a string or a list of strings).
    pub params: Prefixes,
    /// The group's learning rate at the start (a multiplier `lr / base lr` is kept, so schedules
    /// scale it); give this or `lr_scale`.
    #[serde(default)]
    pub lr: Option<f64>,
    /// The group's learning rate as a multiplier of the optimizer's.
    #[serde(default)]
    pub lr_scale: Option<f64>,
    /// The group's weight decay (the optimizer's when absent).
    #[serde(default)]
    pub weight_decay: Option<f64>,
}

/// A string or a list of strings.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Prefixes {
    /// One prefix.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Prefixes {
    fn matches(&self, name: &str) -> bool {
        match self {
            Self::One(p) => name.starts_with(p.as_str()),
            Self::Many(ps) => ps.iter().any(|p| name.starts_with(p.as_str())),
        }
    }
}

/// The group options an optimizer takes besides its own.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupOptions {
    /// Parameter groups; the first whose prefixes match a name holds it, the rest keep the
    /// optimizer's settings.
    pub groups: Vec<GroupSpec>,
    /// No weight decay on biases, normalization weights and other 1-D tensors (timm's and the
    /// ViT fine-tuning recipes' convention).
    pub no_decay_bias_norm: bool,
    /// Layer-wise learning-rate decay: a ViT's encoder layer i (of L) gets `layer_decay^(L - i)`
    /// times the rate, the embeddings `layer_decay^(L + 1)`, the final norm and the head 1.
    pub layer_decay: Option<f64>,
    /// A multiplier of the head's learning rate (the model's classification head).
    pub head_lr_scale: Option<f64>,
}

/// The keys of [`GroupOptions`], taken out of an optimizer's option map before its own are read.
pub const GROUP_KEYS: [&str; 4] = ["groups", "no_decay_bias_norm", "layer_decay", "head_lr_scale"];

/// The resolved settings of one tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorHyper {
    /// Its learning rate as a multiplier of the optimizer's.
    pub lr_scale: f64,
    /// Its weight decay.
    pub weight_decay: f64,
}

/// Per-tensor settings by parameter name; a name it does not hold takes the optimizer's.
#[derive(Clone, Debug, Default)]
pub struct ParamGroups {
    per_tensor: HashMap<String, TensorHyper>,
}

/// The encoder layer of a transformer parameter name (`...encoder.layer.N....`, also
/// `...layers.N.` and `...blocks.N.`), or `None`.
fn layer_index(name: &str) -> Option<usize> {
    for key in ["encoder.layer.", "layers.", "blocks."] {
        if let Some(rest) = name.split_once(key).map(|(_, r)| r) {
            if let Some(n) = rest.split('.').next().and_then(|n| n.parse().ok()) {
                return Some(n);
            }
        }
    }
    None
}

impl ParamGroups {
    /// Resolves `opts` against `model`'s parameter names: `base_lr` and `base_wd` are the
    /// optimizer's own settings.
    pub fn resolve(model: &Model, base_lr: f64, base_wd: f64, opts: &GroupOptions) -> Result<Self> {
        let names: Vec<String> =
            model.params().all().into_iter().map(|(n, _)| n).filter(|n| !crate::models::is_buffer(n)).collect();
        for (i, g) in opts.groups.iter().enumerate() {
            if g.lr.is_some() && g.lr_scale.is_some() {
                bail!("groups[{i}]: give lr or lr_scale, not both");
            }
            if g.lr.is_some() && base_lr <= 0.0 {
                bail!("groups[{i}]: a group lr needs the optimizer's lr > 0 (the group keeps lr / base lr)");
            }
            for v in [g.lr, g.lr_scale, g.weight_decay].into_iter().flatten() {
                if !crate::train::is_nonneg(v) {
                    bail!("groups[{i}]: lr, lr_scale and weight_decay must be >= 0, got {v}");
                }
            }
            if !names.iter().any(|n| g.params.matches(n)) {
                bail!("groups[{i}]: no parameter of the model starts with {:?}", g.params);
            }
        }
        let layers = names.iter().filter_map(|n| layer_index(n)).max().map(|m| m + 1);
        if let Some(d) = opts.layer_decay {
            if !(d > 0.0 && d <= 1.0) {
                bail!("layer_decay must be in (0, 1], got {d}");
            }
            if layers.is_none() {
                bail!("layer_decay needs a transformer whose parameters are named `...encoder.layer.N...` (a ViT)");
            }
        }
        if let Some(s) = opts.head_lr_scale {
            if !crate::train::is_nonneg(s) {
                bail!("head_lr_scale must be >= 0, got {s}");
            }
            if model.head().is_none() {
                bail!("head_lr_scale: this model has no classification head samhost knows");
            }
        }
        let head = model.head().map(|(p, _)| p.to_string());
        let mut per_tensor = HashMap::new();
        for name in names {
            let mut h = TensorHyper { lr_scale: 1.0, weight_decay: base_wd };
            if let Some(g) = opts.groups.iter().find(|g| g.params.matches(&name)) {
                h.lr_scale = g.lr_scale.or(g.lr.map(|lr| lr / base_lr)).unwrap_or(1.0);
                h.weight_decay = g.weight_decay.unwrap_or(base_wd);
            }
            if let (Some(d), Some(l)) = (opts.layer_decay, layers) {
                let depth = match layer_index(&name) {
                    Some(i) => l - i,
                    None if name.contains("embeddings") => l + 1,
                    None => 0,
                };
                h.lr_scale *= d.powi(depth as i32);
            }
            if let (Some(s), Some(p)) = (opts.head_lr_scale, &head) {
                if name.starts_with(p.as_str()) {
                    h.lr_scale *= s;
                }
            }
            let one_d = model.params().get(&name).is_some_and(|v| v.rank() <= 1);
            if opts.no_decay_bias_norm && (one_d || name.ends_with(".bias") || model.params().is_norm_parameter(&name))
            {
                h.weight_decay = 0.0;
            }
            per_tensor.insert(name, h);
        }
        Ok(Self { per_tensor })
    }

    /// Whether every tensor takes the optimizer's own settings.
    pub fn is_uniform(&self, base_wd: f64) -> bool {
        self.per_tensor.values().all(|h| h.lr_scale == 1.0 && h.weight_decay == base_wd)
    }

    /// The settings of the tensor called `name` (the optimizer's own when not resolved).
    pub fn get(&self, name: &str, base_wd: f64) -> TensorHyper {
        self.per_tensor.get(name).copied().unwrap_or(TensorHyper { lr_scale: 1.0, weight_decay: base_wd })
    }

    /// Every tensor's settings, by name (for `opt.groups` and tests).
    pub fn iter(&self) -> impl Iterator<Item = (&String, &TensorHyper)> {
        self.per_tensor.iter()
    }
}

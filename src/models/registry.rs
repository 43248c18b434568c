//! From a configuration to a model: the architectures by `model_type`, the named configurations
//! of the repository's `models/` folder, and parameter counts without building.
//!
//! Every configuration is JSON with a `model_type` (`mlp`, `cnn`, `cifar_resnet`, `wide_resnet`,
//! `vit`, `dinov2`, `sequential`) and the architecture's fields (Hugging Face names where one exists: `num_labels`,
//! `num_channels`, and all of `ViTConfig`).

use super::cnn::{Cnn, CnnConfig};
use super::compose::{SequentialConfig, SequentialNet};
use super::dinov2::{Dinov2, Dinov2Config};
use super::init::seeded_var_builder;
use super::mlp::{Mlp, MlpConfig};
use super::resnet::{ResNet, ResNetConfig};
use super::shapes::shape_var_builder;
use super::vit::{Vit, VitConfig};
use super::wide_resnet::{WideResNet, WideResNetConfig};
use super::{is_buffer, Model, Network, Params};
use crate::rng::HostRng;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use candle_nn::{VarBuilder, VarMap};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::Path;
use std::sync::Arc;

/// The configurations shipped in the repository's `models/` folder, by name.
pub const BUILTIN: [(&str, &str); 9] = [
    ("resnet20", include_str!("../../models/resnet20.json")),
    ("resnet32", include_str!("../../models/resnet32.json")),
    ("resnet56", include_str!("../../models/resnet56.json")),
    ("resnet110", include_str!("../../models/resnet110.json")),
    ("wrn-16-8", include_str!("../../models/wrn-16-8.json")),
    ("wrn-28-10", include_str!("../../models/wrn-28-10.json")),
    ("vit-s16", include_str!("../../models/vit-s16.json")),
    ("vit-b16", include_str!("../../models/vit-b16.json")),
    ("cnn", include_str!("../../models/cnn.json")),
];

/// The `model_type`s this registry builds.
pub const MODEL_TYPES: [&str; 7] = ["mlp", "cnn", "cifar_resnet", "wide_resnet", "vit", "dinov2", "sequential"];

/// The `model_type` written for a model defined by a script's forward closure: it cannot be
/// rebuilt from its configuration alone.
pub const SCRIPTED: &str = "scripted";

/// The `model_type` of a configuration, checked to be one this registry builds.
pub fn model_type_of(v: &Value) -> Result<&str> {
    let model_type = match v.get("model_type") {
        Some(Value::String(s)) => s.as_str(),
        Some(other) => bail!("model_type must be a string, got {other}"),
        None => bail!("the config has no model_type (one of {})", MODEL_TYPES.join(", ")),
    };
    if model_type == SCRIPTED {
        bail!(
            "this model was defined by a forward closure in a script (model_type `{SCRIPTED}`): build it with the \
             same script and load the weights with m.load(path)"
        );
    }
    if !MODEL_TYPES.contains(&model_type) {
        bail!("model_type `{model_type}` is not supported (supported: {})", MODEL_TYPES.join(", "));
    }
    Ok(model_type)
}

/// A parsed configuration of one of the supported architectures.
#[derive(Clone, Debug, PartialEq)]
pub enum ArchConfig {
    /// `mlp`
    Mlp(MlpConfig),
    /// `cnn`
    Cnn(CnnConfig),
    /// `cifar_resnet`
    ResNet(ResNetConfig),
    /// `wide_resnet`
    WideResNet(WideResNetConfig),
    /// `vit` (Hugging Face's ViT)
    Vit(VitConfig),
    /// `dinov2` (Hugging Face's DINOv2)
    Dinov2(Dinov2Config),
    /// `sequential` (layers in order, `sequential([...])` in a script)
    Sequential(SequentialConfig),
}

fn parse_fields<T: DeserializeOwned>(model_type: &str, obj: &serde_json::Map<String, Value>) -> Result<T> {
    let mut obj = obj.clone();
    obj.remove("model_type");
    serde_json::from_value(Value::Object(obj)).with_context(|| format!("{model_type} config"))
}

impl ArchConfig {
    /// Parses a configuration, dispatching on its `model_type`. With `strict`, a ViT config may
    /// hold only known fields (scripts); without, unknown Hugging Face fields are kept
    /// (checkpoints). The other architectures always reject unknown fields.
    pub fn from_json(v: &Value, strict: bool) -> Result<Self> {
        let cfg = Self::parse(v, strict)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses as [`ArchConfig::from_json`] without validating (the caller adjusts fields
    /// first, e.g. the head size of a checkpoint without one).
    pub fn parse(v: &Value, strict: bool) -> Result<Self> {
        let obj = v.as_object().context("a model config must be a JSON object (a map)")?;
        let model_type = model_type_of(v)?;
        let cfg = match model_type {
            "mlp" => Self::Mlp(parse_fields(model_type, obj)?),
            "cnn" => Self::Cnn(parse_fields(model_type, obj)?),
            "cifar_resnet" => Self::ResNet(parse_fields(model_type, obj)?),
            "wide_resnet" => Self::WideResNet(parse_fields(model_type, obj)?),
            "sequential" => Self::Sequential(parse_fields(model_type, obj)?),
            "dinov2" => {
                let c: Dinov2Config = parse_fields(model_type, obj)?;
                if strict {
                    c.check_known_fields()?;
                }
                Self::Dinov2(c)
            }
            "vit" => {
                let c: VitConfig = parse_fields(model_type, obj)?;
                if strict {
                    c.check_known_fields()?;
                }
                Self::Vit(c)
            }
            other => bail!("model_type `{other}` is not supported (supported: {})", MODEL_TYPES.join(", ")),
        };
        Ok(cfg)
    }

    /// The `model_type` name.
    pub fn model_type(&self) -> &'static str {
        match self {
            Self::Mlp(_) => "mlp",
            Self::Cnn(_) => "cnn",
            Self::ResNet(_) => "cifar_resnet",
            Self::WideResNet(_) => "wide_resnet",
            Self::Vit(_) => "vit",
            Self::Dinov2(_) => "dinov2",
            Self::Sequential(_) => "sequential",
        }
    }

    /// The configuration as JSON, with its `model_type` (for a ViT, Hugging Face's
    /// `config.json` of a `ViTForImageClassification`).
    pub fn to_json(&self) -> Value {
        let v = match self {
            Self::Mlp(c) => serde_json::to_value(c),
            Self::Cnn(c) => serde_json::to_value(c),
            Self::ResNet(c) => serde_json::to_value(c),
            Self::WideResNet(c) => serde_json::to_value(c),
            Self::Sequential(c) => serde_json::to_value(c),
            Self::Vit(c) => return c.to_hf_json(),
            Self::Dinov2(c) => return c.to_hf_json(),
        };
        let mut obj = match v {
            Ok(Value::Object(m)) => m,
            _ => serde_json::Map::new(),
        };
        obj.insert("model_type".into(), self.model_type().into());
        Value::Object(obj)
    }

    /// Rejects configurations that build nothing.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Mlp(c) => c.validate(),
            Self::Cnn(c) => c.validate(),
            Self::ResNet(c) => c.validate(),
            Self::WideResNet(c) => c.validate(),
            Self::Vit(c) => c.validate(),
            Self::Dinov2(c) => c.validate(),
            Self::Sequential(c) => c.validate(),
        }
    }

    /// The number of classes of the head.
    pub fn num_classes(&self) -> Option<usize> {
        match self {
            Self::Mlp(c) => c.sizes.last().copied(),
            Self::Cnn(c) => Some(c.num_labels),
            Self::ResNet(c) => Some(c.num_labels),
            Self::WideResNet(c) => Some(c.num_labels),
            Self::Vit(c) => c.classes(),
            Self::Dinov2(c) => c.classes(),
            Self::Sequential(c) => c.head().map(|(_, k)| k),
        }
    }

    /// Changes the number of classes of the head.
    pub fn set_num_classes(&mut self, n: usize) {
        match self {
            Self::Mlp(c) => {
                if let Some(last) = c.sizes.last_mut() {
                    *last = n;
                }
            }
            Self::Cnn(c) => c.num_labels = n,
            Self::ResNet(c) => c.num_labels = n,
            Self::WideResNet(c) => c.num_labels = n,
            Self::Vit(c) => c.set_classes(n),
            Self::Dinov2(c) => c.set_classes(n),
            Self::Sequential(c) => c.set_num_classes(n),
        }
    }

    /// The name prefix of the classification head's tensors.
    pub fn head_prefix(&self) -> String {
        match self {
            Self::Mlp(c) => c.head_prefix(),
            Self::Cnn(_) | Self::Vit(_) | Self::Dinov2(_) => "classifier.".into(),
            Self::ResNet(_) => "linear.".into(),
            Self::WideResNet(_) => "fc.".into(),
            Self::Sequential(c) => c.head().map(|(p, _)| p).unwrap_or_default(),
        }
    }

    /// The patch grid of a vision transformer (ViT, DINOv2), `None` for other architectures.
    pub fn patch_grid(&self) -> Option<Result<(usize, usize)>> {
        match self {
            Self::Vit(c) => Some(c.grid()),
            Self::Dinov2(c) => Some(c.grid()),
            _ => None,
        }
    }

    /// Sets a vision transformer's input image size; false for other architectures.
    pub fn set_image_size(&mut self, size: super::vit::Size2) -> bool {
        match self {
            Self::Vit(c) => c.image_size = size,
            Self::Dinov2(c) => c.image_size = size,
            _ => return false,
        }
        true
    }

    /// The name of a vision transformer's position embeddings.
    pub fn position_embeddings_name(&self) -> Option<&'static str> {
        match self {
            Self::Vit(_) => Some("vit.embeddings.position_embeddings"),
            Self::Dinov2(_) => Some("dinov2.embeddings.position_embeddings"),
            _ => None,
        }
    }

    /// Builds the network over variables from `vb`; dropout generators derive from `rng`.
    pub fn build_network(&self, vb: VarBuilder, rng: &HostRng) -> Result<Arc<dyn Network>> {
        Ok(match self {
            Self::Mlp(c) => Arc::new(Mlp::build(c, vb)?),
            Self::Cnn(c) => Arc::new(Cnn::build(c, vb)?),
            Self::ResNet(c) => Arc::new(ResNet::build(c, vb)?),
            Self::WideResNet(c) => Arc::new(WideResNet::build(c, vb, rng)?),
            Self::Vit(c) => Arc::new(Vit::build(c, vb, rng)?),
            Self::Dinov2(c) => Arc::new(Dinov2::build(c, vb, rng)?),
            Self::Sequential(c) => Arc::new(SequentialNet::build(c, vb, rng)?),
        })
    }
}

/// Builds a model with fresh weights drawn from `rng` (the session's seeded generator).
pub fn build_model(cfg: &ArchConfig, rng: &HostRng, device: &Device) -> Result<Model> {
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, rng, device);
    let net = cfg.build_network(vb, rng)?;
    Ok(Model::new(net, Params::new(varmap)))
}

/// The number of scalar parameters (buffers excluded) of the architecture, found without
/// allocating its weights.
pub fn count_parameters(cfg: &ArchConfig) -> Result<usize> {
    let (vb, log) = shape_var_builder(&Device::Cpu);
    // Dropout generators are never drawn from here: any seed will do.
    cfg.build_network(vb, &HostRng::new(0))?;
    let log = log.lock().unwrap_or_else(|p| p.into_inner());
    Ok(log.iter().filter(|(n, _)| !is_buffer(n)).map(|(_, s)| s.iter().product::<usize>()).sum())
}

/// The names of the configurations shipped with samhost.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

/// A configuration by name or path: a `.json` file that exists, else one of [`BUILTIN`] (the
/// repository's `models/` folder, compiled in).
pub fn resolve_config(name_or_file: &str) -> Result<Value> {
    let path = Path::new(name_or_file);
    if path.is_file() {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        return serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()));
    }
    if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name_or_file) {
        return serde_json::from_str(text).with_context(|| format!("built-in config {name_or_file}"));
    }
    if name_or_file.ends_with(".json") {
        bail!("{name_or_file}: no such file");
    }
    bail!(
        "no model config called `{name_or_file}` (built in: {}; or give a path to a .json file)",
        builtin_names().join(", ")
    )
}

/// Merges `overrides` into the object `base` (keys of `overrides` win).
pub fn merge(base: &Value, overrides: &Value) -> Result<Value> {
    let mut out = base.as_object().context("a model config must be a JSON object")?.clone();
    if let Some(o) = overrides.as_object() {
        for (k, v) in o {
            out.insert(k.clone(), v.clone());
        }
    } else if !overrides.is_null() {
        bail!("config overrides must be a map");
    }
    Ok(Value::Object(out))
}

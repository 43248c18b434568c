//! The `Model` script type: architectures, forward, save/load, freezing.

use super::convert::{err, from_json, op, options, shape_of, to_json, to_usize, Res};
use crate::models::registry::{self, ArchConfig};
use crate::models::resnet::{ResNetConfig, Shortcut};
use crate::models::wide_resnet::WideResNetConfig;
use crate::models::{self, Model};
use crate::session::Session;
use candle_core::Tensor;
use rhai::{Array, Dynamic, Engine, ImmutableString, Map, INT};
use serde::Deserialize;
use std::path::Path;
use std::rc::Rc;

/// Options of `mlp(sizes, #{...})`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct MlpOptions {
    init: Option<models::init::InitScheme>,
}

/// Options of `resnet(depth, classes, #{...})`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ResNetOptions {
    shortcut: Option<Shortcut>,
    num_channels: Option<usize>,
}

/// Options of `wide_resnet(depth, width, classes, #{...})`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct WideResNetOptions {
    dropout: Option<f64>,
    num_channels: Option<usize>,
}

/// A script map as a JSON config with `model_type` set (a different one is an error).
fn config_map(what: &str, model_type: &str, map: Map) -> Res<serde_json::Value> {
    let mut json = to_json(&Dynamic::from_map(map))?;
    let obj = json.as_object_mut().ok_or_else(|| err(format!("{what}: expected a map")))?;
    match obj.get("model_type") {
        None => {
            obj.insert("model_type".into(), model_type.into());
        }
        Some(v) if v == model_type => {}
        Some(v) => return Err(err(format!("{what}: model_type is {v}, expected \"{model_type}\""))),
    }
    Ok(json)
}

/// Saves a model: a `.safetensors` path gets the weights only; any other path is a folder that
/// gets `model.safetensors` and `config.json`.
pub fn save_model(m: &Model, path: &str) -> anyhow::Result<()> {
    let p = Path::new(path);
    if p.extension().is_some_and(|e| e == "safetensors") {
        return m.params().save(p);
    }
    if p.is_file() {
        anyhow::bail!("{path}: is a file; give a folder (or a .safetensors path for the weights only)");
    }
    // Weights and config.json are written into a new folder that then replaces `path` in one
    // step, so a reader never sees the weights of one save with the config of another.
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)
        .map_err(|e| anyhow::anyhow!("{}: cannot create the folder: {e}", parent.display()))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", tmp.display()))?;
    let written = (|| {
        // Other files of an existing folder (a preprocessor config, notes) are kept.
        if let Ok(entries) = std::fs::read_dir(p) {
            for e in entries.flatten() {
                let keep = e.file_name() != "model.safetensors" && e.file_name() != "config.json";
                if keep && e.file_type().is_ok_and(|t| t.is_file()) {
                    std::fs::copy(e.path(), tmp.join(e.file_name()))
                        .map_err(|err| anyhow::anyhow!("{}: cannot keep it: {err}", e.path().display()))?;
                } else if keep {
                    anyhow::bail!("{path}: holds the folder {}; save into a folder of files only", e.path().display());
                }
            }
        }
        m.params().save(&tmp.join("model.safetensors"))?;
        let config = serde_json::to_string_pretty(&m.network().config())?;
        crate::fsutil::write_bytes_atomic(&tmp.join("config.json"), config.as_bytes())?;
        if let (Some(pre), Some((size, _))) = (m.preprocessing(), m.input_size()) {
            let text = serde_json::to_string_pretty(&pre.to_json(size))?;
            crate::fsutil::write_bytes_atomic(&tmp.join("preprocessor_config.json"), text.as_bytes())?;
        }
        crate::fsutil::replace_dir(&tmp, p)
    })();
    if written.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    written
}

/// Loads weights saved by [`save_model`] (a file, or a folder holding `model.safetensors`).
pub fn load_model(m: &Model, path: &str) -> anyhow::Result<()> {
    let p = Path::new(path);
    let file = if p.is_dir() { p.join("model.safetensors") } else { p.to_path_buf() };
    m.params().load(&file)
}

/// Registers the model API.
pub fn register(engine: &mut Engine, session: &Rc<Session>) {
    engine.register_type_with_name::<Model>("Model");

    let s = session.clone();
    api!(engine, "mlp", "sizes: Array -> Model",
        "A multi-layer perceptron `[in, hidden.., classes]`: flattens its input; layers `fc1..fcN` with weight [out, in] and bias [out] (the PyTorch layout), ReLU between. Initialised from the seeded host generator as PyTorch's nn.Linear: weights kaiming_uniform(a = sqrt(5)), i.e. U(±1/sqrt(fan_in)), biases U(±1/sqrt(fan_in)).",
        move |sizes: Array| {
            let cfg = models::mlp::MlpConfig { sizes: shape_of("mlp sizes", &sizes)?, init: Default::default() };
            op("mlp", s.build_model(&ArchConfig::Mlp(cfg)))
        });
    let s = session.clone();
    api!(engine, "mlp", "sizes: Array, options: Map -> Model",
        "`mlp(sizes)` with options: init (\"torch\": PyTorch's nn.Linear default; \"he\": He-normal weights, std sqrt(2/fan_in), biases as PyTorch's).",
        move |sizes: Array, o: Map| {
            let opts: MlpOptions = options("mlp", &o)?;
            let cfg = models::mlp::MlpConfig { sizes: shape_of("mlp sizes", &sizes)?, init: opts.init.unwrap_or_default() };
            op("mlp", s.build_model(&ArchConfig::Mlp(cfg)))
        });

    let s = session.clone();
    api!(engine, "cnn", "config: Map -> Model",
        "A small CNN: per stage a 3x3 convolution (padding 1) + ReLU + 2x2 max-pooling, then flatten, a hidden linear layer + ReLU and the classifier. Keys (defaults): channels [32, 64, 128], hidden 256, classes 10, input [3, 32, 32], init (\"torch\": PyTorch's nn.Conv2d/nn.Linear defaults, U(±1/sqrt(fan_in)) weights and biases; \"he\": He-normal weights). Tensors conv1..convK, fc, classifier.",
        move |o: Map| -> Res<Model> {
            let cfg = op("cnn", ArchConfig::from_json(&config_map("cnn", "cnn", o)?, true))?;
            op("cnn", s.build_model(&cfg))
        });
    let s = session.clone();
    api!(
        engine,
        "cnn",
        "-> Model",
        "The CNN with its default configuration (see `cnn(config)`).",
        move || -> Res<Model> {
            let cfg = op("cnn", ArchConfig::from_json(&config_map("cnn", "cnn", Map::new())?, true))?;
            op("cnn", s.build_model(&cfg))
        }
    );

    let s = session.clone();
    let build_resnet = move |depth: INT, classes: INT, o: Map| -> Res<Model> {
        let opts: ResNetOptions = options("resnet", &o)?;
        let d = ResNetConfig::default();
        let cfg = ResNetConfig {
            depth: to_usize("resnet depth", depth)?,
            num_labels: to_usize("resnet classes", classes)?,
            num_channels: opts.num_channels.unwrap_or(d.num_channels),
            shortcut: opts.shortcut.unwrap_or(d.shortcut),
        };
        let cfg = ArchConfig::ResNet(cfg);
        op("resnet", cfg.validate().and_then(|()| s.build_model(&cfg)))
    };
    let f = build_resnet.clone();
    api!(engine, "resnet", "depth: int, classes: int -> Model",
        "The CIFAR ResNet of He et al. 2016 (depth 6n+2: 20, 32, 44, 56, 110) for 3-channel images: 16/32/64-channel stages, option-A (parameter-free) shortcuts, global average pooling. Tensors conv1, bn1, layerS.I.{conv1,bn1,conv2,bn2}, linear. Initialised as the reference PyTorch code (akamaster/pytorch_resnet_cifar10): convolution and linear weights kaiming_normal (N(0, 2/fan_in)), the linear bias U(±1/sqrt(64)), BatchNorm weight 1 and bias 0.",
        move |depth: INT, classes: INT| f(depth, classes, Map::new()));
    api!(engine, "resnet", "depth: int, classes: int, options: Map -> Model",
        "The CIFAR ResNet with options: shortcut \"A\" (default) or \"B\" (1x1 convolution + BatchNorm, tensors shortcut.0/1), num_channels (3).",
        build_resnet);

    let s = session.clone();
    let build_wrn = move |depth: INT, width: INT, classes: INT, o: Map| -> Res<Model> {
        let opts: WideResNetOptions = options("wide_resnet", &o)?;
        let d = WideResNetConfig::default();
        let cfg = WideResNetConfig {
            depth: to_usize("wide_resnet depth", depth)?,
            widen_factor: to_usize("wide_resnet width", width)?,
            num_labels: to_usize("wide_resnet classes", classes)?,
            num_channels: opts.num_channels.unwrap_or(d.num_channels),
            dropout: opts.dropout.unwrap_or(d.dropout),
        };
        let cfg = ArchConfig::WideResNet(cfg);
        op("wide_resnet", cfg.validate().and_then(|()| s.build_model(&cfg)))
    };
    let f = build_wrn.clone();
    api!(engine, "wide_resnet", "depth: int, width: int, classes: int -> Model",
        "WRN-depth-width of Zagoruyko & Komodakis (depth 6n+4, e.g. 16-8, 28-10): pre-activation blocks of 16k/32k/64k channels, no dropout. Tensors conv1, blockG.layer.I.{bn1,conv1,bn2,conv2,convShortcut}, bn1, fc. Initialised as the reference PyTorch code (xternalz/WideResNet-pytorch): convolutions N(0, 2/(k·k·out_channels)), BatchNorm weight 1 and bias 0, fc weight U(±1/sqrt(fan_in)) and bias 0.",
        move |depth: INT, width: INT, classes: INT| f(depth, width, classes, Map::new()));
    api!(
        engine,
        "wide_resnet",
        "depth: int, width: int, classes: int, options: Map -> Model",
        "A WideResNet with options: dropout (0; the paper's dropout runs use 0.3, seeded masks), num_channels (3).",
        build_wrn
    );

    getter!(engine, "preprocess", "Array",
        "The checkpoint's preprocessing as a transform list for `ds.transform(...)`: gray to RGB, a resize to the model's image size with the processor's resampling (bicubic or bilinear), and its normalisation (image_mean, image_std, the rescale factor folded in), from the preprocessor_config.json that from_pretrained read; [] when the checkpoint had none. Add augmentation around it: ds.transform([#{random_crop: 56, padding: 4}] + m.preprocess).",
        |m: &mut Model| -> Res<Dynamic> {
            match (m.preprocessing(), m.input_size()) {
                (Some(p), Some((size, channels))) => from_json(&p.transforms(size, channels)),
                _ => Ok(Dynamic::from_array(Array::new())),
            }
        });

    let s = session.clone();
    api!(engine, "vit", "config: Map -> Model",
        "A Vision Transformer with Hugging Face's ViTConfig fields (hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act, hidden_dropout_prob, attention_probs_dropout_prob, initializer_range, layer_norm_eps, image_size, patch_size, num_channels, qkv_bias) and num_labels; missing fields take ViT-B/16's values. Tensors as ViTForImageClassification: vit.embeddings..., vit.encoder.layer.N..., vit.layernorm, classifier. Initialised as transformers' ViT: linear and patch-projection weights, the [CLS] token and the position embeddings N(0, initializer_range²) (transformers' trunc_normal_ cuts at ±2, 100 std at the usual 0.02), biases 0, layer norms weight 1 and bias 0.",
        move |o: Map| -> Res<Model> {
            // Fields samhost does not use (from a Hugging Face config, or `model_config(m)`) are
            // kept, and named.
            let cfg = op("vit", ArchConfig::from_json(&config_map("vit", "vit", o)?, false))?;
            if let ArchConfig::Vit(c) = &cfg {
                let unused: Vec<&str> = c
                    .extra
                    .keys()
                    .map(String::as_str)
                    .filter(|k| !crate::models::vit::KNOWN_HF_KEYS.contains(k))
                    .collect();
                if !unused.is_empty() {
                    s.say(&format!("vit: fields samhost does not use, kept in config.json: {}", unused.join(", ")));
                }
            }
            op("vit", s.build_model(&cfg))
        });

    let s = session.clone();
    api!(engine, "dinov2", "config: Map -> Model",
        "DINOv2 (Oquab et al. 2023) with transformers' Dinov2Config fields (hidden_size, num_hidden_layers, num_attention_heads, mlp_ratio, hidden_act, hidden_dropout_prob, attention_probs_dropout_prob, initializer_range, layer_norm_eps, image_size, patch_size, num_channels, qkv_bias, layerscale_value, drop_path_rate, use_mask_token) and num_labels; missing fields take transformers' defaults (ViT-B/14 at 224). The ViT encoder with LayerScale on both branches and stochastic depth; the head reads the [CLS] token concatenated with the mean patch token. Tensors as Dinov2ForImageClassification: dinov2.embeddings..., dinov2.encoder.layer.N.{norm1,attention,layer_scale1,norm2,mlp,layer_scale2}, dinov2.layernorm, classifier. Initialised as transformers: weights, the [CLS] token and position embeddings N(0, initializer_range²), biases and the mask token 0, LayerScale layerscale_value. from_pretrained(\"facebook/dinov2-small\", #{num_classes: 10, image_size: 56}) loads the Hub's checkpoints.",
        move |o: Map| -> Res<Model> {
            let cfg = op("dinov2", ArchConfig::from_json(&config_map("dinov2", "dinov2", o)?, false))?;
            if let ArchConfig::Dinov2(c) = &cfg {
                let known = |k: &str| {
                    crate::models::vit::KNOWN_HF_KEYS.contains(&k) || crate::models::dinov2::KNOWN_DINOV2_KEYS.contains(&k)
                };
                let unused: Vec<&str> = c.extra.keys().map(String::as_str).filter(|k| !known(k)).collect();
                if !unused.is_empty() {
                    s.say(&format!("dinov2: fields samhost does not use, kept in config.json: {}", unused.join(", ")));
                }
            }
            op("dinov2", s.build_model(&cfg))
        });

    let s = session.clone();
    let build_named = move |name: &str, o: Map| -> Res<Model> {
        let base = op("model", registry::resolve_config(name))?;
        let merged = op("model", registry::merge(&base, &to_json(&Dynamic::from_map(o))?))?;
        let cfg = op("model", ArchConfig::from_json(&merged, true).map_err(|e| e.context(name.to_string())))?;
        op("model", s.build_model(&cfg))
    };
    let f = build_named.clone();
    api!(engine, "model", "name: String -> Model",
        "A model from a named configuration (resnet20, resnet32, resnet56, resnet110, wrn-16-8, wrn-28-10, vit-s16, vit-b16, cnn: the repository's models/*.json) or from a path to a JSON config with a model_type.",
        move |name: &str| f(name, Map::new()));
    api!(engine, "model", "name: String, overrides: Map -> Model",
        "A model from a named configuration or JSON file with some fields replaced, e.g. `model(\"vit-s16\", #{num_labels: 10, image_size: 32, patch_size: 4})`.",
        build_named);
    api!(
        engine,
        "model_config",
        "m: Model -> Map",
        "The model's configuration (the config.json that `save` writes).",
        |m: &mut Model| -> Res<Dynamic> { from_json(&m.network().config()) }
    );

    api!(
        engine,
        "forward",
        "m: Model, x: Tensor -> Tensor",
        "The model's output for input `x`, in its current mode (train or eval).",
        |m: &mut Model, x: Tensor| -> Res<Tensor> {
            m.forward(&x).map_err(|e| err(format!("forward of an input {:?}: {e}", x.dims())))
        }
    );
    api!(
        engine,
        "train",
        "m: Model",
        "Switches to training mode (BatchNorm batch statistics, dropout on).",
        |m: &mut Model| m.set_training(true)
    );
    api!(
        engine,
        "eval_mode",
        "m: Model",
        "Switches to evaluation mode: BatchNorm running statistics, dropout off (PyTorch's `eval()`, a reserved word in Rhai).",
        |m: &mut Model| m.set_training(false)
    );
    getter!(engine, "training", "bool", "Whether the model is in training mode.", |m: &mut Model| m.is_training());
    getter!(engine, "precision", "String",
        "The precision of the forward and backward passes: \"f32\", or \"bf16\" mixed precision (parameters, gradients and optimizer state stay f32). New models take `--dtype`.",
        |m: &mut Model| -> ImmutableString { m.precision().name().into() });
    api!(engine, "set_precision", "m: Model, dtype: String",
        "Sets the precision of the forward and backward passes: \"f32\" or \"bf16\" (\"f16\" is refused: without dynamic loss scaling small gradients underflow). In bf16 the input and each layer's f32 weights are cast at use, normalisations and softmax run in f32, the logits come back as f32; `sam_step` computes its ascent norm over the f32 gradients.",
        |m: &mut Model, dtype: &str| -> Res<()> {
            m.set_precision(op("set_precision", dtype.parse::<models::Precision>())?);
            Ok(())
        });
    api!(engine, "save", "m: Model, path: String",
        "Saves the weights: `x.safetensors` writes that file; any other path is a folder that gets `model.safetensors` (Hugging Face tensor names) and `config.json`. Atomic writes. Under several ranks rank 0 writes (every rank holds the same weights).",
        |m: &mut Model, path: &str| if crate::dist::is_leader() { op("save", save_model(m, path)) } else { Ok(()) });
    api!(engine, "load", "m: Model, path: String",
        "Restores the weights from a safetensors file or a folder written by `save`; every tensor must be present with the same shape.",
        |m: &mut Model, path: &str| op("load", load_model(m, path)));
    api!(engine, "freeze", "m: Model, prefix: String -> int",
        "Freezes the parameters whose names start with `prefix` (neither perturbed by SAM nor updated); returns how many.",
        |m: &mut Model, prefix: &str| -> Res<INT> {
            let n = m.params().freeze(prefix);
            if n == 0 { return Err(err(format!("freeze: no parameter name starts with `{prefix}`"))); }
            Ok(n as INT)
        });
    api!(
        engine,
        "unfreeze",
        "m: Model, prefix: String -> int",
        "Unfreezes the parameters whose names start with `prefix`; returns how many.",
        |m: &mut Model, prefix: &str| m.params().unfreeze(prefix) as INT
    );
    api!(
        engine,
        "num_parameters",
        "m: Model -> int",
        "Number of scalar parameters (buffers excluded).",
        |m: &mut Model| m.params().num_parameters() as INT
    );
    api!(
        engine,
        "num_trainable_parameters",
        "m: Model -> int",
        "Number of trainable (not frozen) scalar parameters.",
        |m: &mut Model| m.params().num_trainable() as INT
    );
    api!(
        engine,
        "parameter_names",
        "m: Model -> Array",
        "Names of every tensor of the model (buffers included), sorted.",
        |m: &mut Model| -> Array { m.params().all().into_iter().map(|(n, _)| Dynamic::from(n)).collect() }
    );
    api!(
        engine,
        "parameters",
        "m: Model -> Map",
        "A map of name -> Tensor of the current weights (copies).",
        |m: &mut Model| -> Res<Map> {
            let mut map = Map::new();
            for (name, v) in m.params().all() {
                map.insert(name.into(), Dynamic::from(op("parameters", v.as_tensor().copy())?));
            }
            Ok(map)
        }
    );
    api!(
        engine,
        "set_parameters",
        "m: Model, tensors: Map",
        "Sets weights by name from a map of name -> Tensor (a subset is allowed; shapes must match).",
        |m: &mut Model, map: Map| -> Res<()> {
            let mut tensors = std::collections::HashMap::new();
            for (k, v) in map {
                let t = v.try_cast::<Tensor>().ok_or_else(|| err(format!("set_parameters: `{k}` is not a Tensor")))?;
                tensors.insert(k.to_string(), t);
            }
            op("set_parameters", m.params().assign(&tensors, true, "set_parameters"))
        }
    );
    api!(
        engine,
        "params",
        "m: Model -> TensorSet",
        "The trainable parameters (not frozen, not buffers) as a TensorSet: copies of their current values.",
        |m: &mut Model| op("params", crate::train::TensorSet::snapshot(&m.params().trainable()))
    );
    api!(engine, "perturb", "m: Model, e: TensorSet",
        "w <- w + e for every tensor of `e` (parameter names; buffers are refused), keeping the weights from before: `m.restore()` puts them back bit-exactly. Perturbing again before a restore adds to the perturbation. One host call over all tensors (one pass that writes w + e and saves w, on the CPU).",
        |m: &mut Model, e: crate::train::TensorSet| op("perturb", m.perturb(&e, 1.0)));
    api!(engine, "perturb", "m: Model, e: TensorSet, scale: float",
        "w <- w + scale·e without forming scale·e first (one pass over each tensor on the CPU): `m.perturb(g, rho / (g.norm() + 1e-12))` is SAM's ascent step. Otherwise as `perturb(m, e)`.",
        |m: &mut Model, e: crate::train::TensorSet, scale: rhai::FLOAT| op("perturb", m.perturb(&e, scale)));
    api!(
        engine,
        "restore",
        "m: Model",
        "Puts back the weights saved by `perturb`, bit-exactly; an error when the model is not perturbed.",
        |m: &mut Model| op("restore", m.restore())
    );
    getter!(
        engine,
        "perturbed",
        "bool",
        "Whether `perturb` moved the weights and `restore` has not put them back.",
        |m: &mut Model| m.is_perturbed()
    );
}

//! The `Layer` script type: layers as values (`linear`, `conv2d`, `batch_norm2d`, ...), composed
//! by `sequential([...])` into a model or by `residual([...])` into a block. Before a model
//! builds it, a layer is a description; inside a model's forward closure (`this.conv1`), it is
//! the model's layer with its tensors and `forward(x)` applies it.

use super::convert::{err, op, options, to_usize, Res};
use crate::models::compose::{Layer, LayerSpec, SequentialConfig, ShortcutSpec};
use crate::models::init::InitScheme;
use crate::models::registry::ArchConfig;
use crate::models::Model;
use crate::session::Session;
use candle_core::Tensor;
use rhai::{Array, Dynamic, Engine, Map, FLOAT, INT};
use serde::Deserialize;
use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

/// A layer as the script holds it.
#[derive(Clone)]
pub enum ScriptLayer {
    /// A description, built when a model takes it.
    Spec(LayerSpec),
    /// A layer of a model, with its tensors.
    Bound(Arc<Layer>),
}

impl ScriptLayer {
    /// The layer's description.
    pub fn spec(&self) -> &LayerSpec {
        match self {
            Self::Spec(s) => s,
            Self::Bound(l) => l.spec(),
        }
    }
}

thread_local! {
    /// The mode of the model whose forward closure runs on this thread (None: no model runs).
    static FORWARD_MODE: Cell<Option<bool>> = const { Cell::new(None) };
}

/// Sets the mode layers see in a forward closure for as long as the guard lives.
pub struct ModeGuard(Option<bool>);

impl ModeGuard {
    /// Layers called from now on run in training mode when `train`.
    pub fn set(train: bool) -> Self {
        Self(FORWARD_MODE.with(|m| m.replace(Some(train))))
    }
}

impl Drop for ModeGuard {
    fn drop(&mut self) {
        let _ = FORWARD_MODE.try_with(|m| m.set(self.0));
    }
}

/// Models nested in a new one, by the tensor-name prefix they take there: their weights are
/// copied in once the new model is built (PyTorch's nesting keeps a module's weights too).
pub type Nested = Vec<(String, Model)>;

/// A layer description from a script value: a layer, a model built by `sequential` (its weights
/// noted in `nested` under `prefix`), or an array of them (a nested sequence). Without `nested`
/// (inside `residual`, which is a description until a model builds it) a model is refused.
pub fn spec_of(what: &str, v: &Dynamic, prefix: &str, nested: Option<&mut Nested>) -> Res<LayerSpec> {
    if let Some(l) = v.clone().try_cast::<ScriptLayer>() {
        return Ok(l.spec().clone());
    }
    if let Some(m) = v.clone().try_cast::<Model>() {
        let layers = match ArchConfig::parse(&m.network().config(), false) {
            Ok(ArchConfig::Sequential(c)) => c.layers,
            _ => return Err(err(format!("{what}: only a model built by sequential([...]) nests inside another"))),
        };
        let Some(nested) = nested else {
            return Err(err(format!(
                "{what}: a model inside residual([...]) would lose its weights; give its layers (or nest the model in sequential([...]) or model(#{{ layers }}) directly)"
            )));
        };
        nested.push((prefix.to_string(), m));
        return Ok(LayerSpec::Sequential { layers });
    }
    if v.is_array() {
        return Ok(LayerSpec::Sequential { layers: specs_of(what, &v.clone().cast::<Array>(), prefix, nested)? });
    }
    Err(err(format!("{what}: expected a layer (linear(...), conv2d(...), ...), got {}", v.type_name())))
}

/// The descriptions of an array of layers, element `i` named `{prefix}{i}.`.
pub fn specs_of(what: &str, a: &Array, prefix: &str, mut nested: Option<&mut Nested>) -> Res<Vec<LayerSpec>> {
    a.iter()
        .enumerate()
        .map(|(i, v)| spec_of(&format!("{what}: element {i}"), v, &format!("{prefix}{i}."), nested.as_deref_mut()))
        .collect()
}

/// Copies the weights of the `nested` models into `m` under their prefixes.
pub fn copy_nested(m: &Model, nested: &Nested) -> anyhow::Result<()> {
    for (prefix, inner) in nested {
        for (name, var) in inner.params().all() {
            let target = format!("{prefix}{name}");
            match m.params().get(&target) {
                Some(v) => v.set(var.as_tensor())?,
                None => anyhow::bail!("nesting: the new model has no tensor `{target}`"),
            }
        }
    }
    Ok(())
}

fn checked(spec: LayerSpec) -> Res<ScriptLayer> {
    // The message names the layer.
    spec.validate().map_err(|e| err(format!("{e:#}")))?;
    Ok(ScriptLayer::Spec(spec))
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LinearOptions {
    bias: Option<bool>,
    init: Option<InitScheme>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ConvOptions {
    stride: Option<usize>,
    padding: Option<usize>,
    groups: Option<usize>,
    bias: Option<bool>,
    init: Option<InitScheme>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct NormOptions {
    eps: Option<f64>,
    momentum: Option<f64>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PoolOptions {
    stride: Option<usize>,
    padding: Option<usize>,
}

#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct GeluOptions {
    approximate: Option<String>,
}

fn linear(i: INT, o: INT, opts: LinearOptions) -> Res<ScriptLayer> {
    checked(LayerSpec::Linear {
        in_features: to_usize("linear in_features", i)?,
        out_features: to_usize("linear out_features", o)?,
        bias: opts.bias.unwrap_or(true),
        init: opts.init.unwrap_or_default(),
    })
}

fn conv2d(i: INT, o: INT, k: INT, opts: ConvOptions) -> Res<ScriptLayer> {
    checked(LayerSpec::Conv2d {
        in_channels: to_usize("conv2d in_channels", i)?,
        out_channels: to_usize("conv2d out_channels", o)?,
        kernel_size: to_usize("conv2d kernel_size", k)?,
        stride: opts.stride.unwrap_or(1),
        padding: opts.padding.unwrap_or(0),
        groups: opts.groups.unwrap_or(1),
        bias: opts.bias.unwrap_or(true),
        init: opts.init.unwrap_or_default(),
    })
}

fn batch_norm2d(c: INT, opts: NormOptions) -> Res<ScriptLayer> {
    checked(LayerSpec::BatchNorm2d {
        num_features: to_usize("batch_norm2d num_features", c)?,
        eps: opts.eps.unwrap_or(1e-5),
        momentum: opts.momentum.unwrap_or(0.1),
    })
}

fn layer_norm(d: INT, opts: NormOptions) -> Res<ScriptLayer> {
    if opts.momentum.is_some() {
        return Err(err("layer_norm options: unknown field `momentum`, expected `eps`"));
    }
    checked(LayerSpec::LayerNorm {
        normalized_shape: to_usize("layer_norm normalized_shape", d)?,
        eps: opts.eps.unwrap_or(1e-5),
    })
}

fn pool(max: bool, k: INT, opts: PoolOptions) -> Res<ScriptLayer> {
    let name = if max { "max_pool2d" } else { "avg_pool2d" };
    let kernel_size = to_usize(&format!("{name} kernel_size"), k)?;
    let (stride, padding) = (opts.stride.unwrap_or(kernel_size), opts.padding.unwrap_or(0));
    checked(if max {
        LayerSpec::MaxPool2d { kernel_size, stride, padding }
    } else {
        LayerSpec::AvgPool2d { kernel_size, stride, padding }
    })
}

fn output_size(v: &Dynamic) -> Res<[usize; 2]> {
    if let Ok(n) = v.as_int() {
        let n = to_usize("adaptive_avg_pool2d output_size", n)?;
        return Ok([n, n]);
    }
    if let Some(a) = v.clone().try_cast::<Array>() {
        let dims = super::convert::shape_of("adaptive_avg_pool2d output_size", &a)?;
        if let [h, w] = dims[..] {
            return Ok([h, w]);
        }
    }
    Err(err("adaptive_avg_pool2d: output_size must be an integer or [height, width]"))
}

/// Options of `residual(layers, #{...})`.
fn residual(body: &Array, o: &Map) -> Res<ScriptLayer> {
    let mut shortcut = ShortcutSpec::default();
    for (k, v) in o {
        match k.as_str() {
            "shortcut" => {
                shortcut = if let Ok(s) = v.clone().into_immutable_string() {
                    ShortcutSpec::Named(s.to_string())
                } else if v.is_array() {
                    ShortcutSpec::Layers(specs_of("residual shortcut", &v.clone().cast::<Array>(), "", None)?)
                } else {
                    ShortcutSpec::Layers(vec![spec_of("residual shortcut", v, "", None)?])
                }
            }
            other => return Err(err(format!("residual options: unknown field `{other}`, expected `shortcut`"))),
        }
    }
    checked(LayerSpec::Residual { body: specs_of("residual", body, "", None)?, shortcut })
}

/// Registers the layer API.
pub fn register(engine: &mut Engine, session: &Rc<Session>) {
    engine.register_type_with_name::<ScriptLayer>("Layer");
    api!(
        engine,
        "to_string",
        "l: Layer -> String",
        "The layer as its constructor call, e.g. `conv2d(3, 16, 3, padding: 1)`.",
        |l: &mut ScriptLayer| l.spec().describe()
    );
    api!(
        engine,
        "to_debug",
        "l: Layer -> String",
        "The layer as its constructor call (what `print` and `debug` show).",
        |l: &mut ScriptLayer| l.spec().describe()
    );

    api!(engine, "linear", "in_features: int, out_features: int -> Layer",
        "A fully connected layer, PyTorch's nn.Linear: weight [out, in] and bias [out], both U(±1/sqrt(in)) as PyTorch's default.",
        |i: INT, o: INT| linear(i, o, LinearOptions::default()));
    api!(
        engine,
        "linear",
        "in_features: int, out_features: int, options: Map -> Layer",
        "`linear(in, out)` with options: bias (true), init (\"torch\": PyTorch's default; \"he\": He-normal weights).",
        |i: INT, o: INT, m: Map| linear(i, o, options("linear", &m)?)
    );
    api!(engine, "conv2d", "in_channels: int, out_channels: int, kernel_size: int -> Layer",
        "A 2-D convolution, PyTorch's nn.Conv2d: weight [out, in/groups, k, k], bias [out], both U(±1/sqrt(fan_in)) with fan_in = in/groups·k·k as PyTorch's default. Stride 1, no padding.",
        |i: INT, o: INT, k: INT| conv2d(i, o, k, ConvOptions::default()));
    api!(engine, "conv2d", "in_channels: int, out_channels: int, kernel_size: int, options: Map -> Layer",
        "`conv2d(in, out, k)` with options: stride (1), padding (0), groups (1), bias (true), init (\"torch\" or \"he\"). Followed by relu() and max_pool2d(2) in a sequence, it runs as one fused op on the CPU.",
        |i: INT, o: INT, k: INT, m: Map| conv2d(i, o, k, options("conv2d", &m)?));
    api!(engine, "batch_norm2d", "num_features: int -> Layer",
        "BatchNorm over the channels of images, PyTorch's nn.BatchNorm2d: weight 1, bias 0, buffers running_mean and running_var; eps 1e-5, momentum 0.1. Batch statistics in training mode (a SAM step keeps those of its first pass), running statistics in evaluation mode.",
        |c: INT| batch_norm2d(c, NormOptions::default()));
    api!(
        engine,
        "batch_norm2d",
        "num_features: int, options: Map -> Layer",
        "`batch_norm2d(c)` with options: eps (1e-5), momentum (0.1).",
        |c: INT, m: Map| batch_norm2d(c, options("batch_norm2d", &m)?)
    );
    api!(
        engine,
        "layer_norm",
        "normalized_shape: int -> Layer",
        "Layer normalisation over the last dimension, PyTorch's nn.LayerNorm: weight 1, bias 0, eps 1e-5.",
        |d: INT| layer_norm(d, NormOptions::default())
    );
    api!(
        engine,
        "layer_norm",
        "normalized_shape: int, options: Map -> Layer",
        "`layer_norm(d)` with options: eps (1e-5).",
        |d: INT, m: Map| layer_norm(d, options("layer_norm", &m)?)
    );
    api!(engine, "dropout", "p: float -> Layer",
        "Dropout, PyTorch's nn.Dropout: in training mode each value is zeroed with probability p (masks from the model's seeded generator, replayed in SAM's second pass) and the rest scaled by 1/(1-p); the identity in evaluation mode.",
        |p: FLOAT| checked(LayerSpec::Dropout { p }));
    api!(engine, "relu", "-> Layer", "The ReLU layer, nn.ReLU.", || checked(LayerSpec::Relu));
    api!(engine, "gelu", "-> Layer", "The exact GELU layer, nn.GELU: x·Φ(x).", || checked(LayerSpec::Gelu {
        approximate: "none".into()
    }));
    api!(
        engine,
        "gelu",
        "options: Map -> Layer",
        "nn.GELU with options: approximate (\"none\" or \"tanh\").",
        |m: Map| {
            let o: GeluOptions = options("gelu", &m)?;
            checked(LayerSpec::Gelu { approximate: o.approximate.unwrap_or_else(|| "none".into()) })
        }
    );
    api!(engine, "tanh", "-> Layer", "The tanh layer, nn.Tanh.", || checked(LayerSpec::Tanh));
    api!(engine, "sigmoid", "-> Layer", "The logistic layer, nn.Sigmoid.", || checked(LayerSpec::Sigmoid));
    api!(engine, "identity", "-> Layer", "The identity layer, nn.Identity.", || checked(LayerSpec::Identity));
    api!(engine, "max_pool2d", "kernel_size: int -> Layer",
        "Max-pooling over square windows with stride = kernel_size, nn.MaxPool2d (PyTorch's output size: a trailing row or column that does not fill a window is dropped).",
        |k: INT| pool(true, k, PoolOptions::default()));
    api!(
        engine,
        "max_pool2d",
        "kernel_size: int, options: Map -> Layer",
        "`max_pool2d(k)` with options: stride (k), padding (0; -inf padding, at most k/2).",
        |k: INT, m: Map| pool(true, k, options("max_pool2d", &m)?)
    );
    api!(
        engine,
        "avg_pool2d",
        "kernel_size: int -> Layer",
        "Average pooling over square windows with stride = kernel_size, nn.AvgPool2d.",
        |k: INT| pool(false, k, PoolOptions::default())
    );
    api!(
        engine,
        "avg_pool2d",
        "kernel_size: int, options: Map -> Layer",
        "`avg_pool2d(k)` with options: stride (k), padding (0; zero padding counted in the mean, PyTorch's default).",
        |k: INT, m: Map| pool(false, k, options("avg_pool2d", &m)?)
    );
    api!(engine, "adaptive_avg_pool2d", "output_size: Dynamic -> Layer",
        "nn.AdaptiveAvgPool2d to an integer or [height, width] output; the input size must be a multiple of it. adaptive_avg_pool2d(1) followed by flatten() is the global average pool.",
        |v: Dynamic| checked(LayerSpec::AdaptiveAvgPool2d { output_size: output_size(&v)? }));
    api!(engine, "flatten", "-> Layer", "nn.Flatten: every dimension after the batch into one.", || checked(
        LayerSpec::Flatten { start_dim: 1 }
    ));
    api!(
        engine,
        "flatten",
        "start_dim: int -> Layer",
        "nn.Flatten(start_dim): dimensions start_dim.. into one.",
        |d: INT| checked(LayerSpec::Flatten { start_dim: to_usize("flatten start_dim", d)? })
    );
    api!(engine, "embedding", "num_embeddings: int, embedding_dim: int -> Layer",
        "nn.Embedding: weight [num_embeddings, embedding_dim], N(0, 1) as PyTorch's; maps integer indices (any shape) to rows.",
        |n: INT, d: INT| checked(LayerSpec::Embedding {
            num_embeddings: to_usize("embedding num_embeddings", n)?,
            embedding_dim: to_usize("embedding embedding_dim", d)?,
        }));
    api!(engine, "residual", "layers: Array -> Layer",
        "A residual block x + f(x), f the layers in order (tensor names 0, 1, ... under the block's). Followed by relu() in a sequence, the sum and the ReLU are one op.",
        |a: Array| residual(&a, &Map::new()));
    api!(engine, "residual", "layers: Array, options: Map -> Layer",
        "`residual(layers)` with options: shortcut: a layer or a list of layers (a projection, tensors shortcut.0, ...), \"pad\" (option A of He et al. 2016: subsample by 2 and zero-pad the channels, no parameters) or \"identity\" (the default).",
        |a: Array, m: Map| residual(&a, &m));

    let s = session.clone();
    api!(engine, "sequential", "layers: Array -> Model",
        "A model that applies the layers in order, PyTorch's nn.Sequential: tensors named 0.weight, 1.0.weight (nested lists, residual blocks and sequential models nest; a nested model brings its weights), so a state dict saved by PyTorch loads with m.load(path) and the reverse. Fresh weights from the seeded host generator, each layer initialised as its PyTorch module. A conv2d + relu + max_pool2d(2), a linear + relu, a batch_norm2d + relu and a residual + relu run as the built-in models' fused ops. Saved with its layers in config.json, so from_pretrained(folder) rebuilds it.",
        move |a: Array| -> Res<Model> {
            let mut nested = Nested::new();
            let cfg = ArchConfig::Sequential(SequentialConfig { layers: specs_of("sequential", &a, "", Some(&mut nested))? });
            let m = op("sequential", cfg.validate().and_then(|()| s.build_model(&cfg)))?;
            op("sequential", copy_nested(&m, &nested))?;
            Ok(m)
        });

    api!(engine, "forward", "l: Layer, x: Tensor -> Tensor",
        "Applies a model's layer (`this.conv1.forward(x)` in a forward closure) in the mode of the model's pass: training mode inside a training step, evaluation mode otherwise.",
        |l: &mut ScriptLayer, x: Tensor| -> Res<Tensor> {
            match l {
                ScriptLayer::Bound(layer) => {
                    let train = FORWARD_MODE.with(|m| m.get()).unwrap_or(false);
                    layer.forward_t(&x, train).map_err(|e| err(format!("{}: {e}", layer.spec().describe())))
                }
                ScriptLayer::Spec(s) => Err(err(format!(
                    "{}: this layer belongs to no model yet: put it in sequential([...]) or model(#{{ layers: #{{...}}, forward: |x| ... }}) and call this.NAME.forward(x) in the forward closure",
                    s.describe()
                ))),
            }
        });
}

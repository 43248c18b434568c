//! [`LayerSpec`]: what a layer is before it owns parameters. Scripts build specs
//! (`linear(784, 10)`, `sequential([...])`); a model builds them into [`super::Layer`]s, naming
//! the parameters by position as PyTorch's `nn.Sequential` does. A sequential model's
//! `config.json` is the list of its specs, so a saved model can be rebuilt.

use super::super::init::InitScheme;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}
fn bn_eps() -> f64 {
    1e-5
}
fn bn_momentum() -> f64 {
    0.1
}

/// What a residual block adds to its body's output.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ShortcutSpec {
    /// `"identity"` (`x` itself) or `"pad"`: option A of He et al. 2016, `x` subsampled to the
    /// body's resolution and zero-padded to its channels (no parameters).
    Named(String),
    /// A projection: layers applied to `x` (tensor names `shortcut.0`, `shortcut.1`, ...).
    Layers(Vec<LayerSpec>),
}

impl Default for ShortcutSpec {
    fn default() -> Self {
        Self::Named("identity".into())
    }
}

/// A layer with its hyper-parameters, named as the arguments of the PyTorch module it mirrors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum LayerSpec {
    /// `nn.Linear`: `weight [out, in]`, `bias [out]`.
    Linear {
        /// Input features.
        in_features: usize,
        /// Output features.
        out_features: usize,
        /// Whether the layer has a bias.
        #[serde(default = "yes")]
        bias: bool,
        /// How fresh weights are drawn.
        #[serde(default, skip_serializing_if = "InitScheme::is_default")]
        init: InitScheme,
    },
    /// `nn.Conv2d`: `weight [out, in/groups, k, k]`, `bias [out]`.
    Conv2d {
        /// Input channels.
        in_channels: usize,
        /// Output channels.
        out_channels: usize,
        /// Square kernel size.
        kernel_size: usize,
        /// Stride.
        #[serde(default = "one")]
        stride: usize,
        /// Zero padding on every side.
        #[serde(default)]
        padding: usize,
        /// Channel groups (`in_channels` for a depthwise convolution).
        #[serde(default = "one")]
        groups: usize,
        /// Whether the layer has a bias.
        #[serde(default = "yes")]
        bias: bool,
        /// How fresh weights are drawn.
        #[serde(default, skip_serializing_if = "InitScheme::is_default")]
        init: InitScheme,
    },
    /// `nn.BatchNorm2d`: `weight`, `bias`, buffers `running_mean`, `running_var`.
    BatchNorm2d {
        /// Channels.
        num_features: usize,
        /// Added to the variance.
        #[serde(default = "bn_eps")]
        eps: f64,
        /// Running-statistics momentum (PyTorch's convention: the weight of the new batch).
        #[serde(default = "bn_momentum")]
        momentum: f64,
    },
    /// `nn.LayerNorm` over the last dimension: `weight`, `bias`.
    LayerNorm {
        /// Size of the last dimension.
        normalized_shape: usize,
        /// Added to the variance.
        #[serde(default = "bn_eps")]
        eps: f64,
    },
    /// `nn.Dropout`: in training mode, zeroes each value with probability `p` and scales the
    /// rest by 1/(1-p).
    Dropout {
        /// Drop probability in [0, 1).
        p: f64,
    },
    /// `nn.ReLU`.
    Relu,
    /// `nn.GELU`: exact (`approximate: "none"`) or with the tanh approximation (`"tanh"`).
    Gelu {
        /// `"none"` or `"tanh"`.
        #[serde(default = "none")]
        approximate: String,
    },
    /// `nn.Tanh`.
    Tanh,
    /// `nn.Sigmoid`.
    Sigmoid,
    /// `nn.Identity`.
    Identity,
    /// `nn.MaxPool2d` (square windows; `ceil_mode` false).
    MaxPool2d {
        /// Window size.
        kernel_size: usize,
        /// Stride (PyTorch's default: the window size).
        stride: usize,
        /// Implicit -inf padding on every side.
        #[serde(default)]
        padding: usize,
    },
    /// `nn.AvgPool2d` (square windows, zero padding counted, as PyTorch's default).
    AvgPool2d {
        /// Window size.
        kernel_size: usize,
        /// Stride (PyTorch's default: the window size).
        stride: usize,
        /// Zero padding on every side.
        #[serde(default)]
        padding: usize,
    },
    /// `nn.AdaptiveAvgPool2d` to `[H, W]`; the input's height and width must be multiples of it.
    AdaptiveAvgPool2d {
        /// Output height and width.
        output_size: [usize; 2],
    },
    /// `nn.Flatten`: dimensions `start_dim..` into one.
    Flatten {
        /// First dimension flattened (1: keep the batch).
        #[serde(default = "one")]
        start_dim: usize,
    },
    /// `nn.Embedding`: `weight [num_embeddings, embedding_dim]`, N(0, 1) as PyTorch's.
    Embedding {
        /// Vocabulary size.
        num_embeddings: usize,
        /// Vector size.
        embedding_dim: usize,
    },
    /// `nn.Sequential`: the layers in order, named `0`, `1`, ...
    Sequential {
        /// The layers.
        layers: Vec<LayerSpec>,
    },
    /// `body(x) + shortcut(x)`: the body's layers are named `0`, `1`, ... and a projection
    /// shortcut's `shortcut.0`, ...
    Residual {
        /// The layers of the residual branch.
        body: Vec<LayerSpec>,
        /// What is added to the body's output.
        #[serde(default)]
        shortcut: ShortcutSpec,
    },
}

fn none() -> String {
    "none".into()
}

impl LayerSpec {
    /// The PyTorch-like constructor call that describes the layer, e.g. `conv2d(3, 16, 3)`.
    pub fn describe(&self) -> String {
        match self {
            Self::Linear { in_features, out_features, bias, .. } => {
                format!("linear({in_features}, {out_features}{})", if *bias { "" } else { ", bias: false" })
            }
            Self::Conv2d { in_channels, out_channels, kernel_size, stride, padding, groups, bias, .. } => {
                let mut s = format!("conv2d({in_channels}, {out_channels}, {kernel_size}");
                for (name, v, default) in [("stride", *stride, 1), ("padding", *padding, 0), ("groups", *groups, 1)] {
                    if v != default {
                        s.push_str(&format!(", {name}: {v}"));
                    }
                }
                if !bias {
                    s.push_str(", bias: false");
                }
                s + ")"
            }
            Self::BatchNorm2d { num_features, .. } => format!("batch_norm2d({num_features})"),
            Self::LayerNorm { normalized_shape, .. } => format!("layer_norm({normalized_shape})"),
            Self::Dropout { p } => format!("dropout({p})"),
            Self::Relu => "relu()".into(),
            Self::Gelu { approximate } if approximate == "tanh" => "gelu(approximate: tanh)".into(),
            Self::Gelu { .. } => "gelu()".into(),
            Self::Tanh => "tanh()".into(),
            Self::Sigmoid => "sigmoid()".into(),
            Self::Identity => "identity()".into(),
            Self::MaxPool2d { kernel_size, stride, padding } => {
                format!("max_pool2d({kernel_size}, stride: {stride}, padding: {padding})")
            }
            Self::AvgPool2d { kernel_size, stride, padding } => {
                format!("avg_pool2d({kernel_size}, stride: {stride}, padding: {padding})")
            }
            Self::AdaptiveAvgPool2d { output_size: [h, w] } => format!("adaptive_avg_pool2d([{h}, {w}])"),
            Self::Flatten { start_dim } => format!("flatten({start_dim})"),
            Self::Embedding { num_embeddings, embedding_dim } => {
                format!("embedding({num_embeddings}, {embedding_dim})")
            }
            Self::Sequential { layers } => format!("sequential([{} layers])", layers.len()),
            Self::Residual { body, .. } => format!("residual([{} layers])", body.len()),
        }
    }

    /// Rejects hyper-parameters that build nothing, naming the layer.
    pub fn validate(&self) -> Result<()> {
        let what = self.describe();
        let positive = |name: &str, v: usize| if v == 0 { bail!("{what}: {name} must be > 0") } else { Ok(()) };
        match self {
            Self::Linear { in_features, out_features, .. } => {
                positive("in_features", *in_features)?;
                positive("out_features", *out_features)?;
            }
            Self::Conv2d { in_channels, out_channels, kernel_size, stride, groups, .. } => {
                positive("in_channels", *in_channels)?;
                positive("out_channels", *out_channels)?;
                positive("kernel_size", *kernel_size)?;
                positive("stride", *stride)?;
                positive("groups", *groups)?;
                if in_channels % groups != 0 || out_channels % groups != 0 {
                    bail!("{what}: groups ({groups}) must divide in_channels ({in_channels}) and out_channels ({out_channels})");
                }
            }
            Self::BatchNorm2d { num_features, eps, momentum } => {
                positive("num_features", *num_features)?;
                if !eps.is_finite() || *eps <= 0.0 || !(0.0..=1.0).contains(momentum) {
                    bail!("{what}: eps must be > 0 and momentum in [0, 1], got {eps} and {momentum}");
                }
            }
            Self::LayerNorm { normalized_shape, eps } => {
                positive("normalized_shape", *normalized_shape)?;
                if !eps.is_finite() || *eps <= 0.0 {
                    bail!("{what}: eps must be > 0, got {eps}");
                }
            }
            Self::Dropout { p } => {
                if !(0.0..1.0).contains(p) {
                    bail!("dropout: p must be in [0, 1), got {p}");
                }
            }
            Self::Gelu { approximate } => {
                if approximate != "none" && approximate != "tanh" {
                    bail!("gelu: approximate must be \"none\" or \"tanh\", got \"{approximate}\"");
                }
            }
            Self::MaxPool2d { kernel_size, stride, padding } | Self::AvgPool2d { kernel_size, stride, padding } => {
                positive("kernel_size", *kernel_size)?;
                positive("stride", *stride)?;
                if 2 * padding > *kernel_size {
                    bail!("{what}: padding must be at most half the kernel size (as PyTorch)");
                }
            }
            Self::AdaptiveAvgPool2d { output_size: [h, w] } => {
                positive("output height", *h)?;
                positive("output width", *w)?;
            }
            Self::Flatten { .. } | Self::Relu | Self::Tanh | Self::Sigmoid | Self::Identity => {}
            Self::Embedding { num_embeddings, embedding_dim } => {
                positive("num_embeddings", *num_embeddings)?;
                positive("embedding_dim", *embedding_dim)?;
            }
            Self::Sequential { layers } => {
                for (i, l) in layers.iter().enumerate() {
                    l.validate().map_err(|e| e.context(format!("layer {i}")))?;
                }
            }
            Self::Residual { body, shortcut } => {
                if body.is_empty() {
                    bail!("residual: the body must have at least one layer");
                }
                for (i, l) in body.iter().enumerate() {
                    l.validate().map_err(|e| e.context(format!("residual layer {i}")))?;
                }
                match shortcut {
                    ShortcutSpec::Named(n) if n == "identity" || n == "pad" => {}
                    ShortcutSpec::Named(n) => {
                        bail!("residual: shortcut must be \"identity\", \"pad\", a layer or a list of layers, got \"{n}\"")
                    }
                    ShortcutSpec::Layers(ls) => {
                        for (i, l) in ls.iter().enumerate() {
                            l.validate().map_err(|e| e.context(format!("shortcut layer {i}")))?;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether the layer (or a layer inside it) owns tensors.
    pub fn has_tensors(&self) -> bool {
        match self {
            Self::Linear { .. }
            | Self::Conv2d { .. }
            | Self::BatchNorm2d { .. }
            | Self::LayerNorm { .. }
            | Self::Embedding { .. } => true,
            Self::Sequential { layers } => layers.iter().any(Self::has_tensors),
            Self::Residual { body, shortcut } => {
                body.iter().any(Self::has_tensors)
                    || matches!(shortcut, ShortcutSpec::Layers(ls) if ls.iter().any(Self::has_tensors))
            }
            _ => false,
        }
    }

    /// Whether the layer (or a layer inside it) is a dropout with p > 0.
    pub fn has_dropout(&self) -> bool {
        match self {
            Self::Dropout { p } => *p > 0.0,
            Self::Sequential { layers } => layers.iter().any(Self::has_dropout),
            Self::Residual { body, shortcut } => {
                body.iter().any(Self::has_dropout)
                    || matches!(shortcut, ShortcutSpec::Layers(ls) if ls.iter().any(Self::has_dropout))
            }
            _ => false,
        }
    }
}

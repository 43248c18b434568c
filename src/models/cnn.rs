//! A small convolutional network: per stage a 3x3 convolution (padding 1), ReLU and 2x2
//! max-pooling; then flatten, a hidden linear layer with ReLU, and the classifier.

use super::init::InitScheme;
use super::layers::{conv_biased, linear_scheme, Conv, Linear};
use super::registry::ArchConfig;
use super::Network;
use anyhow::{bail, Result};
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// The configuration of [`Cnn`]. Tensors: `conv1..convK`, `fc` (hidden), `classifier`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CnnConfig {
    /// Output channels of each stage.
    pub channels: Vec<usize>,
    /// Width of the hidden linear layer.
    pub hidden: usize,
    /// Number of classes (`classes` in a script map).
    #[serde(alias = "classes")]
    pub num_labels: usize,
    /// Input shape `[C, H, W]`.
    pub input: Vec<usize>,
    /// How fresh weights are drawn: PyTorch's `nn.Conv2d` / `nn.Linear` defaults unless `"he"`.
    #[serde(skip_serializing_if = "InitScheme::is_default")]
    pub init: InitScheme,
}

impl Default for CnnConfig {
    fn default() -> Self {
        Self {
            channels: vec![32, 64, 128],
            hidden: 256,
            num_labels: 10,
            input: vec![3, 32, 32],
            init: InitScheme::Torch,
        }
    }
}

impl CnnConfig {
    /// The `[C, H, W]` of the features entering the hidden layer.
    pub fn feature_shape(&self) -> Result<[usize; 3]> {
        let [c, mut h, mut w] = match self.input.as_slice() {
            [c, h, w] => [*c, *h, *w],
            other => bail!("cnn: input must be [channels, height, width], got {other:?}"),
        };
        let mut ch = c;
        for (i, &out) in self.channels.iter().enumerate() {
            if h < 2 || w < 2 {
                bail!("cnn: stage {} gets a {h}x{w} map, too small for 2x2 max-pooling: use fewer stages", i + 1);
            }
            h /= 2;
            w /= 2;
            ch = out;
        }
        Ok([ch, h, w])
    }

    /// Rejects configurations that build nothing.
    pub fn validate(&self) -> Result<()> {
        if self.channels.is_empty() {
            bail!("cnn: channels must list at least one stage");
        }
        if self.channels.contains(&0) || self.hidden == 0 || self.num_labels == 0 || self.input.contains(&0) {
            bail!(
                "cnn: sizes must be > 0 (channels {:?}, hidden {}, classes {}, input {:?})",
                self.channels,
                self.hidden,
                self.num_labels,
                self.input
            );
        }
        self.feature_shape().map(|_| ())
    }
}

/// The network described by [`CnnConfig`].
pub struct Cnn {
    cfg: CnnConfig,
    convs: Vec<Conv>,
    fc: Linear,
    classifier: Linear,
}

impl Cnn {
    /// Creates the layers from `vb`, initialised as PyTorch's `nn.Conv2d` and `nn.Linear`
    /// defaults (weights and biases U(±1/√fan_in), `kaiming_uniform_(a = √5)`), or with He-normal
    /// weights (std √(2/fan_in)) for `init: "he"`.
    pub fn build(cfg: &CnnConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let mut convs = Vec::with_capacity(cfg.channels.len());
        let mut c_in = cfg.input[0];
        for (i, &c_out) in cfg.channels.iter().enumerate() {
            convs.push(conv_biased(c_in, c_out, 3, 1, cfg.init, vb.pp(format!("conv{}", i + 1)))?);
            c_in = c_out;
        }
        let [c, h, w] = cfg.feature_shape()?;
        let fc = linear_scheme(c * h * w, cfg.hidden, cfg.init, vb.pp("fc"))?;
        let classifier = linear_scheme(cfg.hidden, cfg.num_labels, cfg.init, vb.pp("classifier"))?;
        Ok(Self { cfg: cfg.clone(), convs, fc, classifier })
    }
}

impl Network for Cnn {
    /// The classifier's input: the hidden fully connected layer's activations, `[N, hidden]`.
    fn features_t(&self, x: &Tensor, _train: bool) -> candle_core::Result<Option<Tensor>> {
        super::layers::check_input("cnn", x, &self.cfg.input)?;
        let mut h = x.clone();
        for conv in &self.convs {
            h = conv.forward_block(&h, true, true)?;
        }
        self.fc.forward_act(&h.flatten_from(1)?, true).map(Some)
    }

    fn head_t(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.classifier.forward(features)
    }

    fn config(&self) -> serde_json::Value {
        ArchConfig::Cnn(self.cfg.clone()).to_json()
    }
}

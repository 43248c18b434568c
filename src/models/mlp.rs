//! The multi-layer perceptron: flatten, then `fc1..fcN` linear layers with ReLU between.

use super::init::InitScheme;
use super::layers::{linear_scheme, Linear};
use super::registry::{build_model, ArchConfig};
use super::{Model, Network};
use crate::rng::HostRng;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// The configuration of an MLP: `sizes` is `[in, hidden.., classes]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    /// Layer sizes, input first and classes last.
    pub sizes: Vec<usize>,
    /// How fresh weights are drawn: PyTorch's `nn.Linear` default unless `"he"`.
    #[serde(default, skip_serializing_if = "InitScheme::is_default")]
    pub init: InitScheme,
}

impl MlpConfig {
    /// Rejects sizes that build nothing.
    pub fn validate(&self) -> Result<()> {
        if self.sizes.len() < 2 {
            bail!("mlp needs at least an input and an output size, got {:?}", self.sizes);
        }
        if let Some(z) = self.sizes.iter().position(|&s| s == 0) {
            bail!("mlp: layer size {z} is 0 in {:?}", self.sizes);
        }
        Ok(())
    }

    /// The classifier's tensor-name prefix (the last layer, `fcN.`).
    pub fn head_prefix(&self) -> String {
        format!("fc{}.", self.sizes.len() - 1)
    }
}

/// An MLP over flattened inputs. Layer `fcK` has weight `[out, in]` and bias `[out]` (the PyTorch
/// layout), initialised as PyTorch's `nn.Linear`: weights `kaiming_uniform_(a = √5)`, which is
/// U(±1/√fan_in), and biases U(±1/√fan_in); with `init: "he"` the weights are He-normal
/// (std √(2/fan_in), candle-nn's `linear`) instead.
pub struct Mlp {
    cfg: MlpConfig,
    layers: Vec<Linear>,
}

impl Mlp {
    /// The layer sizes, input first and classes last.
    pub fn sizes(&self) -> &[usize] {
        &self.cfg.sizes
    }

    /// Creates the layers from `vb`.
    pub fn build(cfg: &MlpConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let layers = cfg
            .sizes
            .windows(2)
            .enumerate()
            .map(|(i, w)| linear_scheme(w[0], w[1], cfg.init, vb.pp(format!("fc{}", i + 1))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { cfg: cfg.clone(), layers })
    }
}

/// Builds `mlp([in, hidden.., out])`.
pub fn mlp(sizes: &[usize], rng: &HostRng, device: &Device) -> Result<Model> {
    build_model(&ArchConfig::Mlp(MlpConfig { sizes: sizes.to_vec(), init: InitScheme::Torch }), rng, device)
}

impl Network for Mlp {
    fn forward_t(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        let mut h = x.flatten_from(1)?;
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward_act(&h, i < last)?;
        }
        Ok(h)
    }

    fn config(&self) -> serde_json::Value {
        ArchConfig::Mlp(self.cfg.clone()).to_json()
    }
}

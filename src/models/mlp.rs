//! The multi-layer perceptron: flatten, then `fc1..fcN` linear layers with ReLU between.

use super::init::seeded_var_builder;
use super::{Model, Network, Params};
use crate::rng::HostRng;
use anyhow::{bail, Result};
use candle_core::{Device, Module, Tensor};
use candle_nn::{linear, Linear, VarMap};
use std::sync::Arc;

/// An MLP over flattened inputs. Layer `fcK` has weight `[out, in]` and bias `[out]` (the PyTorch
/// layout), initialised as PyTorch's `nn.Linear` (uniform in ±1/sqrt(fan_in)).
pub struct Mlp {
    sizes: Vec<usize>,
    layers: Vec<Linear>,
}

impl Mlp {
    /// The layer sizes, input first and classes last.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }
}

/// Builds `mlp([in, hidden.., out])`.
pub fn mlp(sizes: &[usize], rng: &HostRng, device: &Device) -> Result<Model> {
    if sizes.len() < 2 {
        bail!("mlp needs at least an input and an output size, got {sizes:?}");
    }
    if let Some(z) = sizes.iter().position(|&s| s == 0) {
        bail!("mlp: layer size {z} is 0 in {sizes:?}");
    }
    let varmap = VarMap::new();
    let vb = seeded_var_builder(&varmap, rng, device);
    let layers = sizes
        .windows(2)
        .enumerate()
        .map(|(i, w)| linear(w[0], w[1], vb.pp(format!("fc{}", i + 1))))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let net = Mlp { sizes: sizes.to_vec(), layers };
    Ok(Model::new(Arc::new(net), Params::new(varmap)))
}

impl Network for Mlp {
    fn forward_t(&self, x: &Tensor, _train: bool) -> candle_core::Result<Tensor> {
        let mut h = x.flatten_from(1)?;
        let last = self.layers.len() - 1;
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(&h)?;
            if i < last {
                h = h.relu()?;
            }
        }
        Ok(h)
    }

    fn config(&self) -> serde_json::Value {
        serde_json::json!({ "model_type": "mlp", "sizes": self.sizes })
    }
}

//! [`SequentialNet`]: a network that is a list of layers (`sequential([...])` in a script), saved
//! as `{"model_type": "sequential", "layers": [...]}` so `from_pretrained` rebuilds it.

use super::layer::{head_of, Sequence};
use super::spec::LayerSpec;
use crate::models::registry::ArchConfig;
use crate::models::Network;
use crate::rng::HostRng;
use anyhow::{bail, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// The configuration of a [`SequentialNet`]: its layers, in order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SequentialConfig {
    /// The layers, named `0`, `1`, ... as in PyTorch's `nn.Sequential`.
    pub layers: Vec<LayerSpec>,
}

impl SequentialConfig {
    /// Rejects an empty list and layers that build nothing.
    pub fn validate(&self) -> Result<()> {
        if self.layers.is_empty() {
            bail!("sequential: give at least one layer");
        }
        for (i, l) in self.layers.iter().enumerate() {
            l.validate().map_err(|e| e.context(format!("sequential layer {i}")))?;
        }
        Ok(())
    }

    /// The head: the prefix of the last layer with tensors and its outputs, when it is linear.
    pub fn head(&self) -> Option<(String, usize)> {
        head_of(&self.layers, "")
    }

    /// Changes the output size of the head (a no-op without one).
    pub fn set_num_classes(&mut self, n: usize) {
        let Some((prefix, _)) = self.head() else { return };
        let Ok(i) = prefix.trim_end_matches('.').parse::<usize>() else { return };
        if let Some(LayerSpec::Linear { out_features, .. }) = self.layers.get_mut(i) {
            *out_features = n;
        }
    }
}

/// A sequence of layers as a network.
pub struct SequentialNet {
    cfg: SequentialConfig,
    seq: Sequence,
    drop_rng: Option<HostRng>,
}

impl SequentialNet {
    /// Builds the layers under `vb`; dropout masks come from a generator seeded from `rng`.
    pub fn build(cfg: &SequentialConfig, vb: VarBuilder, rng: &HostRng) -> Result<Self> {
        cfg.validate()?;
        let dropout = cfg.layers.iter().any(LayerSpec::has_dropout);
        let drop_rng = if dropout { HostRng::new(rng.next_seed()) } else { rng.clone() };
        let seq = Sequence::build(&cfg.layers, vb, &drop_rng)?;
        Ok(Self { cfg: cfg.clone(), seq, drop_rng: dropout.then_some(drop_rng) })
    }
}

impl Network for SequentialNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        self.seq.forward_t(x, train).map_err(|e| candle_core::Error::Msg(format!("sequential: {e}")))
    }

    fn config(&self) -> serde_json::Value {
        ArchConfig::Sequential(self.cfg.clone()).to_json()
    }

    fn dropout_rng(&self) -> Option<HostRng> {
        self.drop_rng.clone()
    }
}

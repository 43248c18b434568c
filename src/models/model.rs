//! [`Model`]: an architecture ([`Network`]) with its parameters and its train/eval mode.

use super::params::Params;
use candle_core::{Result, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// An architecture: the forward computation over parameters held in a [`Params`].
pub trait Network: Send + Sync {
    /// The logits for a batch `x`; `train` selects training behaviour (BatchNorm batch statistics
    /// and running-statistic updates, dropout).
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor>;

    /// The architecture's configuration as JSON (Hugging Face field names where they exist), so a
    /// saved model can be rebuilt.
    fn config(&self) -> serde_json::Value;
}

/// A model: a network, its parameters and whether it is in training mode.
/// Cloning gives another handle to the same model.
#[derive(Clone)]
pub struct Model {
    net: Arc<dyn Network>,
    params: Params,
    training: Arc<AtomicBool>,
}

impl Model {
    /// A model in training mode.
    pub fn new(net: Arc<dyn Network>, params: Params) -> Self {
        Self { net, params, training: Arc::new(AtomicBool::new(true)) }
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

    /// Forward pass in the model's current mode.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.net.forward_t(x, self.is_training())
    }

    /// Forward pass in an explicit mode.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.net.forward_t(x, train)
    }
}

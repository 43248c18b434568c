//! The trunk's outputs kept within one training step whose trainable parameters all lie in the
//! classification head (a linear probe): the step's passes at `w` and at `w + e` see the same
//! trunk weights, so the second reuses the first's features instead of running the frozen
//! backbone again ([`crate::models::Model::reuse_trunk`]).

use crate::rng::RngState;
use candle_core::{Tensor, TensorId};
use std::sync::{Arc, Mutex};

/// One trunk output: the batch tensor it came from, the mode it ran in, the features, and where
/// the dropout generator stood after the trunk drew its masks.
struct Entry {
    input: TensorId,
    train: bool,
    features: Tensor,
    rng_after: Option<RngState>,
}

/// The trunk outputs computed since the scope opened.
#[derive(Default)]
pub struct TrunkCache {
    entries: Vec<Entry>,
}

impl TrunkCache {
    /// The features kept for the batch tensor `input` in mode `train`, and the dropout
    /// generator's position after the trunk's pass.
    pub fn get(&self, input: TensorId, train: bool) -> Option<(Tensor, Option<RngState>)> {
        self.entries
            .iter()
            .find(|e| e.input == input && e.train == train)
            .map(|e| (e.features.clone(), e.rng_after.clone()))
    }

    /// Keeps `features` for the batch tensor `input` in mode `train`.
    pub fn insert(&mut self, input: TensorId, train: bool, features: Tensor, rng_after: Option<RngState>) {
        self.entries.push(Entry { input, train, features, rng_after });
    }
}

/// While alive, the model keeps its trunk outputs; dropping it frees them and ends the reuse.
pub struct TrunkCacheScope {
    slot: Arc<Mutex<Option<TrunkCache>>>,
}

impl TrunkCacheScope {
    /// Opens the cache in `slot`; `None` when it is open already (an enclosing scope owns it).
    pub fn open(slot: &Arc<Mutex<Option<TrunkCache>>>) -> Option<Self> {
        let mut guard = slot.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_some() {
            return None;
        }
        *guard = Some(TrunkCache::default());
        Some(Self { slot: slot.clone() })
    }
}

impl Drop for TrunkCacheScope {
    fn drop(&mut self) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

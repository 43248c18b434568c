//! A `VarBuilder` backend that records the name and shape of every tensor a constructor asks
//! for without allocating it, so that an architecture's parameter count is known without
//! building it (ViT-B/16 or WRN-28-10 in a few milliseconds).

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// The shapes recorded by a [`shape_var_builder`], by tensor name.
pub type ShapeLog = Arc<Mutex<BTreeMap<String, Vec<usize>>>>;

struct ShapeBackend {
    log: ShapeLog,
}

/// A `VarBuilder` whose tensors are zero-stride views of a single zero: constructors run as
/// usual and every requested name and shape lands in the returned log.
pub fn shape_var_builder(device: &Device) -> (VarBuilder<'static>, ShapeLog) {
    let log: ShapeLog = Arc::default();
    let backend = ShapeBackend { log: log.clone() };
    (VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone()), log)
}

impl SimpleBackend for ShapeBackend {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("parameter {name}: a shape-only builder cannot look tensors up without a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.log.lock().map(|l| l.contains_key(name)).unwrap_or(false)
    }
}

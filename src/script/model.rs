//! The `Model` script type: architectures, forward, save/load, freezing.

use super::convert::{err, op, shape_of, Res};
use crate::models::{self, Model};
use crate::session::Session;
use candle_core::Tensor;
use rhai::{Array, Dynamic, Engine, Map, INT};
use std::path::Path;
use std::rc::Rc;

/// Saves a model: a `.safetensors` path gets the weights only; any other path is a folder that
/// gets `model.safetensors` and `config.json`.
pub fn save_model(m: &Model, path: &str) -> anyhow::Result<()> {
    let p = Path::new(path);
    if p.extension().is_some_and(|e| e == "safetensors") {
        return m.params().save(p);
    }
    std::fs::create_dir_all(p).map_err(|e| anyhow::anyhow!("{path}: cannot create the folder: {e}"))?;
    m.params().save(&p.join("model.safetensors"))?;
    let config = serde_json::to_string_pretty(&m.network().config())?;
    crate::fsutil::write_bytes_atomic(&p.join("config.json"), config.as_bytes())
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
        "A multi-layer perceptron `[in, hidden.., classes]`: flattens its input; layers `fc1..fcN` with weight [out, in] and bias [out] (the PyTorch layout), ReLU between. Initialised from the seeded host generator.",
        move |sizes: Array| op("mlp", models::mlp::mlp(&shape_of("mlp sizes", &sizes)?, &s.rng, &s.device)));

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
        "eval",
        "m: Model",
        "Switches to evaluation mode (BatchNorm running statistics, dropout off).",
        |m: &mut Model| m.set_training(false)
    );
    api!(engine, "save", "m: Model, path: String",
        "Saves the weights: `x.safetensors` writes that file; any other path is a folder that gets `model.safetensors` (Hugging Face tensor names) and `config.json`. Atomic writes.",
        |m: &mut Model, path: &str| op("save", save_model(m, path)));
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
}

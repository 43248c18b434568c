//! Conversions between Rhai values and Rust: errors, shapes, nested arrays, option maps.

use candle_core::{DType, Device, Tensor};
use rhai::{Array, Dynamic, EvalAltResult, Map, Position, INT};
use serde::de::DeserializeOwned;

/// The result type of every registered function.
pub type Res<T> = Result<T, Box<EvalAltResult>>;

/// A runtime error carrying `msg`; Rhai attaches the script position.
pub fn err(msg: impl Into<String>) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(Dynamic::from(msg.into()), Position::NONE))
}

/// Converts a core error into a script error, prefixed by the operation's name.
pub fn op<T, E: Into<anyhow::Error>>(name: &str, r: Result<T, E>) -> Res<T> {
    r.map_err(|e| err(format!("{name}: {:#}", e.into())))
}

/// Splits `"a: T, b: U -> R"` into `["a: T", "b: U"]` and `"R"`.
pub fn split_signature(sig: &str) -> (Vec<String>, String) {
    let (params, ret) = match sig.rsplit_once("->") {
        Some((p, r)) => (p, r.trim().to_string()),
        None => (sig, "()".to_string()),
    };
    let params = params.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect();
    (params, ret)
}

/// Turns plain text into a `///` doc comment block.
pub fn doc_comment(text: &str) -> String {
    text.lines().map(|l| format!("/// {}", l.trim())).collect::<Vec<_>>().join("\n")
}

/// A non-negative size from a script integer.
pub fn to_usize(what: &str, v: INT) -> Res<usize> {
    usize::try_from(v).map_err(|_| err(format!("{what} must be >= 0, got {v}")))
}

/// A shape from an array of integers.
pub fn shape_of(what: &str, a: &Array) -> Res<Vec<usize>> {
    a.iter()
        .map(|d| match d.as_int() {
            Ok(v) => to_usize(what, v),
            Err(t) => Err(err(format!("{what}: dimensions must be integers, got {t}"))),
        })
        .collect()
}

/// A dimension index, negative counting from the end.
pub fn dim_index(rank: usize, d: INT) -> Res<usize> {
    let r = rank as INT;
    let i = if d < 0 { d + r } else { d };
    if i < 0 || i >= r {
        return Err(err(format!("dimension {d} is out of range for a tensor of rank {rank}")));
    }
    Ok(i as usize)
}

/// A number (integer or float) as f64.
pub fn number(what: &str, v: &Dynamic) -> Res<f64> {
    if let Ok(f) = v.as_float() {
        Ok(f)
    } else if let Ok(i) = v.as_int() {
        Ok(i as f64)
    } else if let Ok(b) = v.as_bool() {
        Ok(if b { 1.0 } else { 0.0 })
    } else {
        Err(err(format!("{what}: expected a number, got {}", v.type_name())))
    }
}

fn flatten_into(what: &str, v: &Dynamic, depth: usize, shape: &mut Vec<usize>, out: &mut Vec<f64>) -> Res<()> {
    if v.is_array() {
        let a = v.read_lock::<Array>().ok_or_else(|| err(format!("{what}: unreadable array")))?;
        if depth == shape.len() {
            if !out.is_empty() {
                return Err(err(format!("{what}: ragged nested array (a number where a list was expected)")));
            }
            shape.push(a.len());
        } else if shape[depth] != a.len() {
            return Err(err(format!(
                "{what}: ragged nested array: a list of {} where {} were expected at depth {depth}",
                a.len(),
                shape[depth]
            )));
        }
        for x in a.iter() {
            flatten_into(what, x, depth + 1, shape, out)?;
        }
        Ok(())
    } else {
        if depth != shape.len() {
            return Err(err(format!("{what}: ragged nested array (a number where a list was expected)")));
        }
        out.push(number(what, v)?);
        Ok(())
    }
}

/// A tensor from a number or a (nested) array of numbers.
pub fn tensor_from_dynamic(v: &Dynamic, dtype: DType, device: &Device) -> Res<Tensor> {
    let mut shape = Vec::new();
    let mut values = Vec::new();
    flatten_into("tensor", v, 0, &mut shape, &mut values)?;
    let t = op("tensor", Tensor::from_vec(values, shape, &Device::Cpu))?;
    op("tensor", t.to_dtype(dtype).and_then(|t| t.to_device(device)))
}

fn nest(values: &[Dynamic], dims: &[usize]) -> Dynamic {
    match dims {
        [] => values.first().cloned().unwrap_or(Dynamic::UNIT),
        [_] => Dynamic::from_array(values.to_vec()),
        [_, rest @ ..] => {
            let step: usize = rest.iter().product();
            let rows: Array = if step == 0 { Vec::new() } else { values.chunks(step).map(|c| nest(c, rest)).collect() };
            Dynamic::from_array(rows)
        }
    }
}

/// Whether a dtype holds integers.
pub fn is_integer(dtype: DType) -> bool {
    matches!(dtype, DType::U8 | DType::U32 | DType::I64)
}

/// The values of a tensor as Rhai numbers (INT for integer dtypes, FLOAT otherwise), flat.
pub fn tensor_values(t: &Tensor) -> Res<Vec<Dynamic>> {
    let flat = op("to_array", t.flatten_all().and_then(|f| f.to_device(&Device::Cpu)))?;
    if is_integer(t.dtype()) {
        let v = op("to_array", flat.to_dtype(DType::I64).and_then(|f| f.to_vec1::<i64>()))?;
        Ok(v.into_iter().map(Dynamic::from_int).collect())
    } else {
        let v = op("to_array", flat.to_dtype(DType::F64).and_then(|f| f.to_vec1::<f64>()))?;
        Ok(v.into_iter().map(Dynamic::from_float).collect())
    }
}

/// A tensor as nested Rhai arrays (a bare number for a scalar).
pub fn tensor_to_dynamic(t: &Tensor) -> Res<Dynamic> {
    let values = tensor_values(t)?;
    Ok(nest(&values, t.dims()))
}

/// Parses an option map into a typed settings struct (unknown keys are errors). Integers are
/// accepted where floats are expected.
pub fn options<T: DeserializeOwned>(what: &str, map: &Map) -> Res<T> {
    let json: serde_json::Value =
        rhai::serde::from_dynamic(&Dynamic::from_map(map.clone())).map_err(|e| err(format!("{what} options: {e}")))?;
    serde_json::from_value(json).map_err(|e| err(format!("{what} options: {e}")))
}

/// A Rhai map from a JSON value.
pub fn from_json(v: &serde_json::Value) -> Res<Dynamic> {
    rhai::serde::to_dynamic(v)
}

/// A JSON value from a Rhai value.
pub fn to_json(v: &Dynamic) -> Res<serde_json::Value> {
    rhai::serde::from_dynamic(v)
}

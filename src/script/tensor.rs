//! The `Tensor` script type: creation, arithmetic with broadcasting, reductions, shape
//! operations, element-wise functions, and safetensors files.

use super::convert::{dim_index, err, op, shape_of, tensor_from_dynamic, tensor_to_dynamic, tensor_values, Res};
use crate::device::device_name;
use crate::session::Session;
use crate::train::loss;
use candle_core::{DType, Device, Tensor};
use rhai::{Array, Dynamic, Engine, ImmutableString, Map, FLOAT, INT};
use std::collections::BTreeMap;
use std::path::Path;
use std::rc::Rc;

/// The most elements a tensor made from numbers alone (`arange`) may have: 2^28 (1 GiB of f32).
const MAX_MADE_ELEMENTS: f64 = (1u64 << 28) as f64;

/// Checks that `arange(start, end, step)` has a finite, bounded number of elements.
fn arange_count(a: f64, b: f64, st: f64) -> Res<()> {
    if st == 0.0 || !st.is_finite() || !a.is_finite() || !b.is_finite() {
        return Err(err(format!("arange: start, end and step must be finite and step not 0, got {a}, {b}, {st}")));
    }
    let n = ((b - a) / st).ceil();
    if n > MAX_MADE_ELEMENTS {
        return Err(err(format!(
            "arange: {n} elements is more than {MAX_MADE_ELEMENTS} (start {a}, end {b}, step {st})"
        )));
    }
    Ok(())
}

/// Parses a dtype name.
pub fn parse_dtype(name: &str) -> Res<DType> {
    match name {
        "f32" | "float32" => Ok(DType::F32),
        "f64" | "float64" => Ok(DType::F64),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "u8" | "uint8" => Ok(DType::U8),
        "u32" | "uint32" => Ok(DType::U32),
        "i64" | "int64" => Ok(DType::I64),
        other => Err(err(format!("unknown dtype `{other}` (expected f32, f64, f16, bf16, u8, u32 or i64)"))),
    }
}

/// A short display: shape, dtype, device and the first few values.
pub fn describe(t: &Tensor) -> String {
    const SHOWN: usize = 6;
    let n = t.elem_count();
    let head = match t.flatten_all().and_then(|f| f.narrow(0, 0, n.min(SHOWN))) {
        Ok(h) => match tensor_values(&h) {
            Ok(v) => v
                .iter()
                .map(|x| match x.as_float() {
                    Ok(f) => format!("{f:.4}"),
                    Err(_) => x.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", "),
            Err(_) => "?".into(),
        },
        Err(_) => "?".into(),
    };
    let more = if n > SHOWN { ", …" } else { "" };
    format!("Tensor({:?}, {:?}, {}) [{head}{more}]", t.dims(), t.dtype(), device_name(t.device()))
}

/// `t ∘ c` for a number `c` (`c_first`: `c ∘ t`), as one affine map where possible.
fn with_number(name: &str, t: &Tensor, c: f64, c_first: bool) -> Res<Tensor> {
    let r = match (name, c_first) {
        ("+", _) => t.affine(1.0, c),
        ("-", false) => t.affine(1.0, -c),
        ("-", true) => t.affine(-1.0, c),
        ("*", _) => t.affine(c, 0.0),
        ("/", false) => t.affine(1.0 / c, 0.0),
        ("/", true) => t.recip().and_then(|r| r.affine(c, 0.0)),
        _ => unreachable!("binary operator"),
    };
    r.map_err(|e| err(format!("`{name}` of a tensor {:?} and a number: {e}", t.dims())))
}

fn binary(name: &str, a: &Tensor, b: &Tensor) -> Res<Tensor> {
    let r = match name {
        "+" => a.broadcast_add(b),
        "-" => a.broadcast_sub(b),
        "*" => a.broadcast_mul(b),
        "/" => a.broadcast_div(b),
        _ => unreachable!("binary operator"),
    };
    r.map_err(|e| err(format!("`{name}` of tensors {:?} and {:?}: {e}", a.dims(), b.dims())))
}

fn reduce(name: &str, t: &Tensor, dim: Option<INT>) -> Res<Tensor> {
    let r = match dim {
        None => {
            let flat = op(name, t.flatten_all())?;
            match name {
                "sum" => flat.sum(0),
                "mean" => flat.mean(0),
                "max" => flat.max(0),
                "min" => flat.min(0),
                "argmax" => flat.argmax(0),
                _ => unreachable!("reduction"),
            }
        }
        Some(d) => {
            let d = dim_index(t.rank(), d)?;
            match name {
                "sum" => t.sum(d),
                "mean" => t.mean(d),
                "max" => t.max(d),
                "min" => t.min(d),
                "argmax" => t.argmax(d),
                _ => unreachable!("reduction"),
            }
        }
    };
    r.map_err(|e| err(format!("{name} of a tensor {:?}: {e}", t.dims())))
}

/// `log_softmax` along `dim`, from differentiable elementary ops.
pub fn log_softmax_dim(t: &Tensor, dim: usize) -> candle_core::Result<Tensor> {
    let max = t.max_keepdim(dim)?.detach();
    let shifted = t.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(dim)?.log()?;
    shifted.broadcast_sub(&lse)
}

fn reshape(t: &Tensor, shape: &Array) -> Res<Tensor> {
    let mut dims = Vec::with_capacity(shape.len());
    let mut infer = None;
    for (i, d) in shape.iter().enumerate() {
        let v = d.as_int().map_err(|_| err("reshape: dimensions must be integers"))?;
        if v == -1 {
            if infer.replace(i).is_some() {
                return Err(err("reshape: at most one dimension can be -1"));
            }
            dims.push(1);
        } else {
            dims.push(super::convert::to_usize("reshape", v)?);
        }
    }
    if let Some(i) = infer {
        let known: usize = dims.iter().product();
        if known == 0 || !t.elem_count().is_multiple_of(known) {
            return Err(err(format!("reshape: cannot reshape {:?} into {shape:?}", t.dims())));
        }
        dims[i] = t.elem_count() / known;
    }
    t.reshape(dims.clone()).map_err(|e| err(format!("reshape {:?} into {dims:?}: {e}", t.dims())))
}

fn random(session: &Session, shape: &Array, normal: bool) -> Res<Tensor> {
    let dims = shape_of("shape", shape)?;
    let n = dims.iter().product();
    let values = if normal { session.rng.normal(n, 0.0, 1.0) } else { session.rng.uniform(n, 0.0, 1.0) };
    op("random", Tensor::from_vec(values, dims, session.device()))
}

/// Reads a safetensors file into a map of name -> Tensor (on the session's device).
pub fn load_tensor_map(path: &str, device: &Device) -> Res<Map> {
    let tensors = op("load_tensors", crate::models::params::load_safetensors(Path::new(path)))?;
    let mut map = Map::new();
    let mut names: Vec<_> = tensors.into_iter().collect();
    names.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, t) in names {
        let t = op("load_tensors", t.to_device(device))?;
        map.insert(k.into(), Dynamic::from(t));
    }
    Ok(map)
}

/// Writes a map of name -> Tensor to a safetensors file, atomically.
pub fn save_tensor_map(path: &str, map: &Map) -> Res<()> {
    let mut tensors = BTreeMap::new();
    for (k, v) in map {
        let t = v
            .clone()
            .try_cast::<Tensor>()
            .ok_or_else(|| err(format!("save_tensors: `{k}` is a {}, not a Tensor", v.type_name())))?;
        tensors.insert(k.to_string(), t);
    }
    op("save_tensors", crate::models::params::save_safetensors(Path::new(path), &tensors))
}

/// Registers the tensor API.
pub fn register(engine: &mut Engine, session: &Rc<Session>) {
    engine.register_type_with_name::<Tensor>("Tensor");

    let s = session.clone();
    api!(
        engine,
        "tensor",
        "values: Array -> Tensor",
        "A float32 tensor from a number or a nested array of numbers, e.g. `tensor([[1, 2], [3, 4]])`.",
        move |v: Dynamic| tensor_from_dynamic(&v, DType::F32, s.device())
    );
    let s = session.clone();
    api!(
        engine,
        "tensor",
        "values: Array, dtype: String -> Tensor",
        "A tensor of the given dtype (f32, f64, f16, bf16, u8, u32, i64) from nested numbers.",
        move |v: Dynamic, dtype: &str| tensor_from_dynamic(&v, parse_dtype(dtype)?, s.device())
    );
    let s = session.clone();
    api!(
        engine,
        "zeros",
        "shape: Array -> Tensor",
        "A float32 tensor of zeros of the given shape.",
        move |shape: Array| op("zeros", Tensor::zeros(shape_of("zeros", &shape)?, DType::F32, s.device()))
    );
    let s = session.clone();
    api!(
        engine,
        "ones",
        "shape: Array -> Tensor",
        "A float32 tensor of ones of the given shape.",
        move |shape: Array| op("ones", Tensor::ones(shape_of("ones", &shape)?, DType::F32, s.device()))
    );
    let s = session.clone();
    api!(
        engine,
        "randn",
        "shape: Array -> Tensor",
        "Standard normal samples of the given shape, from the seeded host generator.",
        move |shape: Array| random(&s, &shape, true)
    );
    let s = session.clone();
    api!(
        engine,
        "rand",
        "shape: Array -> Tensor",
        "Uniform samples in [0, 1) of the given shape, from the seeded host generator.",
        move |shape: Array| random(&s, &shape, false)
    );
    let s = session.clone();
    api!(engine, "arange", "end: int -> Tensor", "The float32 values 0, 1, …, end-1.", move |end: INT| {
        arange_count(0.0, end as f64, 1.0)?;
        op("arange", Tensor::arange(0f32, end as f32, s.device()))
    });
    let s = session.clone();
    api!(
        engine,
        "arange",
        "start: float, end: float, step: float -> Tensor",
        "Float32 values from `start` (included) to `end` (excluded) by `step`.",
        move |a: Dynamic, b: Dynamic, st: Dynamic| {
            let (a, b, st) = (
                super::convert::number("arange", &a)?,
                super::convert::number("arange", &b)?,
                super::convert::number("arange", &st)?,
            );
            arange_count(a, b, st)?;
            op("arange", Tensor::arange_step(a as f32, b as f32, st as f32, s.device()))
        }
    );

    for name in ["+", "-", "*", "/"] {
        api!(
            engine,
            name,
            "a: Tensor, b: Tensor -> Tensor",
            "Element-wise arithmetic with broadcasting (numpy rules).",
            move |a: Tensor, b: Tensor| binary(name, &a, &b)
        );
        api!(
            engine,
            name,
            "a: Tensor, b: float -> Tensor",
            "Element-wise arithmetic with a number.",
            move |a: Tensor, b: FLOAT| with_number(name, &a, b, false)
        );
        api!(
            engine,
            name,
            "a: Tensor, b: int -> Tensor",
            "Element-wise arithmetic with a number.",
            move |a: Tensor, b: INT| with_number(name, &a, b as f64, false)
        );
        api!(
            engine,
            name,
            "a: float, b: Tensor -> Tensor",
            "Element-wise arithmetic with a number.",
            move |a: FLOAT, b: Tensor| with_number(name, &b, a, true)
        );
        api!(
            engine,
            name,
            "a: int, b: Tensor -> Tensor",
            "Element-wise arithmetic with a number.",
            move |a: INT, b: Tensor| with_number(name, &b, a as f64, true)
        );
    }
    api!(engine, "-", "a: Tensor -> Tensor", "Negation.", |a: Tensor| op("neg", a.neg()));
    api!(
        engine,
        "matmul",
        "a: Tensor, b: Tensor -> Tensor",
        "Matrix product of the last two dimensions, batch dimensions broadcast.",
        |a: Tensor, b: Tensor| {
            if a.rank() < 2 || b.rank() < 2 {
                return Err(err(format!("matmul needs tensors of rank >= 2, got {:?} and {:?}", a.dims(), b.dims())));
            }
            a.broadcast_matmul(&b).map_err(|e| err(format!("matmul of {:?} and {:?}: {e}", a.dims(), b.dims())))
        }
    );

    for name in ["sum", "mean", "max", "min", "argmax"] {
        api!(
            engine,
            name,
            "t: Tensor -> Tensor",
            "Reduction over all elements (a scalar tensor; argmax gives the flat index).",
            move |t: Tensor| reduce(name, &t, None)
        );
        api!(
            engine,
            name,
            "t: Tensor, dim: int -> Tensor",
            "Reduction along `dim` (negative counts from the end); the dimension is removed.",
            move |t: Tensor, d: INT| reduce(name, &t, Some(d))
        );
    }

    api!(
        engine,
        "reshape",
        "t: Tensor, shape: Array -> Tensor",
        "The same values in a new shape; one dimension may be -1.",
        |t: Tensor, s: Array| reshape(&t, &s)
    );
    api!(engine, "flatten", "t: Tensor -> Tensor", "All dimensions flattened into one.", |t: Tensor| op(
        "flatten",
        t.flatten_all()
    ));
    api!(
        engine,
        "flatten",
        "t: Tensor, start_dim: int -> Tensor",
        "Dimensions start_dim.. flattened into one (torch.flatten(t, start_dim)): flatten(h, 1) keeps the batch.",
        |t: Tensor, d: INT| op("flatten", t.flatten_from(dim_index(t.rank(), d)?))
    );
    let pool = |kind: crate::models::compose::pool::PoolKind, name: &'static str| {
        move |t: Tensor, k: INT| -> Res<Tensor> {
            let k = super::convert::to_usize(&format!("{name} kernel_size"), k)?.max(1);
            op(name, crate::models::compose::pool::pool2d(&t, kind, k, k, 0))
        }
    };
    api!(
        engine,
        "max_pool2d",
        "t: Tensor, kernel_size: int -> Tensor",
        "Max-pooling of images [N, C, H, W] over k x k windows with stride k (F.max_pool2d(t, k)); 2 runs the fused CPU op.",
        pool(crate::models::compose::pool::PoolKind::Max, "max_pool2d")
    );
    api!(
        engine,
        "avg_pool2d",
        "t: Tensor, kernel_size: int -> Tensor",
        "Average pooling of images [N, C, H, W] over k x k windows with stride k (F.avg_pool2d(t, k)).",
        pool(crate::models::compose::pool::PoolKind::Avg, "avg_pool2d")
    );
    api!(
        engine,
        "transpose",
        "t: Tensor, d0: int, d1: int -> Tensor",
        "Swaps two dimensions.",
        |t: Tensor, a: INT, b: INT| {
            let (a, b) = (dim_index(t.rank(), a)?, dim_index(t.rank(), b)?);
            op("transpose", t.transpose(a, b).and_then(|t| t.contiguous()))
        }
    );
    api!(
        engine,
        "narrow",
        "t: Tensor, dim: int, start: int, len: int -> Tensor",
        "The slice `start..start+len` along `dim`.",
        |t: Tensor, d: INT, start: INT, len: INT| {
            let d = dim_index(t.rank(), d)?;
            let (start, len) =
                (super::convert::to_usize("narrow start", start)?, super::convert::to_usize("narrow len", len)?);
            t.narrow(d, start, len).map_err(|e| err(format!("narrow({d}, {start}, {len}) of {:?}: {e}", t.dims())))
        }
    );
    api!(
        engine,
        "cat",
        "tensors: Array, dim: int -> Tensor",
        "Concatenates tensors along `dim`.",
        |ts: Array, d: INT| {
            let ts: Vec<Tensor> = ts
                .into_iter()
                .enumerate()
                .map(|(i, v)| v.try_cast::<Tensor>().ok_or_else(|| err(format!("cat: element {i} is not a Tensor"))))
                .collect::<Res<_>>()?;
            let first = ts.first().ok_or_else(|| err("cat: empty list"))?;
            let d = dim_index(first.rank(), d)?;
            let shapes: Vec<_> = ts.iter().map(|t| t.dims().to_vec()).collect();
            Tensor::cat(&ts, d).map_err(|e| err(format!("cat along {d} of {shapes:?}: {e}")))
        }
    );
    api!(
        engine,
        "unsqueeze",
        "t: Tensor, dim: int -> Tensor",
        "Inserts a dimension of size 1.",
        |t: Tensor, d: INT| op("unsqueeze", t.unsqueeze(dim_index(t.rank() + 1, d)?))
    );
    api!(engine, "squeeze", "t: Tensor, dim: int -> Tensor", "Removes a dimension of size 1.", |t: Tensor, d: INT| op(
        "squeeze",
        t.squeeze(dim_index(t.rank(), d)?)
    ));

    macro_rules! unary {
        ($name:literal, $doc:literal, $f:expr) => {
            api!(engine, $name, "t: Tensor -> Tensor", $doc, |t: Tensor| op($name, $f(&t)));
        };
    }
    unary!("exp", "Element-wise exponential.", |t: &Tensor| t.exp());
    unary!("log", "Element-wise natural logarithm.", |t: &Tensor| t.log());
    unary!("sqrt", "Element-wise square root.", |t: &Tensor| t.sqrt());
    unary!("sqr", "Element-wise square.", |t: &Tensor| t.sqr());
    unary!("abs", "Element-wise absolute value.", |t: &Tensor| t.abs());
    unary!("relu", "Element-wise max(x, 0) (one fused op on the CPU, with its backward pass).", crate::ops::relu);
    unary!("gelu", "Element-wise exact GELU, x·Φ(x) (F.gelu).", crate::ops::gelu_erf);
    unary!("sigmoid", "Element-wise logistic function.", |t: &Tensor| (t.neg()?.exp()? + 1.0)?.recip());
    unary!("tanh", "Element-wise hyperbolic tangent.", |t: &Tensor| t.tanh());
    api!(engine, "pow", "t: Tensor, p: float -> Tensor", "Element-wise power.", |t: Tensor, p: FLOAT| op(
        "pow",
        t.powf(p)
    ));
    api!(
        engine,
        "softmax",
        "t: Tensor, dim: int -> Tensor",
        "Softmax along `dim` (differentiable).",
        |t: Tensor, d: INT| op("softmax", log_softmax_dim(&t, dim_index(t.rank(), d)?).and_then(|l| l.exp()))
    );
    api!(
        engine,
        "log_softmax",
        "t: Tensor, dim: int -> Tensor",
        "Log-softmax along `dim` (differentiable).",
        |t: Tensor, d: INT| op("log_softmax", log_softmax_dim(&t, dim_index(t.rank(), d)?))
    );
    api!(
        engine,
        "to_dtype",
        "t: Tensor, dtype: String -> Tensor",
        "The tensor converted to another dtype.",
        |t: Tensor, d: &str| op("to_dtype", t.to_dtype(parse_dtype(d)?))
    );
    api!(
        engine,
        "one_hot",
        "labels: Tensor, classes: int -> Tensor",
        "One-hot float32 rows [N, classes] for integer labels [N].",
        |l: Tensor, k: INT| op("one_hot", loss::one_hot(&l, super::convert::to_usize("classes", k)?, DType::F32))
    );
    api!(
        engine,
        "cross_entropy",
        "logits: Tensor, labels: Tensor -> Tensor",
        "Mean cross-entropy of logits [N, K] against integer labels [N] (a scalar tensor).",
        |l: Tensor, y: Tensor| op("cross_entropy", loss::cross_entropy(&l, &y, 0.0))
    );
    api!(
        engine,
        "cross_entropy",
        "logits: Tensor, labels: Tensor, label_smoothing: float -> Tensor",
        "Mean cross-entropy with label smoothing ε: the target is (1-ε)·onehot + ε/K.",
        |l: Tensor, y: Tensor, eps: FLOAT| op("cross_entropy", loss::cross_entropy(&l, &y, eps))
    );

    getter!(engine, "shape", "Array", "The dimensions, as an array of integers.", |t: &mut Tensor| -> Array {
        t.dims().iter().map(|&d| Dynamic::from_int(d as INT)).collect()
    });
    getter!(
        engine,
        "dtype",
        "String",
        "The element type: f32, f64, bf16, u32, …",
        |t: &mut Tensor| -> ImmutableString { format!("{:?}", t.dtype()).to_lowercase().into() }
    );
    getter!(
        engine,
        "device",
        "String",
        "Where the tensor lives: cpu or cuda:N.",
        |t: &mut Tensor| -> ImmutableString { device_name(t.device()).into() }
    );
    getter!(engine, "rank", "int", "Number of dimensions.", |t: &mut Tensor| -> INT { t.rank() as INT });
    api!(engine, "len", "t: Tensor -> int", "Size of the first dimension.", |t: &mut Tensor| -> Res<INT> {
        Ok(op("len", t.dim(0))? as INT)
    });
    api!(
        engine,
        "item",
        "t: Tensor -> float",
        "The value of a one-element tensor (an int for integer dtypes).",
        |t: &mut Tensor| -> Res<Dynamic> {
            if t.elem_count() != 1 {
                return Err(err(format!("item: the tensor has shape {:?}, not one element", t.dims())));
            }
            Ok(tensor_values(t)?.remove(0))
        }
    );
    api!(engine, "to_array", "t: Tensor -> Array", "The values as nested arrays.", |t: &mut Tensor| tensor_to_dynamic(
        t
    ));
    api!(
        engine,
        "to_string",
        "t: Tensor -> String",
        "Shape, dtype, device and the first values.",
        |t: &mut Tensor| -> ImmutableString { describe(t).into() }
    );
    api!(
        engine,
        "to_debug",
        "t: Tensor -> String",
        "Shape, dtype, device and the first values.",
        |t: &mut Tensor| -> ImmutableString { describe(t).into() }
    );

    let s = session.clone();
    api!(
        engine,
        "load_tensors",
        "path: String -> Map",
        "Reads a safetensors file into a map of name -> Tensor.",
        move |path: &str| load_tensor_map(path, s.device())
    );
    api!(
        engine,
        "save_tensors",
        "path: String, tensors: Map",
        "Writes a map of name -> Tensor to a safetensors file (atomically: temporary file, then rename). Under several ranks rank 0 writes.",
        |path: &str, map: Map| if crate::dist::is_leader() { save_tensor_map(path, &map) } else { Ok(()) }
    );
}

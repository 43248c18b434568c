//! Tensor functions for sample selection (small-loss tricks, co-teaching, ESAM's data
//! selection): comparisons, `where`, `clamp`, sorting, `topk`, indexing, a sub-batch, and the
//! per-example cross-entropy. Each is one candle operation (or two) over the whole tensor.

use super::convert::{err, op, options, Res};
use crate::data::Batch;
use crate::train::loss;
use candle_core::{DType, Tensor, D};
use rhai::{Dynamic, Engine, Map, FLOAT, INT};
use serde::Deserialize;

/// Options of `argsort`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct SortOptions {
    descending: bool,
}

/// Options of `cross_entropy(logits, labels, #{...})`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct LossOptions {
    reduction: String,
    label_smoothing: f64,
}

impl Default for LossOptions {
    fn default() -> Self {
        Self { reduction: "mean".into(), label_smoothing: 0.0 }
    }
}

/// A dimension index (negative counts from the end).
fn dim(t: &Tensor, d: INT, what: &str) -> Res<usize> {
    super::convert::dim_index(t.rank(), d).map_err(|e| err(format!("{what}: {e}")))
}

/// Indices as a u32 tensor (from any integer or float dtype).
fn as_indices(t: &Tensor, what: &str) -> Res<Tensor> {
    if t.dtype() == DType::U32 {
        return Ok(t.clone());
    }
    let min = op(what, t.to_dtype(DType::F64).and_then(|x| x.min_all()).and_then(|x| x.to_scalar::<f64>()));
    if t.elem_count() > 0 && min? < 0.0 {
        return Err(err(format!("{what}: indices must be >= 0")));
    }
    op(what, t.to_dtype(DType::U32))
}

/// A 1-D index tensor (u32) for selecting along one dimension.
fn indices_1d(t: &Tensor, what: &str) -> Res<Tensor> {
    let i = as_indices(t, what)?;
    if i.rank() != 1 {
        return Err(err(format!("{what}: indices must be 1-D, got {:?}", i.dims())));
    }
    Ok(i)
}

/// `arg_sort_last_dim`, also for tensors with no element (candle's kernel panics on those).
fn arg_sort(t: &Tensor, ascending: bool, what: &str) -> Res<Tensor> {
    if t.rank() == 0 {
        return Err(err(format!("{what}: a scalar has no dimension to sort")));
    }
    if t.elem_count() == 0 {
        return op(what, Tensor::zeros(t.shape(), DType::U32, t.device()));
    }
    op(what, t.contiguous().and_then(|t| t.arg_sort_last_dim(ascending)))
}

/// Registers the selection functions.
pub fn register(engine: &mut Engine) {
    for name in ["gt", "lt", "ge", "le", "eq", "ne"] {
        let cmp = move |a: &Tensor, b: &Tensor| match name {
            "gt" => a.broadcast_gt(b),
            "lt" => a.broadcast_lt(b),
            "ge" => a.broadcast_ge(b),
            "le" => a.broadcast_le(b),
            "eq" => a.broadcast_eq(b),
            _ => a.broadcast_ne(b),
        };
        api!(
            engine,
            name,
            "a: Tensor, b: Tensor -> Tensor",
            "Element-wise comparison with broadcasting: a u8 tensor of 1 where it holds, 0 elsewhere.",
            move |a: Tensor, b: Tensor| {
                let b = op(name, b.to_dtype(a.dtype()))?;
                op(name, cmp(&a, &b))
            }
        );
        api!(
            engine,
            name,
            "a: Tensor, b: float -> Tensor",
            "Element-wise comparison with a number (a u8 tensor).",
            move |a: Tensor, b: FLOAT| {
                let b = op(name, Tensor::new(b, a.device()).and_then(|b| b.to_dtype(a.dtype())))?;
                op(name, cmp(&a, &b))
            }
        );
        api!(
            engine,
            name,
            "a: Tensor, b: int -> Tensor",
            "Element-wise comparison with a number (a u8 tensor).",
            move |a: Tensor, b: INT| {
                let b = op(name, Tensor::new(b as f64, a.device()).and_then(|b| b.to_dtype(a.dtype())))?;
                op(name, cmp(&a, &b))
            }
        );
    }
    api!(
        engine,
        "where",
        "cond: Tensor, a: Tensor, b: Tensor -> Tensor",
        "Element-wise `a` where `cond` is non-zero, else `b`; `a` and `b` are broadcast to `cond`'s shape.",
        |c: Tensor, a: Tensor, b: Tensor| -> Res<Tensor> {
            let shape = c.shape().clone();
            let a = op("where", a.broadcast_as(&shape).and_then(|t| t.contiguous()))?;
            let b =
                op("where", b.to_dtype(a.dtype()).and_then(|t| t.broadcast_as(&shape)).and_then(|t| t.contiguous()))?;
            op("where", c.to_dtype(DType::U8).and_then(|c| c.where_cond(&a, &b)))
        }
    );
    api!(
        engine,
        "where",
        "cond: Tensor, a: float, b: float -> Tensor",
        "Element-wise `a` where `cond` is non-zero, else `b` (f32).",
        |c: Tensor, a: FLOAT, b: FLOAT| -> Res<Tensor> {
            let (dev, shape) = (c.device().clone(), c.shape().clone());
            let a = op("where", Tensor::full(a as f32, &shape, &dev))?;
            let b = op("where", Tensor::full(b as f32, &shape, &dev))?;
            op("where", c.to_dtype(DType::U8).and_then(|c| c.where_cond(&a, &b)))
        }
    );
    api!(
        engine,
        "clamp",
        "t: Tensor, lo: float, hi: float -> Tensor",
        "Every element limited to [lo, hi].",
        |t: Tensor, lo: FLOAT, hi: FLOAT| -> Res<Tensor> {
            if lo.is_nan() || hi.is_nan() || lo > hi {
                return Err(err(format!("clamp: needs lo <= hi, got {lo} and {hi}")));
            }
            op("clamp", t.clamp(lo, hi))
        }
    );
    api!(
        engine,
        "argsort",
        "t: Tensor -> Tensor",
        "Indices (u32) that sort the last dimension ascending.",
        |t: Tensor| arg_sort(&t, true, "argsort")
    );
    api!(
        engine,
        "argsort",
        "t: Tensor, options: Map -> Tensor",
        "Indices (u32) that sort the last dimension. Options: descending (false).",
        |t: Tensor, o: Map| -> Res<Tensor> {
            let so: SortOptions = options("argsort", &o)?;
            arg_sort(&t, !so.descending, "argsort")
        }
    );
    api!(
        engine,
        "topk",
        "t: Tensor, k: int -> Map",
        "The k largest values of the last dimension, largest first: #{values, indices} (indices u32).",
        |t: Tensor, k: INT| -> Res<Map> {
            let n = op("topk", t.dim(D::Minus1))?;
            if k < 0 || k as usize > n {
                return Err(err(format!("topk: k must be in 0..={n}, got {k}")));
            }
            let idx = arg_sort(&t, false, "topk")?;
            let idx = op("topk", idx.narrow(D::Minus1, 0, k as usize).and_then(|i| i.contiguous()))?;
            let values = op("topk", t.contiguous().and_then(|t| t.gather(&idx, D::Minus1)))?;
            let mut m = Map::new();
            m.insert("values".into(), Dynamic::from(values));
            m.insert("indices".into(), Dynamic::from(idx));
            Ok(m)
        }
    );
    api!(
        engine,
        "index_select",
        "t: Tensor, indices: Tensor, dim: int -> Tensor",
        "The slices of `t` at `indices` (a 1-D integer tensor) along `dim`.",
        |t: Tensor, i: Tensor, d: INT| -> Res<Tensor> {
            let d = dim(&t, d, "index_select")?;
            op("index_select", t.index_select(&indices_1d(&i, "index_select")?, d))
        }
    );
    api!(
        engine,
        "gather",
        "t: Tensor, indices: Tensor, dim: int -> Tensor",
        "`out[i][j] = t[i][indices[i][j]]` along `dim` (as torch.gather): `indices` has `t`'s rank.",
        |t: Tensor, i: Tensor, d: INT| -> Res<Tensor> {
            let d = dim(&t, d, "gather")?;
            let i = as_indices(&i, "gather")?;
            op("gather", t.contiguous().and_then(|t| t.gather(&i.contiguous()?, d)))
        }
    );
    api!(
        engine,
        "select",
        "b: Batch, indices: Tensor -> Batch",
        "The sub-batch of the examples at `indices` (a 1-D integer tensor), in that order.",
        |b: &mut Batch, i: Tensor| -> Res<Batch> {
            let i = indices_1d(&i, "select")?;
            let n = b.len() as f64;
            if i.elem_count() > 0
                && op("select", i.max_all().and_then(|m| m.to_dtype(DType::F64)).and_then(|m| m.to_scalar::<f64>()))?
                    >= n
            {
                return Err(err(format!("select: an index is out of range for a batch of {n}")));
            }
            let images = op("select", b.images.index_select(&i, 0))?;
            let labels = op("select", b.labels.index_select(&i, 0))?;
            op("select", Batch::new(images, labels))
        }
    );
    api!(engine, "cross_entropy", "logits: Tensor, labels: Tensor, options: Map -> Tensor",
        "Cross-entropy of logits [N, K] against integer labels [N]. Options: reduction (\"mean\", \"sum\", or \"none\" for the per-example losses [N]), label_smoothing (0).",
        |l: Tensor, y: Tensor, o: Map| -> Res<Tensor> {
            let lo: LossOptions = options("cross_entropy", &o)?;
            if !(0.0..1.0).contains(&lo.label_smoothing) {
                return Err(err(format!("cross_entropy: label_smoothing must be in [0, 1), got {}", lo.label_smoothing)));
            }
            let per = op("cross_entropy", loss::cross_entropy_per_example(&l, &y, lo.label_smoothing))?;
            match lo.reduction.as_str() {
                "none" => Ok(per),
                "sum" => op("cross_entropy", per.sum_all()),
                "mean" => op("cross_entropy", per.mean_all()),
                other => Err(err(format!("cross_entropy: reduction `{other}` is not \"mean\", \"sum\" or \"none\""))),
            }
        });
}

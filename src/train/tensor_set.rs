//! [`TensorSet`]: named tensors over (some of) a model's parameters, the vector space in which
//! gradients, perturbations and SAM variants are computed. Keyed by parameter name in sorted
//! order (as checkpoints are), so two sets line up by name, and an operation on two sets that do
//! not hold the same names fails naming the tensor, as candle's `VarMap` does.
//!
//! Every operation is one pass per tensor (in parallel blocks on the CPU for f32, candle's ops
//! elsewhere); reductions (`norm`, `dot`) are summed in f64.

use crate::ops::elementwise::{self, applies};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::BTreeMap;

/// Named tensors (see the module documentation). Cloning shares the tensors, which are never
/// written in place.
#[derive(Clone, Debug, Default)]
pub struct TensorSet {
    tensors: BTreeMap<String, Tensor>,
}

/// An element-wise operation with a fast f32 kernel and candle's composition for the rest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elementwise {
    /// `a + b`
    Add,
    /// `a - b`
    Sub,
    /// `a * b`
    Mul,
    /// `a / b`
    Div,
}

impl Elementwise {
    fn apply(self, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        if applies(&[a, b]) && a.shape() == b.shape() {
            return match self {
                Self::Add => elementwise::map2(a, b, |x, y| x + y),
                Self::Sub => elementwise::map2(a, b, |x, y| x - y),
                Self::Mul => elementwise::map2(a, b, |x, y| x * y),
                Self::Div => elementwise::map2(a, b, |x, y| x / y),
            };
        }
        let b = b.to_dtype(a.dtype())?;
        match self {
            Self::Add => a.broadcast_add(&b),
            Self::Sub => a.broadcast_sub(&b),
            Self::Mul => a.broadcast_mul(&b),
            Self::Div => a.broadcast_div(&b),
        }
    }

    /// The operator's symbol, for errors.
    pub fn symbol(self) -> &'static str {
        match self {
            Self::Add => "+",
            Self::Sub => "-",
            Self::Mul => "*",
            Self::Div => "/",
        }
    }
}

/// `f` on the fast path, `slow` elsewhere.
fn unary(
    t: &Tensor,
    f: impl Fn(f32) -> f32 + Sync,
    slow: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<Tensor> {
    Ok(if applies(&[t]) { elementwise::map1(t, f)? } else { slow(t)? })
}

impl TensorSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// A set of the given named tensors.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        Self { tensors: pairs.into_iter().collect() }
    }

    /// Copies of the current values of `params` (later updates of the variables do not change
    /// the set).
    pub fn snapshot(params: &[(String, Var)]) -> Result<Self> {
        Ok(Self::from_pairs(
            params.iter().map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?))).collect::<Result<Vec<_>>>()?,
        ))
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name)
    }

    /// Sets the tensor called `name`. Replacing a tensor needs the same shape.
    pub fn set(&mut self, name: &str, t: Tensor) -> Result<()> {
        if let Some(old) = self.tensors.get(name) {
            if old.dims() != t.dims() {
                bail!("tensor `{name}` has shape {:?}, the new value {:?}", old.dims(), t.dims());
            }
        }
        self.tensors.insert(name.to_string(), t);
        Ok(())
    }

    /// The names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }

    /// How many tensors the set holds.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the set holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The named tensors in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.tensors.iter()
    }

    /// The tensors in name order.
    pub fn tensors(&self) -> Vec<Tensor> {
        self.tensors.values().cloned().collect()
    }

    /// Number of scalars over all tensors.
    pub fn elem_count(&self) -> usize {
        self.tensors.values().map(Tensor::elem_count).sum()
    }

    /// Fails unless `other` holds exactly this set's names; `what` names the operation.
    pub fn check_same_names(&self, other: &TensorSet, what: &str) -> Result<()> {
        if let Some(n) = self.tensors.keys().find(|n| !other.tensors.contains_key(*n)) {
            bail!("{what}: the second set has no tensor `{n}` (the first has {} tensors)", self.len());
        }
        if let Some(n) = other.tensors.keys().find(|n| !self.tensors.contains_key(*n)) {
            bail!("{what}: the first set has no tensor `{n}` (the second has {} tensors)", other.len());
        }
        Ok(())
    }

    /// `f` on every tensor.
    pub fn map(&self, mut f: impl FnMut(&str, &Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Self { tensors: self.tensors.iter().map(|(n, t)| Ok((n.clone(), f(n, t)?))).collect::<Result<_>>()? })
    }

    /// The tensors whose name `keep` accepts.
    pub fn filter(&self, mut keep: impl FnMut(&str) -> bool) -> Self {
        Self { tensors: self.tensors.iter().filter(|(n, _)| keep(n)).map(|(n, t)| (n.clone(), t.clone())).collect() }
    }

    /// `self ∘ other` element-wise, tensor by tensor (the same names; each pair the same shape,
    /// or broadcastable on the slow path).
    pub fn zip(&self, other: &TensorSet, op: Elementwise) -> Result<Self> {
        let what = format!("TensorSet {} TensorSet", op.symbol());
        self.check_same_names(other, &what)?;
        self.map(|n, a| {
            let b = &other.tensors[n];
            if a.dims() != b.dims() {
                bail!("{what}: tensor `{n}` has shapes {:?} and {:?}", a.dims(), b.dims());
            }
            Ok(op.apply(a, b)?)
        })
    }

    /// `self ∘ x` with the number `x` on every element (`x ∘ self` when `flipped`).
    pub fn scalar(&self, op: Elementwise, x: f64, flipped: bool) -> Result<Self> {
        let xf = x as f32;
        self.map(|_, t| {
            let fast = applies(&[t]);
            Ok(match (op, flipped) {
                (Elementwise::Add, _) if fast => elementwise::map1(t, |v| v + xf)?,
                (Elementwise::Mul, _) if fast => elementwise::map1(t, |v| v * xf)?,
                (Elementwise::Sub, false) if fast => elementwise::map1(t, |v| v - xf)?,
                (Elementwise::Sub, true) if fast => elementwise::map1(t, |v| xf - v)?,
                (Elementwise::Div, false) if fast => elementwise::map1(t, |v| v / xf)?,
                (Elementwise::Div, true) if fast => elementwise::map1(t, |v| xf / v)?,
                (Elementwise::Add, _) => t.affine(1.0, x)?,
                (Elementwise::Mul, _) => t.affine(x, 0.0)?,
                (Elementwise::Sub, false) => t.affine(1.0, -x)?,
                (Elementwise::Sub, true) => t.affine(-1.0, x)?,
                (Elementwise::Div, false) => t.affine(1.0 / x, 0.0)?,
                (Elementwise::Div, true) => (t.recip()? * x)?,
            })
        })
    }

    /// `self · a` (every tensor scaled by the number `a`).
    pub fn scale(&self, a: f64) -> Result<Self> {
        self.scalar(Elementwise::Mul, a, false)
    }

    /// `self + a · other` (same names), in one pass per tensor.
    pub fn axpy(&self, a: f64, other: &TensorSet) -> Result<Self> {
        self.check_same_names(other, "axpy")?;
        let af = a as f32;
        self.map(|n, x| {
            let y = &other.tensors[n];
            if applies(&[x, y]) && x.shape() == y.shape() {
                Ok(elementwise::map2(x, y, |x, y| x + af * y)?)
            } else {
                Ok((x + y.to_dtype(x.dtype())?.affine(a, 0.0)?)?)
            }
        })
    }

    /// `a·self + b·other` (same names), in one pass per tensor.
    pub fn axpby(&self, a: f64, b: f64, other: &TensorSet) -> Result<Self> {
        self.check_same_names(other, "axpby")?;
        let (af, bf) = (a as f32, b as f32);
        self.map(|n, x| {
            let y = &other.tensors[n];
            if applies(&[x, y]) && x.shape() == y.shape() {
                Ok(elementwise::map2(x, y, |x, y| af * x + bf * y)?)
            } else {
                Ok((x.affine(a, 0.0)? + y.to_dtype(x.dtype())?.affine(b, 0.0)?)?)
            }
        })
    }

    /// `|x|` element-wise.
    pub fn abs(&self) -> Result<Self> {
        self.map(|_, t| unary(t, f32::abs, Tensor::abs))
    }

    /// `x²` element-wise.
    pub fn sqr(&self) -> Result<Self> {
        self.map(|_, t| unary(t, |v| v * v, Tensor::sqr))
    }

    /// `√x` element-wise.
    pub fn sqrt(&self) -> Result<Self> {
        self.map(|_, t| unary(t, f32::sqrt, Tensor::sqrt))
    }

    /// The sign of every element: -1, 0 or 1 (as PyTorch's `torch.sign`).
    pub fn sign(&self) -> Result<Self> {
        let sign = |v: f32| {
            if v > 0.0 {
                1.0
            } else if v < 0.0 {
                -1.0
            } else {
                0.0
            }
        };
        self.map(|_, t| unary(t, sign, |t| t.sign()))
    }

    /// Zeros of the same names and shapes.
    pub fn zeros_like(&self) -> Result<Self> {
        self.map(|_, t| Ok(t.zeros_like()?))
    }

    /// The global L2 norm over every element of every tensor (summed in f64).
    pub fn norm(&self) -> Result<f64> {
        Ok(self.sum_squares()?.sqrt())
    }

    /// `Σ x²` over every element of every tensor, in f64.
    pub fn sum_squares(&self) -> Result<f64> {
        crate::ops::sum_squares::sum_squares(&self.tensors())
    }

    /// `Σ self·other` over every element (the same names and shapes), in f64.
    pub fn dot(&self, other: &TensorSet) -> Result<f64> {
        self.check_same_names(other, "dot")?;
        let mut total = 0f64;
        for (n, a) in &self.tensors {
            let b = &other.tensors[n];
            if a.dims() != b.dims() {
                bail!("dot: tensor `{n}` has shapes {:?} and {:?}", a.dims(), b.dims());
            }
            total += elementwise::dot(a, &b.to_dtype(a.dtype())?)?;
        }
        Ok(total)
    }

    /// Every tensor as f32 (gradients of a mixed-precision model are f32 already).
    pub fn to_f32(&self) -> Result<Self> {
        self.map(|_, t| Ok(if t.dtype() == DType::F32 { t.clone() } else { t.to_dtype(DType::F32)? }))
    }
}

//! Loss landscapes as tomgoldstein/loss-landscape draws them (Li et al., NeurIPS 2018): the loss
//! and accuracy at `w + α·d` (1-D) or `w + α·d₁ + β·d₂` (2-D) along random directions with
//! filter normalization: each filter of `d` (a slice along the first dimension of a weight of
//! rank ≥ 2) is scaled to the norm of the same filter of `w`; tensors of rank ≤ 1 (biases,
//! BatchNorm's weight and bias) get no direction unless asked, then their own values. And the
//! loss along the line between two models, BatchNorm statistics interpolated too.

use super::{gaussian_like, loss_at, Data};
use crate::models::Model;
use crate::rng::HostRng;
use crate::train::{LossFn, TensorSet};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use serde::Deserialize;
use std::collections::HashMap;

/// Options of `landscape`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Options {
    /// 1 (a line) or 2 (a plane).
    pub dims: usize,
    /// Coordinates from `-range` to `range`.
    pub range: f64,
    /// Points per axis.
    pub points: usize,
    /// Seed of the directions (the same seed, the same directions for two models of one shape).
    pub seed: u64,
    /// Also move biases and normalization parameters (rank ≤ 1), along their own values.
    pub include_bias_bn: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self { dims: 1, range: 1.0, points: 21, seed: 0, include_bias_bn: false }
    }
}

/// The measured landscape.
pub struct Landscape {
    /// The coordinates of each axis.
    pub xs: Vec<f64>,
    /// The second axis's coordinates (2-D only).
    pub ys: Vec<f64>,
    /// The loss at each point: `loss[j][i]` at (xs[i], ys[j]); one row in 1-D.
    pub loss: Vec<Vec<f64>>,
    /// The accuracy, laid out as `loss`.
    pub accuracy: Vec<Vec<f64>>,
}

/// A filter-normalized random direction for the weights `w` (see the module documentation).
pub fn filter_normalized(w: &TensorSet, rng: &HostRng, include_bias_bn: bool) -> Result<TensorSet> {
    let d = gaussian_like(w, rng)?;
    d.map(|name, t| {
        let wt = w.get(name).cloned().unwrap_or_else(|| t.clone());
        if t.rank() <= 1 {
            return Ok(if include_bias_bn { wt } else { t.zeros_like()? });
        }
        // Per filter (first dimension): d_f ← d_f / ‖d_f‖ · ‖w_f‖.
        let n = t.dim(0)?;
        let tf = t.to_dtype(DType::F64)?.reshape((n, ()))?;
        let wf = wt.to_dtype(DType::F64)?.reshape((n, ()))?;
        let dn = tf.sqr()?.sum_keepdim(1)?.sqrt()?;
        let wn = wf.sqr()?.sum_keepdim(1)?.sqrt()?;
        let scale = (wn / (dn + 1e-10)?)?;
        Ok(tf.broadcast_mul(&scale)?.reshape(t.shape())?.to_dtype(t.dtype())?)
    })
}

fn linspace(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![(lo + hi) / 2.0];
    }
    (0..n).map(|i| lo + (hi - lo) * i as f64 / (n - 1) as f64).collect()
}

/// The landscape around the model's weights (see the module documentation); the weights are
/// restored bit-exactly afterwards.
pub fn landscape(model: &Model, data: &Data, loss_fn: &LossFn, o: &Options) -> Result<Landscape> {
    if o.dims != 1 && o.dims != 2 {
        bail!("landscape: dims must be 1 or 2, got {}", o.dims);
    }
    if o.points == 0 || o.points > 1001 {
        bail!("landscape: points must be in 1..=1001, got {}", o.points);
    }
    if !(o.range >= 0.0 && o.range.is_finite()) {
        bail!("landscape: range must be a finite number >= 0, got {}", o.range);
    }
    let w = TensorSet::snapshot(&model.params().trainable())?;
    let rng = HostRng::new(o.seed);
    let d1 = filter_normalized(&w, &rng, o.include_bias_bn)?;
    let d2 = if o.dims == 2 { Some(filter_normalized(&w, &rng, o.include_bias_bn)?) } else { None };
    let xs = linspace(-o.range, o.range, o.points);
    let ys = if o.dims == 2 { xs.clone() } else { vec![0.0] };
    let (mut loss, mut accuracy) = (Vec::new(), Vec::new());
    for &b in &ys {
        let (mut lr, mut ar) = (Vec::new(), Vec::new());
        for &a in &xs {
            let step = match &d2 {
                Some(d2) => d1.scale(a)?.axpy(b, d2)?,
                None => d1.scale(a)?,
            };
            model.perturb(&step, 1.0)?;
            let r = loss_at(model, data, loss_fn);
            model.restore()?;
            let (l, acc) = r?;
            lr.push(l);
            ar.push(acc);
        }
        loss.push(lr);
        accuracy.push(ar);
    }
    Ok(Landscape { xs, ys: if o.dims == 2 { ys } else { Vec::new() }, loss, accuracy })
}

/// The loss and accuracy at `(1 − t)·w_a + t·w_b` for `points` values of t from 0 to 1, every
/// tensor interpolated (BatchNorm's running statistics too). The two models must have the same
/// tensors; `a`'s weights are restored afterwards.
pub fn interpolate(
    a: &Model,
    b: &Model,
    data: &Data,
    loss_fn: &LossFn,
    points: usize,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    if !(2..=1001).contains(&points) {
        bail!("interpolate: points must be in 2..=1001, got {points}");
    }
    let wa = a.params().snapshot()?;
    let wb = b.params().snapshot()?;
    for (name, t) in &wa {
        match wb.get(name) {
            Some(u) if u.dims() == t.dims() => {}
            Some(u) => {
                bail!("interpolate: `{name}` has shape {:?} in the first model, {:?} in the second", t.dims(), u.dims())
            }
            None => bail!("interpolate: the second model has no tensor `{name}`"),
        }
    }
    let ts = linspace(0.0, 1.0, points);
    let (mut losses, mut accs) = (Vec::new(), Vec::new());
    let mut result = Ok(());
    for &t in &ts {
        let mix: Result<HashMap<String, Tensor>> = wa
            .iter()
            .map(|(n, x)| {
                let y = wb[n].to_dtype(x.dtype())?;
                Ok((n.clone(), ((x * (1.0 - t))? + (y * t)?)?))
            })
            .collect();
        let step =
            mix.and_then(|m| a.params().assign(&m, false, "interpolate")).and_then(|()| loss_at(a, data, loss_fn));
        match step {
            Ok((l, acc)) => {
                losses.push(l);
                accs.push(acc);
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    a.params().assign(&wa, false, "interpolate")?;
    result?;
    Ok((ts, losses, accs))
}

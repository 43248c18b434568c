//! The Hessian's spectrum as PyHessian measures it: the top eigenvalues by power iteration with
//! deflation, the trace by Hutchinson's estimator, the spectral density by stochastic Lanczos
//! quadrature. Each product is a [`super::hvp::hvp`].

use super::eigen::symmetric_eigen;
use super::hvp::hvp;
use super::{gaussian_like, loss_grad, normalized, rademacher_like, Data};
use crate::models::Model;
use crate::rng::HostRng;
use crate::train::{LossFn, TensorSet};
use anyhow::{bail, Result};
use serde::Deserialize;

/// Options of `hessian_top`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopOptions {
    /// How many of the largest eigenvalues.
    pub k: usize,
    /// Power iterations per eigenvalue at most.
    pub iters: usize,
    /// Stop when the eigenvalue changes by less than this, relative.
    pub tol: f64,
    /// The central difference's relative step (see [`super::hvp`]).
    pub fd_step: f64,
}

impl Default for TopOptions {
    fn default() -> Self {
        Self { k: 1, iters: 100, tol: 1e-3, fd_step: super::hvp::DEFAULT_STEP }
    }
}

/// The top eigenvalues, their eigenvectors and the iterations each took.
pub struct TopEigen {
    /// Largest first (largest by value, as PyHessian's power iteration finds them).
    pub eigenvalues: Vec<f64>,
    /// Unit eigenvectors over the trainable parameters.
    pub eigenvectors: Vec<TensorSet>,
    /// Power iterations per eigenvalue.
    pub iterations: Vec<usize>,
}

/// `v` with its components along `basis` (orthonormal) removed.
fn orthogonalized(v: &TensorSet, basis: &[TensorSet]) -> Result<TensorSet> {
    let mut v = v.clone();
    for b in basis {
        let c = v.dot(b)?;
        v = v.axpy(-c, b)?;
    }
    Ok(v)
}

/// The trainable parameters' shapes, as a zero vector.
fn shape_of(model: &Model, data: &Data, loss_fn: &LossFn) -> Result<TensorSet> {
    // One gradient gives the names, shapes, dtypes and devices the vectors must have.
    let (_, _, g) = loss_grad(model, data, loss_fn)?;
    g.zeros_like()
}

/// The `k` largest eigenvalues of the Hessian (power iteration from a normalized Gaussian
/// start, deflated against the eigenvectors already found; stops at relative change < tol).
pub fn top_eigen(model: &Model, data: &Data, loss_fn: &LossFn, o: &TopOptions, rng: &HostRng) -> Result<TopEigen> {
    if o.k == 0 || o.iters == 0 {
        bail!("hessian_top: k and iters must be >= 1");
    }
    let h = super::hvp::step_for(model, o.fd_step)?;
    let like = shape_of(model, data, loss_fn)?;
    if o.k > like.elem_count() {
        bail!("hessian_top: k = {} but the model has {} trainable parameters", o.k, like.elem_count());
    }
    let mut out = TopEigen { eigenvalues: Vec::new(), eigenvectors: Vec::new(), iterations: Vec::new() };
    for _ in 0..o.k {
        let mut v = normalized(&orthogonalized(&gaussian_like(&like, rng)?, &out.eigenvectors)?)?;
        let mut value: Option<f64> = None;
        let mut iters = 0;
        for it in 0..o.iters {
            iters = it + 1;
            let hv = orthogonalized(&hvp(model, data, loss_fn, &v, h)?, &out.eigenvectors)?;
            let lambda = hv.dot(&v)?;
            v = normalized(&hv)?;
            let done = value.is_some_and(|prev| (lambda - prev).abs() / (prev.abs() + 1e-6) < o.tol);
            value = Some(lambda);
            if done {
                break;
            }
        }
        out.eigenvalues.push(value.unwrap_or(0.0));
        out.eigenvectors.push(v);
        out.iterations.push(iters);
    }
    Ok(out)
}

/// Options of `hessian_trace`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TraceOptions {
    /// Rademacher samples at most.
    pub samples: usize,
    /// Stop when the running mean changes by less than this, relative (PyHessian's rule).
    pub tol: f64,
    /// The central difference's relative step.
    pub fd_step: f64,
}

impl Default for TraceOptions {
    fn default() -> Self {
        Self { samples: 100, tol: 1e-3, fd_step: super::hvp::DEFAULT_STEP }
    }
}

/// Hutchinson's estimate of the trace, its standard error and the samples taken.
pub struct TraceEstimate {
    /// The mean of `vᵀHv` over the samples.
    pub trace: f64,
    /// Standard deviation of the samples over √samples.
    pub std_error: f64,
    /// Every `vᵀHv`.
    pub samples: Vec<f64>,
}

/// `tr(H) = E[vᵀHv]` over Rademacher `v`.
pub fn trace(model: &Model, data: &Data, loss_fn: &LossFn, o: &TraceOptions, rng: &HostRng) -> Result<TraceEstimate> {
    if o.samples == 0 {
        bail!("hessian_trace: samples must be >= 1");
    }
    let h = super::hvp::step_for(model, o.fd_step)?;
    let like = shape_of(model, data, loss_fn)?;
    let mut samples = Vec::new();
    let mut mean = 0.0;
    for _ in 0..o.samples {
        let v = rademacher_like(&like, rng)?;
        samples.push(hvp(model, data, loss_fn, &v, h)?.dot(&v)?);
        let next = samples.iter().sum::<f64>() / samples.len() as f64;
        let converged = samples.len() > 1 && (next - mean).abs() / (mean.abs() + 1e-6) < o.tol;
        mean = next;
        if converged {
            break;
        }
    }
    let n = samples.len() as f64;
    let var = if samples.len() > 1 { samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    Ok(TraceEstimate { trace: mean, std_error: (var / n).sqrt(), samples })
}

/// Options of `hessian_density`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DensityOptions {
    /// Lanczos steps per run (the quadrature's nodes).
    pub iters: usize,
    /// Independent runs averaged.
    pub runs: usize,
    /// Width of the Gaussian kernel that smooths the nodes into a curve, relative to the range
    /// of the nodes (1%).
    pub sigma: f64,
    /// Points of the density curve.
    pub points: usize,
    /// The central difference's relative step.
    pub fd_step: f64,
}

impl Default for DensityOptions {
    fn default() -> Self {
        Self { iters: 50, runs: 1, sigma: 0.01, points: 400, fd_step: super::hvp::DEFAULT_STEP }
    }
}

/// Stochastic Lanczos quadrature: per run the Ritz values (nodes) and weights, and the density
/// on a grid.
pub struct Density {
    /// Per run: the eigenvalues of the Lanczos tridiagonal matrix.
    pub nodes: Vec<Vec<f64>>,
    /// Per run: their weights (squared first components of its eigenvectors; they sum to 1).
    pub weights: Vec<Vec<f64>>,
    /// The grid of eigenvalues.
    pub grid: Vec<f64>,
    /// The density at each grid point (it integrates to about 1).
    pub density: Vec<f64>,
}

/// The spectral density by stochastic Lanczos quadrature (Lanczos with full
/// reorthogonalization from a normalized Rademacher start, `iters` steps, `runs` runs).
pub fn density(model: &Model, data: &Data, loss_fn: &LossFn, o: &DensityOptions, rng: &HostRng) -> Result<Density> {
    if o.iters == 0 || o.runs == 0 || o.points < 2 {
        bail!("hessian_density: iters and runs must be >= 1, points >= 2");
    }
    let h = super::hvp::step_for(model, o.fd_step)?;
    let like = shape_of(model, data, loss_fn)?;
    if like.elem_count() == 0 {
        bail!("hessian_density: the trainable parameters hold no value");
    }
    let m = o.iters.min(like.elem_count());
    let (mut all_nodes, mut all_weights) = (Vec::new(), Vec::new());
    for _ in 0..o.runs {
        let mut basis: Vec<TensorSet> = vec![normalized(&rademacher_like(&like, rng)?)?];
        let (mut alpha, mut beta) = (Vec::new(), Vec::new());
        for j in 0..m {
            let w = hvp(model, data, loss_fn, &basis[j], h)?;
            let a = w.dot(&basis[j])?;
            alpha.push(a);
            if j + 1 == m {
                break;
            }
            // Full reorthogonalization against every Lanczos vector.
            let w = orthogonalized(&w, &basis)?;
            let b = w.norm()?;
            if b < 1e-10 {
                break;
            }
            beta.push(b);
            basis.push(w.scale(1.0 / b)?);
        }
        let n = alpha.len();
        let mut t = vec![0.0; n * n];
        for i in 0..n {
            t[i * n + i] = alpha[i];
            if i + 1 < n {
                t[i * n + i + 1] = beta[i];
                t[(i + 1) * n + i] = beta[i];
            }
        }
        let (values, vectors) = symmetric_eigen(&t, n);
        all_weights.push((0..n).map(|k| vectors[0][k] * vectors[0][k]).collect());
        all_nodes.push(values);
    }
    let (lo, hi) =
        all_nodes.iter().flatten().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    let span = (hi - lo).max(1e-12);
    let sigma = (o.sigma * span).max(1e-12);
    let (g0, g1) = (lo - 0.05 * span - 3.0 * sigma, hi + 0.05 * span + 3.0 * sigma);
    let grid: Vec<f64> = (0..o.points).map(|i| g0 + (g1 - g0) * i as f64 / (o.points - 1) as f64).collect();
    let norm = 1.0 / (o.runs as f64 * sigma * (2.0 * std::f64::consts::PI).sqrt());
    let density = grid
        .iter()
        .map(|&x| {
            all_nodes
                .iter()
                .zip(&all_weights)
                .flat_map(|(ns, ws)| ns.iter().zip(ws))
                .map(|(&n, &w)| w * (-(x - n).powi(2) / (2.0 * sigma * sigma)).exp())
                .sum::<f64>()
                * norm
        })
        .collect();
    Ok(Density { nodes: all_nodes, weights: all_weights, grid, density })
}

//! [`SamConfig`]: the settings of a SAM step, with the variant it takes and each variant's
//! hyperparameters (names as the script gives them).

use anyhow::{bail, Result};
use serde::Deserialize;

/// Which member of the SAM family a step takes.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// SAM (Foret et al., ICLR 2021); ASAM with `adaptive: true`.
    #[default]
    Sam,
    /// GSAM (Zhuang et al., ICLR 2022): `d = g_p − α·(g − (g·u)u)`, `u = g_p/‖g_p‖`.
    Gsam,
    /// LookSAM (Liu et al., CVPR 2022): a SAM step every `k` steps, one pass with the stored
    /// `g_v` between them.
    Looksam,
    /// Fisher SAM (Kim et al., ICML 2022): `e = ρ·f⁻¹g / √(g·f⁻¹g)`, `f = 1 + η·g²`.
    Fisher,
    /// Friendly SAM (Li et al., CVPR 2024): the ascent direction `g − σ·m` with `m` an
    /// exponential average of past gradients.
    Friendly,
    /// ESAM (Du et al., ICLR 2022): stochastic weight perturbation and sharpness-sensitive data
    /// selection.
    Esam,
}

impl Variant {
    /// The variant's name as scripts give it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sam => "sam",
            Self::Gsam => "gsam",
            Self::Looksam => "looksam",
            Self::Fisher => "fisher",
            Self::Friendly => "friendly",
            Self::Esam => "esam",
        }
    }
}

/// Which tensors ASAM's `T = |w| + η` scales.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AsamScope {
    /// Every trainable tensor, weights and biases alike.
    #[default]
    All,
    /// Only tensors whose name contains `weight` (the ASAM authors' code); `T = 1` elsewhere.
    Weights,
}

/// Which parameters the ascent step perturbs (`perturb` option).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum PerturbScope {
    /// `"all"` (every trainable parameter, the default) or `"norm"` (SAM-ON, Müller et al.,
    /// NeurIPS 2023: only normalization layers' weights and biases).
    Named(String),
    /// Parameters whose name starts with one of these prefixes.
    Prefixes(Vec<String>),
}

/// Settings of a SAM step.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamConfig {
    /// Radius of the neighbourhood (ρ). 0 gives exactly the base optimizer's step.
    pub rho: f64,
    /// Adaptive SAM: scale the perturbation by `T = |w| + eta`.
    pub adaptive: bool,
    /// ASAM's offset η (0.01), or Fisher SAM's η in `f = 1 + η·g²` (1.0).
    pub eta: Option<f64>,
    /// Split the batch into chunks of this many examples, one perturbation each (the paper's m);
    /// a batch that it does not divide ends with a smaller chunk, chunks weighted by size.
    pub m_sharpness: Option<usize>,
    /// Clip the SAM gradient to this global norm before the base step.
    pub grad_clip: Option<f64>,
    /// Added to the norm so that a zero gradient gives a zero perturbation, not NaN.
    pub eps: f64,
    /// The family member.
    pub variant: Variant,
    /// GSAM's α (0.1) or LookSAM's α (0.7).
    pub alpha: Option<f64>,
    /// GSAM: rho follows the learning rate from `rho_max` (at `lr_max`) to `rho_min` (at `lr_min`).
    pub rho_max: Option<f64>,
    /// GSAM: the rho at `lr_min` (given together with `rho_max`).
    pub rho_min: Option<f64>,
    /// GSAM: the learning rate at which rho is `rho_max` (default: the largest lr seen).
    pub lr_max: Option<f64>,
    /// GSAM: the learning rate at which rho is `rho_min` (default 0).
    pub lr_min: Option<f64>,
    /// LookSAM: a SAM step every `k` optimizer steps (5).
    pub k: usize,
    /// Composer's SAM interval: steps 0, k, 2k, ... are SAM steps, the others plain steps.
    pub every: Option<usize>,
    /// F-SAM's σ (1).
    pub sigma: f64,
    /// F-SAM's λ (0.9).
    pub lambda: f64,
    /// ESAM: the probability that a parameter tensor takes part in the second pass (0.5).
    pub beta: f64,
    /// ESAM: the share of the batch, the sharpest examples, used for the second pass (0.5).
    pub gamma: f64,
    /// Which parameters are perturbed: "all", "norm" (SAM-ON) or a list of name prefixes.
    pub perturb: Option<PerturbScope>,
    /// Which tensors ASAM scales: "all" (weights and biases) or "weights" (the ASAM authors').
    pub asam_scope: AsamScope,
    /// The mode of the step's passes: "train" (batch statistics and dropout, whatever the model's
    /// mode) or "model" (the model's own: after `m.eval()` BatchNorm uses and keeps its running
    /// statistics and dropout is off, as fine-tuning with frozen statistics wants).
    pub mode: StepMode,
}

/// The mode of a step's forward passes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepMode {
    /// Training mode always (PyTorch's `model.train()` before the loop).
    #[default]
    Train,
    /// The model's current mode (`m.train()` / `m.eval()`).
    Model,
}

impl StepMode {
    /// Whether the passes run in training mode for `model`.
    pub fn train(self, model: &crate::models::Model) -> bool {
        match self {
            Self::Train => true,
            Self::Model => model.is_training(),
        }
    }
}

impl Default for SamConfig {
    fn default() -> Self {
        Self {
            rho: 0.05,
            adaptive: false,
            eta: None,
            m_sharpness: None,
            grad_clip: None,
            eps: 1e-12,
            variant: Variant::Sam,
            alpha: None,
            rho_max: None,
            rho_min: None,
            lr_max: None,
            lr_min: None,
            k: 5,
            every: None,
            sigma: 1.0,
            lambda: 0.9,
            beta: 0.5,
            gamma: 0.5,
            perturb: None,
            asam_scope: AsamScope::All,
            mode: StepMode::Train,
        }
    }
}

fn finite_nonneg(what: &str, x: f64) -> Result<()> {
    if !(x >= 0.0 && x.is_finite()) {
        bail!("{what} must be a finite number >= 0, got {x}");
    }
    Ok(())
}

impl SamConfig {
    /// Rejects settings that have no meaning (each error names the option).
    pub fn validate(&self) -> Result<()> {
        finite_nonneg("rho", self.rho)?;
        if let Some(eta) = self.eta {
            finite_nonneg("eta", eta)?;
        }
        if self.m_sharpness == Some(0) {
            bail!("m_sharpness must be >= 1");
        }
        if let Some(c) = self.grad_clip {
            if !crate::train::is_positive(c) {
                bail!("grad_clip must be > 0, got {c}");
            }
        }
        for (what, v) in [("alpha", self.alpha), ("rho_max", self.rho_max), ("rho_min", self.rho_min)] {
            if let Some(v) = v {
                finite_nonneg(what, v)?;
            }
        }
        for (what, v) in [("lr_max", self.lr_max), ("lr_min", self.lr_min)] {
            if let Some(v) = v {
                finite_nonneg(what, v)?;
            }
        }
        if self.k == 0 {
            bail!("k must be >= 1");
        }
        if self.every == Some(0) {
            bail!("every must be >= 1");
        }
        finite_nonneg("sigma", self.sigma)?;
        if !(0.0..1.0).contains(&self.lambda) {
            bail!("lambda must be in [0, 1), got {}", self.lambda);
        }
        if !(self.beta > 0.0 && self.beta <= 1.0) {
            bail!("beta must be in (0, 1], got {}", self.beta);
        }
        if !(self.gamma > 0.0 && self.gamma <= 1.0) {
            bail!("gamma must be in (0, 1], got {}", self.gamma);
        }
        if let Some(PerturbScope::Named(n)) = &self.perturb {
            if n != "all" && n != "norm" {
                bail!("perturb: `{n}` is not \"all\", \"norm\" or a list of name prefixes");
            }
        }
        if self.rho_max.is_some() != self.rho_min.is_some() {
            bail!("rho_max and rho_min go together (GSAM's rho schedule)");
        }
        let rho_opts = self.rho_max.is_some();
        if rho_opts && self.variant != Variant::Gsam {
            bail!("rho_max / rho_min are GSAM's (variant: \"gsam\")");
        }
        if self.m_sharpness.is_some() && matches!(self.variant, Variant::Looksam | Variant::Friendly | Variant::Esam) {
            bail!("m_sharpness is not supported with variant \"{}\"", self.variant.name());
        }
        if self.adaptive && self.variant == Variant::Fisher {
            bail!("adaptive (ASAM) and variant \"fisher\" are two different perturbations: choose one");
        }
        Ok(())
    }

    /// ASAM's η (0.01 unless given).
    pub fn asam_eta(&self) -> f64 {
        self.eta.unwrap_or(0.01)
    }

    /// Fisher SAM's η (1.0 unless given).
    pub fn fisher_eta(&self) -> f64 {
        self.eta.unwrap_or(1.0)
    }

    /// GSAM's α (0.1) or LookSAM's α (0.7) unless given.
    pub fn alpha_or_default(&self) -> f64 {
        self.alpha.unwrap_or(if self.variant == Variant::Looksam { 0.7 } else { 0.1 })
    }

    /// The rho of a step at learning rate `lr`: `rho`, or with GSAM's `rho_max` the linear
    /// interpolation `rho_min + (rho_max − rho_min)·(lr − lr_min)/(lr_max − lr_min)` (`lr_min`
    /// defaults to 0, `lr_max` to `seen_lr_max`, the largest lr seen so far), clamped to
    /// `[rho_min, rho_max]`.
    pub fn rho_at(&self, lr: f64, seen_lr_max: f64) -> f64 {
        let (Some(hi), Some(lo)) = (self.rho_max, self.rho_min) else { return self.rho };
        let lr_max = self.lr_max.unwrap_or(seen_lr_max);
        let lr_min = self.lr_min.unwrap_or(0.0);
        if lr_max <= lr_min {
            return hi;
        }
        let r = lo + (hi - lo) * (lr - lr_min) / (lr_max - lr_min);
        r.clamp(lo.min(hi), lo.max(hi))
    }
}

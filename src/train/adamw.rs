//! AdamW (Loshchilov & Hutter): Adam with decoupled weight decay, with the semantics of
//! `torch.optim.AdamW`.

use super::optim::{check_aligned, read_count, read_scalar, Optimizer};
use super::param_groups::ParamGroups;
use super::sam_state::SamState;
use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};

/// AdamW settings (PyTorch's names and defaults).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// Decay rates of the first and second moment estimates.
    pub betas: [f64; 2],
    /// Added to the denominator for numerical stability.
    pub eps: f64,
    /// Decoupled weight decay: `w ← w·(1 − lr·weight_decay)` before the Adam update.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-3, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 1e-2 }
    }
}

/// The AdamW optimizer. Bias correction counts each tensor's own steps (PyTorch keeps a `step`
/// per parameter), so a tensor unfrozen after N steps starts its correction from 1, not N.
pub struct AdamW {
    cfg: AdamWConfig,
    m: HashMap<String, Tensor>,
    v: HashMap<String, Tensor>,
    /// Steps taken by each tensor (its bias correction's t).
    counts: HashMap<String, u64>,
    steps: u64,
    sam: SamState,
    groups: ParamGroups,
}

impl AdamW {
    /// A new optimizer with zero moments.
    pub fn new(cfg: AdamWConfig) -> Result<Self> {
        let [b1, b2] = cfg.betas;
        if !(0.0..1.0).contains(&b1) || !(0.0..1.0).contains(&b2) {
            bail!("adamw: betas must be in [0, 1), got {:?}", cfg.betas);
        }
        if !crate::train::is_nonneg(cfg.lr)
            || !crate::train::is_nonneg(cfg.eps)
            || !crate::train::is_nonneg(cfg.weight_decay)
        {
            bail!("adamw: lr, eps and weight_decay must be >= 0");
        }
        Ok(Self {
            cfg,
            m: HashMap::new(),
            v: HashMap::new(),
            counts: HashMap::new(),
            steps: 0,
            sam: SamState::default(),
            groups: ParamGroups::default(),
        })
    }

    /// The optimizer with per-tensor learning-rate multipliers and weight decay.
    pub fn with_groups(mut self, groups: ParamGroups) -> Self {
        self.groups = groups;
        self
    }

    /// The settings.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }
}

impl Optimizer for AdamW {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn step(&mut self, params: &[(String, Var)], grads: &[Tensor]) -> Result<()> {
        check_aligned(params, grads)?;
        // Checked before anything changes, so a bad state leaves the weights as they were.
        for (name, p) in params {
            for (what, state) in [("exp_avg", &self.m), ("exp_avg_sq", &self.v)] {
                if let Some(t) = state.get(name).filter(|t| t.dims() != p.dims()) {
                    bail!("adamw: the {what} state of `{name}` has shape {:?}, the parameter {:?}", t.dims(), p.dims());
                }
            }
        }
        self.steps += 1;
        let c = &self.cfg;
        let [b1, b2] = c.betas;
        for ((name, p), g) in params.iter().zip(grads) {
            let count = self.counts.get(name).copied().unwrap_or(0) + 1;
            let t = i32::try_from(count).unwrap_or(i32::MAX);
            let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
            let h = self.groups.get(name, c.weight_decay);
            let lr = c.lr * h.lr_scale;
            let g = g.to_dtype(p.dtype())?;
            let m = match self.m.get(name) {
                Some(m) => (m.affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?,
                None => g.affine(1.0 - b1, 0.0)?,
            };
            let v = match self.v.get(name) {
                Some(v) => (v.affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?,
                None => g.sqr()?.affine(1.0 - b2, 0.0)?,
            };
            let decayed = p.as_tensor().affine(1.0 - lr * h.weight_decay, 0.0)?;
            let denom = v.affine(1.0 / bc2, 0.0)?.sqrt()?.affine(1.0, c.eps)?;
            let update = (m.affine(lr / bc1, 0.0)? / denom)?;
            p.set(&(decayed - update)?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
            self.counts.insert(name.clone(), count);
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    fn state(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut s = BTreeMap::new();
        for (k, v) in &self.m {
            s.insert(format!("exp_avg.{k}"), v.clone());
        }
        for (k, v) in &self.v {
            s.insert(format!("exp_avg_sq.{k}"), v.clone());
        }
        for (k, n) in &self.counts {
            s.insert(format!("step.{k}"), Tensor::new(&[*n as f64], &candle_core::Device::Cpu)?);
        }
        s.insert("steps".into(), Tensor::new(&[self.steps as f64], &candle_core::Device::Cpu)?);
        s.insert("lr".into(), Tensor::new(&[self.cfg.lr], &candle_core::Device::Cpu)?);
        self.sam.save_into(&mut s)?;
        Ok(s)
    }

    fn load_state(&mut self, state: &BTreeMap<String, Tensor>) -> Result<()> {
        self.steps = read_count(state, "steps")?;
        if let Some(lr) = read_scalar(state, "lr")? {
            self.cfg.lr = lr;
        }
        let pick = |prefix: &str| -> HashMap<String, Tensor> {
            state.iter().filter_map(|(k, v)| k.strip_prefix(prefix).map(|n| (n.to_string(), v.clone()))).collect()
        };
        self.m = pick("exp_avg.");
        self.v = pick("exp_avg_sq.");
        self.counts = HashMap::new();
        for name in self.m.keys() {
            // A checkpoint from before per-tensor counts: every tensor took every step.
            let key = format!("step.{name}");
            let n = if state.contains_key(&key) { read_count(state, &key)? } else { self.steps };
            self.counts.insert(name.clone(), n);
        }
        self.sam = SamState::load_from(state)?;
        Ok(())
    }

    fn sam_state(&mut self) -> Option<&mut SamState> {
        Some(&mut self.sam)
    }

    fn groups(&self) -> Option<&ParamGroups> {
        Some(&self.groups)
    }
}

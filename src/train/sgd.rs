//! Stochastic gradient descent with momentum, dampening, Nesterov and L2 weight decay, with the
//! semantics of `torch.optim.SGD`.

use super::optim::{check_aligned, read_count, read_scalar, Optimizer};
use super::param_groups::ParamGroups;
use super::sam_state::SamState;
use anyhow::{bail, Result};
use candle_core::{Tensor, Var};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};

/// SGD settings (PyTorch's names and defaults, with `lr` 0.1).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0 disables the buffer).
    pub momentum: f64,
    /// Dampening of the momentum buffer's gradient term.
    pub dampening: f64,
    /// Nesterov momentum (needs momentum > 0 and dampening 0).
    pub nesterov: bool,
    /// L2 penalty, added to the gradient before momentum.
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self { lr: 0.1, momentum: 0.0, dampening: 0.0, nesterov: false, weight_decay: 0.0 }
    }
}

impl SgdConfig {
    /// Rejects settings PyTorch rejects.
    pub fn validate(&self) -> Result<()> {
        if !crate::train::is_nonneg(self.lr) {
            bail!("sgd: lr must be >= 0, got {}", self.lr);
        }
        if !crate::train::is_nonneg(self.momentum) || !crate::train::is_nonneg(self.weight_decay) {
            bail!("sgd: momentum and weight_decay must be >= 0");
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            bail!("sgd: nesterov needs momentum > 0 and dampening 0");
        }
        Ok(())
    }
}

/// The SGD optimizer.
pub struct Sgd {
    cfg: SgdConfig,
    momentum: HashMap<String, Tensor>,
    steps: u64,
    sam: SamState,
    groups: ParamGroups,
}

impl Sgd {
    /// A new optimizer with empty momentum buffers.
    pub fn new(cfg: SgdConfig) -> Result<Self> {
        cfg.validate()?;
        Ok(Self { cfg, momentum: HashMap::new(), steps: 0, sam: SamState::default(), groups: ParamGroups::default() })
    }

    /// The optimizer with per-tensor learning-rate multipliers and weight decay.
    pub fn with_groups(mut self, groups: ParamGroups) -> Self {
        self.groups = groups;
        self
    }

    /// The settings.
    pub fn config(&self) -> &SgdConfig {
        &self.cfg
    }
}

impl Optimizer for Sgd {
    fn name(&self) -> &'static str {
        "sgd"
    }

    fn step(&mut self, params: &[(String, Var)], grads: &[Tensor]) -> Result<()> {
        check_aligned(params, grads)?;
        let c = &self.cfg;
        // Checked before anything changes, so a bad state leaves the weights as they were.
        for (name, p) in params {
            if let Some(b) = self.momentum.get(name).filter(|b| b.dims() != p.dims()) {
                bail!("sgd: the momentum buffer of `{name}` has shape {:?}, the parameter {:?}", b.dims(), p.dims());
            }
        }
        for ((name, p), g) in params.iter().zip(grads) {
            let h = self.groups.get(name, c.weight_decay);
            let (lr, wd) = (c.lr * h.lr_scale, h.weight_decay);
            let buf = self.momentum.get(name);
            if crate::ops::inplace::applies(&[p.as_tensor(), g])
                && buf.is_none_or(|b| crate::ops::inplace::applies(&[b]))
            {
                let buf = self.momentum.remove(name);
                let (m, damp) = (c.momentum, c.dampening);
                if let Some(b) = crate::ops::inplace::sgd(p.as_tensor(), g, buf, lr, m, damp, c.nesterov, wd)? {
                    self.momentum.insert(name.clone(), b);
                }
                continue;
            }
            let mut d = g.to_dtype(p.dtype())?;
            if wd != 0.0 {
                d = (d + p.as_tensor().affine(wd, 0.0)?)?;
            }
            if c.momentum != 0.0 {
                let buf = match self.momentum.get(name) {
                    None => d.copy()?,
                    Some(b) => (b.affine(c.momentum, 0.0)? + d.affine(1.0 - c.dampening, 0.0)?)?,
                };
                d = if c.nesterov { (d + buf.affine(c.momentum, 0.0)?)? } else { buf.clone() };
                self.momentum.insert(name.clone(), buf);
            }
            let updated = (p.as_tensor() - d.affine(lr, 0.0)?)?;
            p.set(&updated)?;
        }
        self.steps += 1;
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    fn state(&self) -> Result<BTreeMap<String, Tensor>> {
        // Copies: the buffers are updated in place by later steps.
        let mut s: BTreeMap<String, Tensor> =
            self.momentum.iter().map(|(k, v)| Ok((format!("momentum.{k}"), v.copy()?))).collect::<Result<_>>()?;
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
        // Copies: the buffers are updated in place by later steps.
        self.momentum = state
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("momentum.").map(|n| Ok((n.to_string(), v.copy()?))))
            .collect::<Result<_>>()?;
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

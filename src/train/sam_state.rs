//! [`SamState`]: what the SAM family keeps between steps, kept with the base optimizer (so it is
//! saved in the optimizer's part of a checkpoint and restored on resume): the step counter that
//! decides LookSAM's and `every`'s SAM steps, LookSAM's `g_v`, F-SAM's gradient average, the
//! largest learning rate GSAM's rho schedule has seen.

use super::tensor_set::TensorSet;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;

/// Prefix of the SAM state's keys in an optimizer state.
const PREFIX: &str = "sam.";

/// The SAM family's state between steps (see the module documentation).
#[derive(Clone, Debug, Default)]
pub struct SamState {
    /// Steps taken through `sam_step` (SAM or not), counted from 0.
    pub steps: u64,
    /// Named buffers of the variants: `looksam_gv` (LookSAM's `g_v`), `friendly_m` (F-SAM's `m`).
    pub buffers: BTreeMap<String, TensorSet>,
    /// The largest learning rate seen (GSAM's default `lr_max`).
    pub lr_max: Option<f64>,
    /// Named numbers of the variants: `looksam_gv_norm` (‖g_v‖, computed once per SAM step).
    pub scalars: BTreeMap<String, f64>,
}

impl SamState {
    /// Adds the state to an optimizer state map, under `sam.` keys.
    pub fn save_into(&self, out: &mut BTreeMap<String, Tensor>) -> Result<()> {
        if self.steps == 0 && self.buffers.is_empty() && self.lr_max.is_none() && self.scalars.is_empty() {
            return Ok(());
        }
        out.insert(format!("{PREFIX}steps"), Tensor::new(&[self.steps as f64], &Device::Cpu)?);
        if let Some(lr) = self.lr_max {
            out.insert(format!("{PREFIX}lr_max"), Tensor::new(&[lr], &Device::Cpu)?);
        }
        for (name, v) in &self.scalars {
            out.insert(format!("{PREFIX}scalar/{name}"), Tensor::new(&[*v], &Device::Cpu)?);
        }
        for (buffer, set) in &self.buffers {
            for (name, t) in set.iter() {
                out.insert(format!("{PREFIX}{buffer}/{name}"), t.copy()?);
            }
        }
        Ok(())
    }

    /// The state stored in an optimizer state map by [`SamState::save_into`] (empty when none).
    pub fn load_from(state: &BTreeMap<String, Tensor>) -> Result<Self> {
        let mut out = Self { steps: super::optim::read_count(state, &format!("{PREFIX}steps"))?, ..Self::default() };
        if let Some(t) = state.get(&format!("{PREFIX}lr_max")) {
            let v = t.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
            out.lr_max = Some(*v.first().context("sam.lr_max: an empty tensor")?);
        }
        for (key, t) in state {
            let Some(rest) = key.strip_prefix(PREFIX) else { continue };
            let Some((buffer, name)) = rest.split_once('/') else { continue };
            if buffer == "scalar" {
                let v = t.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
                out.scalars.insert(name.to_string(), *v.first().with_context(|| format!("{key}: an empty tensor"))?);
                continue;
            }
            out.buffers.entry(buffer.to_string()).or_default().set(name, t.copy()?)?;
        }
        Ok(out)
    }

    /// Whether `key` of an optimizer state belongs to the SAM state.
    pub fn owns_key(key: &str) -> bool {
        key.starts_with(PREFIX)
    }
}

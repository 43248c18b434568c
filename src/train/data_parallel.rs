//! The training step across ranks (see [`crate::dist`]): what each rank computed locally
//! becomes what every rank steps with.
//!
//! - [`average_step`]: the descent direction (SAM's second gradient, GSAM's combination, the
//!   plain gradient) is averaged over the ranks, weighted by their examples, together with the
//!   step's statistics. The first gradient of SAM stays local: each rank perturbs its own
//!   weights with its own `e` (Foret et al.'s m-sharpness with `m` = the per-rank batch), so N
//!   ranks equal one process with `m_sharpness: B/N`.
//! - [`average_buffers`]: BatchNorm's running statistics, each rank's from its own share,
//!   averaged after the step (the mean of the ranks' updates, as m-sharpness makes one update
//!   of its chunks'); the normalisation itself uses each rank's batch statistics, as PyTorch's
//!   DistributedDataParallel does without SyncBatchNorm.
//! - [`average_state`]: the variants' state kept between steps (LookSAM's `g_v`, F-SAM's
//!   momentum), so every rank holds, and rank 0 checkpoints, the same.
//!
//! Alone, every function returns its input.

use super::sam_state::SamState;
use super::tensor_set::TensorSet;
use crate::dist;
use crate::models::Model;
use anyhow::Result;

/// What one rank measured in a step, before averaging over the ranks.
#[derive(Clone, Copy, Debug)]
pub struct LocalStats {
    /// Examples this rank stepped on.
    pub n: usize,
    /// Their mean loss at `w`.
    pub loss: f64,
    /// Their mean loss at `w + e` (SAM's second pass), if any.
    pub sharp_loss: Option<f64>,
    /// The first gradient's norm (the mean over m-sharpness chunks).
    pub grad_norm: f64,
    /// Correctly classified examples (`None` when the logits are not `[N, K]`).
    pub correct: Option<usize>,
}

/// The step's direction `d` and statistics averaged over the ranks, weighted by examples.
pub fn average_step(d: TensorSet, local: LocalStats) -> Result<(TensorSet, LocalStats)> {
    if !dist::is_parallel() {
        return Ok((d, local));
    }
    let n = local.n as f64;
    let mut s = [
        n,
        n * local.loss,
        n * local.sharp_loss.unwrap_or(0.0),
        n * local.grad_norm,
        local.correct.unwrap_or(0) as f64,
        local.correct.is_none() as u8 as f64,
    ];
    dist::sum(&mut s)?;
    let total = s[0].max(1.0);
    let names = d.names();
    let weighted: Vec<_> = d.iter().map(|(_, t)| t.affine(n / total, 0.0)).collect::<candle_core::Result<_>>()?;
    let summed = dist::sum_tensors(&weighted)?;
    let d = TensorSet::from_pairs(names.into_iter().zip(summed));
    let stats = LocalStats {
        n: s[0] as usize,
        loss: s[1] / total,
        sharp_loss: local.sharp_loss.map(|_| s[2] / total),
        grad_norm: s[3] / total,
        correct: (s[5] == 0.0).then_some(s[4] as usize),
    };
    Ok((d, stats))
}

/// Averages the model's buffers (BatchNorm running statistics) over the ranks.
pub fn average_buffers(model: &Model) -> Result<()> {
    let buffers = model.params().buffers();
    if !dist::is_parallel() || buffers.is_empty() {
        return Ok(());
    }
    let local: Vec<_> = buffers.iter().map(|(_, v)| v.as_tensor().clone()).collect();
    for ((_, v), mean) in buffers.iter().zip(dist::mean_tensors(&local)?) {
        v.set(&mean)?;
    }
    Ok(())
}

/// Averages the tensors a SAM variant keeps between steps over the ranks; LookSAM's norm of
/// `g_v` is recomputed from the average.
pub fn average_state(state: &mut SamState) -> Result<()> {
    if !dist::is_parallel() {
        return Ok(());
    }
    for (key, set) in state.buffers.iter_mut() {
        *set = mean(set)?;
        if key == "looksam_gv" {
            state.scalars.insert("looksam_gv_norm".into(), set.norm()?);
        }
    }
    Ok(())
}

/// The mean of `set` over the ranks (each rank's weight equal): the `all_reduce` of scripts that
/// write their own step.
pub fn mean(set: &TensorSet) -> Result<TensorSet> {
    if !dist::is_parallel() {
        return Ok(set.clone());
    }
    Ok(TensorSet::from_pairs(set.names().into_iter().zip(dist::mean_tensors(&set.tensors())?)))
}

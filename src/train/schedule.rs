//! Learning-rate schedules. A schedule owns a step counter; each `step()` advances it and
//! returns the learning rate for the next optimizer step.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The shape of a schedule. Step counts are in whatever unit the script calls `step()` in
/// (optimizer steps or epochs).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScheduleKind {
    /// The base learning rate throughout.
    Constant,
    /// Multiplies by `gamma` every `step_size` steps.
    Step {
        /// Steps between decays.
        step_size: usize,
        /// Decay factor.
        gamma: f64,
    },
    /// Multiplies by `gamma` at each milestone.
    MultiStep {
        /// Steps at which the rate decays (increasing).
        milestones: Vec<usize>,
        /// Decay factor.
        gamma: f64,
    },
    /// Linear warmup from 0 over `warmup` steps, then a half cosine from the base rate down to
    /// `min_lr` at `total` steps.
    Cosine {
        /// Total steps (warmup included).
        total: usize,
        /// Warmup steps.
        #[serde(default)]
        warmup: usize,
        /// Final learning rate.
        #[serde(default)]
        min_lr: f64,
    },
    /// Linear warmup over `warmup` steps, then linear decay to `end_lr` at `total` steps.
    Linear {
        /// Total steps (warmup included).
        total: usize,
        /// Warmup steps.
        #[serde(default)]
        warmup: usize,
        /// Final learning rate.
        #[serde(default)]
        end_lr: f64,
    },
}

/// A schedule applied to a base learning rate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Schedule {
    /// The shape.
    pub kind: ScheduleKind,
    /// The learning rate at step 0 (after warmup for warmup schedules).
    pub base_lr: f64,
    /// How many times `step()` has been called.
    pub count: usize,
}

impl Schedule {
    /// A schedule at step 0.
    pub fn new(kind: ScheduleKind, base_lr: f64) -> Result<Self> {
        match &kind {
            ScheduleKind::Step { step_size: 0, .. } => bail!("step schedule: step_size must be > 0"),
            ScheduleKind::MultiStep { milestones, .. } if milestones.windows(2).any(|w| w[0] >= w[1]) => {
                bail!("multi_step schedule: milestones must increase, got {milestones:?}")
            }
            ScheduleKind::Cosine { total, warmup, .. } | ScheduleKind::Linear { total, warmup, .. }
                if *total == 0 || warmup > total =>
            {
                bail!("schedule: total must be > 0 and warmup <= total (total {total}, warmup {warmup})")
            }
            _ => {}
        }
        Ok(Self { kind, base_lr, count: 0 })
    }

    /// The learning rate at step `t`.
    pub fn lr_at(&self, t: usize) -> f64 {
        let base = self.base_lr;
        match &self.kind {
            ScheduleKind::Constant => base,
            ScheduleKind::Step { step_size, gamma } => base * gamma.powi((t / step_size) as i32),
            ScheduleKind::MultiStep { milestones, gamma } => {
                base * gamma.powi(milestones.iter().filter(|&&m| m <= t).count() as i32)
            }
            ScheduleKind::Cosine { total, warmup, min_lr } => {
                if t < *warmup {
                    base * (t + 1) as f64 / *warmup as f64
                } else {
                    let span = (*total - *warmup).max(1) as f64;
                    let p = ((t - *warmup) as f64 / span).min(1.0);
                    min_lr + 0.5 * (base - min_lr) * (1.0 + (std::f64::consts::PI * p).cos())
                }
            }
            ScheduleKind::Linear { total, warmup, end_lr } => {
                if t < *warmup {
                    base * (t + 1) as f64 / *warmup as f64
                } else {
                    let span = (*total - *warmup).max(1) as f64;
                    let p = ((t - *warmup) as f64 / span).min(1.0);
                    base + (end_lr - base) * p
                }
            }
        }
    }

    /// The learning rate for the current step.
    pub fn current(&self) -> f64 {
        self.lr_at(self.count)
    }

    /// Advances one step and returns the new learning rate.
    pub fn step(&mut self) -> f64 {
        self.count += 1;
        self.current()
    }
}

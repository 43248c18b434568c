//! Training primitives: losses, optimizers, learning-rate schedules and the SAM step.
//! Nothing here knows about Rhai.

pub mod adamw;
pub mod evaluate;
pub mod grads;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod sam;
pub mod schedule;
pub mod sgd;

pub use adamw::{AdamW, AdamWConfig};
pub use loss::LossFn;
pub use optim::Optimizer;
pub use sam::{sam_step, train_step, SamConfig, StepStats};
pub use schedule::{Schedule, ScheduleKind};
pub use sgd::{Sgd, SgdConfig};

/// `x >= 0` and not NaN (for validating settings).
pub fn is_nonneg(x: f64) -> bool {
    x >= 0.0
}

/// `x > 0` and not NaN (for validating settings).
pub fn is_positive(x: f64) -> bool {
    x > 0.0
}

//! Training primitives: losses, optimizers, learning-rate schedules and the SAM step.
//! Nothing here knows about Rhai.

pub mod adamw;
pub mod data_parallel;
pub mod evaluate;
pub mod grads;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod param_groups;
pub mod sam;
pub mod sam_config;
pub mod sam_state;
pub mod schedule;
pub mod sgd;
pub mod tensor_set;

pub use adamw::{AdamW, AdamWConfig};
pub use grads::{grad, GradOptions, GradOutput};
pub use loss::LossFn;
pub use optim::Optimizer;
pub use sam::{sam_step, sam_step_accumulated, train_step, train_step_accumulated, train_step_in, StepStats};
pub use sam_config::{AsamScope, PerturbScope, SamConfig, StepMode, Variant};
pub use sam_state::SamState;
pub use schedule::{Schedule, ScheduleKind};
pub use sgd::{Sgd, SgdConfig};
pub use tensor_set::{Elementwise, TensorSet};

/// `x >= 0` and not NaN (for validating settings).
pub fn is_nonneg(x: f64) -> bool {
    x >= 0.0
}

/// `x > 0` and not NaN (for validating settings).
pub fn is_positive(x: f64) -> bool {
    x > 0.0
}

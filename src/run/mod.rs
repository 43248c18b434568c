//! Runs: the lifecycle of one run ([`Run`]: start, resume, steps, end) and what it leaves
//! behind: the run folder, the metric log, the progress display, checkpoints, summaries and
//! plots. Plain Rust: nothing here knows about Rhai.

pub mod checkpoint;
pub mod compare;
pub mod lifecycle;
pub mod metrics;
pub mod plot;
pub mod progress;
pub mod record;
pub mod rundir;
pub mod signals;
pub mod summary;
pub mod tensorboard;

pub use lifecycle::{begin_step, end_step, Interrupted, Run};
pub use metrics::MetricLog;
pub use record::RunRecord;
pub use rundir::RunDir;
pub use summary::RunStatus;

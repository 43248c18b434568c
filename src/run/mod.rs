//! Experiment records: the metric log of a run.

pub mod metrics;

pub use metrics::MetricLog;

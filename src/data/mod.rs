//! Datasets, batches and the loader that feeds training.

pub mod batch;
pub mod dataset;
pub mod loader;
pub mod synthetic;

pub use batch::Batch;
pub use dataset::Dataset;
pub use loader::{BatchOptions, Batches};

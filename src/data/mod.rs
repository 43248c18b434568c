//! Datasets, batches and the loader that feeds training: one file per format (cifar, idx,
//! folder, safetensors, hub), label noise, transforms, and the prefetching loader.

pub mod batch;
pub mod cifar;
pub mod dataset;
pub mod folder;
pub mod hub;
pub mod idx;
pub mod load;
pub mod loader;
pub mod noise;
pub mod safetensors;
pub mod seed;
pub mod synthetic;
pub mod transforms;

pub use batch::Batch;
pub use dataset::Dataset;
pub use load::{load_dataset, LoadOptions};
pub use loader::{BatchOptions, Batches};
pub use noise::NoiseKind;
pub use transforms::Transform;

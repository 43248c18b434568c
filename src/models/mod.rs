//! Architectures, their parameters, and the [`Model`] type every training function takes.

pub mod batch_norm;
pub mod cnn;
pub mod compose;
pub mod dinov2;
pub mod encoder;
pub mod hf_config;
pub mod init;
pub mod layers;
pub mod mlp;
pub mod model;
pub mod no_grad;
pub mod params;
pub mod precision;
pub mod preprocess;
pub mod pretrained;
pub mod registry;
pub mod resnet;
pub mod shapes;
pub mod trunk_cache;
pub mod vit;
pub mod wide_resnet;

pub use model::{Model, Network};
pub use params::{is_buffer, Params};
pub use precision::Precision;
pub use registry::{build_model, ArchConfig};

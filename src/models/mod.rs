//! Architectures, their parameters, and the [`Model`] type every training function takes.

pub mod init;
pub mod mlp;
pub mod model;
pub mod params;

pub use model::{Model, Network};
pub use params::Params;

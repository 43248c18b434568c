//! The Rhai layer: the only module that imports `rhai`. Bindings convert Rhai values to typed
//! Rust options, call one core function, and convert the result back.

#[macro_use]
mod macros;

pub mod api;
pub mod check;
pub mod config;
pub mod convert;
pub mod data;
pub mod diagnostics;
pub mod dist;
pub mod engine;
pub mod forward_model;
pub mod hub;
pub mod layers;
pub mod model;
pub mod optim;
pub mod report;
pub mod run;
pub mod runlog;
pub mod runner;
pub mod tensor;
pub mod tensor_select;
pub mod tensor_set;
pub mod train;

pub use engine::build_engine;

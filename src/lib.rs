//! samhost: run Sharpness-Aware Minimization experiments written as Rhai scripts.
//!
//! The core (`train`, `models`, `data`, `run`) is plain Rust over candle and knows nothing of Rhai;
//! `script` is the only module that imports `rhai`, and it only converts values and calls the core.

pub mod alloc;
pub mod cli;
pub mod data;
pub mod device;
pub mod diagnostics;
pub mod dist;
pub mod fsutil;
pub mod hub;
pub mod models;
pub mod ops;
pub mod rng;
pub mod run;
pub mod runtime;
pub mod script;
pub mod session;
pub mod sweep;
pub mod train;

pub use session::Session;

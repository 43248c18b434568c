//! Tensor operations that candle lacks or runs slowly on CPU, as candle custom ops with their
//! own backward passes.

pub mod bias;
pub mod conv2d;
pub mod cpu;
pub mod gemm;
pub mod half;
pub mod linear;
pub mod param_grads;
pub mod pointwise;

pub use conv2d::{conv2d, conv2d_block, ConvBlockOptions};
pub use pointwise::{max_pool2, relu};

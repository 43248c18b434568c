//! Tensor operations that candle lacks or runs slowly on CPU, as candle custom ops with their
//! own backward passes.
//!
//! What makes a CPU training step fast here, beyond the gemm candle also uses:
//! - fewer graph nodes: a convolution with its bias, ReLU and max-pooling ([`conv2d_block`]), a
//!   linear layer with its bias and ReLU ([`linear::dense`]) and BatchNorm with its ReLU are one
//!   node each, because candle's backward pass adds every node's gradient into a zero-filled
//!   tensor of its size;
//! - the gradients of the parameters handed over beside candle's store ([`param_grads`]);
//! - inputs that are data get no gradient (the first layer's input gradient is never computed);
//! - gemm operand layouts chosen so that the large operand is read where it lies and the small
//!   one is packed (the convolution's weight gradient, a linear layer wider than its batch).

pub mod attention;
pub mod batch_norm;
pub mod bias;
pub mod bmm;
pub mod buffer;
pub mod conv2d;
pub mod cpu;
pub mod elementwise;
pub mod encoder_layer;
pub mod fast_exp;
pub mod gelu;
pub mod gemm;
pub mod half;
pub mod inplace;
pub mod interpolate;
pub mod lanes;
pub mod layer_norm;
pub mod linear;
pub mod param_grads;
pub mod param_op;
pub mod pointwise;
pub mod res_block;
pub mod softmax;
pub mod sum_squares;

pub use conv2d::{conv2d, conv2d_block, ConvBlockOptions};
pub use gelu::gelu_erf;
pub use layer_norm::{layer_norm, layer_norm_ops};
pub use pointwise::{add_relu, max_pool2, relu};
pub use softmax::softmax_last;

//! Building blocks shared by the architectures, with PyTorch's initialisation and tensor names.
//! Every block is differentiable end to end: on the CPU in f32 the linear layer, the convolution
//! (with its bias, ReLU and pooling) and BatchNorm (with its ReLU) run as fused custom ops with
//! their own backward passes ([`crate::ops`], each checked against candle's elementary ops in
//! tests/it/ops.rs), never candle's fused kernels that cut the gradient (../shared/STACK.md);
//! other devices and dtypes compose candle's ops.

use crate::ops::half::{in_f32, is_half};
use crate::ops::ConvBlockOptions;
use crate::rng::HostRng;
use candle_core::{DType, Module, Result, Tensor, D};

pub use super::batch_norm::{batch_norm, bn, bn_relu, BatchNorm2d};
use candle_nn::{Init, VarBuilder};

pub use super::init::InitScheme;
pub use super::no_grad::param;

/// The parameter `t` in `dtype`: `t` itself when it already is, else a cast that gradients flow
/// through (they come back in `t`'s own type); detached when it takes no gradient in this pass
/// ([`param`]). Mixed precision casts the f32 master weights this way at each use.
pub fn cast_as(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let t = param(t);
    if t.dtype() == dtype {
        Ok(t)
    } else {
        t.to_dtype(dtype)
    }
}

/// A fully connected layer `x·Wᵀ + b` (`weight [out, in]`, optional `bias [out]`, the PyTorch
/// layout) that computes in its input's dtype.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer over existing tensors.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `[out]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// `x·Wᵀ + b`, followed by a ReLU when `relu`, with the weight cast to `x`'s dtype: one
    /// fused op for f32 on the CPU (see [`crate::ops::linear::dense`]).
    pub fn forward_act(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let bias = self.bias.as_ref().map(param);
        crate::ops::linear::dense(x, &cast_as(&self.weight, x.dtype())?, bias.as_ref(), relu)
    }
}

impl Linear {
    /// `gelu(x·Wᵀ + b)` (exact GELU) as one op for f32 on the CPU (see
    /// [`crate::ops::linear::dense_act`]).
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        let bias = self.bias.as_ref().map(param);
        let w = cast_as(&self.weight, x.dtype())?;
        crate::ops::linear::dense_act(x, &w, bias.as_ref(), crate::ops::linear::Act::Gelu)
    }
}

impl From<candle_nn::Linear> for Linear {
    fn from(l: candle_nn::Linear) -> Self {
        Self::new(l.weight().clone(), l.bias().cloned())
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, false)
    }
}

/// A linear layer `weight [out, in]`, `bias [out]` initialised as PyTorch's `nn.Linear`: both
/// uniform in ±1/sqrt(in).
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    linear_scheme(in_dim, out_dim, InitScheme::Torch, vb)
}

/// A linear layer with weight and bias initialised by `scheme`.
pub fn linear_scheme(in_dim: usize, out_dim: usize, scheme: InitScheme, vb: VarBuilder) -> Result<Linear> {
    linear_init(in_dim, out_dim, scheme.weight(in_dim), scheme.bias(in_dim), vb)
}

/// A linear layer with explicit initialisations for its weight and bias.
pub fn linear_init(in_dim: usize, out_dim: usize, w_init: Init, b_init: Init, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints((out_dim, in_dim), "weight", w_init)?;
    let b = vb.get_with_hints(out_dim, "bias", b_init)?;
    Ok(Linear::new(w, Some(b)))
}

/// A 2-D convolution (`weight` `[O, C, K, K]`, optional `bias` `[O]`) run by
/// [`crate::ops::conv2d()`] (im2col + gemm on CPU, with both backward passes).
#[derive(Clone, Debug)]
pub struct Conv {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    groups: usize,
}

impl Conv {
    /// The convolution (plus bias), followed by a ReLU when `relu` and 2x2 max-pooling when
    /// `pool`, with the weight cast to `x`'s dtype: one fused op for f32 on the CPU (see
    /// [`crate::ops::conv2d_block`]). A grouped convolution composes candle's ops.
    pub fn forward_block(&self, x: &Tensor, relu: bool, pool: bool) -> Result<Tensor> {
        let bias = self.bias.as_ref().map(param);
        let weight = cast_as(&self.weight, x.dtype())?;
        if self.groups == 1 {
            let opts = ConvBlockOptions { stride: self.stride, padding: self.padding, relu, pool };
            return crate::ops::conv2d_block(x, &weight, bias.as_ref(), opts);
        }
        let mut y = x.conv2d(&weight, self.padding, self.stride, 1, self.groups)?;
        if let Some(b) = bias {
            y = y.broadcast_add(&cast_as(&b, y.dtype())?.reshape((1, (), 1, 1))?)?;
        }
        if relu {
            y = crate::ops::relu(&y)?;
        }
        if pool {
            y = crate::ops::max_pool2(&y)?;
        }
        Ok(y)
    }

    /// The weight `[O, C/groups, K, K]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_block(x, false, false)
    }
}

/// A convolution without bias (the ResNet convention), He-normal initialised with the fan given
/// by `fan_out` (WideResNet) or the fan-in (CIFAR ResNet).
pub fn conv_no_bias(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    fan_out: bool,
    vb: VarBuilder,
) -> Result<Conv> {
    let fan = if fan_out { c_out * kernel * kernel } else { c_in * kernel * kernel };
    let std = (2.0 / fan.max(1) as f64).sqrt();
    let weight = vb.get_with_hints((c_out, c_in, kernel, kernel), "weight", Init::Randn { mean: 0.0, stdev: std })?;
    Ok(Conv { weight, bias: None, stride, padding, groups: 1 })
}

/// A convolution with bias and stride 1, initialised by `scheme` (PyTorch's `nn.Conv2d`
/// default, uniform in ±1/sqrt(fan_in), for [`InitScheme::Torch`]).
pub fn conv_biased(
    c_in: usize,
    c_out: usize,
    kernel: usize,
    padding: usize,
    scheme: InitScheme,
    vb: VarBuilder,
) -> Result<Conv> {
    let fan_in = c_in * kernel * kernel;
    let weight = vb.get_with_hints((c_out, c_in, kernel, kernel), "weight", scheme.weight(fan_in))?;
    let bias = Some(vb.get_with_hints(c_out, "bias", scheme.bias(fan_in))?);
    Ok(Conv { weight, bias, stride: 1, padding, groups: 1 })
}

/// The shape of a [`conv2d`] layer.
#[derive(Clone, Copy, Debug)]
pub struct ConvShape {
    /// Input channels.
    pub c_in: usize,
    /// Output channels.
    pub c_out: usize,
    /// Square kernel size.
    pub kernel: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
    /// Channel groups.
    pub groups: usize,
}

/// A convolution of any stride, padding and grouping, with an optional bias, initialised by
/// `scheme` with the fan-in `c_in/groups·k·k` (PyTorch's `nn.Conv2d` default for
/// [`InitScheme::Torch`]).
pub fn conv2d(shape: ConvShape, bias: bool, scheme: InitScheme, vb: VarBuilder) -> Result<Conv> {
    let ConvShape { c_in, c_out, kernel, stride, padding, groups } = shape;
    let fan_in = c_in / groups.max(1) * kernel * kernel;
    let weight = vb.get_with_hints((c_out, c_in / groups.max(1), kernel, kernel), "weight", scheme.weight(fan_in))?;
    let bias = if bias { Some(vb.get_with_hints(c_out, "bias", scheme.bias(fan_in))?) } else { None };
    Ok(Conv { weight, bias, stride, padding, groups: groups.max(1) })
}

/// Layer normalisation over the last dimension (`weight`, `bias`); fused on the CPU, with
/// an exact backward pass (see [`super::fused`]).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// A layer norm of `size` features with weight 1 and bias 0.
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(size, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(size, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
}

impl LayerNorm {
    /// The weight `[size]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias `[size]`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// The epsilon added to the variance.
    pub fn eps(&self) -> f64 {
        self.eps
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::ops::layer_norm(x, &param(&self.weight), &param(&self.bias), self.eps)
    }
}

/// Dropout whose masks come from a seeded generator (candle's own dropout draws from an
/// unseeded one). Active in training mode only; kept units are scaled by 1/(1-p).
#[derive(Clone, Debug)]
pub struct Dropout {
    p: f64,
    rng: HostRng,
}

impl Dropout {
    /// Dropout with probability `p` in [0, 1), masks drawn from `rng`.
    pub fn new(p: f64, rng: &HostRng) -> Result<Self> {
        if !(0.0..1.0).contains(&p) {
            candle_core::bail!("dropout probability must be in [0, 1), got {p}");
        }
        Ok(Self { p, rng: rng.clone() })
    }

    /// The drop probability.
    pub fn p(&self) -> f64 {
        self.p
    }

    /// `x` with a random mask applied (training) or unchanged (evaluation, or p = 0).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.p == 0.0 {
            return Ok(x.clone());
        }
        let scale = (1.0 / (1.0 - self.p)) as f32;
        let p = self.p as f32;
        let mask: Vec<f32> =
            self.rng.uniform(x.elem_count(), 0.0, 1.0).into_iter().map(|u| if u < p { 0.0 } else { scale }).collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }
}

/// Hidden activations by their Hugging Face names (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU, `x·Φ(x)` (Hugging Face `gelu`).
    Gelu,
    /// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
    /// `x·sigmoid(1.702x)` (`quick_gelu`).
    QuickGelu,
    /// ReLU.
    Relu,
    /// `x·sigmoid(x)` (`silu`, `swish`).
    Silu,
}

impl Activation {
    /// The activation called `name`.
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            other => candle_core::bail!(
                "hidden_act `{other}` is not supported (gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, quick_gelu, relu, silu, swish)"
            ),
        })
    }

    /// Applies the activation.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => crate::ops::gelu_erf(x),
            Self::GeluTanh => x.gelu(),
            Self::QuickGelu => x.mul(&sigmoid(&(x * 1.702)?)?),
            Self::Relu => crate::ops::relu(x),
            Self::Silu => x.mul(&sigmoid(x)?),
        }
    }
}

/// `1 / (1 + exp(-x))` from elementary ops.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// The mean over the spatial dimensions: `[N, C, H, W]` to `[N, C]` (summed in f32 for bf16/f16
/// inputs).
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    if is_half(x) {
        return in_f32(x, global_avg_pool);
    }
    x.mean(D::Minus1)?.mean(D::Minus1)
}

/// `x[:, :, ::2, ::2]`: every other row and column, starting with the first.
pub fn subsample2(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let x = x.pad_with_zeros(2, 0, h % 2)?.pad_with_zeros(3, 0, w % 2)?;
    let (h2, w2) = (h.div_ceil(2), w.div_ceil(2));
    x.reshape((n, c, h2, 2, w2, 2))?.narrow(3, 0, 1)?.narrow(5, 0, 1)?.reshape((n, c, h2, w2))
}

/// Fails unless `x` is a batch `[N, ..expected]`, naming the architecture.
pub fn check_input(what: &str, x: &Tensor, expected: &[usize]) -> Result<()> {
    let dims = x.dims();
    if dims.len() != expected.len() + 1 || &dims[1..] != expected {
        candle_core::bail!(
            "{what} expects a batch of inputs [N, {}], got {dims:?}",
            expected.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

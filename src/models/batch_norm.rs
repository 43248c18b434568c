//! BatchNorm over the channels of images `[N, C, H, W]`, as PyTorch's `nn.BatchNorm2d`: the
//! layer with its parameters and running statistics. The kernels (fused on the CPU, elementary
//! ops elsewhere) are in `ops::batch_norm`.

use super::no_grad::param;
use crate::ops::batch_norm::{batch_norm_eval, batch_norm_train, batch_norm_train_ops};
use crate::ops::half::{in_f32, is_half};
use crate::ops::res_block::BlockOutput;
use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

/// BatchNorm over channels: eps 1e-5, momentum 0.1, weight 1, bias 0. Training mode normalises
/// with the batch statistics (the gradient flows through them) and updates the running
/// statistics, buffers named `running_mean` and `running_var` (the unbiased variance, as
/// PyTorch); evaluation mode uses the running statistics.
#[derive(Clone, Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

/// A [`BatchNorm2d`] of `channels` under `vb`.
pub fn batch_norm(channels: usize, vb: VarBuilder) -> Result<BatchNorm2d> {
    let running_mean = Var::from_tensor(&vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?)?;
    let running_var = Var::from_tensor(&vb.get_with_hints(channels, "running_var", Init::Const(1.0))?)?;
    let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
    let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
    Ok(BatchNorm2d { weight, bias, running_mean, running_var, eps: 1e-5, momentum: 0.1 })
}

/// Applies a BatchNorm in training or evaluation mode.
pub fn bn(layer: &BatchNorm2d, x: &Tensor, train: bool) -> Result<Tensor> {
    layer.forward_t(x, train)
}

/// Applies a BatchNorm in training or evaluation mode followed by a ReLU (one fused op in
/// training mode on the CPU).
pub fn bn_relu(layer: &BatchNorm2d, x: &Tensor, train: bool) -> Result<Tensor> {
    layer.forward_act(x, train, true)
}

impl BatchNorm2d {
    /// The layer with another `eps` and running-statistics `momentum` (PyTorch's convention:
    /// the weight of the new batch).
    pub fn with_eps_momentum(mut self, eps: f64, momentum: f64) -> Self {
        self.eps = eps;
        self.momentum = momentum;
        self
    }

    /// Normalises `x` in training (`train`) or evaluation mode. bf16/f16 inputs are normalised
    /// in f32 (statistics, weights and running buffers stay f32) and the result cast back.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_act(x, train, false)
    }

    /// [`Self::forward_t`], followed by a ReLU when `relu`.
    pub fn forward_act(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        if is_half(x) {
            return in_f32(x, |x| self.forward_act(x, train, relu));
        }
        let (n, c, h, w) = x.dims4()?;
        if c != self.weight.dim(0)? {
            candle_core::bail!("batch norm of {} channels got an input {:?}", self.weight.dim(0)?, x.dims());
        }
        let then_relu = |y: Tensor| if relu { crate::ops::relu(&y) } else { Ok(y) };
        if !train {
            return then_relu(self.forward_eval(x)?);
        }
        let m = n * h * w;
        if m < 2 {
            candle_core::bail!("batch norm in training mode needs more than one value per channel, got {:?}", x.dims());
        }
        let (weight, bias) = (param(&self.weight), param(&self.bias));
        let (y, mean, var) = batch_norm_train(x, &weight, &bias, self.eps, relu)?;
        self.update_running(&mean, &var, m)?;
        Ok(y)
    }

    /// Moves the running statistics towards a training batch's mean and biased variance per
    /// channel over `m` values each (the variance stored unbiased, as PyTorch).
    pub fn update_running(&self, mean: &Tensor, var: &Tensor, m: usize) -> Result<()> {
        let k = self.momentum;
        let unbiased = m as f64 / (m as f64 - 1.0);
        let rm = ((self.running_mean.as_tensor() * (1.0 - k))? + (mean.detach().to_dtype(DType::F32)? * k)?)?;
        let rv =
            ((self.running_var.as_tensor() * (1.0 - k))? + (var.detach().to_dtype(DType::F32)? * (k * unbiased))?)?;
        self.running_mean.set(&rm.to_dtype(self.running_mean.dtype())?)?;
        self.running_var.set(&rv.to_dtype(self.running_var.dtype())?)
    }

    /// The weight and the bias as this pass reads them (frozen ones detached), and `eps`: what a
    /// fused op that normalises in training mode takes ([`crate::ops::res_block`]).
    pub fn train_params(&self) -> ([Tensor; 2], f64) {
        ([param(&self.weight), param(&self.bias)], self.eps)
    }

    /// Training mode from elementary ops, without updating the running statistics: the
    /// output, and the batch mean and (biased) variance per channel (the fused op's reference).
    pub fn forward_train_unfused(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        batch_norm_train_ops(x, &param(&self.weight), &param(&self.bias), self.eps)
    }

    fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        batch_norm_eval(
            x,
            &param(&self.weight),
            &param(&self.bias),
            self.running_mean.as_tensor(),
            self.running_var.as_tensor(),
            self.eps,
        )
    }
}

/// Moves the running statistics of `norms` by the batch statistics of a fused residual op's
/// output (`ops::res_block`), one statistic per BatchNorm in order.
pub fn update_running<'a>(norms: impl IntoIterator<Item = &'a BatchNorm2d>, out: &BlockOutput) -> Result<()> {
    for ((norm, (mean, var)), &m) in norms.into_iter().zip(&out.stats).zip(&out.count) {
        norm.update_running(mean, var, m)?;
    }
    Ok(())
}

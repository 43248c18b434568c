//! The shape shared by the CPU ops over an input and its parameters (a linear layer, a
//! convolution, BatchNorm, layer norm): `(x, weight)` or `(x, weight, bias)` in candle's graph,
//! with the gradients of the weight and the bias handed over through [`super::param_grads`].

use super::param_grads::deliver;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// A storage and its layout, as candle hands operands to a custom op.
pub type Operand<'a> = (&'a CpuStorage, &'a Layout);

/// Gradients of the input, the weight and the bias (each `None` when not computed).
pub type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// An op over an input, a weight and an optional bias.
pub trait ParamOp: Send + Sync + 'static {
    /// The op's name in candle's graph (and its errors).
    const NAME: &'static str;

    /// The forward pass on the CPU.
    fn cpu_fwd(&self, x: Operand, w: Operand, b: Option<Operand>) -> Result<(CpuStorage, Shape)>;

    /// The gradients of `x`, `w` and `b` (only of operands that track a gradient) from the
    /// output `y` and its gradient `dy`.
    fn bwd(&self, x: &Tensor, w: &Tensor, b: Option<&Tensor>, y: &Tensor, dy: &Tensor) -> Result<Grads3>;
}

/// `op` applied to `x`, `w` and, when given, `b` (as a two- or three-operand candle op).
pub fn apply<O: ParamOp>(x: &Tensor, w: &Tensor, b: Option<&Tensor>, op: O) -> Result<Tensor> {
    match b {
        Some(b) => x.apply_op3(w, b, WithParams(op)),
        None => x.apply_op2(w, WithParams(op)),
    }
}

/// A [`ParamOp`] as a candle custom op.
struct WithParams<O>(O);

/// `grad` (when there is one) handed over as the gradient of the parameter `p`.
fn hand_over(p: &Tensor, grad: Option<Tensor>) -> Result<Option<Tensor>> {
    Ok(match grad {
        Some(g) => deliver(p, g)?,
        None => None,
    })
}

impl<O: ParamOp> CustomOp2 for WithParams<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        self.0.cpu_fwd((s1, l1), (s2, l2), None)
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.0.bwd(x, w, None, y, dy)?;
        Ok((dx, hand_over(w, dw)?))
    }
}

impl<O: ParamOp> CustomOp3 for WithParams<O> {
    fn name(&self) -> &'static str {
        O::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.cpu_fwd((s1, l1), (s2, l2), Some((s3, l3)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Grads3> {
        let (dx, dw, db) = self.0.bwd(x, w, Some(b), y, dy)?;
        Ok((dx, hand_over(w, dw)?, hand_over(b, db)?))
    }
}

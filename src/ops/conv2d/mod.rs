//! 2-D convolution on CPU as im2col + gemm or, in f32 on AVX2 where the output width is a
//! multiple of 8, as a direct convolution (`direct.rs`), with an optional fused epilogue (bias,
//! ReLU, 2x2 max-pooling) and its backward pass.
//!
//! candle 0.11 runs CPU conv2d as a direct loop and its backward through `conv_transpose2d` and a
//! batch-transposed convolution, well below its matmul rate. Here a group of samples is unfolded
//! (im2col: `[C·KH·KW, B·Ho·Wo]`, enough samples that the product has at least
//! [`MIN_COLUMNS`] columns) into a per-thread buffer and multiplied with the weight matrix
//! `[O, C·KH·KW]` by the gemm candle uses for matmul; the input gradient multiplies by the
//! transposed weights and folds back (col2im), the weight gradient accumulates `grad·colsᵀ` per
//! thread over a fixed range of samples (the same sum on every run with the same thread count).
//!
//! The epilogue runs on each group's product while it is in cache: add the bias, clamp at zero,
//! pool. With pooling only the pooled output and the position of each window's maximum are kept,
//! and the backward pass scatters the incoming gradient straight into the group's buffer: no
//! full-size intermediate or its gradient exists, where candle's graph would hold three (and add
//! each gradient into a zero-filled tensor). The input gradient is computed only when the input
//! needs one (not for a data batch), and the parameters' gradients go to [`super::param_grads`].
//!
//! Other devices and dtypes fall back to candle's `conv2d` and the separate ops.
//!
//! Files: `geometry.rs` (the shape of a convolution, its runs of valid input positions, the
//! sample groups), `unfold.rs` (im2col and col2im), `passes.rs` (the forward and backward passes
//! on slices by im2col + gemm), `direct.rs` (the direct convolution; its AVX2 kernels in `direct/avx2.rs`),
//! `winograd.rs` (F(2x2, 3x3) for wide 3x3 convolutions of stride 1), this file (the candle op, the
//! choice between the two, and the public functions).

mod direct;
mod geometry;
mod passes;
mod unfold;
mod winograd;

pub use geometry::MIN_COLUMNS;

use super::cpu::{slice_of, typed_slice};
use super::gemm::Float;
use super::half::{in_f32, is_half};
use super::param_op::{self, Grads3, Operand, ParamOp};
use candle_core::{backend::BackendStorage, CpuStorage, DType, Result, Shape, Tensor};
use geometry::Geometry;
use passes::{backward, forward, Epilogue, Grads, Needs, Saved};
use std::sync::Mutex;

/// The op: `(x, kernel[, bias]) -> epilogue(conv(x, kernel))`.
struct ConvBlock {
    stride: usize,
    padding: usize,
    ep: Epilogue,
    /// Each pooling window's argmax, written by the forward pass for the backward pass.
    argmax: Mutex<Vec<u8>>,
}

impl ConvBlock {
    fn out_shape(&self, g: &Geometry) -> Shape {
        if self.ep.pool {
            Shape::from((g.n, g.o, g.ho / 2, g.wo / 2))
        } else {
            Shape::from((g.n, g.o, g.ho, g.wo))
        }
    }

    /// Runs `f` on the slices the backward pass reads, checked: the operands, the output, its
    /// gradient and the pooling positions of the forward pass.
    fn with_saved<T: Float, R>(
        &self,
        x: &Tensor,
        k: &Tensor,
        y: &Tensor,
        dy: &Tensor,
        f: impl FnOnce(Saved<T>) -> R,
    ) -> Result<R> {
        let ((xs, xl), (ks, kl)) = (x.storage_and_layout(), k.storage_and_layout());
        let ((ys, yl), (ds, dl)) = (y.storage_and_layout(), dy.storage_and_layout());
        let argmax = self.argmax.lock().map_err(|_| candle_core::Error::Msg("conv2d: poisoned lock".into()))?;
        if self.ep.pool && argmax.len() != y.elem_count() {
            candle_core::bail!("conv2d backward: the pooling positions of the forward pass are missing");
        }
        let (xv, kv) = (slice_of::<T>(&xs, xl, "conv2d input")?, slice_of::<T>(&ks, kl, "conv2d kernel")?);
        let (yv, dv) = (slice_of::<T>(&ys, yl, "conv2d output")?, slice_of::<T>(&ds, dl, "conv2d gradient")?);
        Ok(f(Saved { x: xv, k: kv, y: yv, dy: dv, argmax: &argmax }))
    }

    /// The gradients asked for, by im2col + gemm.
    fn grads<T: Float>(&self, g: &Geometry, ops: [&Tensor; 4], needs: Needs) -> Result<Grads<T>> {
        let [x, k, y, dy] = ops;
        self.with_saved(x, k, y, dy, |saved| backward(g, self.ep, saved, needs))
    }

    /// [`Self::grads`] in f32, by the direct kernels where they apply.
    fn grads_f32(&self, g: &Geometry, ops: [&Tensor; 4], needs: Needs) -> Result<Grads<f32>> {
        let [x, k, y, dy] = ops;
        self.with_saved(x, k, y, dy, |saved| backward_f32(g, self.ep, saved, needs))
    }
}

/// The forward pass in f32: by Winograd's F(2x2, 3x3) or the direct kernels where they apply,
/// else im2col + gemm.
fn forward_f32(g: &Geometry, ep: Epilogue, x: &[f32], k: &[f32], b: Option<&[f32]>) -> (Vec<f32>, Vec<u8>) {
    if winograd::applies(g) {
        winograd::forward(g, ep, x, k, b)
    } else if direct::applies(g) {
        direct::forward(g, ep, x, k, b)
    } else {
        forward(g, ep, x, k, b)
    }
}

/// The backward pass in f32: by Winograd's F(2x2, 3x3) or the direct kernels where they apply,
/// else im2col + gemm.
fn backward_f32(g: &Geometry, ep: Epilogue, saved: Saved<f32>, needs: Needs) -> Grads<f32> {
    if winograd::applies(g) {
        return winograd::backward(g, ep, saved, needs);
    }
    if !direct::applies(g) {
        return backward(g, ep, saved, needs);
    }
    if !needs.input || direct::applies_to_input(g) {
        return direct::backward(g, ep, saved, needs);
    }
    // A strided convolution: its input gradient by im2col + gemm, the rest directly.
    let (gx, _, _) = backward(g, ep, saved, Needs { input: true, kernel: false, bias: false });
    let (_, gk, gb) = direct::backward(g, ep, saved, Needs { input: false, ..needs });
    (gx, gk, gb)
}

/// A convolution without bias or epilogue on contiguous f32 CPU slices, for ops that fuse
/// several layers around it ([`super::res_block`]): the same kernels as [`conv2d`].
pub(crate) struct SliceConv {
    g: Geometry,
}

impl SliceConv {
    /// The convolution of an input `x_dims` `[N, C, H, W]` with a kernel `k_dims` `[O, C, KH, KW]`.
    pub(crate) fn new(x_dims: &[usize], k_dims: &[usize], stride: usize, padding: usize) -> Result<Self> {
        Ok(Self { g: Geometry::new(x_dims, k_dims, stride, padding)? })
    }

    /// The output's dimensions `[N, O, Ho, Wo]`.
    pub(crate) fn out_dims(&self) -> [usize; 4] {
        [self.g.n, self.g.o, self.g.ho, self.g.wo]
    }

    /// The output.
    pub(crate) fn forward(&self, x: &[f32], k: &[f32]) -> Vec<f32> {
        forward_f32(&self.g, Epilogue::NONE, x, k, None).0
    }

    /// The gradients of the input (when `input`) and of the kernel (when `kernel`) from the
    /// output `y` and its gradient `dy`.
    pub(crate) fn backward(
        &self,
        [x, k, y, dy]: [&[f32]; 4],
        input: bool,
        kernel: bool,
    ) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
        let saved = Saved { x, k, y, dy, argmax: &[] };
        let (gx, gk, _) = backward_f32(&self.g, Epilogue::NONE, saved, Needs { input, kernel, bias: false });
        (gx, gk)
    }
}

impl ParamOp for ConvBlock {
    const NAME: &'static str = "samhost-conv2d";

    fn cpu_fwd(&self, x: Operand, k: Operand, b: Option<Operand>) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(x.1.dims(), k.1.dims(), self.stride, self.padding)?;
        fn typed<'a, T: Float>((s, l): Operand<'a>) -> Result<&'a [T]> {
            typed_slice(s, l, "conv2d operand")
        }
        let (out, argmax) = match x.0.dtype() {
            DType::F32 => {
                let (x, k, b) = (typed(x)?, typed(k)?, b.map(typed).transpose()?);
                let (o, a) = forward_f32(&g, self.ep, x, k, b);
                (CpuStorage::F32(o), a)
            }
            DType::F64 => {
                let (o, a) = forward(&g, self.ep, typed(x)?, typed(k)?, b.map(typed).transpose()?);
                (CpuStorage::F64(o), a)
            }
            d => candle_core::bail!("conv2d: unsupported dtype {d:?}"),
        };
        *self.argmax.lock().map_err(|_| candle_core::Error::Msg("conv2d: poisoned lock".into()))? = argmax;
        Ok((out, self.out_shape(&g)))
    }

    fn bwd(&self, x: &Tensor, k: &Tensor, b: Option<&Tensor>, y: &Tensor, dy: &Tensor) -> Result<Grads3> {
        let g = Geometry::new(x.dims(), k.dims(), self.stride, self.padding)?;
        let dy = dy.contiguous()?;
        if dy.shape() != y.shape() {
            candle_core::bail!("conv2d backward: gradient {:?} does not match the output {:?}", dy.dims(), y.dims());
        }
        let needs = Needs { input: x.track_op(), kernel: k.track_op(), bias: b.is_some_and(|b| b.track_op()) };
        let dev = x.device();
        fn wrap<T: Float>(v: Option<Vec<T>>, shape: &[usize], dev: &candle_core::Device) -> Result<Option<Tensor>> {
            v.map(|v| Tensor::from_vec(v, shape, dev)).transpose()
        }
        let (gx, gk, gb) = match x.dtype() {
            DType::F32 => {
                let (gx, gk, gb) = self.grads_f32(&g, [x, k, y, &dy], needs)?;
                (wrap(gx, x.dims(), dev)?, wrap(gk, k.dims(), dev)?, wrap(gb, &[g.o], dev)?)
            }
            DType::F64 => {
                let (gx, gk, gb) = self.grads::<f64>(&g, [x, k, y, &dy], needs)?;
                (wrap(gx, x.dims(), dev)?, wrap(gk, k.dims(), dev)?, wrap(gb, &[g.o], dev)?)
            }
            d => candle_core::bail!("conv2d: unsupported dtype {d:?}"),
        };
        Ok((gx, gk, gb))
    }
}

/// Options of [`conv2d_block`]: the convolution's stride and padding and what follows it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConvBlockOptions {
    /// Square stride (at least 1).
    pub stride: usize,
    /// Symmetric zero padding.
    pub padding: usize,
    /// Clamp the output at zero.
    pub relu: bool,
    /// 2x2 max-pooling with stride 2 after the ReLU (an odd last row or column is dropped).
    pub pool: bool,
}

impl Default for ConvBlockOptions {
    /// Stride 1, no padding, nothing after the convolution.
    fn default() -> Self {
        Self { stride: 1, padding: 0, relu: false, pool: false }
    }
}

/// 2-D convolution of `x` `[N, C, H, W]` with `kernel` `[O, C, KH, KW]` (square stride and
/// symmetric zero padding, no dilation, one group). CPU f32/f64 use the im2col + gemm path;
/// CPU bf16/f16 use it too, on the operands widened to f32 (products accumulate in f32, the
/// result is rounded back, as on tensor cores); anything else uses candle's `conv2d`.
pub fn conv2d(x: &Tensor, kernel: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    conv2d_block(x, kernel, None, ConvBlockOptions { stride, padding, ..Default::default() })
}

/// `pool?(relu?(conv2d(x, kernel) + bias))` as one op on the CPU in f32/f64 (bias `[O]`); other
/// dtypes and devices compose [`conv2d`], the broadcast add, [`super::relu`] and
/// [`super::max_pool2`], which compute the same.
pub fn conv2d_block(x: &Tensor, kernel: &Tensor, bias: Option<&Tensor>, opts: ConvBlockOptions) -> Result<Tensor> {
    let stride = opts.stride;
    if stride == 0 {
        candle_core::bail!("conv2d: stride must be > 0");
    }
    let same = |t: &Tensor| t.dtype() == x.dtype() && t.device().same_device(x.device());
    // The fused op for the convolution itself, and for the whole block.
    let conv_fast = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && same(kernel)
        && super::cpu::fused_enabled();
    if !(conv_fast && bias.is_none_or(same)) {
        let y = if x.device().is_cpu() && is_half(x) && kernel.dtype() == x.dtype() {
            in_f32(x, |x| conv2d(x, &kernel.to_dtype(DType::F32)?, stride, opts.padding))?
        } else if conv_fast {
            conv2d(x, kernel, stride, opts.padding)?
        } else {
            x.conv2d(kernel, opts.padding, stride, 1, 1)?
        };
        let y = match bias {
            Some(b) => super::bias::add_broadcast(&y, &b.reshape((1, b.elem_count(), 1, 1))?)?,
            None => y,
        };
        let y = if opts.relu { super::relu(&y)? } else { y };
        return if opts.pool { super::max_pool2(&y) } else { Ok(y) };
    }
    let g = Geometry::new(x.dims(), kernel.dims(), stride, opts.padding)?;
    if opts.pool && (g.ho < 2 || g.wo < 2) {
        candle_core::bail!("2x2 max-pooling needs an input of at least 2x2, got {}x{}", g.ho, g.wo);
    }
    let ep = Epilogue { relu: opts.relu, pool: opts.pool };
    let op = ConvBlock { stride, padding: opts.padding, ep, argmax: Mutex::new(Vec::new()) };
    let (x, kernel) = (x.contiguous()?, kernel.contiguous()?);
    match bias {
        Some(b) => {
            if b.dims() != [g.o] {
                candle_core::bail!("conv2d: bias {:?} does not match the kernel's {} output channels", b.dims(), g.o);
            }
            param_op::apply(&x, &kernel, Some(&b.contiguous()?), op)
        }
        None => param_op::apply(&x, &kernel, None, op),
    }
}

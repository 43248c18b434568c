//! A residual basic block in training mode as one op over images `[N, C, H, W]`, in the two forms
//! the SAM papers train:
//!
//! ```text
//! post-activation (CIFAR ResNet, He et al. 2016, post.rs):
//!     out = relu(bn2(conv2(relu(bn1(conv1(x))))) + skip(x))
//!     skip: the identity, option A (subsample by 2, zero channels padded) or option B (1x1 conv + BN)
//! pre-activation (WideResNet, Zagoruyko & Komodakis 2016, pre.rs):
//!     a = relu(bn1(x));  out = conv2(relu(bn2(conv1(a)))) + (x, or a 1x1 conv of a)
//! ```
//!
//! with 3x3 convolutions (padding 1, the first one strided) and BatchNorm with the batch's
//! statistics.
//!
//! Composed from the fused convolution and BatchNorm ops a block is five or six nodes in candle's
//! graph, and candle's backward pass adds the gradient of every node's input into a freshly
//! zero-filled tensor: six activation-sized memsets and adds per block (the block's input takes
//! two gradients), about a tenth of ResNet-20's SGD step at one thread and a fifth at two (those
//! adds run on one thread). Here the block is one node: the skip's gradient is added into the
//! input's in place, the residual sum happens inside the pass that produces it, and the
//! parameters' gradients are handed over through [`super::param_grads`], so only the block's
//! input gradient goes back to candle.
//!
//! As the fused encoder layer ([`super::encoder_layer`]), the op keeps the parameters out of
//! candle's graph but one (the anchor), so it runs only where their gradients are sure to be
//! collected (the training code's forward-backward pass) or where none takes a gradient.
//! Elsewhere (evaluation mode, other devices and dtypes, other shapes) the caller composes the
//! block from the single ops, which compute the same; `SAMHOST_FUSED_BLOCK=0` makes it do so
//! everywhere. The batch statistics are returned for the caller to move the running statistics.

mod chain;
mod post;
mod pre;

pub use post::{res_block_train, res_chain_train, BlockSkip, BlockTensors};
pub use pre::{preact_block_train, preact_chain_train, PreActTensors};

use super::batch_norm::Stats;
use super::cpu::{f32_slice, fused_ok, grad_f32, named_slices, slice_of};
use super::param_grads::{capture_ahead, deliver};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// The block's output and the batch statistics of its BatchNorms (`(mean, biased variance)` per
/// channel, in the order each form's documentation gives), each over `count` values.
pub struct BlockOutput {
    /// The block's output `[N, O, Ho, Wo]`.
    pub y: Tensor,
    /// The statistics of each BatchNorm.
    pub stats: Vec<(Tensor, Tensor)>,
    /// Values per channel of each statistic (N·H·W of the BatchNorm's input).
    pub count: Vec<usize>,
}

/// What the forward pass keeps: the statistics always (for the running statistics), the
/// activations when a backward pass may follow, and (a chain of blocks) each block's own.
struct Saved {
    stats: Vec<Stats>,
    acts: Vec<Vec<f32>>,
    inner: Vec<Saved>,
}

/// The input's gradient (when asked for) and one gradient per tensor slot (`None` where none is
/// computed).
type FormGrads = (Option<Vec<f32>>, Vec<Option<Vec<f32>>>);

/// One form's math on slices.
trait Form: Send + Sync + 'static {
    /// Names of the tensor slots, for errors.
    fn names(&self) -> &[&'static str];

    /// The output's dimensions.
    fn out_dims(&self) -> [usize; 4];

    /// Values per channel of each BatchNorm's statistics.
    fn counts(&self) -> Vec<usize>;

    /// The output, and what the backward pass needs (the activations only when `keep`).
    fn forward(&self, x: &[f32], w: &[&[f32]], keep: bool) -> Result<(Vec<f32>, Saved)>;

    /// The input's gradient (when `pass.need_x`) and the gradients of the tensors that
    /// `pass.tracks`, from the output and its gradient.
    fn backward(&self, pass: Pass) -> Result<FormGrads>;
}

/// What a form's backward pass reads: the input `x`, the output `out` and its gradient `g`, the
/// tensors `w`, what the forward pass kept, whether the input's gradient is wanted, and which
/// tensors take a gradient.
struct Pass<'a> {
    x: &'a [f32],
    out: &'a [f32],
    g: &'a [f32],
    w: &'a [&'a [f32]],
    saved: &'a Saved,
    need_x: bool,
    tracks: &'a dyn Fn(usize) -> bool,
}

/// Whether the fused block may run: not when `SAMHOST_FUSED_BLOCK=0` (for comparisons with the
/// composed block; read once per process).
fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| crate::ops::cpu::env_switch("SAMHOST_FUSED_BLOCK"))
}

/// Whether consecutive blocks may run as one op ([`chain`]): not when `SAMHOST_FUSED_CHAIN=0`
/// (for comparisons with one op per block; read once per process).
fn chain_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| crate::ops::cpu::env_switch("SAMHOST_FUSED_CHAIN"))
}

/// Whether the op may run on `x` with the tensors `p` (before the form checks their shapes).
fn admissible(x: &Tensor, p: &[Option<Tensor>]) -> bool {
    let f32_cpu = |t: &Tensor| t.dtype() == DType::F32 && t.device().is_cpu() && t.is_contiguous();
    enabled() && fused_ok(x) && x.rank() == 4 && p.iter().flatten().all(f32_cpu)
}

/// Runs `form` on `x` with the tensors `p` as one op, or `None` where a trainable tensor's
/// gradient could not be collected.
fn run<F: Form>(x: &Tensor, p: Vec<Option<Tensor>>, form: F) -> Result<Option<BlockOutput>> {
    let tracked: Vec<usize> = (0..p.len()).filter(|&i| p[i].as_ref().is_some_and(Tensor::track_op)).collect();
    let collected = capture_ahead() && tracked.iter().all(|&i| p[i].as_ref().is_some_and(Tensor::is_variable));
    if !(tracked.is_empty() || collected) {
        return Ok(None);
    }
    let anchor = tracked.first().and_then(|&i| p[i].clone().map(|t| (i, t)));
    let count = form.counts();
    let shared = Arc::new(Mutex::new(None));
    let op = BlockOp {
        p,
        form,
        keep: x.track_op() || !tracked.is_empty(),
        anchor: anchor.as_ref().map(|(i, _)| *i),
        saved: shared.clone(),
    };
    let x = x.contiguous()?;
    let y = match anchor {
        Some((_, a)) => x.apply_op2(&a, op)?,
        None => x.apply_op1(op)?,
    };
    let guard = shared.lock().map_err(|_| poisoned())?;
    let Some(saved) = guard.as_ref() else { candle_core::bail!("residual block: the forward pass kept no statistics") };
    let dev = x.device();
    let stats = saved
        .stats
        .iter()
        .map(|s| Ok((Tensor::from_slice(&s.mean, s.mean.len(), dev)?, Tensor::from_slice(&s.var, s.var.len(), dev)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(BlockOutput { y, stats, count }))
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("residual block: poisoned lock".into())
}

/// The op: the block's tensors, its form, and what the forward pass keeps.
struct BlockOp<F> {
    p: Vec<Option<Tensor>>,
    form: F,
    keep: bool,
    /// The position of the parameter passed as the op's second operand.
    anchor: Option<usize>,
    saved: Arc<Mutex<Option<Saved>>>,
}

impl<F: Form> BlockOp<F> {
    fn forward(&self, x: &[f32]) -> Result<(Vec<f32>, Shape)> {
        let guards: Vec<_> = self.p.iter().map(|t| t.as_ref().map(Tensor::storage_and_layout)).collect();
        let w = named_slices(&guards, self.form.names())?;
        let (out, saved) = self.form.forward(x, &w, self.keep)?;
        *self.saved.lock().map_err(|_| poisoned())? = Some(saved);
        Ok((out, Shape::from(self.form.out_dims().to_vec())))
    }

    /// The input's gradient (when `x` tracks one); the parameters' gradients are handed over,
    /// except the anchor's, returned second.
    fn backward(&self, x: &Tensor, out: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let guard = self.saved.lock().map_err(|_| poisoned())?;
        let Some(saved) = guard.as_ref().filter(|s| !s.acts.is_empty()) else {
            candle_core::bail!("residual block: the backward pass ran without the forward pass's activations")
        };
        let grad = grad_f32(grad)?;
        let ((xs, xl), (gs, gl), (os, ol)) =
            (x.storage_and_layout(), grad.storage_and_layout(), out.storage_and_layout());
        let xv = slice_of::<f32>(&xs, xl, "residual block input")?;
        let g = slice_of::<f32>(&gs, gl, "residual block gradient")?;
        let outv = slice_of::<f32>(&os, ol, "residual block output")?;
        let guards: Vec<_> = self.p.iter().map(|t| t.as_ref().map(Tensor::storage_and_layout)).collect();
        let w = named_slices(&guards, self.form.names())?;
        let tracks = |i: usize| self.p.get(i).and_then(Option::as_ref).is_some_and(Tensor::track_op);
        let pass = Pass { x: xv, out: outv, g, w: &w, saved, need_x: x.track_op(), tracks: &tracks };
        let (dx, grads) = self.form.backward(pass)?;
        drop(guards);
        let dev = x.device();
        let mut anchor_grad = None;
        for (i, grad) in grads.into_iter().enumerate() {
            let (Some(grad), Some(p)) = (grad, self.p.get(i).and_then(Option::as_ref)) else { continue };
            let back = deliver(p, Tensor::from_vec(grad, p.shape(), dev)?)?;
            if Some(i) == self.anchor {
                anchor_grad = back;
            } else if back.is_some() {
                candle_core::bail!(
                    "residual block: the gradient of the {} has nowhere to go (the fused block runs only in a \
                     forward-backward pass that collects parameter gradients)",
                    self.form.names()[i]
                );
            }
        }
        let dx = dx.map(|dx| Tensor::from_vec(dx, x.shape(), dev)).transpose()?;
        Ok((dx, anchor_grad))
    }
}

impl<F: Form> CustomOp1 for BlockOp<F> {
    fn name(&self) -> &'static str {
        "samhost-res-block"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out, shape) = self.forward(f32_slice(s, l, "residual block input")?)?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(&self, x: &Tensor, out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.backward(x, out, grad)?.0)
    }
}

impl<F: Form> CustomOp2 for BlockOp<F> {
    fn name(&self) -> &'static str {
        "samhost-res-block"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out, shape) = self.forward(f32_slice(s, l, "residual block input")?)?;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.backward(x, out, grad)
    }
}

//! Gradients: one forward-backward pass ([`grad`], a [`TensorSet`] of the trainable
//! parameters), plain vectors aligned with a parameter list, and the norms SAM needs (the sum of
//! squares itself is a kernel: [`crate::ops::sum_squares`]).

use super::loss::{cross_entropy_per_example, LossFn};
use super::tensor_set::TensorSet;
use crate::models::Model;
use crate::ops::sum_squares::sum_squares;
use anyhow::{Context, Result};
use candle_core::{Tensor, Var};

/// The gradient of `loss` with respect to each of `params` (zeros where a parameter does not
/// reach the loss). The custom ops hand the gradients of variables over directly
/// ([`crate::ops::param_grads`]); candle's store holds the rest, and a parameter reached both
/// ways gets the sum.
pub fn gradients(loss: &Tensor, params: &[(String, Var)]) -> Result<Vec<Tensor>> {
    let (store, mut direct) = crate::ops::param_grads::capture(|| loss.backward())?;
    params
        .iter()
        .map(|(_, v)| {
            let t = v.as_tensor();
            Ok(match (store.get(t), direct.remove(&t.id())) {
                (Some(a), Some(b)) => (a + b)?,
                (Some(g), None) => g.clone(),
                (None, Some(g)) => g,
                (None, None) => t.zeros_like()?,
            })
        })
        .collect()
}

/// The global L2 norm over all tensors together.
pub fn global_norm(tensors: &[Tensor]) -> Result<f64> {
    Ok(sum_squares(tensors)?.sqrt())
}

/// Scales every tensor so that their global norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when the norm exceeds it).
pub fn clip_global_norm(grads: Vec<Tensor>, max_norm: f64) -> Result<Vec<Tensor>> {
    let norm = global_norm(&grads)?;
    if norm <= max_norm {
        return Ok(grads);
    }
    let scale = max_norm / (norm + 1e-6);
    grads.into_iter().map(|g| Ok(g.affine(scale, 0.0)?)).collect()
}

/// Options of one forward-backward pass ([`grad`]).
#[derive(Clone, Copy, Debug)]
pub struct GradOptions {
    /// Let BatchNorm update its running statistics (training mode always normalises with the
    /// batch's statistics); `false` leaves them as they were.
    pub update_bn: bool,
    /// Also compute the per-example losses (cross-entropy) into [`GradOutput::losses`].
    pub per_example: bool,
    /// Training mode (batch statistics, dropout); `false` evaluates the loss in evaluation mode
    /// (BatchNorm's running statistics, no dropout), as sharpness measures do.
    pub train: bool,
}

impl Default for GradOptions {
    fn default() -> Self {
        Self { update_bn: true, per_example: true, train: true }
    }
}

/// What one forward-backward pass gives.
pub struct GradOutput {
    /// The batch's loss (detached).
    pub loss: f64,
    /// Correctly classified examples (`None` when the logits are not `[N, K]`).
    pub correct: Option<usize>,
    /// Examples in the batch.
    pub n: usize,
    /// The gradient of the loss for every trainable parameter (zeros where a parameter does not
    /// reach the loss).
    pub grads: TensorSet,
    /// Per-example cross-entropy `[N]` (detached; with the pass's label smoothing), when asked
    /// for and the logits are `[N, K]`.
    pub losses: Option<Tensor>,
}

impl GradOutput {
    /// Share of correct predictions (NaN when not a classification batch).
    pub fn accuracy(&self) -> f64 {
        match self.correct {
            Some(c) if self.n > 0 => c as f64 / self.n as f64,
            _ => f64::NAN,
        }
    }
}

/// One forward-backward pass of `model` in training mode over a batch: the loss, the
/// gradients of the trainable parameters `params` as a [`TensorSet`], the batch accuracy and
/// the per-example losses. At perturbed weights the dropout masks are those of the last pass at
/// unperturbed weights ([`Model::begin_gradient`]).
pub fn grad_of(
    model: &Model,
    params: &[(String, Var)],
    images: &Tensor,
    labels: &Tensor,
    loss_fn: &LossFn,
    opts: GradOptions,
) -> Result<GradOutput> {
    model.begin_gradient()?;
    grad_pass(model, params, images, labels, loss_fn, opts)
}

/// A scope in which `model`'s parameters outside `params` (frozen ones, or those a step leaves
/// out) enter the graph detached: no weight gradient is computed for them, and there is no
/// backward pass below the lowest parameter of `params` (see [`crate::models::no_grad`]).
pub fn no_grad_outside(model: &Model, params: &[(String, Var)]) -> crate::models::no_grad::NoGradScope {
    let wanted: std::collections::HashSet<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    let skip = model
        .params()
        .all()
        .into_iter()
        .filter(|(n, _)| !crate::models::is_buffer(n) && !wanted.contains(n.as_str()))
        .map(|(_, v)| v.as_tensor().id())
        .collect();
    crate::models::no_grad::NoGradScope::new(skip)
}

/// [`grad_of`] without the dropout mark (one micro-batch of a gradient evaluation).
fn grad_pass(
    model: &Model,
    params: &[(String, Var)],
    images: &Tensor,
    labels: &Tensor,
    loss_fn: &LossFn,
    opts: GradOptions,
) -> Result<GradOutput> {
    let n = images.dim(0)?;
    if labels.dim(0)? != n {
        anyhow::bail!("batch: {} images but {} labels", n, labels.dim(0)?);
    }
    if matches!(loss_fn, LossFn::CrossEntropy { .. }) {
        // A closure loss decides what labels mean (its own cross_entropy checks them).
        model.check_labels(labels)?;
    }
    let _scope = no_grad_outside(model, params);
    // The gradients below come from one capture ([`gradients`]).
    let _ahead = crate::ops::param_grads::CaptureAhead::new();
    let saved_bn = if opts.update_bn { None } else { Some(model.params().save_buffers()?) };
    let result = (|| -> Result<GradOutput> {
        let logits = model.forward_t(images, opts.train).context("forward pass")?;
        let loss = loss_fn.compute(&logits, labels)?;
        let classify = matches!((logits.dims(), labels.dims()), ([a, _], [b]) if a == b);
        let losses = match (opts.per_example && classify, loss_fn) {
            (false, _) => None,
            (true, LossFn::CrossEntropy { label_smoothing }) => {
                Some(cross_entropy_per_example(&logits.detach(), labels, *label_smoothing)?)
            }
            // A closure loss may give labels another meaning: no cross-entropy where they are
            // not classes of the logits.
            (true, LossFn::Custom(_)) => {
                let k = logits.dim(1)?;
                let fits = crate::train::loss::max_label(labels)?.is_none_or(|m| (m as usize) < k);
                if fits {
                    Some(cross_entropy_per_example(&logits.detach(), labels, 0.0)?)
                } else {
                    None
                }
            }
        };
        let correct = if classify { Some(super::metrics::correct(&logits, labels)?) } else { None };
        let grads = gradients(&loss, params)?;
        let loss = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        Ok(GradOutput {
            loss,
            correct,
            n,
            grads: TensorSet::from_pairs(params.iter().map(|(k, _)| k.clone()).zip(grads)),
            losses,
        })
    })();
    if let Some(saved) = saved_bn {
        model.params().restore_buffers(&saved)?;
    }
    result
}

/// [`grad_of`] over the model's trainable parameters; fails when none is trainable.
pub fn grad(
    model: &Model,
    images: &Tensor,
    labels: &Tensor,
    loss_fn: &LossFn,
    opts: GradOptions,
) -> Result<GradOutput> {
    let params = model.params().trainable();
    if params.is_empty() {
        anyhow::bail!("the model has no trainable parameters (all frozen?)");
    }
    grad_of(model, &params, images, labels, loss_fn, opts)
}

/// Makes several first passes update BatchNorm's running statistics once together: every pass
/// starts from the statistics as they were ([`OneBnUpdate::begin_pass`]), and they end as the
/// mean of the passes' results ([`OneBnUpdate::finish`]), `(1 − k)·r + k·mean(batch
/// statistics)` for momentum `k`: PyTorch's one update per optimizer step (K chained updates
/// would turn momentum 0.1 into 1 − 0.9^K).
pub struct OneBnUpdate {
    start: Vec<(Var, Tensor)>,
    sums: Vec<Option<Tensor>>,
    passes: usize,
}

impl OneBnUpdate {
    /// Remembers the statistics now (nothing to do for one pass or a model without buffers).
    pub fn new(model: &Model, passes: usize) -> Result<Self> {
        let start = if passes > 1 { model.params().save_buffers()? } else { Vec::new() };
        let sums = vec![None; start.len()];
        Ok(Self { start, sums, passes: 0 })
    }

    /// Before a pass: back to the remembered statistics.
    pub fn begin_pass(&self, model: &Model) -> Result<()> {
        model.params().restore_buffers(&self.start)
    }

    /// After a pass: adds the statistics it left.
    pub fn end_pass(&mut self) -> Result<()> {
        for ((v, _), sum) in self.start.iter().zip(self.sums.iter_mut()) {
            let now = v.as_tensor().to_dtype(candle_core::DType::F64)?;
            *sum = Some(match sum.take() {
                None => now,
                Some(s) => (s + now)?,
            });
        }
        self.passes += 1;
        Ok(())
    }

    /// Sets the statistics to the mean of the passes'.
    pub fn finish(self) -> Result<()> {
        for ((v, _), sum) in self.start.iter().zip(self.sums) {
            if let Some(s) = sum {
                v.set(&(s / self.passes.max(1) as f64)?.to_dtype(v.dtype())?)?;
            }
        }
        Ok(())
    }
}

/// [`grad_of`] over micro-batches taken as one batch: the losses and gradients of the
/// micro-batches weighted by their sizes (`n_i / N`), so for a mean loss and a model without
/// BatchNorm the result is the gradient of the whole batch (each micro-batch normalises with its
/// own batch statistics; together they update BatchNorm's running statistics once, see
/// [`OneBnUpdate`]).
pub fn grad_micro(
    model: &Model,
    params: &[(String, Var)],
    micro: &[(Tensor, Tensor)],
    loss_fn: &LossFn,
    opts: GradOptions,
) -> Result<GradOutput> {
    match micro {
        [] => anyhow::bail!("no micro-batch"),
        [(x, y)] => grad_of(model, params, x, y, loss_fn, opts),
        _ => {
            let total: usize = micro.iter().map(|(x, _)| x.dim(0)).sum::<candle_core::Result<usize>>()?;
            if total == 0 {
                anyhow::bail!("the micro-batches hold no example");
            }
            let mut bn = OneBnUpdate::new(model, if opts.update_bn { micro.len() } else { 1 })?;
            let mut outs = Vec::with_capacity(micro.len());
            model.begin_gradient()?;
            for (i, (x, y)) in micro.iter().enumerate() {
                bn.begin_pass(model)?;
                outs.push(grad_pass(model, params, x, y, loss_fn, opts).with_context(|| format!("micro-batch {i}"))?);
                bn.end_pass()?;
            }
            bn.finish()?;
            let mut acc: Option<GradOutput> = None;
            let mut losses = Vec::new();
            for out in outs {
                let w = out.n as f64 / total as f64;
                if let Some(l) = &out.losses {
                    losses.push(l.clone());
                }
                acc = Some(match acc {
                    None => GradOutput {
                        loss: w * out.loss,
                        correct: out.correct,
                        n: out.n,
                        grads: out.grads.scale(w)?,
                        losses: None,
                    },
                    Some(a) => GradOutput {
                        loss: a.loss + w * out.loss,
                        correct: a.correct.zip(out.correct).map(|(a, b)| a + b),
                        n: a.n + out.n,
                        grads: a.grads.axpy(w, &out.grads)?,
                        losses: None,
                    },
                });
            }
            let mut out = acc.context("no micro-batch")?;
            if losses.len() == micro.len() {
                out.losses = Some(Tensor::cat(&losses, 0)?);
            }
            Ok(out)
        }
    }
}

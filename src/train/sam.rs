//! Sharpness-Aware Minimization (Foret et al., ICLR 2021) and its family, on candle autograd.
//!
//! One SAM step at weights `w` on a batch:
//! 1. `g = ∇L(w)` (training mode: BatchNorm uses and updates batch statistics);
//! 2. the ascent step `e = ρ·a / (‖a‖₂ + ε)` with the ascent direction `a = g` (the norm over
//!    every perturbed parameter together); adaptive SAM (Kwon et al., 2021) uses
//!    `e = ρ·T²a / (‖Ta‖₂ + ε)` with `T = |w| + η`; the variants choose `a` and `e` otherwise
//!    (see [`Variant`]);
//! 3. `g_SAM = ∇L(w + e)`, with BatchNorm running statistics restored afterwards, so they come
//!    from the first pass only (as the paper's code does);
//! 4. the weights are restored to `w` (bit-exactly, [`Model::restore`]) and the base optimizer
//!    steps with `g_SAM`, or with the variant's combination of `g` and `g_SAM` (GSAM).
//!
//! With m-sharpness the batch is split into chunks of `m` examples; each chunk gets its own
//! perturbation and the chunk gradients are averaged. The variants' state between steps
//! ([`SamState`]) lives with the base optimizer.

use super::data_parallel::LocalStats;
use super::grads::{grad_micro, GradOptions, GradOutput};
use super::loss::{cross_entropy_per_example, LossFn};
use super::optim::Optimizer;
use super::sam_config::{AsamScope, PerturbScope, SamConfig, StepMode, Variant};
use super::sam_state::SamState;
use super::tensor_set::TensorSet;
use crate::models::Model;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};

/// What one training step measured.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepStats {
    /// Loss at `w` (first pass).
    pub loss: f64,
    /// Loss at `w + e` (second pass); equals `loss` for a plain step.
    pub sharp_loss: f64,
    /// Global L2 norm of the first gradient (mean over chunks with m-sharpness).
    pub grad_norm: f64,
    /// Batch accuracy of the first pass (NaN when the logits are not `[N, K]`).
    pub accuracy: f64,
}

/// The splits of a batch of `n` examples into chunks of `m`.
fn chunk_ranges(n: usize, m: Option<usize>) -> Result<Vec<(usize, usize)>> {
    match m {
        None => Ok(vec![(0, n)]),
        Some(m) if m >= n => Ok(vec![(0, n)]),
        // Chunks of m; a batch that m does not divide ends with a smaller chunk, and the chunks'
        // gradients are weighted by their sizes.
        Some(m) => Ok((0..n.div_ceil(m)).map(|i| (i * m, m.min(n - i * m))).collect()),
    }
}

/// The variant state of a step: the optimizer's, or a fresh one for an optimizer without.
fn take_state(opt: &mut dyn Optimizer, cfg: &SamConfig) -> Result<SamState> {
    let stateful = matches!(cfg.variant, Variant::Looksam | Variant::Friendly) || cfg.every.is_some();
    match opt.sam_state() {
        Some(s) => Ok(s.clone()),
        None if stateful => bail!(
            "variant \"{}\"{} keeps state between steps, which the optimizer `{}` cannot hold",
            cfg.variant.name(),
            if cfg.every.is_some() { " with every" } else { "" },
            opt.name()
        ),
        None => Ok(SamState::default()),
    }
}

/// The parameters the ascent step perturbs.
fn in_scope(model: &Model, scope: &Option<PerturbScope>, name: &str) -> bool {
    match scope {
        None => true,
        Some(PerturbScope::Named(n)) if n == "all" => true,
        Some(PerturbScope::Named(_)) => model.params().is_norm_parameter(name),
        Some(PerturbScope::Prefixes(p)) => p.iter().any(|p| name.starts_with(p.as_str())),
    }
}

/// ASAM's `T` per tensor: `|w| + η`, or `None` (T = 1) for a tensor outside `asam_scope`.
fn asam_t(model: &Model, name: &str, cfg: &SamConfig) -> Result<Option<Tensor>> {
    if cfg.asam_scope == AsamScope::Weights && !name.contains("weight") {
        return Ok(None);
    }
    let w = model.params().get(name).with_context(|| format!("no parameter `{name}`"))?;
    Ok(Some(w.as_tensor().abs()?.affine(1.0, cfg.asam_eta())?))
}

/// The perturbation of one chunk as a direction and a scale (`e = scale·dir`), and F-SAM's
/// updated average.
fn perturbation(
    model: &Model,
    g: &TensorSet,
    g_norm: f64,
    rho: f64,
    cfg: &SamConfig,
    state: &SamState,
) -> Result<(TensorSet, f64, Option<TensorSet>)> {
    let mut m_next = None;
    let full = match cfg.variant {
        Variant::Friendly => match state.buffers.get("friendly_m") {
            Some(m) if m.names() == g.names() => {
                m_next = Some(m.scale(cfg.lambda)?.axpy(1.0 - cfg.lambda, g)?);
                g.axpy(-cfg.sigma, m)?
            }
            _ => {
                m_next = Some(g.clone());
                g.clone()
            }
        },
        Variant::Fisher => {
            let eta = cfg.fisher_eta() as f32;
            g.map(|_, t| {
                Ok(if crate::ops::elementwise::applies(&[t]) {
                    crate::ops::elementwise::map1(t, |v| v / (1.0 + eta * (v * v)))?
                } else {
                    (t / (t.sqr()?.affine(eta as f64, 1.0))?)?
                })
            })?
        }
        _ => g.clone(),
    };
    let scoped = cfg.perturb.is_some();
    let a = if scoped { full.filter(|n| in_scope(model, &cfg.perturb, n)) } else { full };
    if a.is_empty() {
        bail!("perturb: no trainable parameter is in the scope {:?}", cfg.perturb);
    }
    let beta = if cfg.variant == Variant::Esam { cfg.beta } else { 1.0 };
    if cfg.variant == Variant::Fisher {
        // e = ρ·f⁻¹g / √(g·f⁻¹g)
        let gs = if scoped { g.filter(|n| a.get(n).is_some()) } else { g.clone() };
        let denom = gs.dot(&a)?.max(0.0).sqrt();
        return Ok((a, rho / (denom + cfg.eps), m_next));
    }
    if cfg.adaptive {
        let mut ta = TensorSet::new();
        let mut tta = TensorSet::new();
        for (name, t) in a.iter() {
            match asam_t(model, name, cfg)? {
                Some(tw) => {
                    let x = (t * &tw)?;
                    tta.set(name, (&x * &tw)?)?;
                    ta.set(name, x)?;
                }
                None => {
                    ta.set(name, t.clone())?;
                    tta.set(name, t.clone())?;
                }
            }
        }
        let norm = ta.norm()?;
        return Ok((tta, rho / (beta * (norm + cfg.eps)), m_next));
    }
    // The direction is g itself unless scoped or F-SAM's: its norm is known then.
    let norm = if scoped || cfg.variant == Variant::Friendly { a.norm()? } else { g_norm };
    Ok((a, rho / (beta * (norm + cfg.eps)), m_next))
}

/// ESAM's sharpness-sensitive data selection: the indices of the `round(γ·n)` examples (at
/// least one) whose loss rose most from `w` to `w + e`; all of them when γ = 1.
fn sharpest(model: &Model, x: &Tensor, y: &Tensor, before: &Tensor, cfg: &SamConfig) -> Result<Option<Tensor>> {
    let n = y.dim(0)?;
    let keep = ((cfg.gamma * n as f64).round() as usize).clamp(1, n);
    if keep == n {
        return Ok(None);
    }
    let logits = model.forward_t(x, true)?.detach();
    let after = cross_entropy_per_example(&logits, y, 0.0)?;
    let rise: Vec<f32> = (after - before)?.to_dtype(DType::F32)?.to_vec1()?;
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.sort_by(|&a, &b| rise[b as usize].total_cmp(&rise[a as usize]).then(a.cmp(&b)));
    order.truncate(keep);
    order.sort_unstable();
    Ok(Some(Tensor::from_vec(order, keep, x.device())?))
}

/// ESAM's stochastic weight perturbation: each trainable tensor takes part in the second pass
/// with probability β (drawn from a generator seeded by the step number, so a resumed run
/// draws the same); at least one always does.
fn esam_params(params: &[(String, Var)], beta: f64, step: u64) -> Vec<(String, Var)> {
    if beta >= 1.0 {
        return params.to_vec();
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5a11_e5a3 ^ step);
    let picked: Vec<(String, Var)> = params.iter().filter(|_| rng.random::<f64>() < beta).cloned().collect();
    if picked.is_empty() {
        let i = rng.random_range(0..params.len());
        return vec![params[i].clone()];
    }
    picked
}

/// `d = g_p − α·(g − (g·u)u)` with `u = g_p/‖g_p‖` (GSAM's surrogate-gap descent).
fn gsam_direction(g: &TensorSet, gp: &TensorSet, alpha: f64, eps: f64) -> Result<TensorSet> {
    let coef = g.dot(gp)? / (gp.sum_squares()? + eps);
    gp.scale(1.0 + alpha * coef)?.axpy(-alpha, g)
}

/// LookSAM's `g_v = g_s − (g_s·ĝ)ĝ`, `ĝ = g/‖g‖`: the part of the SAM gradient orthogonal to `g`.
fn looksam_gv(g: &TensorSet, gs: &TensorSet, eps: f64) -> Result<TensorSet> {
    let coef = gs.dot(g)? / (g.sum_squares()? + eps);
    gs.axpy(-coef, g)
}

/// A step that takes one pass: the plain step of `every`, or LookSAM's step with `g_v`.
#[allow(clippy::too_many_arguments)]
fn one_pass(
    model: &Model,
    opt: &mut dyn Optimizer,
    params: &[(String, Var)],
    micro: &[(Tensor, Tensor)],
    loss_fn: &LossFn,
    cfg: &SamConfig,
    gv: Option<(&TensorSet, f64)>,
) -> Result<StepStats> {
    let train = cfg.mode.train(model);
    let first = grad_micro(model, params, micro, loss_fn, GradOptions { update_bn: true, per_example: false, train })?;
    let g_norm = first.grads.norm()?;
    let d = match gv {
        // d = g + α·‖g‖/‖g_v‖·g_v
        Some((gv, gv_norm)) => {
            let scale = cfg.alpha_or_default() * g_norm / (gv_norm + cfg.eps);
            first.grads.axpy(scale, gv)?
        }
        None => first.grads.clone(),
    };
    // A plain step over several ranks reports the norm of the gradient they average (the
    // full batch's); LookSAM's step between SAM steps the mean of the ranks' ‖g‖, as SAM does.
    let norm = if gv.is_none() && crate::dist::is_parallel() { None } else { Some(g_norm) };
    finish(model, opt, d, cfg, &[first], norm, None)
}

/// Averages `d` and the statistics of the first passes over the ranks (alone: as they are),
/// clips, steps the base optimizer with `d`, and averages BatchNorm's running statistics over
/// the ranks. `norm_mean` is the first gradient's norm to report (`None`: the norm of the
/// averaged `d`).
fn finish(
    model: &Model,
    opt: &mut dyn Optimizer,
    d: TensorSet,
    cfg: &SamConfig,
    firsts: &[GradOutput],
    norm_mean: Option<f64>,
    sharp_mean: Option<f64>,
) -> Result<StepStats> {
    // Chunks weighted by their sizes (equal chunks: the plain mean).
    let n: usize = firsts.iter().map(|f| f.n).sum();
    let weight = |f: &GradOutput| if n > 0 { f.n as f64 / n as f64 } else { 1.0 / firsts.len().max(1) as f64 };
    let loss = firsts.iter().map(|f| weight(f) * f.loss).sum::<f64>();
    let correct: Option<usize> = firsts.iter().map(|f| f.correct).sum();
    let local = LocalStats { n, loss, sharp_loss: sharp_mean, grad_norm: norm_mean.unwrap_or(0.0), correct };
    let (mut d, mut all) = super::data_parallel::average_step(d, local)?;
    if norm_mean.is_none() {
        all.grad_norm = d.norm()?;
    }
    if let Some(c) = cfg.grad_clip {
        let norm = d.norm()?;
        if norm > c {
            d = d.scale(c / (norm + 1e-6))?;
        }
    }
    opt.step_set(model, &d)?;
    super::data_parallel::average_buffers(model)?;
    Ok(StepStats {
        loss: all.loss,
        sharp_loss: all.sharp_loss.unwrap_or(all.loss),
        grad_norm: all.grad_norm,
        accuracy: match all.correct {
            Some(c) if all.n > 0 => c as f64 / all.n as f64,
            _ => f64::NAN,
        },
    })
}

/// One step of the SAM family (see the module documentation and [`Variant`]): updates
/// `model`'s trainable parameters with `opt` and returns the statistics. Stateful variants
/// (LookSAM, F-SAM, `every`) keep their state with `opt` ([`Optimizer::sam_state`]).
pub fn sam_step(
    model: &Model,
    opt: &mut dyn Optimizer,
    images: &Tensor,
    labels: &Tensor,
    loss_fn: &LossFn,
    cfg: &SamConfig,
) -> Result<StepStats> {
    sam_step_accumulated(model, opt, &[(images.clone(), labels.clone())], loss_fn, cfg)
}

/// Checks a step's micro-batches: images and labels agree, and there is at least one example.
fn check_micro(micro: &[(Tensor, Tensor)]) -> Result<()> {
    if micro.is_empty() {
        bail!("no batch given");
    }
    for (i, (x, y)) in micro.iter().enumerate() {
        let n = x.dim(0)?;
        if y.dim(0)? != n {
            let which = if micro.len() > 1 { format!("micro-batch {i}") } else { "batch".into() };
            bail!("{which}: {} images but {} labels", n, y.dim(0)?);
        }
    }
    Ok(())
}

/// [`sam_step`] with gradient accumulation over `micro` (micro-batches of one step): the first
/// gradient is accumulated over them (weighted by size), the weights are perturbed once, the
/// second gradient is accumulated at `w + e`, and the base optimizer steps once. For a model
/// without BatchNorm this equals the step on the whole batch; with BatchNorm each micro-batch is
/// normalised with its own statistics and updates the running statistics in the first pass.
/// m-sharpness and ESAM take one batch.
pub fn sam_step_accumulated(
    model: &Model,
    opt: &mut dyn Optimizer,
    micro: &[(Tensor, Tensor)],
    loss_fn: &LossFn,
    cfg: &SamConfig,
) -> Result<StepStats> {
    cfg.validate()?;
    let params = model.params().trainable();
    if params.is_empty() {
        bail!("the model has no trainable parameters (all frozen?)");
    }
    if model.is_perturbed() {
        bail!("the model is perturbed (perturb without restore): restore it before a step");
    }
    check_micro(micro)?;
    if micro.len() > 1 && (cfg.m_sharpness.is_some() || cfg.variant == Variant::Esam) {
        bail!("micro-batches (gradient accumulation) do not combine with m_sharpness or variant \"esam\"");
    }
    let mut state = take_state(opt, cfg)?;
    let t = state.steps;
    let lr = opt.learning_rate();
    let lr_max = state.lr_max.map_or(lr, |m| m.max(lr));
    state.lr_max = cfg.rho_max.map(|_| lr_max);
    let stats = if cfg.every.is_some_and(|k| t % k as u64 != 0) {
        one_pass(model, opt, &params, micro, loss_fn, cfg, None)?
    } else if cfg.variant == Variant::Looksam
        && t % cfg.k as u64 != 0
        && state.buffers.get("looksam_gv").is_some_and(|gv| gv.names() == params_names(&params))
    {
        let gv = state.buffers.get("looksam_gv").cloned().context("LookSAM's g_v")?;
        let gv_norm = match state.scalars.get("looksam_gv_norm") {
            Some(&n) => n,
            None => gv.norm()?,
        };
        one_pass(model, opt, &params, micro, loss_fn, cfg, Some((&gv, gv_norm)))?
    } else {
        sam_family_step(model, opt, &params, micro, loss_fn, cfg, &mut state, cfg.rho_at(lr, lr_max))?
    };
    state.steps = t + 1;
    if let Some(s) = opt.sam_state() {
        *s = state;
    }
    Ok(stats)
}

fn params_names(params: &[(String, Var)]) -> Vec<String> {
    params.iter().map(|(n, _)| n.clone()).collect()
}

/// The two-pass step of every variant, over the chunks of m-sharpness.
#[allow(clippy::too_many_arguments)]
fn sam_family_step(
    model: &Model,
    opt: &mut dyn Optimizer,
    params: &[(String, Var)],
    micro: &[(Tensor, Tensor)],
    loss_fn: &LossFn,
    cfg: &SamConfig,
    state: &mut SamState,
    rho: f64,
) -> Result<StepStats> {
    // The chunks of m-sharpness, each perturbed on its own; or all the micro-batches as one.
    let chunks: Vec<Vec<(Tensor, Tensor)>> = match micro {
        [(images, labels)] => {
            let ranges = chunk_ranges(images.dim(0)?, cfg.m_sharpness)?;
            if ranges.len() == 1 {
                vec![micro.to_vec()]
            } else {
                ranges
                    .iter()
                    .map(|&(start, len)| Ok(vec![(images.narrow(0, start, len)?, labels.narrow(0, start, len)?)]))
                    .collect::<Result<_>>()?
            }
        }
        _ => vec![micro.to_vec()],
    };
    let sizes: Vec<usize> =
        chunks.iter().map(|c| c.iter().map(|(x, _)| x.dim(0)).sum()).collect::<candle_core::Result<_>>()?;
    let total_n = sizes.iter().sum::<usize>().max(1) as f64;
    let esam = cfg.variant == Variant::Esam;
    // A linear probe's frozen trunk gives the same features at w and at w + e: computed once.
    let _trunk = model.reuse_trunk(params);
    let (mut norm_sum, mut sharp_sum) = (0.0, 0.0);
    let mut firsts = Vec::with_capacity(chunks.len());
    let mut total: Option<TensorSet> = None;
    // m-sharpness: the chunks' first passes together make one update of BatchNorm's running
    // statistics, the mean of each chunk's update from the same start (as one optimizer step
    // should: PyTorch's momentum 0.1 would otherwise become 1 − 0.9^K); second passes never do.
    let mut bn = super::grads::OneBnUpdate::new(model, chunks.len())?;
    let train = cfg.mode.train(model);
    for (chunk, &size) in chunks.iter().zip(&sizes) {
        // The chunk's weight in the step: its share of the batch's examples.
        let w = if chunks.len() > 1 { size as f64 / total_n } else { 1.0 };
        bn.begin_pass(model)?;
        let mut first =
            grad_micro(model, params, chunk, loss_fn, GradOptions { update_bn: true, per_example: esam, train })?;
        bn.end_pass()?;
        let g_norm = first.grads.norm()?;
        norm_sum += w * g_norm;
        let (dir, scale, m_next) = perturbation(model, &first.grads, g_norm, rho, cfg, state)?;
        let keep_g = matches!(cfg.variant, Variant::Gsam | Variant::Looksam);
        let g = if keep_g { Some(std::mem::take(&mut first.grads)) } else { None };
        first.grads = TensorSet::new();
        model.perturb(&dir, scale)?;
        drop(dir);
        let saved_bn = model.params().save_buffers()?;
        let second = (|| -> Result<(GradOutput, Vec<(String, Var)>)> {
            let mut sub = chunk.clone();
            if esam {
                let before = first.losses.as_ref().context("ESAM needs the per-example losses of the first pass")?;
                let (x, y) = &chunk[0];
                if let Some(idx) = sharpest(model, x, y, before, cfg)? {
                    sub = vec![(x.index_select(&idx, 0)?, y.index_select(&idx, 0)?)];
                }
            }
            let p2 = if esam { esam_params(params, cfg.beta, state.steps) } else { params.to_vec() };
            let opts = GradOptions { update_bn: true, per_example: false, train };
            Ok((grad_micro(model, &p2, &sub, loss_fn, opts)?, p2))
        })();
        // Restore weights and running statistics whatever the second pass did.
        let restored = model.restore();
        model.params().restore_buffers(&saved_bn)?;
        restored?;
        let (second, _) = second.context("second (perturbed) pass")?;
        sharp_sum += w * second.loss;
        let d = match (cfg.variant, &g) {
            (Variant::Gsam, Some(g)) => gsam_direction(g, &second.grads, cfg.alpha_or_default(), cfg.eps)?,
            (Variant::Looksam, Some(g)) => {
                let gv = looksam_gv(g, &second.grads, cfg.eps)?;
                state.scalars.insert("looksam_gv_norm".into(), gv.norm()?);
                state.buffers.insert("looksam_gv".into(), gv);
                second.grads
            }
            _ => second.grads,
        };
        if let Some(m) = m_next {
            state.buffers.insert("friendly_m".into(), m);
        }
        total = Some(match total {
            None if chunks.len() > 1 => d.scale(w)?,
            None => d,
            Some(acc) => acc.axpy(w, &d)?,
        });
        firsts.push(first);
    }
    bn.finish()?;
    // With several ranks, every rank keeps the same variant state (rank 0 checkpoints it).
    super::data_parallel::average_state(state)?;
    let d = total.context("empty batch")?;
    finish(model, opt, d, cfg, &firsts, Some(norm_sum), Some(sharp_sum))
}

/// One plain step (the baseline): gradient at `w`, optional clipping, base optimizer step.
pub fn train_step(
    model: &Model,
    opt: &mut dyn Optimizer,
    images: &Tensor,
    labels: &Tensor,
    loss_fn: &LossFn,
    grad_clip: Option<f64>,
) -> Result<StepStats> {
    train_step_accumulated(model, opt, &[(images.clone(), labels.clone())], loss_fn, grad_clip)
}

/// [`train_step`] with the gradient accumulated over micro-batches (weighted by size).
pub fn train_step_accumulated(
    model: &Model,
    opt: &mut dyn Optimizer,
    micro: &[(Tensor, Tensor)],
    loss_fn: &LossFn,
    grad_clip: Option<f64>,
) -> Result<StepStats> {
    train_step_in(model, opt, micro, loss_fn, grad_clip, StepMode::Train)
}

/// [`train_step_accumulated`] with the passes in `mode` ([`StepMode::Model`]: the model's own).
pub fn train_step_in(
    model: &Model,
    opt: &mut dyn Optimizer,
    micro: &[(Tensor, Tensor)],
    loss_fn: &LossFn,
    grad_clip: Option<f64>,
    mode: StepMode,
) -> Result<StepStats> {
    let params = model.params().trainable();
    if params.is_empty() {
        bail!("the model has no trainable parameters (all frozen?)");
    }
    if let Some(c) = grad_clip {
        if !crate::train::is_positive(c) {
            bail!("grad_clip must be > 0, got {c}");
        }
    }
    if model.is_perturbed() {
        bail!("the model is perturbed (perturb without restore): restore it before a step");
    }
    check_micro(micro)?;
    let cfg = SamConfig { grad_clip, mode, ..SamConfig::default() };
    one_pass(model, opt, &params, micro, loss_fn, &cfg, None)
}

//! `sam_step`, `train_step` and `evaluate` for scripts.

use super::convert::{err, op, options, Res};
use super::optim::Optim;
use crate::data::{Batch, Dataset};
use crate::models::Model;
use crate::session::Session;
use crate::train::evaluate::{evaluate, EvalStats};
use crate::train::{sam_step_accumulated, LossFn, SamConfig, StepStats};
use candle_core::Tensor;
use rhai::{Array, Dynamic, Engine, FnPtr, Map, NativeCallContext};
use serde::Deserialize;
use std::rc::Rc;

/// Options of `train_step` besides the loss.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PlainOptions {
    label_smoothing: f64,
    grad_clip: Option<f64>,
    mode: crate::train::StepMode,
}

/// Options of `grad` besides the loss.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct GradOpts {
    label_smoothing: f64,
    update_bn: bool,
}

impl Default for GradOpts {
    fn default() -> Self {
        Self { label_smoothing: 0.0, update_bn: true }
    }
}

/// The result of `grad` as a script map.
fn grad_map(g: crate::train::GradOutput) -> Map {
    let mut m = Map::new();
    m.insert("loss".into(), Dynamic::from_float(g.loss));
    m.insert("accuracy".into(), Dynamic::from_float(g.accuracy()));
    m.insert("grads".into(), Dynamic::from(g.grads));
    if let Some(l) = g.losses {
        m.insert("losses".into(), Dynamic::from(l));
    }
    m
}

/// One forward-backward pass for `grad`.
fn do_grad(ctx: &NativeCallContext, m: &Model, batch: &Batch, mut o: Map) -> Res<Map> {
    let closure = take_loss(&mut o)?;
    let g: GradOpts = options("grad", &o)?;
    let opts = crate::train::GradOptions { update_bn: g.update_bn, per_example: true, train: true };
    let out = op(
        "grad",
        with_loss(ctx, closure, g.label_smoothing, |loss| {
            crate::train::grad(m, &batch.images, &batch.labels, loss, opts)
        }),
    )?;
    Ok(grad_map(out))
}

/// Options of `evaluate`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct EvalOptions {
    batch: usize,
    augment: bool,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self { batch: 256, augment: false }
    }
}

/// Takes `loss` out of an option map: a string ("cross_entropy") or a closure.
pub(super) fn take_loss(map: &mut Map) -> Res<Option<FnPtr>> {
    match map.remove("loss") {
        None => Ok(None),
        Some(v) if v.is_fnptr() => Ok(v.try_cast::<FnPtr>()),
        Some(v) if v.is_string() => match v.to_string().as_str() {
            "cross_entropy" => Ok(None),
            other => Err(err(format!(
                "loss: unknown loss `{other}` (use \"cross_entropy\" or a closure |logits, labels| ...)"
            ))),
        },
        Some(v) => Err(err(format!("loss: expected \"cross_entropy\" or a closure, got {}", v.type_name()))),
    }
}

/// Calls `f` with the loss described by the options (`loss` removed from them already).
pub(super) fn with_loss<T>(
    ctx: &NativeCallContext,
    closure: Option<FnPtr>,
    label_smoothing: f64,
    f: impl FnOnce(&LossFn) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    match closure {
        None => f(&LossFn::CrossEntropy { label_smoothing }),
        Some(fp) => {
            let call = |logits: &Tensor, labels: &Tensor| -> anyhow::Result<Tensor> {
                let out: Dynamic = fp
                    .call_within_context(ctx, (logits.clone(), labels.clone()))
                    .map_err(|e| anyhow::anyhow!("in the loss closure: {e}"))?;
                let type_name = out.type_name();
                out.try_cast::<Tensor>()
                    .ok_or_else(|| anyhow::anyhow!("the loss closure must return a Tensor, it returned {type_name}"))
            };
            f(&LossFn::Custom(&call))
        }
    }
}

/// A step's statistics as a script map.
pub fn stats_map(s: &StepStats) -> Map {
    let mut m = Map::new();
    m.insert("loss".into(), Dynamic::from_float(s.loss));
    m.insert("sharp_loss".into(), Dynamic::from_float(s.sharp_loss));
    m.insert("grad_norm".into(), Dynamic::from_float(s.grad_norm));
    m.insert("accuracy".into(), Dynamic::from_float(s.accuracy));
    m
}

/// Evaluation results as a script map (noisy-label fields only when present).
pub fn eval_map(s: &EvalStats) -> Map {
    let mut m = Map::new();
    m.insert("loss".into(), Dynamic::from_float(s.loss));
    m.insert("accuracy".into(), Dynamic::from_float(s.accuracy));
    for (k, v) in [
        ("accuracy_clean", s.accuracy_clean),
        ("clean_part_accuracy", s.clean_part_accuracy),
        ("noisy_part_fit", s.noisy_part_fit),
        ("noisy_part_recovered", s.noisy_part_recovered),
    ] {
        if let Some(v) = v {
            m.insert(k.into(), Dynamic::from_float(v));
        }
    }
    m
}

/// After Ctrl-C, stops the script at the start of a step (nothing of the step is done).
fn stop_if_interrupted(s: &Session) -> Res<()> {
    crate::run::begin_step(s)
        .map_err(|_| Box::new(rhai::EvalAltResult::ErrorTerminated(Dynamic::from("interrupted"), rhai::Position::NONE)))
}

/// Counts the step and fails when its loss is not finite ([`crate::run::end_step`]); returns the
/// statistics as a map.
fn finish_step(s: &Session, what: &str, stats: &StepStats) -> Res<Map> {
    crate::run::end_step(s, what, stats).map_err(|e| err(format!("{e:#}")))?;
    Ok(stats_map(stats))
}

/// The micro-batches of an array (each element a Batch).
fn batches_of(what: &str, a: Array) -> Res<Vec<Batch>> {
    if a.is_empty() {
        return Err(err(format!("{what}: the array of batches is empty")));
    }
    a.into_iter()
        .enumerate()
        .map(|(i, v)| {
            let t = v.type_name();
            v.try_cast::<Batch>().ok_or_else(|| err(format!("{what}: element {i} of the array is a {t}, not a Batch")))
        })
        .collect()
}

/// The optimizer, borrowed for a step; an error instead of a panic when a loss closure reaches
/// it during the step.
fn borrow_opt<'a>(what: &str, opt: &'a Optim) -> Res<std::cell::RefMut<'a, Box<dyn crate::train::Optimizer>>> {
    opt.0
        .try_borrow_mut()
        .map_err(|_| err(format!("{what}: the optimizer is in use (reached from inside a loss closure?)")))
}

/// A SAM-family step over one batch or micro-batches.
fn do_sam(ctx: &NativeCallContext, s: &Session, m: &Model, opt: &Optim, b: Vec<Batch>, options_map: Map) -> Res<Map> {
    stop_if_interrupted(s)?;
    let mut o = options_map;
    let closure = take_loss(&mut o)?;
    let label_smoothing = match o.remove("label_smoothing") {
        Some(v) => super::convert::number("label_smoothing", &v)?,
        None => 0.0,
    };
    let cfg: SamConfig = options("sam_step", &o)?;
    let micro: Vec<(Tensor, Tensor)> = b.into_iter().map(|b| (b.images, b.labels)).collect();
    let mut optim = borrow_opt("sam_step", opt)?;
    let stats = op(
        "sam_step",
        with_loss(ctx, closure, label_smoothing, |loss| sam_step_accumulated(m, optim.as_mut(), &micro, loss, &cfg)),
    )?;
    drop(optim);
    finish_step(s, "sam_step", &stats)
}

/// A plain step over one batch or micro-batches.
fn do_train(ctx: &NativeCallContext, s: &Session, m: &Model, opt: &Optim, b: Vec<Batch>, options_map: Map) -> Res<Map> {
    stop_if_interrupted(s)?;
    let mut o = options_map;
    let closure = take_loss(&mut o)?;
    let p: PlainOptions = options("train_step", &o)?;
    let micro: Vec<(Tensor, Tensor)> = b.into_iter().map(|b| (b.images, b.labels)).collect();
    let mut optim = borrow_opt("train_step", opt)?;
    let stats = op(
        "train_step",
        with_loss(ctx, closure, p.label_smoothing, |loss| {
            crate::train::train_step_in(m, optim.as_mut(), &micro, loss, p.grad_clip, p.mode)
        }),
    )?;
    drop(optim);
    finish_step(s, "train_step", &stats)
}

/// Registers the training API.
pub fn register(engine: &mut Engine, session: &Rc<Session>) {
    let sam_doc = "One Sharpness-Aware Minimization step, or a step of one of its variants; returns #{loss, sharp_loss, grad_norm, accuracy} (loss at w, loss at w+e, norm of the first gradient, batch accuracy).\nOptions: rho (0.05; 0 gives exactly the base optimizer's step); adaptive (false: ASAM, e = rho T²g/‖Tg‖ with T = |w| + eta; ASAM wants rho about 10x SAM's, e.g. 0.5 to 2); eta (ASAM 0.01, Fisher 1.0); asam_scope (\"all\": T on weights and biases alike; \"weights\": T only on tensors named *weight*, T = 1 elsewhere, the ASAM authors' convention); perturb (\"all\"; \"norm\": SAM-ON, only normalization layers' weights and biases are perturbed, all parameters updated; or an array of name prefixes); m_sharpness (chunks of M examples, one perturbation each, gradients averaged; a batch that M does not divide ends with a smaller chunk, and the chunks are weighted by their sizes); loss (\"cross_entropy\" or a closure |logits, labels| returning a scalar tensor, called for both passes); label_smoothing (0); grad_clip (global norm of the step's gradient); mode (\"train\" (default): both passes in training mode; \"model\": the model's own mode, so after m.eval() BatchNorm uses and keeps its running statistics and dropout is off: fine-tuning with frozen statistics).\nvariant: \"sam\" (default); \"gsam\" (Zhuang et al., ICLR 2022: d = g_p - alpha (g - (g.u)u), u = g_p/|g_p|; alpha 0.1; rho_max with rho_min make rho follow the learning rate, rho_min + (rho_max - rho_min)(lr - lr_min)/(lr_max - lr_min), lr_max default the largest lr seen, lr_min 0); \"looksam\" (Liu et al., CVPR 2022: steps 0, k, 2k, ... are SAM steps that keep g_v = g_s - (g_s.ĝ)ĝ, the others take one pass with d = g + alpha |g|/|g_v| g_v; k 5, alpha 0.7); \"fisher\" (Kim et al., ICML 2022: e = rho f⁻¹g/sqrt(g.f⁻¹g), f = 1 + eta g², eta 1.0); \"friendly\" (F-SAM, Li et al., CVPR 2024, as its authors' code: m starts at the first g, then the ascent direction is g - sigma m and m <- lambda m + (1 - lambda) g; sigma 1, lambda 0.9); \"esam\" (Du et al., ICLR 2022: every tensor perturbed by (rho/beta) g/|g|, each takes part in the second pass with probability beta and is not updated this step otherwise, as the authors' code; the second pass on the round(gamma N) examples whose loss rose most; beta 0.5, gamma 0.5). every: k (Composer's SAM interval: steps 0, k, 2k, ... are SAM steps, the others plain steps). Steps are counted per optimizer from 0; the count and the variants' buffers (LookSAM's g_v, F-SAM's m) live with the optimizer and are saved in its checkpoints.\nBatchNorm running statistics come from the first pass only; frozen parameters are neither perturbed nor updated. `batch` may be an array of batches: gradient accumulation (the first gradient accumulated over the micro-batches weighted by size, one perturbation, the second gradient accumulated, one optimizer step; equal to the step on the whole batch for models without BatchNorm, while with BatchNorm each micro-batch is normalised with its own statistics and updates the running statistics once).";
    let s = session.clone();
    api!(
        engine,
        "sam_step",
        "m: Model, opt: Optimizer, batch: Batch, options: Map -> Map",
        sam_doc,
        move |ctx: NativeCallContext, m: Model, opt: Optim, b: Batch, o: Map| do_sam(&ctx, &s, &m, &opt, vec![b], o)
    );
    let s = session.clone();
    api!(
        engine,
        "sam_step",
        "m: Model, opt: Optimizer, batch: Batch -> Map",
        "One SAM step with the default options (rho 0.05, cross-entropy).",
        move |ctx: NativeCallContext, m: Model, opt: Optim, b: Batch| do_sam(&ctx, &s, &m, &opt, vec![b], Map::new())
    );
    let s = session.clone();
    api!(engine, "sam_step", "m: Model, opt: Optimizer, batches: Array, options: Map -> Map",
        "`sam_step` with gradient accumulation over an array of micro-batches (see sam_step with one batch for the options).",
        move |ctx: NativeCallContext, m: Model, opt: Optim, b: Array, o: Map| {
            do_sam(&ctx, &s, &m, &opt, batches_of("sam_step", b)?, o)
        });
    let s = session.clone();
    api!(
        engine,
        "sam_step",
        "m: Model, opt: Optimizer, batches: Array -> Map",
        "`sam_step` with the default options and gradient accumulation over an array of micro-batches.",
        move |ctx: NativeCallContext, m: Model, opt: Optim, b: Array| {
            do_sam(&ctx, &s, &m, &opt, batches_of("sam_step", b)?, Map::new())
        }
    );
    let s = session.clone();
    api!(engine, "train_step", "m: Model, opt: Optimizer, batch: Batch, options: Map -> Map",
        "One plain step (the baseline SAM is compared against): the same statistics as sam_step, with sharp_loss = loss. Options: loss, label_smoothing, grad_clip, mode (\"train\": training mode whatever the model's; \"model\": the model's own, so after m.eval() BatchNorm keeps its running statistics and dropout is off).",
        move |ctx: NativeCallContext, m: Model, opt: Optim, b: Batch, o: Map| do_train(&ctx, &s, &m, &opt, vec![b], o));
    let s = session.clone();
    api!(
        engine,
        "train_step",
        "m: Model, opt: Optimizer, batch: Batch -> Map",
        "One plain step with cross-entropy.",
        move |ctx: NativeCallContext, m: Model, opt: Optim, b: Batch| do_train(&ctx, &s, &m, &opt, vec![b], Map::new())
    );
    let s = session.clone();
    api!(
        engine,
        "train_step",
        "m: Model, opt: Optimizer, batches: Array, options: Map -> Map",
        "`train_step` with the gradient accumulated over an array of micro-batches (weighted by size).",
        move |ctx: NativeCallContext, m: Model, opt: Optim, b: Array, o: Map| {
            do_train(&ctx, &s, &m, &opt, batches_of("train_step", b)?, o)
        }
    );
    api!(engine, "grad", "m: Model, batch: Batch -> Map",
        "One forward-backward pass in training mode: #{loss, accuracy, grads, losses}: `grads` a TensorSet over the trainable parameters, `losses` the per-example cross-entropy [N] (detached). Nothing is updated but BatchNorm's running statistics.",
        |ctx: NativeCallContext, m: Model, batch: Batch| do_grad(&ctx, &m, &batch, Map::new()));
    api!(engine, "grad", "m: Model, batch: Batch, options: Map -> Map",
        "`grad` with options: loss (\"cross_entropy\" or a closure |logits, labels|), label_smoothing (0), update_bn (true; false leaves BatchNorm's running statistics untouched, as SAM's second pass needs). With a closure loss, `losses` is still the per-example cross-entropy.",
        |ctx: NativeCallContext, m: Model, batch: Batch, o: Map| do_grad(&ctx, &m, &batch, o));
    let s = session.clone();
    api!(engine, "evaluate", "m: Model, ds: Dataset, options: Map -> Map",
        "Evaluates in eval mode over the whole dataset: #{loss, accuracy}; on a dataset with label noise also accuracy_clean (against the true labels), clean_part_accuracy, noisy_part_fit (corrupted examples predicted as their wrong label) and noisy_part_recovered (predicted as their true label). The dataset's deterministic transforms apply (normalize, resize); its random ones (crops, flips, cutout) do not, unless augment: true. Options: batch (256), augment (false).",
        move |m: Model, ds: Dataset, o: Map| -> Res<Map> {
            let eo: EvalOptions = options("evaluate", &o)?;
            Ok(eval_map(&op("evaluate", evaluate(&m, &ds, eo.batch, s.device(), eo.augment))?))
        });
    let s = session.clone();
    api!(
        engine,
        "evaluate",
        "m: Model, ds: Dataset -> Map",
        "Evaluates with batches of 256, without the dataset's random transforms.",
        move |m: Model, ds: Dataset| -> Res<Map> {
            Ok(eval_map(&op("evaluate", evaluate(&m, &ds, 256, s.device(), false))?))
        }
    );
    api!(
        engine,
        "accuracy",
        "logits: Tensor, labels: Tensor -> float",
        "Share of rows whose arg-max equals the label.",
        |l: Tensor, y: Tensor| -> Res<f64> {
            Ok(op("accuracy", crate::train::metrics::correct(&l, &y))? as f64
                / l.dims().first().copied().unwrap_or(1).max(1) as f64)
        }
    );
}

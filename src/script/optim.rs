//! Optimizer and schedule script types.

use super::convert::{err, op, options, Res};
use crate::models::Model;
use crate::train::param_groups::{GroupOptions, ParamGroups, GROUP_KEYS};
use crate::train::{AdamW, AdamWConfig, Optimizer, Schedule, ScheduleKind, Sgd, SgdConfig};
use rhai::{Engine, Map, FLOAT};
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

/// A script handle to an optimizer (shared: schedules and steps see the same state).
#[derive(Clone)]
pub struct Optim(pub Rc<RefCell<Box<dyn Optimizer>>>);

/// A script handle to a learning-rate schedule driving an optimizer.
#[derive(Clone)]
pub struct Sched {
    /// The schedule.
    pub schedule: Rc<RefCell<Schedule>>,
    /// The optimizer whose learning rate it sets.
    pub optim: Optim,
}

/// The optimizer behind a handle, for reading; an error instead of a panic while a step holds it
/// (a loss closure that reads `opt.lr`).
fn read(o: &Optim) -> Res<std::cell::Ref<'_, Box<dyn Optimizer>>> {
    o.0.try_borrow().map_err(|_| err("the optimizer is in use by the step running now (from inside a loss closure?)"))
}

/// The optimizer behind a handle, for writing (see [`read`]).
fn write(o: &Optim) -> Res<std::cell::RefMut<'_, Box<dyn Optimizer>>> {
    o.0.try_borrow_mut()
        .map_err(|_| err("the optimizer is in use by the step running now (from inside a loss closure?)"))
}

/// Splits an optimizer's option map into its own options and the per-tensor ones.
fn split_group_options(what: &str, mut o: Map) -> Res<(Map, GroupOptions)> {
    let mut g = Map::new();
    for k in GROUP_KEYS {
        if let Some(v) = o.remove(k) {
            g.insert(k.into(), v);
        }
    }
    Ok((o, options::<GroupOptions>(what, &g)?))
}

fn new_optim(o: impl Optimizer + 'static) -> Optim {
    Optim(Rc::new(RefCell::new(Box::new(o))))
}

/// Registers the optimizer and schedule API.
pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<Optim>("Optimizer");
    engine.register_type_with_name::<Sched>("Schedule");

    api!(engine, "sgd", "m: Model, options: Map -> Optimizer",
        "SGD with torch.optim.SGD semantics. Options: lr (0.1), momentum (0), dampening (0), nesterov (false), weight_decay (0, added to the gradient), and the per-tensor settings of fine-tuning recipes (see `adamw`): groups, no_decay_bias_norm, layer_decay, head_lr_scale.",
        |m: Model, o: Map| -> Res<Optim> {
            let (own, groups) = split_group_options("sgd", o)?;
            let cfg = options::<SgdConfig>("sgd", &own)?;
            let groups = op("sgd", ParamGroups::resolve(&m, cfg.lr, cfg.weight_decay, &groups))?;
            Ok(new_optim(op("sgd", Sgd::new(cfg))?.with_groups(groups)))
        });
    api!(engine, "adamw", "m: Model, options: Map -> Optimizer",
        "AdamW with torch.optim.AdamW semantics (decoupled decay; bias correction counted per tensor, so a tensor unfrozen later starts its own count). Options: lr (1e-3), betas ([0.9, 0.999]), eps (1e-8), weight_decay (0.01). Per-tensor settings, resolved against the model's parameter names: groups (a list of #{params: prefix or [prefixes], lr or lr_scale, weight_decay}; the first group whose prefix matches holds a tensor; a group's lr is kept as a multiplier of the optimizer's, so schedules scale every group), no_decay_bias_norm (false; true: no weight decay on biases, normalization weights and 1-D tensors), layer_decay (ViT layer-wise lr decay: encoder layer i of L gets layer_decay^(L-i), the embeddings layer_decay^(L+1), the final norm and the head 1), head_lr_scale (multiplies the head's lr). Multipliers combine. `opt.groups` shows the result.",
        |m: Model, o: Map| -> Res<Optim> {
            let (own, groups) = split_group_options("adamw", o)?;
            let cfg = options::<AdamWConfig>("adamw", &own)?;
            let groups = op("adamw", ParamGroups::resolve(&m, cfg.lr, cfg.weight_decay, &groups))?;
            Ok(new_optim(op("adamw", AdamW::new(cfg))?.with_groups(groups)))
        });
    getter!(
        engine,
        "groups",
        "Map",
        "Every parameter's resolved settings: name -> #{lr_scale, weight_decay, lr} (lr: the rate it steps with now).",
        |o: &mut Optim| -> Res<Map> {
            let opt = read(o)?;
            let mut out = Map::new();
            if let Some(g) = opt.groups() {
                let mut rows: Vec<_> = g.iter().collect();
                rows.sort_by(|a, b| a.0.cmp(b.0));
                for (name, h) in rows {
                    let mut m = Map::new();
                    m.insert("lr_scale".into(), h.lr_scale.into());
                    m.insert("weight_decay".into(), h.weight_decay.into());
                    m.insert("lr".into(), (opt.learning_rate() * h.lr_scale).into());
                    out.insert(name.as_str().into(), m.into());
                }
            }
            Ok(out)
        }
    );
    getter!(engine, "lr", "float", "The optimizer's current learning rate.", |o: &mut Optim| -> Res<FLOAT> {
        Ok(read(o)?.learning_rate())
    });
    rhai::FuncRegistration::new_setter("lr")
        .with_params_info(["self", "lr: float"])
        .with_comments(["/// Sets the optimizer's learning rate."])
        .register_into_engine(engine, |o: &mut Optim, lr: FLOAT| -> Res<()> {
            if !crate::train::is_nonneg(lr) {
                return Err(err(format!("lr must be >= 0, got {lr}")));
            }
            write(o)?.set_learning_rate(lr);
            Ok(())
        });
    api!(engine, "step", "opt: Optimizer, m: Model, g: TensorSet",
        "One base-optimizer step (momentum, Nesterov, weight decay, AdamW: as configured) of the model's trainable parameters with `g` as their gradient, matched by name; a trainable parameter missing from `g` is left alone this step; a name that is not a trainable parameter is an error. The model must not be perturbed.",
        |o: &mut Optim, m: Model, g: crate::train::TensorSet| -> Res<()> {
            if m.is_perturbed() {
                return Err(err("step: the model is perturbed: call m.restore() first"));
            }
            op("step", write(o)?.step_set(&m, &g))
        });
    api!(engine, "save", "opt: Optimizer, path: String",
        "Writes the optimizer state (momentum buffers or Adam moments, step count, lr) to a safetensors file, atomically (under several ranks, rank 0 writes).",
        |o: &mut Optim, path: &str| -> Res<()> {
            if !crate::dist::is_leader() {
                return Ok(());
            }
            let state = op("save", read(o)?.state())?;
            op("save", crate::models::params::save_safetensors(Path::new(path), &state))
        });
    api!(
        engine,
        "load",
        "opt: Optimizer, path: String",
        "Restores an optimizer state written by `save`.",
        |o: &mut Optim, path: &str| -> Res<()> {
            let state = op("load", crate::models::params::load_safetensors(Path::new(path)))?;
            op("load", write(o)?.load_state(&state.into_iter().collect()))
        }
    );

    api!(engine, "schedule", "opt: Optimizer, options: Map -> Schedule",
        "A learning-rate schedule over the optimizer's current lr. Options: kind = constant | step {step_size, gamma} | multi_step {milestones, gamma} | cosine {total, warmup, min_lr} | linear {total, warmup, end_lr}. Sets the lr for step 0 at once; `sched.step()` advances.",
        |o: Optim, opts: Map| -> Res<Sched> {
            let kind: ScheduleKind = options("schedule", &opts)?;
            let base = read(&o)?.learning_rate();
            let s = op("schedule", Schedule::new(kind, base))?;
            write(&o)?.set_learning_rate(s.current());
            Ok(Sched { schedule: Rc::new(RefCell::new(s)), optim: o })
        });
    api!(
        engine,
        "step",
        "sched: Schedule -> float",
        "Advances the schedule one step, sets the optimizer's lr, returns it.",
        |s: &mut Sched| -> Res<FLOAT> {
            let mut opt = write(&s.optim)?;
            let lr = s.schedule.try_borrow_mut().map_err(|_| err("the schedule is in use"))?.step();
            opt.set_learning_rate(lr);
            Ok(lr)
        }
    );
    getter!(engine, "lr", "float", "The schedule's current learning rate.", |s: &mut Sched| -> Res<FLOAT> {
        Ok(s.schedule.try_borrow().map_err(|_| err("the schedule is in use"))?.current())
    });
}

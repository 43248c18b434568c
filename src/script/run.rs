//! The run record from scripts: `resume`, `save_checkpoint`, `plot`, `run_dir`.

use super::convert::{err, from_json, op, options, to_json, Res};
use super::optim::{Optim, Sched};
use crate::models::Model;
use crate::run::checkpoint::TrainState;
use crate::run::plot::{file_stem, metric_figure, plot_all, render_png, XAxis};
use crate::run::record::DEFAULT_KEEP;
use crate::session::Session;
use rhai::{Array, Dynamic, Engine, Map, INT};
use serde::Deserialize;
use std::path::PathBuf;
use std::rc::Rc;

/// Options of `resume`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ResumeOptions {
    name: String,
}

/// Options of `plot`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct PlotOptions {
    metric: Option<String>,
    tags: Option<Vec<String>>,
    x: Option<String>,
    path: Option<String>,
}

fn train_state(m: &Model, opt: &Optim, sched: Option<&Sched>) -> Res<TrainState> {
    if let Some(s) = sched {
        if !Rc::ptr_eq(&s.optim.0, &opt.0) {
            return Err(err("the schedule drives another optimizer than the one given"));
        }
    }
    Ok(TrainState { model: m.clone(), optim: opt.0.clone(), sched: sched.map(|s| s.schedule.clone()) })
}

fn do_resume(s: &Session, m: &Model, opt: &Optim, sched: Option<&Sched>, o: &Map) -> Res<Map> {
    let ro: ResumeOptions = options("resume", o)?;
    let train = train_state(m, opt, sched)?;
    let point = op("resume", s.record().and_then(|mut r| r.resume(train, &ro.name, &s.rng)))?;
    if let Some(from) = &point.from {
        let skip = if point.skip > 0 {
            format!("; {} batches of the next epoch were already trained and are skipped", point.skip)
        } else {
            String::new()
        };
        s.say(&format!("resumed from {}: {} epochs done, step {}{skip}", from.display(), point.epoch, point.step));
    }
    let mut out: Map = from_json(&serde_json::Value::Object(point.user))?.try_cast::<Map>().unwrap_or_default();
    out.insert("epoch".into(), Dynamic::from_int(point.epoch as INT));
    out.insert("step".into(), Dynamic::from_int(point.step as INT));
    out.insert("skip".into(), Dynamic::from_int(point.skip as INT));
    out.insert("resumed".into(), Dynamic::from_bool(point.from.is_some()));
    Ok(out)
}

fn do_save(s: &Session, m: &Model, opt: &Optim, sched: Option<&Sched>, state: Map) -> Res<String> {
    let mut user = match to_json(&Dynamic::from_map(state))? {
        serde_json::Value::Object(o) => o,
        _ => return Err(err("save_checkpoint: the state must be a map")),
    };
    let epoch = match user.remove("epoch") {
        Some(v) => v.as_u64().ok_or_else(|| err(format!("save_checkpoint: epoch must be an integer >= 0, got {v}")))?,
        None => {
            return Err(err(
                "save_checkpoint: the state map needs `epoch` (epochs done: where a resumed run continues)",
            ))
        }
    };
    let name = match user.remove("name") {
        Some(serde_json::Value::String(n)) => n,
        Some(v) => return Err(err(format!("save_checkpoint: name must be a string, got {v}"))),
        None => String::new(),
    };
    let keep = match user.remove("keep") {
        Some(v) => {
            v.as_u64().ok_or_else(|| err(format!("save_checkpoint: keep must be an integer >= 0, got {v}")))? as usize
        }
        None => DEFAULT_KEEP,
    };
    for reserved in ["step", "skip", "resumed"] {
        if user.contains_key(reserved) {
            return Err(err(format!("save_checkpoint: `{reserved}` is set by the host; use another key")));
        }
    }
    let train = train_state(m, opt, sched)?;
    let path =
        op("save_checkpoint", s.record().and_then(|mut r| r.save_checkpoint(train, &name, epoch, user, keep, &s.rng)))?;
    Ok(path.display().to_string())
}

fn do_plot(s: &Session, o: &Map) -> Res<Array> {
    let po: PlotOptions = options("plot", o)?;
    // Under several ranks rank 0 draws: the others have no run folder and the same records.
    if !crate::dist::is_leader() {
        return Ok(Array::new());
    }
    let run = s.run.try_borrow().map_err(|_| err("plot: the run record is in use"))?;
    let records = run.metrics.records();
    let x = match &po.x {
        Some(x) => Some(op("plot", XAxis::parse(x))?),
        None => None,
    };
    let plots_dir = run.dir().map(|d| d.plots());
    let mut written: Vec<PathBuf> = Vec::new();
    match &po.metric {
        None if po.tags.is_none() && x.is_none() && po.path.is_none() => {
            let dir = plots_dir.ok_or_else(|| err("plot: this session has no run folder"))?;
            written = op("plot", plot_all(records, &dir))?;
        }
        None => return Err(err("plot: `tags`, `x` and `path` need `metric`")),
        Some(metric) => {
            let fig = metric_figure(records, metric, po.tags.as_deref(), x)
                .ok_or_else(|| err(format!("plot: no record has the metric `{metric}`")))?;
            let path = match (&po.path, plots_dir) {
                (Some(p), _) => PathBuf::from(p),
                (None, Some(d)) => d.join(format!("{}.png", file_stem(metric))),
                (None, None) => return Err(err("plot: this session has no run folder; give a path")),
            };
            op("plot", render_png(&fig, &path))?;
            written.push(path);
        }
    }
    Ok(written.into_iter().map(|p| Dynamic::from(p.display().to_string())).collect())
}

/// Registers the run-record API.
pub fn register(engine: &mut Engine, session: &Rc<Session>) {
    let s = session.clone();
    api!(engine, "resume", "m: Model, opt: Optimizer -> Map",
        "Where training starts: #{epoch, step, skip, resumed, ...}. On a fresh run, epoch 0. With `samhost run SCRIPT --resume RUN_DIR`, loads the newest checkpoint into the model and optimizer (and the host random generator) and returns its epoch (epochs done: continue from there), step, skip (batches of that epoch already trained before a Ctrl-C: skip them) and the values given to save_checkpoint. Also tells the host what to checkpoint on Ctrl-C. Typical use: `let st = resume(model, opt, sched); for epoch in st.epoch..cfg.epochs { ... }`.",
        move |m: Model, opt: Optim| do_resume(&s, &m, &opt, None, &Map::new()));
    let s = session.clone();
    api!(
        engine,
        "resume",
        "m: Model, opt: Optimizer, sched: Schedule -> Map",
        "`resume` with a learning-rate schedule: its step count is restored too.",
        move |m: Model, opt: Optim, sched: Sched| do_resume(&s, &m, &opt, Some(&sched), &Map::new())
    );
    let s = session.clone();
    api!(engine, "resume", "m: Model, opt: Optimizer, options: Map -> Map",
        "`resume` with options: name (\"\": the checkpoints saved with this name, for scripts that train several models).",
        move |m: Model, opt: Optim, o: Map| do_resume(&s, &m, &opt, None, &o));
    let s = session.clone();
    api!(
        engine,
        "resume",
        "m: Model, opt: Optimizer, sched: Schedule, options: Map -> Map",
        "`resume` with a schedule and options (name).",
        move |m: Model, opt: Optim, sched: Sched, o: Map| do_resume(&s, &m, &opt, Some(&sched), &o)
    );

    let s = session.clone();
    api!(engine, "save_checkpoint", "m: Model, opt: Optimizer, state: Map -> String",
        "Writes a checkpoint into the run's checkpoints/ folder, atomically: the model (model.safetensors with Hugging Face names, config.json), the optimizer state, the host random generator, the step count and `state`. `state` needs `epoch` (epochs done: where a resumed run continues); optional `name` (see resume) and `keep` (newest checkpoints of this name to keep, 2; 0 keeps all); any other values come back from `resume`. Returns the checkpoint's folder.",
        move |m: Model, opt: Optim, state: Map| do_save(&s, &m, &opt, None, state));
    let s = session.clone();
    api!(
        engine,
        "save_checkpoint",
        "m: Model, opt: Optimizer, sched: Schedule, state: Map -> String",
        "`save_checkpoint` with a learning-rate schedule, whose state is saved too.",
        move |m: Model, opt: Optim, sched: Sched, state: Map| do_save(&s, &m, &opt, Some(&sched), state)
    );

    let s = session.clone();
    api!(engine, "plot", "-> Array",
        "Plots every metric logged so far into the run's plots/<metric>.png (one line per tag), as happens at the end of every run; returns the files written.",
        move || do_plot(&s, &Map::new()));
    let s = session.clone();
    api!(engine, "plot", "options: Map -> Array",
        "Plots one metric now. Options: metric (required), tags (array of tags to draw; all by default), x (\"step\", \"epoch\" or \"record\"; chosen from the data by default), path (the PNG; plots/<metric>.png by default). Returns the file written.",
        move |o: Map| do_plot(&s, &o));

    let s = session.clone();
    api!(engine, "run_dir", "-> String",
        "The run folder (e.g. runs/quickstart-20250101-120000), or \"\" when the session has none. Handy for saving extra results: `m.save(run_dir() + \"/final\")`.",
        move || -> Res<String> {
            let run = s.run.try_borrow().map_err(|_| err("run_dir: the run record is in use"))?;
            Ok(run.dir().map(|d| d.path().display().to_string()).unwrap_or_default())
        });
}

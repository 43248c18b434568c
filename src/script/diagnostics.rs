//! Sharpness diagnostics for scripts: `hessian_top`, `hessian_trace`, `hessian_density`,
//! `adaptive_sharpness`, `landscape`, `interpolate`, and `plot_lines` to draw several results in
//! one figure. `data` is a Batch or a Dataset (taken in batches of `batch`, 256).

use super::convert::{err, op, Res};
use super::train::{take_loss, with_loss};
use crate::data::{Batch, Batches, Dataset};
use crate::diagnostics::{hessian, landscape, sharpness};
use crate::models::Model;
use crate::run::plot::{render_png, Figure, Line};
use crate::session::Session;
use candle_core::Tensor;
use rhai::{Array, Dynamic, Engine, Map, NativeCallContext};
use serde::de::DeserializeOwned;
use std::path::PathBuf;
use std::rc::Rc;

/// The batches of `data`: one Batch, or a Dataset in order in batches of `batch`.
fn batches_of(what: &str, s: &Session, data: Dynamic, batch: usize) -> Res<Vec<(Tensor, Tensor)>> {
    if let Some(b) = data.clone().try_cast::<Batch>() {
        return Ok(vec![(b.images, b.labels)]);
    }
    let type_name = data.type_name();
    let ds = data
        .try_cast::<Dataset>()
        .ok_or_else(|| err(format!("{what}: data must be a Batch or a Dataset, got {type_name}")))?;
    if ds.is_empty() {
        return Err(err(format!("{what}: the dataset is empty")));
    }
    if batch == 0 {
        return Err(err(format!("{what}: batch must be >= 1")));
    }
    let order = crate::data::loader::epoch_order(ds.len(), false, 0, 0);
    let it = op(what, Batches::new(ds, order, batch, false, s.device().clone()))?;
    it.into_iter().map(|b| op(what, b).map(|b| (b.images, b.labels))).collect()
}

/// Splits the options shared by every diagnostic (`loss`, `batch`, `name`) from the
/// measure's own, which are parsed into `T`.
struct Common<T> {
    closure: Option<rhai::FnPtr>,
    batch: usize,
    name: Option<String>,
    opts: T,
}

fn common<T: DeserializeOwned>(what: &str, mut o: Map) -> Res<Common<T>> {
    let closure = take_loss(&mut o)?;
    let batch = match o.remove("batch") {
        Some(v) => super::convert::to_usize(
            "batch",
            v.as_int().map_err(|t| err(format!("{what}: batch must be an integer, got {t}")))?,
        )?,
        None => 256,
    };
    let name = match o.remove("name") {
        Some(v) => Some(v.into_string().map_err(|t| err(format!("{what}: name must be a string, got {t}")))?),
        None => None,
    };
    Ok(Common { closure, batch, name, opts: super::convert::options(what, &o)? })
}

fn floats(v: &[f64]) -> Array {
    v.iter().map(|&x| Dynamic::from_float(x)).collect()
}

/// Where a diagnostic writes its files: `<run>/diagnostics/`, or None without a run folder.
fn out_dir(s: &Session) -> Res<Option<PathBuf>> {
    let run = s.run.try_borrow().map_err(|_| err("the run record is in use"))?;
    let Some(dir) = run.dir() else { return Ok(None) };
    let d = dir.path().join("diagnostics");
    std::fs::create_dir_all(&d).map_err(|e| err(format!("{}: cannot create: {e}", d.display())))?;
    Ok(Some(d))
}

/// Writes `value` as `<name>.json` and `fig` as `<name>.png` into the run's diagnostics folder;
/// returns the PNG's path ("" without a run folder).
fn record(s: &Session, name: &str, value: &serde_json::Value, fig: Option<&Figure>) -> Res<String> {
    let Some(dir) = out_dir(s)? else { return Ok(String::new()) };
    let stem = crate::run::plot::file_stem(name);
    let text = op(name, serde_json::to_string_pretty(value).map_err(anyhow::Error::from))?;
    op(name, crate::fsutil::write_bytes_atomic(&dir.join(format!("{stem}.json")), text.as_bytes()))?;
    match fig {
        Some(f) => {
            let png = dir.join(format!("{stem}.png"));
            op(name, render_png(f, &png))?;
            Ok(png.display().to_string())
        }
        None => Ok(String::new()),
    }
}

fn line_figure(title: &str, x_label: &str, y_label: &str, lines: Vec<Line>) -> Figure {
    Figure {
        title: title.into(),
        x_label: x_label.into(),
        y_label: y_label.into(),
        lines,
        goal: crate::run::summary::Goal::Min,
    }
}

/// Registers the diagnostics.
pub fn register(engine: &mut Engine, session: &Rc<Session>) {
    let s = session.clone();
    let f = Rc::new(move |ctx: &NativeCallContext, m: Model, data: Dynamic, o: Map| -> Res<Map> {
        let c: Common<hessian::TopOptions> = common("hessian_top", o)?;
        let data = batches_of("hessian_top", &s, data, c.batch)?;
        let top = op(
            "hessian_top",
            with_loss(ctx, c.closure, 0.0, |loss| hessian::top_eigen(&m, &data, loss, &c.opts, &s.rng)),
        )?;
        let json = serde_json::json!({ "eigenvalues": top.eigenvalues, "iterations": top.iterations });
        record(&s, &c.name.unwrap_or_else(|| "hessian_top".into()), &json, None)?;
        let mut out = Map::new();
        out.insert("eigenvalues".into(), Dynamic::from_array(floats(&top.eigenvalues)));
        out.insert(
            "iterations".into(),
            Dynamic::from_array(top.iterations.iter().map(|&i| Dynamic::from_int(i as rhai::INT)).collect()),
        );
        Ok(out)
    });
    let g = f.clone();
    api!(engine, "hessian_top", "m: Model, data: Dynamic, options: Map -> Map",
        "The k largest eigenvalues of the loss Hessian at the model's weights, as PyHessian: power iteration from a normalized Gaussian start, deflated against the eigenvectors found, stopped at relative change < tol. Evaluation mode (BatchNorm running statistics); data a Batch or a Dataset (products averaged over batches weighted by size). Hessian-vector products are central differences of gradients (two gradients each; step fd_step times the RMS weight, at least fd_step). Options: k (1), iters (100), tol (1e-3), fd_step (1e-3), batch (256, for a Dataset), loss. Returns #{eigenvalues, iterations}; also written to the run's diagnostics/hessian_top.json.",
        move |ctx: NativeCallContext, m: Model, data: Dynamic, o: Map| g(&ctx, m, data, o));
    api!(
        engine,
        "hessian_top",
        "m: Model, data: Dynamic -> Map",
        "`hessian_top` with the default options.",
        move |ctx: NativeCallContext, m: Model, data: Dynamic| f(&ctx, m, data, Map::new())
    );
    let s = session.clone();
    let f = Rc::new(move |ctx: &NativeCallContext, m: Model, data: Dynamic, o: Map| -> Res<Map> {
        let c: Common<hessian::TraceOptions> = common("hessian_trace", o)?;
        let data = batches_of("hessian_trace", &s, data, c.batch)?;
        let t = op(
            "hessian_trace",
            with_loss(ctx, c.closure, 0.0, |loss| hessian::trace(&m, &data, loss, &c.opts, &s.rng)),
        )?;
        let json = serde_json::json!({ "trace": t.trace, "std_error": t.std_error, "samples": t.samples });
        record(&s, &c.name.unwrap_or_else(|| "hessian_trace".into()), &json, None)?;
        let mut out = Map::new();
        out.insert("trace".into(), Dynamic::from_float(t.trace));
        out.insert("std_error".into(), Dynamic::from_float(t.std_error));
        out.insert("samples".into(), Dynamic::from_array(floats(&t.samples)));
        Ok(out)
    });
    let g = f.clone();
    api!(engine, "hessian_trace", "m: Model, data: Dynamic, options: Map -> Map",
        "The trace of the loss Hessian by Hutchinson's estimator, E[vᵀHv] over Rademacher v (as PyHessian: stops when the running mean changes by less than tol, relative). Options: samples (100), tol (1e-3), fd_step, batch, loss. Returns #{trace, std_error, samples}.",
        move |ctx: NativeCallContext, m: Model, data: Dynamic, o: Map| g(&ctx, m, data, o));
    api!(
        engine,
        "hessian_trace",
        "m: Model, data: Dynamic -> Map",
        "`hessian_trace` with the default options.",
        move |ctx: NativeCallContext, m: Model, data: Dynamic| f(&ctx, m, data, Map::new())
    );
    let s = session.clone();
    let f = Rc::new(move |ctx: &NativeCallContext, m: Model, data: Dynamic, o: Map| -> Res<Map> {
        let c: Common<hessian::DensityOptions> = common("hessian_density", o)?;
        let data = batches_of("hessian_density", &s, data, c.batch)?;
        let d = op(
            "hessian_density",
            with_loss(ctx, c.closure, 0.0, |loss| hessian::density(&m, &data, loss, &c.opts, &s.rng)),
        )?;
        let json = serde_json::json!({ "grid": d.grid, "density": d.density, "nodes": d.nodes, "weights": d.weights });
        let points = d.grid.iter().copied().zip(d.density.iter().copied()).collect();
        let fig = line_figure(
            "Hessian eigenvalue density",
            "eigenvalue",
            "density",
            vec![Line { label: String::new(), points }],
        );
        let plot = record(&s, &c.name.unwrap_or_else(|| "hessian_density".into()), &json, Some(&fig))?;
        let mut out = Map::new();
        out.insert("grid".into(), Dynamic::from_array(floats(&d.grid)));
        out.insert("density".into(), Dynamic::from_array(floats(&d.density)));
        out.insert(
            "nodes".into(),
            Dynamic::from_array(d.nodes.iter().map(|n| Dynamic::from_array(floats(n))).collect()),
        );
        out.insert(
            "weights".into(),
            Dynamic::from_array(d.weights.iter().map(|n| Dynamic::from_array(floats(n))).collect()),
        );
        out.insert("plot".into(), Dynamic::from(plot));
        Ok(out)
    });
    let g = f.clone();
    api!(engine, "hessian_density", "m: Model, data: Dynamic, options: Map -> Map",
        "The Hessian's eigenvalue density by stochastic Lanczos quadrature (Lanczos with full reorthogonalization from a normalized Rademacher vector; Ritz values weighted by the squared first components; smoothed by a Gaussian of width sigma x the range). Options: iters (50), runs (1), sigma (0.01), points (400), fd_step, batch, loss, name. Returns #{grid, density, nodes, weights, plot}; the run's diagnostics/ gets the JSON and a PNG of the density.",
        move |ctx: NativeCallContext, m: Model, data: Dynamic, o: Map| g(&ctx, m, data, o));
    api!(
        engine,
        "hessian_density",
        "m: Model, data: Dynamic -> Map",
        "`hessian_density` with the default options.",
        move |ctx: NativeCallContext, m: Model, data: Dynamic| f(&ctx, m, data, Map::new())
    );
    let s = session.clone();
    let f = Rc::new(move |ctx: &NativeCallContext, m: Model, data: Dynamic, o: Map| -> Res<Map> {
        let c: Common<sharpness::Options> = common("adaptive_sharpness", o)?;
        let data = batches_of("adaptive_sharpness", &s, data, c.batch)?;
        let r = op(
            "adaptive_sharpness",
            with_loss(ctx, c.closure, 0.0, |loss| sharpness::adaptive_sharpness(&m, &data, loss, &c.opts, &s.rng)),
        )?;
        let json = serde_json::json!({ "sharpness": r.sharpness, "per_batch": r.per_batch, "loss": r.loss });
        record(&s, &c.name.unwrap_or_else(|| "adaptive_sharpness".into()), &json, None)?;
        let mut out = Map::new();
        out.insert("sharpness".into(), Dynamic::from_float(r.sharpness));
        out.insert("per_batch".into(), Dynamic::from_array(floats(&r.per_batch)));
        out.insert("loss".into(), Dynamic::from_float(r.loss));
        Ok(out)
    });
    let g = f.clone();
    api!(engine, "adaptive_sharpness", "m: Model, data: Dynamic, options: Map -> Map",
        "Adaptive sharpness (Andriushchenko et al., ICML 2023): the mean over batches of size m of L(w + δ) − L(w) with ‖δ/c‖_p <= rho, c = |w| (adaptive) or 1. kind \"worst\": δ by projected gradient ascent (APGD-style: random start, step 2 rho, momentum 0.75, step halved when the loss stops rising, best point kept); \"average\": δ = rho c z, z ~ N(0, 1), averaged over `steps` draws. Options: rho (0.1), kind (\"worst\"), adaptive (true), norm (\"l2\" or \"linf\"), steps (20), m (examples per batch; 0 = the batches as given), batch, loss. Returns #{sharpness, per_batch, loss}.",
        move |ctx: NativeCallContext, m: Model, data: Dynamic, o: Map| g(&ctx, m, data, o));
    api!(
        engine,
        "adaptive_sharpness",
        "m: Model, data: Dynamic -> Map",
        "`adaptive_sharpness` with the default options.",
        move |ctx: NativeCallContext, m: Model, data: Dynamic| f(&ctx, m, data, Map::new())
    );
    let s = session.clone();
    let f = Rc::new(move |ctx: &NativeCallContext, m: Model, data: Dynamic, o: Map| -> Res<Map> {
        let c: Common<landscape::Options> = common("landscape", o)?;
        let data = batches_of("landscape", &s, data, c.batch)?;
        let l = op("landscape", with_loss(ctx, c.closure, 0.0, |loss| landscape::landscape(&m, &data, loss, &c.opts)))?;
        let name = c.name.unwrap_or_else(|| "landscape".into());
        let json = serde_json::json!({ "x": l.xs, "y": l.ys, "loss": l.loss, "accuracy": l.accuracy });
        let plot = if l.ys.is_empty() {
            let points = l.xs.iter().copied().zip(l.loss[0].iter().copied()).collect();
            let fig = line_figure(&name, "alpha", "loss", vec![Line { label: String::new(), points }]);
            record(&s, &name, &json, Some(&fig))?
        } else {
            let p = record(&s, &name, &json, None)?;
            match out_dir(&s)? {
                Some(dir) => {
                    let png = dir.join(format!("{}.png", crate::run::plot::file_stem(&name)));
                    op("landscape", crate::run::plot::render_heatmap_png(&name, &l.xs, &l.ys, &l.loss, &png))?;
                    png.display().to_string()
                }
                None => p,
            }
        };
        let rows = |v: &[Vec<f64>]| -> Dynamic {
            if l.ys.is_empty() {
                Dynamic::from_array(floats(&v[0]))
            } else {
                Dynamic::from_array(v.iter().map(|r| Dynamic::from_array(floats(r))).collect())
            }
        };
        let mut out = Map::new();
        out.insert("x".into(), Dynamic::from_array(floats(&l.xs)));
        if !l.ys.is_empty() {
            out.insert("y".into(), Dynamic::from_array(floats(&l.ys)));
        }
        out.insert("loss".into(), rows(&l.loss));
        out.insert("accuracy".into(), rows(&l.accuracy));
        out.insert("plot".into(), Dynamic::from(plot));
        Ok(out)
    });
    let g = f.clone();
    api!(engine, "landscape", "m: Model, data: Dynamic, options: Map -> Map",
        "The loss (and accuracy) along filter-normalized random directions, as tomgoldstein/loss-landscape: each filter of a direction is scaled to the norm of its weight filter; biases and normalization parameters stay put unless include_bias_bn. Evaluation mode. Options: dims (1 or 2), range (1.0: coordinates -range..range), points (21 per axis), seed (0: the same seed gives two models of one architecture the same directions), include_bias_bn (false), batch, loss, name (\"landscape\"). Returns #{x, loss, accuracy} (1-D) or #{x, y, loss, accuracy} with rows over y (2-D) and `plot`; the run's diagnostics/ gets the JSON and a PNG (a line, or a heatmap).",
        move |ctx: NativeCallContext, m: Model, data: Dynamic, o: Map| g(&ctx, m, data, o));
    api!(
        engine,
        "landscape",
        "m: Model, data: Dynamic -> Map",
        "`landscape` with the default options.",
        move |ctx: NativeCallContext, m: Model, data: Dynamic| f(&ctx, m, data, Map::new())
    );
    let s = session.clone();
    api!(engine, "interpolate", "a: Model, b: Model, data: Dynamic, options: Map -> Map",
        "The loss and accuracy at (1 − t) w_a + t w_b for t from 0 to 1 (every tensor interpolated, BatchNorm statistics too), in evaluation mode; the two models must have the same tensors, `a` is put back afterwards. Options: points (11), batch, loss, name (\"interpolate\"). Returns #{t, loss, accuracy, plot}.",
        move |ctx: NativeCallContext, a: Model, b: Model, data: Dynamic, o: Map| -> Res<Map> {
            #[derive(serde::Deserialize)]
            #[serde(default, deny_unknown_fields)]
            struct Points { points: usize }
            impl Default for Points { fn default() -> Self { Self { points: 11 } } }
            let c: Common<Points> = common("interpolate", o)?;
            let data = batches_of("interpolate", &s, data, c.batch)?;
            let (ts, losses, accs) = op("interpolate", with_loss(&ctx, c.closure, 0.0, |loss| landscape::interpolate(&a, &b, &data, loss, c.opts.points)))?;
            let name = c.name.unwrap_or_else(|| "interpolate".into());
            let json = serde_json::json!({ "t": ts, "loss": losses, "accuracy": accs });
            let fig = line_figure(&name, "t", "loss", vec![Line { label: String::new(), points: ts.iter().copied().zip(losses.iter().copied()).collect() }]);
            let plot = record(&s, &name, &json, Some(&fig))?;
            let mut out = Map::new();
            out.insert("t".into(), Dynamic::from_array(floats(&ts)));
            out.insert("loss".into(), Dynamic::from_array(floats(&losses)));
            out.insert("accuracy".into(), Dynamic::from_array(floats(&accs)));
            out.insert("plot".into(), Dynamic::from(plot));
            Ok(out)
        });
    let s = session.clone();
    api!(engine, "plot_lines", "lines: Array, options: Map -> String",
        "Draws several lines in one PNG, e.g. the landscapes of two models: each element #{label, x: [...], y: [...]}. Options: title, x_label, y_label, name (the file <run>/diagnostics/<name>.png, \"lines\") or path. Returns the file written (under several ranks, rank 0 writes it).",
        move |lines: Array, o: Map| -> Res<String> {
            let text = |k: &str, d: &str| -> String { o.get(k).map(|v| v.to_string()).unwrap_or_else(|| d.to_string()) };
            let mut ls = Vec::new();
            for (i, l) in lines.into_iter().enumerate() {
                let m = l.try_cast::<Map>().ok_or_else(|| err(format!("plot_lines: element {i} is not a map #{{label, x, y}}")))?;
                let nums = |k: &str| -> Res<Vec<f64>> {
                    let a = m.get(k).and_then(|v| v.clone().try_cast::<Array>()).ok_or_else(|| err(format!("plot_lines: element {i} has no array `{k}`")))?;
                    a.iter().map(|v| super::convert::number("plot_lines", v)).collect()
                };
                let (x, y) = (nums("x")?, nums("y")?);
                if x.len() != y.len() {
                    return Err(err(format!("plot_lines: element {i} has {} x values and {} y values", x.len(), y.len())));
                }
                ls.push(Line { label: m.get("label").map(|v| v.to_string()).unwrap_or_default(), points: x.into_iter().zip(y).collect() });
            }
            let fig = line_figure(&text("title", ""), &text("x_label", "x"), &text("y_label", "y"), ls);
            // Under several ranks rank 0 draws (the others have no run folder and the same lines).
            if !crate::dist::is_leader() {
                return Ok(o.get("path").map(|p| p.to_string()).unwrap_or_default());
            }
            let path = match o.get("path") {
                Some(p) => PathBuf::from(p.to_string()),
                None => match out_dir(&s)? {
                    Some(d) => d.join(format!("{}.png", crate::run::plot::file_stem(&text("name", "lines")))),
                    None => return Err(err("plot_lines: this session has no run folder; give a path")),
                },
            };
            op("plot_lines", render_png(&fig, &path))?;
            Ok(path.display().to_string())
        });
}

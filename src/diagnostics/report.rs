//! `samhost sharpness RUN_DIR`: the flatness of a saved model from the command line: the newest
//! (or a named) checkpoint of the run, measured on `--data` (or the run's `data` setting): the
//! Hessian's top eigenvalue and trace, worst-case adaptive sharpness and a 1-D filter-normalized
//! landscape, written to `RUN_DIR/diagnostics/<checkpoint>-sharpness.json` and `.png`.

use super::{hessian, landscape, sharpness};
use crate::data::{load_dataset, Batches, LoadOptions};
use crate::rng::HostRng;
use crate::run::plot::{render_png, Figure, Line};
use crate::train::LossFn;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};

/// What `samhost sharpness` measured, for printing.
pub struct Report {
    /// The checkpoint measured.
    pub checkpoint: PathBuf,
    /// The JSON written.
    pub json: PathBuf,
    /// One line per measure.
    pub lines: Vec<String>,
}

/// Measures the checkpoint `name` (or the newest) of `run` on `examples` examples of `data`.
pub fn sharpness_report(run: &Path, name: Option<&str>, data: Option<&Path>, examples: usize) -> Result<Report> {
    let run_dir = crate::run::RunDir::open(run).map_err(|e| anyhow::anyhow!("{e:#}").context("samhost sharpness"))?;
    let all = crate::run::checkpoint::list(&run_dir.checkpoints())?;
    let ck = match name {
        Some(n) => all
            .into_iter()
            .rev()
            .find(|c| c.state.name == n || c.dir.file_name().is_some_and(|f| f == n))
            .with_context(|| format!("{}: no checkpoint `{n}`", run_dir.checkpoints().display()))?,
        None => {
            all.into_iter().last().with_context(|| format!("{}: no checkpoint yet", run_dir.checkpoints().display()))?
        }
    };
    let data_path = match data {
        Some(p) => p.to_path_buf(),
        None => {
            let cfg = run_dir.read_json("config.json")?;
            match cfg.pointer("/config/data").and_then(|v| v.as_str()).filter(|s| !s.is_empty()) {
                Some(p) => PathBuf::from(p),
                None => bail!("{}: the run has no `data` setting: give --data PATH", run.display()),
            }
        }
    };
    if examples == 0 {
        bail!("--examples must be >= 1");
    }
    let hub = crate::hub::HubOptions::from_env(true, false)?;
    let rng = HostRng::new(0);
    let device = Device::Cpu;
    let pre = crate::models::pretrained::from_pretrained(
        &ck.dir.display().to_string(),
        &Default::default(),
        &hub,
        &rng,
        &device,
    )
    .with_context(|| format!("{}: the checkpoint's model", ck.dir.display()))?;
    let model = pre.model;
    let ds = load_dataset(&data_path, &LoadOptions::default())?.subset(examples)?;
    let order = crate::data::loader::epoch_order(ds.len(), false, 0, 0);
    let batches: Vec<_> = Batches::new(ds, order, 256, false, device)?
        .into_iter()
        .map(|b| b.map(|b| (b.images, b.labels)))
        .collect::<Result<_>>()?;
    let loss = LossFn::default();
    let top =
        hessian::top_eigen(&model, &batches, &loss, &hessian::TopOptions { iters: 30, ..Default::default() }, &rng)?;
    let trace =
        hessian::trace(&model, &batches, &loss, &hessian::TraceOptions { samples: 30, ..Default::default() }, &rng)?;
    let sharp_opts = sharpness::Options { rho: 0.05, steps: 10, m: 128, ..Default::default() };
    let sharp = sharpness::adaptive_sharpness(&model, &batches, &loss, &sharp_opts, &rng)?;
    let land = landscape::landscape(&model, &batches, &loss, &landscape::Options::default())?;
    let out = run_dir.path().join("diagnostics");
    std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create", out.display()))?;
    let stem = ck.dir.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| "checkpoint".into());
    let json_path = out.join(format!("{stem}-sharpness.json"));
    let json = serde_json::json!({
        "checkpoint": ck.dir.display().to_string(),
        "data": data_path.display().to_string(),
        "examples": examples,
        "top_eigenvalue": top.eigenvalues[0],
        "trace": trace.trace,
        "trace_std_error": trace.std_error,
        "adaptive_sharpness": sharp.sharpness,
        "loss": sharp.loss,
        "landscape": { "x": land.xs, "loss": land.loss[0], "accuracy": land.accuracy[0] },
    });
    crate::fsutil::write_bytes_atomic(&json_path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    let fig = Figure {
        title: format!("loss landscape of {stem}"),
        x_label: "alpha".into(),
        y_label: "loss".into(),
        lines: vec![Line {
            label: String::new(),
            points: land.xs.iter().copied().zip(land.loss[0].iter().copied()).collect(),
        }],
        goal: crate::run::summary::Goal::Min,
    };
    render_png(&fig, &out.join(format!("{stem}-landscape.png")))?;
    Ok(Report {
        checkpoint: ck.dir,
        json: json_path,
        lines: vec![
            format!("loss {:.4} on {examples} examples of {}", sharp.loss, data_path.display()),
            format!("top Hessian eigenvalue {:.6}", top.eigenvalues[0]),
            format!(
                "Hessian trace {:.4} ± {:.4} (Hutchinson, {} samples)",
                trace.trace,
                trace.std_error,
                trace.samples.len()
            ),
            format!("adaptive sharpness {:.6} (worst case, rho 0.05, batches of 128)", sharp.sharpness),
        ],
    })
}

//! `samhost plot RUN_DIR...`: one metric of several runs overlaid in one PNG (SAM against SGD),
//! each run labelled by the config values that tell the runs apart.

use super::metrics::{metric_names, read_records};
use super::plot::{compare_figure, render_png, RunSeries, XAxis};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// What `samhost plot` produced.
#[derive(Debug)]
pub struct Compared {
    /// The PNG written.
    pub file: PathBuf,
    /// The metric drawn.
    pub metric: String,
    /// Every metric the runs logged.
    pub available: Vec<String>,
}

fn run_name(dir: &Path) -> String {
    let d = if dir.file_name().is_some_and(|n| n == "metrics.jsonl") { dir.parent().unwrap_or(dir) } else { dir };
    d.canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| d.display().to_string())
}

/// Short text of a config value for a legend.
fn short(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Legend labels: the config keys whose values differ between the runs (`rho=0.05, method=sam`),
/// or the folder names when none differ or labels would repeat.
pub fn run_labels(names: &[String], configs: &[Option<Value>]) -> Vec<String> {
    let maps: Vec<Option<&serde_json::Map<String, Value>>> =
        configs.iter().map(|c| c.as_ref().and_then(|c| c.get("config")).and_then(Value::as_object)).collect();
    if names.len() < 2 || maps.iter().any(Option::is_none) {
        return names.to_vec();
    }
    let maps: Vec<&serde_json::Map<String, Value>> = maps.into_iter().flatten().collect();
    let keys: BTreeSet<&String> = maps.iter().flat_map(|m| m.keys()).collect();
    let differing: Vec<&String> =
        keys.into_iter().filter(|k| maps.iter().any(|m| m.get(*k) != maps[0].get(*k))).take(3).collect();
    if differing.is_empty() {
        return names.to_vec();
    }
    let labels: Vec<String> = maps
        .iter()
        .map(|m| {
            differing
                .iter()
                .map(|k| format!("{k}={}", m.get(*k).map(short).unwrap_or_else(|| "-".into())))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .collect();
    let unique: BTreeSet<&String> = labels.iter().collect();
    if unique.len() == labels.len() {
        labels
    } else {
        names.to_vec()
    }
}

/// Overlays `metric` (by default `accuracy` when logged, else the first metric) of the runs in
/// `dirs` (run folders, or metrics.jsonl files) into `output` (by default `<metric>.png`).
pub fn plot_runs(dirs: &[PathBuf], metric: Option<&str>, output: Option<&Path>, x: Option<XAxis>) -> Result<Compared> {
    if dirs.is_empty() {
        bail!("no run folder given");
    }
    let mut runs = Vec::new();
    let mut names = Vec::new();
    let mut configs = Vec::new();
    for d in dirs {
        let file = if d.is_dir() { d.join("metrics.jsonl") } else { d.clone() };
        if !file.is_file() {
            bail!("{}: not a run folder (no metrics.jsonl)", d.display());
        }
        let records = read_records(&file)?;
        let config_file = file.with_file_name("config.json");
        let config = std::fs::read_to_string(&config_file).ok().and_then(|t| serde_json::from_str(&t).ok());
        names.push(run_name(d));
        configs.push(config);
        runs.push(records);
    }
    let labels = run_labels(&names, &configs);
    let all: Vec<Value> = runs.iter().flatten().cloned().collect();
    let available = metric_names(&all);
    let metric = match metric {
        Some(m) => m.to_string(),
        None if available.iter().any(|m| m == "accuracy") => "accuracy".into(),
        None => available.first().cloned().context("the runs logged no numeric metric")?,
    };
    if !available.contains(&metric) {
        bail!("no run logged the metric `{metric}`; the runs have: {}", available.join(", "));
    }
    let series: Vec<RunSeries> =
        labels.into_iter().zip(runs).map(|(label, records)| RunSeries { label, records }).collect();
    let mut fig = compare_figure(&series, &metric, x).context("nothing to plot")?;
    if dirs.len() > 1 {
        fig.title = format!("{metric}: {} runs", dirs.len());
    }
    let file = match output {
        Some(o) => o.to_path_buf(),
        None => PathBuf::from(format!("{}.png", super::plot::file_stem(&metric))),
    };
    render_png(&fig, &file)?;
    Ok(Compared { file, metric, available })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn labels_name_the_settings_that_differ() {
        let names = vec!["a".to_string(), "b".to_string()];
        let c =
            |rho: f64| Some(json!({"config": {"rho": rho, "epochs": 10, "method": if rho > 0.0 {"sam"} else {"sgd"}}}));
        assert_eq!(run_labels(&names, &[c(0.0), c(0.05)]), ["method=sgd, rho=0.0", "method=sam, rho=0.05"]);
        assert_eq!(run_labels(&names, &[c(0.0), c(0.0)]), ["a", "b"]);
        assert_eq!(run_labels(&names, &[c(0.0), None]), ["a", "b"]);
    }
}

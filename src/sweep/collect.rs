//! Gathering a sweep: each point's `summary.json` into one row of `sweep.csv` (the settings, the
//! seed, how the run ended, the last and best value of every metric), and `sweep.png`: one
//! metric's last value (mean over seeds) against the first grid key, a line per combination of the
//! other keys.

use super::grid::{Sweep, SweepPoint};
use crate::run::plot::{render_png, Figure, Line};
use crate::run::summary::{goal, Goal};
use anyhow::{Context, Result};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// One point as gathered.
#[derive(Clone, Debug)]
pub struct PointResult {
    /// The point.
    pub point: SweepPoint,
    /// `finished`, `failed`, `interrupted`, `crashed`, `running` (no summary yet) or `not run`.
    pub status: String,
    /// The error of a failed run.
    pub error: Option<String>,
    /// Its run folder.
    pub run_dir: Option<PathBuf>,
    /// `tag.metric` to (last, best).
    pub metrics: BTreeMap<String, (Option<f64>, Option<f64>)>,
}

/// What `collect` wrote.
#[derive(Debug)]
pub struct Collected {
    /// `sweep.csv`.
    pub csv: PathBuf,
    /// `sweep.png`, when a metric was logged.
    pub png: Option<PathBuf>,
    /// The metric drawn (`tag.metric`).
    pub metric: Option<String>,
    /// Every point.
    pub points: Vec<PointResult>,
}

/// The newest run folder under `runs` (the one a point's `samhost run` made).
fn newest_run(runs: &Path) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(runs).ok()?.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    dirs.pop()
}

/// How a run ended, from its exit code (130 and 143: stopped by a signal).
pub fn exit_status(code: i64) -> &'static str {
    match code {
        0 => "finished",
        129 | 130 | 143 => "interrupted",
        _ => "failed",
    }
}

/// The last `error: ...` line of a point's log.
fn log_error(pdir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(pdir.join("log.txt")).ok()?;
    text.lines().rev().find(|l| l.starts_with("error")).map(|l| l.trim_start_matches("error: ").to_string())
}

fn gather(dir: &Path, p: &SweepPoint) -> PointResult {
    let pdir = Sweep::point_dir(dir, p.index);
    let run_dir = newest_run(&pdir.join("runs"));
    let mut r = PointResult {
        point: p.clone(),
        status: "not run".into(),
        error: None,
        run_dir: run_dir.clone(),
        metrics: BTreeMap::new(),
    };
    let exit: Option<i64> = std::fs::read_to_string(pdir.join("exit.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["exit_code"].as_i64());
    let Some(run) = run_dir else {
        // A run that failed before its first step keeps no run folder: its log says why.
        if let Some(code) = exit {
            r.status = exit_status(code).into();
            r.error = log_error(&pdir).or_else(|| Some(format!("exit code {code}")));
        } else if pdir.join("log.txt").is_file() {
            r.status = "running".into();
        }
        return r;
    };
    let summary: Option<Value> =
        std::fs::read_to_string(run.join("summary.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
    let Some(s) = summary else {
        // No summary: still running, or killed before it could write one.
        match exit {
            Some(code) => {
                r.status = exit_status(code).into();
                r.error = log_error(&pdir).or_else(|| Some(format!("exit code {code}, no summary.json")));
            }
            None => r.status = "running".into(),
        }
        return r;
    };
    r.status = s["status"].as_str().unwrap_or("unknown").to_string();
    r.error = s["error"].as_str().map(str::to_string);
    if let Some(tags) = s["metrics"].as_object() {
        for (tag, metrics) in tags {
            for (name, m) in metrics.as_object().into_iter().flatten() {
                r.metrics.insert(format!("{tag}.{name}"), (m["last"].as_f64(), m["best"].as_f64()));
            }
        }
    }
    r
}

/// A CSV field, quoted when it must be.
fn field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn number(v: Option<f64>) -> String {
    v.map(|x| format!("{x}")).unwrap_or_default()
}

/// The metric drawn: `wanted` (`tag.metric`, or a metric name: its first tag), else the first
/// `*.accuracy`, else the first metric.
fn choose_metric(names: &BTreeSet<String>, wanted: Option<&str>) -> Result<Option<String>> {
    if let Some(w) = wanted {
        if names.contains(w) {
            return Ok(Some(w.to_string()));
        }
        if let Some(n) = names.iter().find(|n| n.rsplit_once('.').is_some_and(|(_, m)| m == w)) {
            return Ok(Some(n.clone()));
        }
        anyhow::bail!(
            "--metric {w}: not logged by the sweep's runs (logged: {})",
            names.iter().cloned().collect::<Vec<_>>().join(", ")
        );
    }
    Ok(names.iter().find(|n| n.ends_with(".accuracy")).or_else(|| names.iter().next()).cloned())
}

/// `sweep.png`: `metric`'s last value against the first grid key, mean over seeds.
fn figure(sweep: &Sweep, points: &[PointResult], metric: &str) -> Option<Figure> {
    let (x_key, x_values) = match sweep.grid.first() {
        Some((k, vs)) => (k.clone(), vs.clone()),
        None => ("seed".to_string(), Vec::new()),
    };
    let numeric: Option<Vec<f64>> = x_values.iter().map(|v| v.parse::<f64>().ok()).collect();
    let x_of = |v: &str| -> f64 {
        match &numeric {
            Some(xs) => x_values.iter().position(|x| x == v).map(|i| xs[i]).unwrap_or(f64::NAN),
            None => x_values.iter().position(|x| x == v).map(|i| i as f64).unwrap_or(f64::NAN),
        }
    };
    // line label -> x -> values over seeds
    // In the grid's order of the other keys' values (the points come in that order).
    let mut lines: Vec<(String, BTreeMap<String, Vec<f64>>)> = Vec::new();
    for r in points {
        let Some((Some(v), _)) = r.metrics.get(metric) else { continue };
        let (x, rest): (String, Vec<String>) = if sweep.grid.is_empty() {
            (r.point.seed.map(|s| s.to_string()).unwrap_or_default(), Vec::new())
        } else {
            let x = r.point.settings[0].1.clone();
            (x, r.point.settings[1..].iter().map(|(k, v)| format!("{k}={v}")).collect())
        };
        let label = if rest.is_empty() { metric.to_string() } else { rest.join(", ") };
        let i = match lines.iter().position(|(l, _)| *l == label) {
            Some(i) => i,
            None => {
                lines.push((label, BTreeMap::new()));
                lines.len() - 1
            }
        };
        lines[i].1.entry(x).or_default().push(*v);
    }
    let lines: Vec<Line> = lines
        .into_iter()
        .map(|(label, per_x)| {
            let mut pts: Vec<(f64, f64)> = per_x
                .into_iter()
                .map(|(x, vs)| {
                    let x = if sweep.grid.is_empty() { x.parse().unwrap_or(f64::NAN) } else { x_of(&x) };
                    (x, vs.iter().sum::<f64>() / vs.len() as f64)
                })
                .filter(|(x, _)| x.is_finite())
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            Line { label, points: pts }
        })
        .filter(|l| !l.points.is_empty())
        .collect();
    if lines.is_empty() {
        return None;
    }
    let over = if sweep.seeds.is_some() { ", mean over seeds" } else { "" };
    let x_label = if numeric.is_none() && !sweep.grid.is_empty() {
        format!("{x_key} (index: {})", x_values.join(", "))
    } else {
        x_key
    };
    let goal = goal(metric.rsplit('.').next().unwrap_or(metric));
    Some(Figure { title: format!("sweep: {metric} (last{over})"), x_label, y_label: metric.to_string(), lines, goal })
}

/// Gathers the sweep in `dir` into `sweep.csv` and `sweep.png` (`metric` picks what is drawn).
pub fn collect(dir: &Path, metric: Option<&str>) -> Result<Collected> {
    let sweep = Sweep::read(dir)?;
    let points: Vec<PointResult> = sweep.points.iter().map(|p| gather(dir, p)).collect();
    let names: BTreeSet<String> = points.iter().flat_map(|r| r.metrics.keys().cloned()).collect();
    let mut header: Vec<String> = vec!["point".into()];
    header.extend(sweep.grid.iter().map(|(k, _)| k.clone()));
    header.extend(["seed", "status", "error", "run_dir"].map(String::from));
    for n in &names {
        header.push(n.clone());
        header.push(format!("{n}.best"));
    }
    let mut text = header.iter().map(|h| field(h)).collect::<Vec<_>>().join(",") + "\n";
    for r in &points {
        let mut row = vec![r.point.index.to_string()];
        row.extend(r.point.settings.iter().map(|(_, v)| v.clone()));
        row.push(r.point.seed.map(|s| s.to_string()).unwrap_or_default());
        row.push(r.status.clone());
        row.push(r.error.clone().unwrap_or_default().lines().next().unwrap_or_default().to_string());
        row.push(r.run_dir.as_ref().map(|p| p.display().to_string()).unwrap_or_default());
        for n in &names {
            let (last, best) = r.metrics.get(n).copied().unwrap_or((None, None));
            row.push(number(last));
            row.push(number(best));
        }
        text += &(row.iter().map(|f| field(f)).collect::<Vec<_>>().join(",") + "\n");
    }
    let csv = dir.join("sweep.csv");
    crate::fsutil::write_bytes_atomic(&csv, text.as_bytes())?;
    let metric = choose_metric(&names, metric)?;
    let mut png = None;
    if let Some(m) = &metric {
        if let Some(fig) = figure(&sweep, &points, m) {
            let path = dir.join("sweep.png");
            render_png(&fig, &path).with_context(|| format!("{}: cannot draw", path.display()))?;
            png = Some(path);
        }
    }
    Ok(Collected { csv, png, metric, points })
}

/// Lines for the terminal: per grid combination, the metric's mean (min-max over seeds) and how
/// many points finished.
pub fn report(c: &Collected) -> Vec<String> {
    let Some(metric) = &c.metric else { return vec!["no metrics logged yet".into()] };
    /// The metric's values, how many points finished, how many there are.
    type Group = (Vec<f64>, usize, usize);
    let mut groups: Vec<(String, Group)> = Vec::new();
    for r in &c.points {
        let label = r.point.settings.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ");
        let label = if label.is_empty() { "(all)".to_string() } else { label };
        let i = match groups.iter().position(|(l, _)| *l == label) {
            Some(i) => i,
            None => {
                groups.push((label, Default::default()));
                groups.len() - 1
            }
        };
        let g = &mut groups[i].1;
        g.2 += 1;
        if r.status == "finished" {
            g.1 += 1;
        }
        if let Some((Some(v), _)) = r.metrics.get(metric) {
            g.0.push(*v);
        }
    }
    let better = if goal(metric.rsplit('.').next().unwrap_or(metric)) == Goal::Max { "higher" } else { "lower" };
    let mut out = vec![format!("{metric} (last; {better} is better):")];
    for (label, (vs, finished, n)) in groups {
        let stat = if vs.is_empty() {
            "-".to_string()
        } else {
            let mean = vs.iter().sum::<f64>() / vs.len() as f64;
            let (lo, hi) = vs.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
            if vs.len() > 1 {
                format!("{mean:.4} ({lo:.4}-{hi:.4})")
            } else {
                format!("{mean:.4}")
            }
        };
        out.push(format!("  {label:<40} {stat:<26} {finished}/{n} finished"));
    }
    out
}

//! [`RunRecord`]: everything a run leaves behind, kept together: the run folder, the metric log,
//! the progress display, the optimizer-step counter and the checkpoint bookkeeping (what to
//! write on Ctrl-C, where a resumed run continues).

use super::checkpoint::{self, Checkpoint, CheckpointState, TrainState};
use super::metrics::MetricLog;
use super::progress::{Progress, ProgressMode};
use super::rundir::{now_iso, RunDir};
use super::summary::{metric_summary, RunStatus};
use crate::rng::HostRng;
use anyhow::{Context, Result};
use serde_json::{json, Map, Value};
use std::path::PathBuf;

/// How many checkpoints of one name `save_checkpoint` keeps unless told otherwise.
pub const DEFAULT_KEEP: usize = 2;

/// Facts about the run for `config.json`.
#[derive(Clone, Debug, Default)]
pub struct RunInfo {
    /// The script as given on the command line.
    pub script: PathBuf,
    /// The seed of the host generator.
    pub seed: u64,
    /// The device, in words (`cpu`, `cuda:0`).
    pub device: String,
    /// The `--device` asked for (`auto` records what it chose in `device`).
    pub device_requested: String,
    /// The precision models compute in (`f32`, `bf16`, `f16`).
    pub precision: String,
    /// `--set` overrides, in order.
    pub overrides: Vec<(String, String)>,
    /// The command line.
    pub command_line: Vec<String>,
}

/// The last point a resumed script can continue from: the script's state at its last
/// `save_checkpoint` (or at `resume`), and the step count then.
#[derive(Clone, Debug)]
struct SavePoint {
    name: String,
    epoch: u64,
    step: u64,
    user: Map<String, Value>,
}

/// What `resume()` hands back to the script.
#[derive(Clone, Debug, PartialEq)]
pub struct ResumePoint {
    /// Epochs done: continue from this epoch.
    pub epoch: u64,
    /// Optimizer steps done.
    pub step: u64,
    /// Batches of epoch `epoch` already trained (after a mid-epoch Ctrl-C); skip them.
    pub skip: u64,
    /// The script's own values saved with the checkpoint.
    pub user: Map<String, Value>,
    /// The checkpoint it came from (`None` on a fresh start).
    pub from: Option<PathBuf>,
}

/// Everything a run records (see the module documentation).
pub struct RunRecord {
    dir: Option<RunDir>,
    /// On a rank other than 0: rank 0's run folder, read (checkpoints to resume from), never written.
    shared: Option<RunDir>,
    info: RunInfo,
    /// The metric log (`log(tag, map)`).
    pub metrics: MetricLog,
    /// The progress display.
    pub progress: Progress,
    steps: u64,
    first_loss: Option<f64>,
    train: Option<TrainState>,
    save_point: Option<SavePoint>,
    /// `--resume`: the newest checkpoint found when the run started, and whether `resume()` used one.
    resuming: bool,
    resume_called: bool,
    started: String,
    previous_config: Option<Value>,
    resolved_config: Option<Value>,
}

impl RunRecord {
    /// A record without a folder (tests, `check`, `api`): metrics are kept in memory only.
    pub fn detached(mode: ProgressMode) -> Self {
        Self {
            dir: None,
            shared: None,
            info: RunInfo::default(),
            metrics: MetricLog::default(),
            progress: Progress::new(mode),
            steps: 0,
            first_loss: None,
            train: None,
            save_point: None,
            resuming: false,
            resume_called: false,
            started: now_iso(),
            previous_config: None,
            resolved_config: None,
        }
    }

    /// The record of a new run in `dir`: copies nothing yet; writes config.json.
    pub fn create(dir: RunDir, info: RunInfo, mode: ProgressMode) -> Result<Self> {
        let metrics = MetricLog::to_file(&dir.metrics_file())?;
        let r = Self { dir: Some(dir), info, metrics, ..Self::detached(mode) };
        r.write_config()?;
        Ok(r)
    }

    /// The record of a resumed run: metrics.jsonl is cut back to the newest checkpoint (records
    /// logged after it will be logged again) and continued.
    pub fn reopen(dir: RunDir, info: RunInfo, mode: ProgressMode) -> Result<Self> {
        let newest = checkpoint::latest(&dir.checkpoints(), None)?;
        let keep = Some(newest.as_ref().map_or(0, |c| c.state.metrics_records));
        let metrics = MetricLog::resume(&dir.metrics_file(), keep)?;
        let previous_config = dir.read_json("config.json").ok();
        let mut progress = Progress::new(mode);
        if let Some(c) = &newest {
            progress.resume_at(c.state.step, c.state.epoch);
        }
        let mut r = Self { dir: Some(dir), info, metrics, progress, previous_config, ..Self::detached(mode) };
        r.resuming = true;
        r.write_config()?;
        Ok(r)
    }

    /// The record of a rank other than 0 of a data-parallel run: metrics in memory only, nothing
    /// written; `shared` (rank 0's run folder) is where `resume` reads the checkpoints of a
    /// `--resume` run, so every rank continues from the same one.
    pub fn follower(shared: Option<RunDir>, resuming: bool, mode: ProgressMode) -> Result<Self> {
        let mut r = Self { shared, ..Self::detached(mode) };
        if resuming {
            let newest = r.newest_checkpoint()?;
            // The metric log continues where rank 0's does, so checkpoints record the same count.
            if let (Some(c), Some(d)) = (&newest, &r.shared) {
                r.metrics = MetricLog::detached_from(&d.metrics_file(), c.state.metrics_records)?;
            }
            r.resuming = true;
        }
        Ok(r)
    }

    /// The run folder, if the run has one (rank 0's, on rank 0 only).
    pub fn dir(&self) -> Option<&RunDir> {
        self.dir.as_ref()
    }

    /// The run folder this record reads: its own, or rank 0's on another rank.
    fn read_dir(&self) -> Option<&RunDir> {
        self.dir.as_ref().or(self.shared.as_ref())
    }

    /// The newest checkpoint of the run folder (what `--resume` continues from).
    pub fn newest_checkpoint(&self) -> Result<Option<Checkpoint>> {
        match self.read_dir() {
            Some(d) => checkpoint::latest(&d.checkpoints(), None),
            None => Ok(None),
        }
    }

    /// Whether this is a `--resume` run.
    pub fn is_resuming(&self) -> bool {
        self.resuming
    }

    /// Whether `--resume` was given but the script never called `resume()`.
    pub fn resume_unused(&self) -> bool {
        self.resuming && !self.resume_called
    }

    /// The `config.json` of the run.
    pub fn config_json(&self) -> Value {
        let overrides: Map<String, Value> =
            self.info.overrides.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect();
        let mut v = json!({
            "script": self.info.script.display().to_string(),
            "config": self.resolved_config.clone().unwrap_or(Value::Null),
            "overrides": overrides,
            "seed": self.info.seed,
            "device": self.info.device,
            "device_requested": self.info.device_requested,
            "dtype": self.info.precision,
            "samhost_version": env!("CARGO_PKG_VERSION"),
            "candle_version": env!("SAMHOST_CANDLE_VERSION"),
            "command_line": self.info.command_line,
            "started": self.started,
        });
        if let Some(prev) = &self.previous_config {
            // A resumed run keeps the first start time and lists every resumption.
            v["started"] = prev.get("started").cloned().unwrap_or(Value::Null);
            let mut resumed = prev.get("resumed").and_then(Value::as_array).cloned().unwrap_or_default();
            resumed.push(json!({ "at": self.started, "command_line": self.info.command_line }));
            v["resumed"] = Value::Array(resumed);
        }
        v
    }

    /// Writes `config.json` (when the run has a folder).
    pub fn write_config(&self) -> Result<()> {
        match &self.dir {
            Some(d) => d.write_json("config.json", &self.config_json()),
            None => Ok(()),
        }
    }

    /// The script resolved its config: recorded in config.json; an integer `epochs` key sizes
    /// the epoch progress bar.
    pub fn set_resolved_config(&mut self, config: Value) -> Result<()> {
        self.progress.set_total_epochs(config.get("epochs").and_then(Value::as_u64));
        self.resolved_config = Some(config);
        self.write_config()
    }

    /// The resolved config, if the script called `config()`.
    pub fn resolved_config(&self) -> Option<&Value> {
        self.resolved_config.as_ref()
    }

    /// Records one `log(tag, map)` call and shows it. Without a `step` key the record gets the
    /// number of optimizer steps taken so far.
    pub fn record_metrics(&mut self, tag: &str, mut metrics: Map<String, Value>) -> Result<()> {
        if !metrics.contains_key("step") && self.steps > 0 {
            metrics.insert("step".into(), Value::from(self.steps));
        }
        let epoch = metrics.get("epoch").and_then(Value::as_u64);
        let line = format_metrics(tag, &metrics);
        self.metrics.record(tag, metrics)?;
        self.progress.logged(epoch, &line);
        Ok(())
    }

    /// The loss of the first step of this process (the divergence bound's scale).
    pub fn first_loss(&self) -> Option<f64> {
        self.first_loss
    }

    /// Counts one optimizer step with its loss; returns the step's number (1-based).
    pub fn after_step(&mut self, loss: f64) -> u64 {
        if self.first_loss.is_none() && loss.is_finite() {
            self.first_loss = Some(loss);
        }
        self.steps += 1;
        self.progress.step(self.steps, loss);
        self.steps
    }

    /// Optimizer steps taken in the run so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Whether `resume` or `save_checkpoint` registered what Ctrl-C checkpoints.
    pub fn has_train_state(&self) -> bool {
        self.train.is_some()
    }

    /// Registers the objects Ctrl-C writes a checkpoint of.
    pub fn register(&mut self, train: TrainState) {
        self.train = Some(train);
    }

    fn checkpoints_dir(&self) -> Result<PathBuf> {
        match self.read_dir() {
            Some(d) => Ok(d.checkpoints()),
            None => anyhow::bail!("this session has no run folder (run the script with `samhost run`)"),
        }
    }

    fn state(
        &self,
        name: &str,
        epoch: u64,
        skip: u64,
        rng: &HostRng,
        user: Map<String, Value>,
    ) -> Result<CheckpointState> {
        let train = self.train.as_ref();
        let busy =
            |what: &str| anyhow::anyhow!("the {what} is in use by the step running now: checkpoint between steps");
        let optimizer = match train {
            Some(t) => t.optim.try_borrow().map_err(|_| busy("optimizer"))?.name().to_string(),
            None => String::new(),
        };
        let schedule = match train.and_then(|t| t.sched.as_ref()) {
            Some(s) => Some(s.try_borrow().map_err(|_| busy("schedule"))?.clone()),
            None => None,
        };
        Ok(CheckpointState {
            seq: 0,
            name: name.to_string(),
            epoch,
            step: self.steps,
            skip,
            interrupted: skip > 0,
            optimizer,
            schedule,
            rng: rng.state(),
            metrics_records: self.metrics.records().len(),
            dropout_rng: None,
            time: (self.metrics.elapsed() * 1000.0).round() / 1000.0,
            saved_at: now_iso(),
            user,
        })
    }

    /// `save_checkpoint`: writes a checkpoint of `train` after `epoch` epochs with the script's
    /// values `user`, keeping the newest `keep` of that name. Registers `train` for Ctrl-C.
    pub fn save_checkpoint(
        &mut self,
        train: TrainState,
        name: &str,
        epoch: u64,
        user: Map<String, Value>,
        keep: usize,
        rng: &HostRng,
    ) -> Result<PathBuf> {
        checkpoint::check_name(name)?;
        let dir = self.checkpoints_dir()?;
        self.train = Some(train.clone());
        let state = self.state(name, epoch, 0, rng, user.clone())?;
        // Another rank's state is rank 0's (every rank steps alike): rank 0 alone writes it.
        let path = if self.dir.is_none() && self.shared.is_some() {
            dir
        } else {
            checkpoint::save(&dir, &train, state, keep)?
        };
        self.save_point = Some(SavePoint { name: name.to_string(), epoch, step: self.steps, user });
        Ok(path)
    }

    /// `resume`: registers `train` for Ctrl-C; on a `--resume` run loads the newest checkpoint
    /// called `name` into it and returns where to continue; otherwise returns the start.
    pub fn resume(&mut self, train: TrainState, name: &str, rng: &HostRng) -> Result<ResumePoint> {
        checkpoint::check_name(name)?;
        self.resume_called = true;
        self.train = Some(train.clone());
        let found = if self.resuming { checkpoint::latest(&self.checkpoints_dir()?, Some(name))? } else { None };
        let Some(ck) = found else {
            self.save_point = Some(SavePoint { name: name.to_string(), epoch: 0, step: self.steps, user: Map::new() });
            return Ok(ResumePoint { epoch: 0, step: self.steps, skip: 0, user: Map::new(), from: None });
        };
        checkpoint::restore(&ck, &train, rng)?;
        let s = &ck.state;
        self.steps = s.step;
        self.progress.resume_at(s.step, s.epoch);
        self.save_point = Some(SavePoint {
            name: name.to_string(),
            epoch: s.epoch,
            step: s.step - s.skip.min(s.step),
            user: s.user.clone(),
        });
        Ok(ResumePoint { epoch: s.epoch, step: s.step, skip: s.skip, user: s.user.clone(), from: Some(ck.dir.clone()) })
    }

    /// After Ctrl-C: writes a checkpoint of the registered objects as they are now (the epoch of
    /// the last save, plus the steps done since as `skip`). `None` when nothing was registered.
    pub fn write_interrupt_checkpoint(&mut self, rng: &HostRng) -> Result<Option<PathBuf>> {
        let (Some(train), Some(dir)) = (self.train.clone(), self.dir.as_ref().map(|d| d.checkpoints())) else {
            return Ok(None);
        };
        let sp =
            self.save_point.clone().unwrap_or(SavePoint { name: String::new(), epoch: 0, step: 0, user: Map::new() });
        let skip = self.steps.saturating_sub(sp.step);
        let mut state = self.state(&sp.name, sp.epoch, skip, rng, sp.user)?;
        state.interrupted = true;
        let path = checkpoint::save(&dir, &train, state, 0)?;
        Ok(Some(path))
    }

    /// Ends the run: removes the bars, writes summary.json and a plot of every metric into
    /// plots/. Returns the plots written.
    pub fn finish(&mut self, status: &RunStatus) -> Result<Vec<PathBuf>> {
        self.progress.finish();
        let Some(dir) = self.dir.clone() else { return Ok(Vec::new()) };
        let records = self.metrics.records();
        let mut summary = json!({
            "status": status.name(),
            "error": status.error().map_or(Value::Null, Value::from),
            "steps": self.steps,
            "wall_time_s": (self.metrics.elapsed() * 10.0).round() / 10.0,
            "ended": now_iso(),
            "metrics": metric_summary(records),
        });
        if let Some(ck) = self.newest_checkpoint()? {
            summary["last_checkpoint"] = Value::from(ck.dir.display().to_string());
        }
        if crate::dist::is_parallel() {
            // Rank 0's view: the time in collectives includes waiting for the slowest rank.
            let c = crate::dist::comm_stats();
            summary["ranks"] = json!({
                "count": crate::dist::world().size(),
                "backend": crate::dist::world().backend(),
                "collective_calls": c.calls,
                "collective_mb": (c.bytes as f64 / 1e6 * 10.0).round() / 10.0,
                "collective_s": (c.seconds * 100.0).round() / 100.0,
            });
        }
        dir.write_json("summary.json", &summary)?;
        super::plot::plot_all(records, &dir.plots()).context("writing the plots")
    }
}

/// A log line: `[tag] key=value  key=value` (keys sorted, numbers to 4 decimals).
pub fn format_metrics(tag: &str, metrics: &Map<String, Value>) -> String {
    let mut keys: Vec<&String> = metrics.keys().collect();
    keys.sort();
    let parts: Vec<String> = keys
        .into_iter()
        .map(|k| {
            let v = &metrics[k];
            let text = match v.as_f64() {
                _ if v.is_i64() || v.is_u64() => v.to_string(),
                Some(f) => super::progress::format_number(f),
                None => v.to_string(),
            };
            format!("{k}={text}")
        })
        .collect();
    format!("[{tag}] {}", parts.join("  "))
}

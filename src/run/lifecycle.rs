//! [`Run`]: the lifecycle of one `samhost run`, drivable from Rust without a script engine.
//!
//! - [`Run::start`]: a resumed run takes its seed, dtype and `--set` overrides from the run
//!   folder's config.json (what is given now wins), then the [`Session`] is made;
//! - [`Run::open`]: the run folder is created (sources copied, config.json written) or reopened
//!   (metrics.jsonl cut back to the newest checkpoint), and Ctrl-C, SIGTERM and SIGHUP are
//!   handled from then on ([`super::signals`]);
//! - [`begin_step`] / [`end_step`] around every optimizer step: a pending Ctrl-C stops the run
//!   before the step, the step is counted and a non-finite loss ends the run naming the step;
//! - [`Run::end`]: the Ctrl-C checkpoint, summary.json, the plots and the closing lines.
//!
//! The script layer only builds the engine over [`Run::session`], evaluates the script and turns
//! its result into a [`RunStatus`].

use super::progress::ProgressMode;
use super::record::RunInfo;
use super::{RunDir, RunRecord, RunStatus};
use crate::session::{Session, SessionOptions, DEFAULT_SEED};
use crate::train::StepStats;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::SystemTime;

/// One run from start to end (see the module documentation).
pub struct Run {
    session: Rc<Session>,
    script: PathBuf,
    resume_dir: Option<RunDir>,
    runs_dir: Option<PathBuf>,
    info: RunInfo,
    mode: ProgressMode,
    seed_note: &'static str,
}

/// The error a step returns when Ctrl-C asked the run to stop before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// The `--set` overrides of a resumed run: those recorded in its config.json, then the ones
/// given now (which win).
pub fn merged_overrides(recorded: &serde_json::Value, given: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = recorded
        .get("overrides")
        .and_then(serde_json::Value::as_object)
        .map(|o| {
            o.iter()
                .filter(|(k, _)| !given.iter().any(|(g, _)| g == *k))
                .map(|(k, v)| (k.clone(), v.as_str().map(String::from).unwrap_or_else(|| v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    out.extend(given.iter().cloned());
    out
}

impl Run {
    /// Starts a run of `opts.script`: with `opts.resume`, opens that run folder and adopts its
    /// recorded seed, dtype and overrides unless given again; then makes the session. Fails on
    /// a missing script path, an unreadable run folder or an unknown device.
    pub fn start(mut opts: SessionOptions) -> Result<Self> {
        let Some(script) = opts.script.clone() else { bail!("no script given") };
        let resume_dir = opts.resume.as_deref().map(RunDir::open).transpose()?;
        let mut seed_note = if opts.seed == DEFAULT_SEED { " (the default; --seed N to change)" } else { "" };
        if let Some(prev) = resume_dir.as_ref().and_then(|d| d.read_json("config.json").ok()) {
            if !opts.seed_given {
                if let Some(seed) = prev.get("seed").and_then(serde_json::Value::as_u64) {
                    opts.seed = seed;
                    seed_note = " (recorded by the run)";
                }
            }
            if !opts.precision_given {
                if let Some(p) = prev.get("dtype").and_then(serde_json::Value::as_str).and_then(|p| p.parse().ok()) {
                    opts.precision = p;
                }
            }
            opts.overrides = merged_overrides(&prev, &opts.overrides);
        }
        // `--set seed=N` is the run's seed: one seed drives initialisation and whatever the
        // script seeds with its `seed` setting (noise, order, augmentation).
        if let Some((_, text)) = opts.overrides.iter().rev().find(|(k, _)| k == "seed") {
            let n: u64 = text
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("--set seed={text}: a seed is a non-negative integer"))?;
            if opts.seed_given && opts.seed != n {
                bail!("--seed {} and --set seed={n} disagree: give the seed once", opts.seed);
            }
            if opts.seed != n {
                seed_note = " (from --set seed)";
            }
            opts.seed = n;
            opts.seed_given = true;
        }
        // Several ranks: rank 0 speaks and writes; each rank on a machine takes its own GPU.
        let topo = crate::dist::topology();
        if topo.size > 1 {
            opts.quiet |= topo.rank != 0;
            if opts.device.trim().eq_ignore_ascii_case("cuda") {
                opts.device = format!("cuda:{}", topo.local_rank);
            }
        }
        let runs_dir = opts.runs_dir.clone();
        let mode = ProgressMode::detect(opts.quiet, opts.progress_every);
        let mut info = RunInfo {
            script: script.clone(),
            seed: opts.seed,
            device: String::new(),
            device_requested: opts.device.clone(),
            precision: opts.precision.name().into(),
            overrides: opts.overrides.clone(),
            command_line: opts.command_line.clone(),
        };
        let session = Rc::new(Session::new(opts)?);
        crate::dist::start(session.device())?;
        info.device = crate::device::device_name(session.device());
        Ok(Self { session, script, resume_dir, runs_dir, info, mode, seed_note })
    }

    /// The host state the script's bindings reach.
    pub fn session(&self) -> &Rc<Session> {
        &self.session
    }

    /// The script being run.
    pub fn script(&self) -> &Path {
        &self.script
    }

    /// The first line of a run: version, script, device, dtype and seed (and where the seed came from).
    pub fn banner(&self) -> String {
        let s = &self.session;
        let w = crate::dist::world();
        let ranks = if w.size() > 1 { format!(" x {} ranks ({})", w.size(), w.backend()) } else { String::new() };
        format!(
            "samhost {}: {} on {}{ranks}, {}, seed {}{}",
            env!("CARGO_PKG_VERSION"),
            self.script.display(),
            s.device_choice.describe(),
            s.precision,
            s.seed,
            self.seed_note
        )
    }

    /// Opens the run folder: reopens the `--resume` folder (noting when `text`, the script now,
    /// differs from the run's copy), or creates a new one under the runs folder and copies the
    /// script and `imported` (the modules it imports) into it; without either, the run keeps
    /// its records in memory. Ctrl-C, SIGTERM and SIGHUP are handled from here on.
    pub fn open(&mut self, text: &str, imported: &[PathBuf]) -> Result<()> {
        if !crate::dist::is_leader() {
            return self.follow();
        }
        let s = &self.session;
        let info = self.info.clone();
        let record = match (self.resume_dir.take(), &self.runs_dir) {
            (Some(dir), _) => {
                let copy = dir.script_dir().join(self.script.file_name().unwrap_or_default());
                if std::fs::read_to_string(&copy).is_ok_and(|t| t != text) {
                    s.say(&format!("note: {} differs from the run's copy {}", self.script.display(), copy.display()));
                }
                let record = RunRecord::reopen(dir, info, self.mode)?;
                match record.newest_checkpoint()? {
                    Some(c) => s.say(&format!(
                        "resuming {}: newest checkpoint {} ({} epochs done, step {})",
                        record.dir().map(|d| d.path().display().to_string()).unwrap_or_default(),
                        c.dir.display(),
                        c.state.epoch,
                        c.state.step
                    )),
                    None => s.say("note: the run folder has no checkpoint yet: starting from the beginning"),
                }
                Some(record)
            }
            (None, Some(runs)) => {
                let stem = self.script.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or("run".into());
                let dir = RunDir::create(runs, &stem, SystemTime::now())?;
                dir.copy_sources(&self.script, imported)?;
                s.say(&format!("run folder: {}", dir.path().display()));
                Some(RunRecord::create(dir, info, self.mode)?)
            }
            (None, None) => None,
        };
        if crate::dist::is_parallel() {
            // The other ranks learn where the run's records are.
            let path = record.as_ref().and_then(|r| r.dir()).map(|d| d.path().display().to_string());
            crate::dist::broadcast_text(&path.unwrap_or_default())?;
        }
        if let Some(record) = record {
            *s.record()? = record;
        }
        super::signals::install(s.interrupted.clone());
        Ok(())
    }

    /// [`Run::open`] on a rank other than 0: the run folder is rank 0's (its path comes from
    /// rank 0); this rank reads its checkpoints when resuming and writes nothing.
    fn follow(&mut self) -> Result<()> {
        let s = &self.session;
        let path = crate::dist::broadcast_text("")?;
        let shared = if path.is_empty() { None } else { Some(RunDir::open(Path::new(&path))?) };
        let resuming = self.resume_dir.take().is_some();
        *s.record()? = RunRecord::follower(shared, resuming, self.mode)?;
        super::signals::install(s.interrupted.clone());
        Ok(())
    }

    /// Ends the run with `status`: after Ctrl-C writes a checkpoint of the registered training
    /// state, then summary.json and the plots, and prints how the run ended (and, after Ctrl-C,
    /// the command that continues it, even with `--quiet`).
    pub fn end(&self, status: &RunStatus) -> Result<()> {
        let session = &self.session;
        let mut run = session.record()?;
        // A run that failed before doing anything leaves no folder behind (a bad --set, a
        // typo in the script): nothing in it would be worth keeping.
        let nothing_done = run.steps() == 0 && run.metrics.records().is_empty() && !run.is_resuming();
        if matches!(status, RunStatus::Failed(_)) && nothing_done && run.newest_checkpoint()?.is_none() {
            run.progress.finish();
            if let Some(dir) = run.dir().map(|d| d.path().to_path_buf()) {
                drop(run);
                std::fs::remove_dir_all(&dir).with_context(|| format!("{}: cannot remove", dir.display()))?;
                session.say(&format!("failed before its first step: no run folder kept ({} removed)", dir.display()));
            }
            return Ok(());
        }
        let interrupt_ck =
            if *status == RunStatus::Interrupted { run.write_interrupt_checkpoint(&session.rng)? } else { None };
        let plots = run.finish(status)?;
        let resume_unused = run.resume_unused();
        let steps = run.steps();
        let Some(dir) = run.dir().map(|d| d.path().to_path_buf()) else { return Ok(()) };
        drop(run);
        if resume_unused {
            session.say(
                "note: --resume was given but the script never called resume(model, opt, ...), so it ran from the beginning",
            );
        }
        if *status == RunStatus::Interrupted {
            let resume_cmd = format!("samhost run {} --resume {}", self.script.display(), dir.display());
            let msg = match interrupt_ck {
                Some(ck) => {
                    format!("interrupted at step {steps}: checkpoint {}\ncontinue with: {resume_cmd}", ck.display())
                }
                None => format!(
                    "interrupted at step {steps}; no checkpoint (the script had not called resume() or save_checkpoint())"
                ),
            };
            // Shown even with --quiet: it is the reason for the exit code.
            eprintln!("{}: {msg}", super::signals::name());
        }
        session.say(&format!(
            "{}: {} (summary.json, metrics.jsonl, {} plot{} in plots/)",
            status.name(),
            dir.display(),
            plots.len(),
            if plots.len() == 1 { "" } else { "s" }
        ));
        Ok(())
    }
}

/// Before an optimizer step: after Ctrl-C the run stops here, with nothing of the step done
/// (the error is [`Interrupted`]). With several ranks, a signal to any of them stops them all
/// here, before the same step.
pub fn begin_step(session: &Session) -> Result<()> {
    // With several ranks, all stop before the same step when any of them was signalled.
    if crate::dist::is_parallel() {
        let kinds = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];
        let mine = session.interrupt_pending().then(super::signals::first);
        let mut seen: Vec<f64> = kinds.iter().map(|&k| (mine == Some(k)) as u8 as f64).collect();
        // A flag set without a signal (tests) counts as Ctrl-C.
        seen[0] += (mine == Some(0)) as u8 as f64;
        crate::dist::sum(&mut seen)?;
        if let Some(i) = seen.iter().position(|&n| n > 0.0) {
            if mine.is_none() {
                super::signals::adopt(kinds[i]);
            }
            return Err(Interrupted.into());
        }
        return Ok(());
    }
    if session.interrupt_pending() {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// The divergence bound when `--max-loss` is not given: this many times the first loss.
pub const MAX_LOSS_FACTOR: f64 = 1e4;

/// After an optimizer step called `what`: counts it (progress, step number), then fails when
/// its loss is not finite or exceeds the divergence bound (`--max-loss`, else
/// [`MAX_LOSS_FACTOR`] times the first step's loss, at least that factor), naming the step.
/// Returns the step's number (1-based).
pub fn end_step(session: &Session, what: &str, stats: &StepStats) -> Result<u64> {
    let (step, first) = {
        let mut record = session.record()?;
        (record.after_step(stats.loss), record.first_loss())
    };
    if !stats.loss.is_finite() || !stats.sharp_loss.is_finite() {
        bail!(
            "{what}: the loss is not finite at step {step} (loss {}, sharp_loss {}): training diverged; lower the learning rate or rho",
            stats.loss,
            stats.sharp_loss
        );
    }
    let bound = session.max_loss.unwrap_or_else(|| MAX_LOSS_FACTOR * first.unwrap_or(1.0).abs().max(1.0));
    let worst = stats.loss.max(stats.sharp_loss);
    if worst > bound {
        bail!(
            "{what}: the loss {worst:e} at step {step} exceeds {bound:e} ({}): training diverged; lower the learning rate or rho",
            if session.max_loss.is_some() { "--max-loss".to_string() } else { format!("{MAX_LOSS_FACTOR:e} x the first loss; --max-loss sets it") }
        );
    }
    Ok(step)
}

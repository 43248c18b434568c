//! The host state every script binding reaches: device, seeded generator, `--set` overrides,
//! output settings and the interrupt flag.

use crate::device::{parse_device, DeviceChoice};
use crate::models::registry::{build_model, ArchConfig};
use crate::models::{Model, Precision};
use crate::rng::HostRng;
use crate::run::progress::ProgressMode;
use crate::run::RunRecord;
use anyhow::Result;
use candle_core::Device;
use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// After Ctrl-C, how long a training script may go on without starting a step (evaluation,
/// work after training) before it is stopped wherever it is.
pub const INTERRUPT_GRACE: Duration = Duration::from_secs(5);

/// The seed used when `--seed` is not given.
pub const DEFAULT_SEED: u64 = 42;

/// What the command line asked for.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// `cpu`, `cuda`, `cuda:N` or `auto`.
    pub device: String,
    /// The precision models compute in (`--dtype`): f32, or bf16/f16 mixed precision.
    pub precision: Precision,
    /// Whether `--dtype` was given (a resumed run otherwise takes the recorded one).
    pub precision_given: bool,
    /// Seed of every random source of the host.
    pub seed: u64,
    /// `--set KEY=VALUE` overrides, in order.
    pub overrides: Vec<(String, String)>,
    /// Print errors only.
    pub quiet: bool,
    /// The script being run or checked, if any.
    pub script: Option<PathBuf>,
    /// Whether `--seed` was given (a resumed run otherwise takes the recorded seed).
    pub seed_given: bool,
    /// Folder that receives the run folders (`--runs-dir`); `None`: no run folder.
    pub runs_dir: Option<PathBuf>,
    /// `--resume RUN_DIR`: continue that run.
    pub resume: Option<PathBuf>,
    /// Steps between two progress lines when stderr is not a terminal.
    pub progress_every: u64,
    /// The command line, for the run's config.json.
    pub command_line: Vec<String>,
    /// Never touch the network: Hub files come from the cache only (as `HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// `--max-loss`: a step whose loss exceeds it stops the run as diverged.
    pub max_loss: Option<f64>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            device: "cpu".into(),
            precision: Precision::F32,
            precision_given: false,
            seed: DEFAULT_SEED,
            overrides: Vec::new(),
            quiet: true,
            script: None,
            seed_given: false,
            runs_dir: None,
            resume: None,
            progress_every: 100,
            command_line: Vec::new(),
            offline: false,
            max_loss: None,
        }
    }
}

/// Host state shared by all bindings of one engine.
pub struct Session {
    /// Where tensors and models live, what was asked for, and why `auto` chose it.
    pub device_choice: DeviceChoice,
    /// The precision new models compute in (`--dtype`).
    pub precision: Precision,
    /// The seed the generator started from.
    pub seed: u64,
    /// The generator behind every random number the host draws.
    pub rng: HostRng,
    /// `--set` overrides.
    pub overrides: Vec<(String, String)>,
    /// Override keys that a `config()` call consumed.
    pub used_overrides: RefCell<BTreeSet<String>>,
    /// Print errors only.
    pub quiet: bool,
    /// The script being run or checked.
    pub script: Option<PathBuf>,
    /// Set by Ctrl-C: the script stops at the next safe point (see [`Session::stop_requested`]).
    pub interrupted: Arc<AtomicBool>,
    /// When the engine first saw the interrupt flag.
    interrupt_seen: Cell<Option<Instant>>,
    /// Never touch the network (`--offline`; `HF_HUB_OFFLINE=1` is read where the Hub is used).
    pub offline: bool,
    /// `--max-loss` (see [`crate::run::end_step`]).
    pub max_loss: Option<f64>,
    /// The configuration the script resolved with `config()`, as JSON.
    pub resolved_config: RefCell<Option<serde_json::Value>>,
    /// The run's record: folder, metric log, progress display, step counter, checkpoints.
    pub run: RefCell<RunRecord>,
}

impl Session {
    /// Where tensors and models live.
    pub fn device(&self) -> &Device {
        &self.device_choice.device
    }

    /// A model of `cfg` on the session's device, initialised from its generator, computing in its
    /// precision.
    pub fn build_model(&self, cfg: &ArchConfig) -> Result<Model> {
        let model = build_model(cfg, &self.rng, self.device())?;
        model.set_precision(self.precision);
        Ok(model)
    }

    /// A session from command-line options; fails on an unknown or unavailable device.
    pub fn new(opts: SessionOptions) -> Result<Self> {
        let device_choice = parse_device(&opts.device)?;
        let mode = ProgressMode::detect(opts.quiet, opts.progress_every);
        Ok(Self {
            device_choice,
            precision: opts.precision,
            seed: opts.seed,
            rng: HostRng::new(opts.seed),
            overrides: opts.overrides,
            used_overrides: RefCell::new(BTreeSet::new()),
            quiet: opts.quiet,
            script: opts.script,
            interrupted: Arc::new(AtomicBool::new(false)),
            interrupt_seen: Cell::new(None),
            offline: opts.offline,
            max_loss: opts.max_loss,
            resolved_config: RefCell::new(None),
            run: RefCell::new(RunRecord::detached(mode)),
        })
    }

    /// A quiet CPU session with the default seed (tests, `check`, `api`).
    pub fn cpu() -> Self {
        match Self::new(SessionOptions::default()) {
            Ok(s) => s,
            Err(_) => unreachable!("the CPU device always exists"),
        }
    }

    /// A quiet CPU session for checking `script` (module paths resolve beside it).
    pub fn cpu_for(script: &std::path::Path) -> Self {
        let opts = SessionOptions { script: Some(script.to_path_buf()), ..SessionOptions::default() };
        match Self::new(opts) {
            Ok(s) => s,
            Err(_) => unreachable!("the CPU device always exists"),
        }
    }

    /// Whether the script must stop now (asked between any two script operations). After Ctrl-C a
    /// script that registered its training state (`resume` / `save_checkpoint`) runs on to the
    /// start of its next optimizer step, so the step in progress and its bookkeeping (schedule,
    /// counters, logging) complete and the checkpoint is exact; the steps stop themselves (see
    /// [`Session::interrupt_pending`]). Without a registered state, or when no step starts within
    /// [`INTERRUPT_GRACE`], the script stops at once. With several ranks the script never stops
    /// here, on one rank alone: every rank stops at the start of the same step (a second signal
    /// still ends the process at once).
    pub fn stop_requested(&self) -> bool {
        if !self.interrupted.load(Ordering::Relaxed) || crate::dist::is_parallel() {
            return false;
        }
        let registered = self.run.try_borrow().map(|r| r.has_train_state()).unwrap_or(true);
        let seen = match self.interrupt_seen.get() {
            Some(t) => t,
            None => {
                let now = Instant::now();
                self.interrupt_seen.set(Some(now));
                if registered {
                    self.say("interrupt: finishing the current step, then writing a checkpoint (Ctrl-C again to stop at once)");
                }
                now
            }
        };
        !registered || seen.elapsed() >= INTERRUPT_GRACE
    }

    /// Whether Ctrl-C was pressed: an optimizer step about to start stops the script instead.
    pub fn interrupt_pending(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
    }

    /// The run record, for writing; an error (never a panic) when a caller up the stack holds it.
    pub fn record(&self) -> Result<std::cell::RefMut<'_, RunRecord>> {
        self.run.try_borrow_mut().map_err(|_| anyhow::anyhow!("the run record is in use"))
    }

    /// Records one `log(tag, map)` call.
    pub fn record_metrics(&self, tag: &str, metrics: serde_json::Map<String, serde_json::Value>) -> Result<()> {
        self.record()?.record_metrics(tag, metrics)
    }

    /// Records the config the script resolved (config.json, the epoch bar's length).
    pub fn set_resolved_config(&self, config: serde_json::Value) -> Result<()> {
        *self.resolved_config.try_borrow_mut().map_err(|_| anyhow::anyhow!("the resolved config is in use"))? =
            Some(config.clone());
        self.record()?.set_resolved_config(config)
    }

    /// Prints a line unless `--quiet` (above the progress bars when they are shown).
    pub fn say(&self, line: &str) {
        if !self.quiet {
            match self.run.try_borrow() {
                Ok(r) => r.progress.println(line),
                Err(_) => eprintln!("{line}"),
            }
        }
    }
}

//! Command-line definitions.

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Run Sharpness-Aware Minimization experiments written as Rhai scripts.
#[derive(Debug, Parser)]
#[command(name = "samhost", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run an experiment script.
    Run(RunArgs),
    /// Compile a script and the modules it imports without running it: syntax errors and calls
    /// of unknown functions, with file:line:col.
    Check {
        /// The script.
        script: PathBuf,
    },
    /// Overlay one metric of several runs in one PNG with a legend (e.g. SAM against SGD). Each
    /// run is labelled by the config values that differ between the runs.
    Plot(PlotArgs),
    /// Measure the flatness of a saved model: the Hessian's top eigenvalue and trace, adaptive
    /// sharpness and a 1-D loss landscape, written to RUN_DIR/diagnostics/.
    Sharpness(SharpnessArgs),
    /// Run a script over a grid of settings (and seeds): each point a run of its own, here N at a
    /// time or as a Slurm job array (--slurm), gathered into sweep.csv and sweep.png.
    Sweep(SweepArgs),
    /// Print the script API reference, generated from the registered functions.
    Api {
        /// Print the reference as JSON (Rhai's function metadata).
        #[arg(long)]
        json: bool,
        /// Write Rhai definition files for editor autocompletion into this folder.
        #[arg(long, value_name = "DIR")]
        definitions: Option<PathBuf>,
    },
}

/// Arguments of `samhost run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The script to run.
    pub script: PathBuf,
    /// Where tensors live: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Precision of the forward and backward passes: f32, or bf16 mixed precision (master
    /// weights, gradients, optimizer state and the SAM ascent norm stay f32)
    /// [default: f32; with --resume, the run's recorded dtype].
    #[arg(long, value_parser = parse_precision)]
    pub dtype: Option<crate::models::Precision>,
    /// Seed of every random source (initialisation, shuffles, label noise, augmentation)
    /// [default: 42; with --resume, the run's recorded seed].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Override a setting of the script's config(#{...}): KEY=VALUE, parsed to the default's type.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub set: Vec<(String, String)>,
    /// Folder that receives the run folders.
    #[arg(long, value_name = "DIR", default_value = "runs")]
    pub runs_dir: PathBuf,
    /// Continue the run in this folder from its newest checkpoint (the script calls `resume`);
    /// its recorded seed and --set values are used unless given again.
    #[arg(long, value_name = "RUN_DIR")]
    pub resume: Option<PathBuf>,
    /// When stderr is not a terminal: print a progress line every N optimizer steps (0: never).
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub progress_every: u64,
    /// Print errors only from the host (no banner, config, progress or closing lines); the
    /// script's own `print` still prints.
    #[arg(long, short)]
    pub quiet: bool,
    /// Never touch the network: Hub models come from the local cache only (as HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
    /// Stop the run as diverged when a step's loss exceeds this (default: 10,000 times the first
    /// step's loss, at least 10,000); a NaN or infinite loss always stops it.
    #[arg(long, value_name = "LOSS")]
    pub max_loss: Option<f64>,
}

/// Arguments of `samhost sweep`.
#[derive(Debug, clap::Args)]
pub struct SweepArgs {
    /// The script to sweep (not with --collect or --task).
    #[arg(required_unless_present_any = ["collect", "task"])]
    pub script: Option<PathBuf>,
    /// A grid axis: KEY=V1,V2,... (a setting of the script's config); repeat for more axes.
    #[arg(long = "grid", value_name = "KEY=V1,V2,...")]
    pub grid: Vec<String>,
    /// Run every grid point with seeds 1..N (`--seed`) [default: the script's seed, once].
    #[arg(long, value_name = "N")]
    pub seeds: Option<u64>,
    /// How many points run at once here (each gets cores/N threads).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub jobs: usize,
    /// A setting every point gets: KEY=VALUE.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub set: Vec<(String, String)>,
    /// Folder that receives the sweep folder.
    #[arg(long, value_name = "DIR", default_value = "runs")]
    pub runs_dir: PathBuf,
    /// Write a Slurm job-array script (one task per point) instead of running the points.
    #[arg(long)]
    pub slurm: bool,
    /// Gather the results of the sweep in this folder (after a --slurm sweep, or a partial one).
    #[arg(long, value_name = "SWEEP_DIR", conflicts_with_all = ["script", "task"])]
    pub collect: Option<PathBuf>,
    /// Run one point of the sweep in --dir (what each Slurm task runs).
    #[arg(long, value_name = "N", requires = "dir")]
    pub task: Option<usize>,
    /// The sweep folder of --task.
    #[arg(long, value_name = "SWEEP_DIR")]
    pub dir: Option<PathBuf>,
    /// The metric drawn in sweep.png and summarised (TAG.METRIC or METRIC) [default: the first
    /// accuracy].
    #[arg(long)]
    pub metric: Option<String>,
    /// Passed to every run: where tensors live.
    #[arg(long)]
    pub device: Option<String>,
    /// Passed to every run: the precision (f32, bf16).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Passed to every run: Hub files from the cache only.
    #[arg(long)]
    pub offline: bool,
}

/// Arguments of `samhost sharpness`.
#[derive(Debug, clap::Args)]
pub struct SharpnessArgs {
    /// The run folder (its checkpoints/ hold the model).
    pub run: PathBuf,
    /// Which checkpoint: its folder name (e.g. epoch-0010) or its name; the newest by default.
    #[arg(long, value_name = "NAME")]
    pub checkpoint: Option<String>,
    /// The examples to measure on (anything `load_dataset` reads); default: the run's `data` setting.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// How many examples of it (the first ones).
    #[arg(long, default_value_t = 512)]
    pub examples: usize,
}

/// Arguments of `samhost plot`.
#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// Run folders (or their metrics.jsonl files).
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
    /// The metric to draw [default: accuracy when logged, else the first metric].
    #[arg(long)]
    pub metric: Option<String>,
    /// The PNG to write [default: METRIC.png].
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// The horizontal axis: step, epoch or record [default: the finest that moves].
    #[arg(long)]
    pub x: Option<String>,
}

/// Parses `--dtype`.
pub fn parse_precision(s: &str) -> Result<crate::models::Precision, String> {
    s.parse().map_err(|e: anyhow::Error| e.to_string())
}

/// Parses `KEY=VALUE`.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

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
    /// Seed of every random source (initialisation, shuffles, label noise, augmentation).
    #[arg(long, default_value_t = crate::session::DEFAULT_SEED)]
    pub seed: u64,
    /// Override a setting of the script's config(#{...}): KEY=VALUE, parsed to the default's type.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    pub set: Vec<(String, String)>,
    /// Folder that receives the run folders.
    #[arg(long, value_name = "DIR", default_value = "runs")]
    pub runs_dir: PathBuf,
    /// Print errors only.
    #[arg(long, short)]
    pub quiet: bool,
    /// Never touch the network: Hub models come from the local cache only (as HF_HUB_OFFLINE=1).
    #[arg(long)]
    pub offline: bool,
}

/// Parses `KEY=VALUE`.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(format!("`{s}` is not KEY=VALUE")),
    }
}

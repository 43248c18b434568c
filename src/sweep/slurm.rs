//! `samhost sweep --slurm`: an sbatch script that runs the sweep as a job array, one task per
//! point (`SLURM_ARRAY_TASK_ID` picks it), each task a `samhost sweep --task N --dir DIR`.

use super::grid::Sweep;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Writes `DIR/sweep.sbatch` for the sweep in `dir` and returns its path.
pub fn write_sbatch(sweep: &Sweep, dir: &Path) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the samhost binary for the job script")?;
    let dir = dir.canonicalize().with_context(|| format!("{}: cannot resolve", dir.display()))?;
    let stem = sweep.script.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "sweep".into());
    let last = sweep.points.len().saturating_sub(1);
    let quote = |p: &Path| format!("'{}'", p.display().to_string().replace('\'', r"'\''"));
    let text = format!(
        "#!/bin/bash\n\
         #SBATCH --job-name=\"sweep-{stem}\"\n\
         #SBATCH --array=0-{last}\n\
         #SBATCH --output=\"{pattern}/points/%3a/slurm-%A_%a.out\"\n\
         # Written by `samhost sweep --slurm`: {n} point(s) of {script}.\n\
         # Add your cluster's #SBATCH options (--time, --cpus-per-task, --mem, --partition, --gres) before\n\
         # the first command below, then\n\
         #   sbatch {sbatch}\n\
         # and when the tasks have ended:\n\
         #   samhost sweep --collect {out}\n\
         set -euo pipefail\n\
         exec {exe} sweep --task \"$SLURM_ARRAY_TASK_ID\" --dir {dirq}\n",
        out = dir.display(),
        pattern = dir.display().to_string().replace('%', "%%"),
        n = sweep.points.len(),
        script = sweep.script.display(),
        sbatch = dir.join("sweep.sbatch").display(),
        dirq = quote(&dir),
        exe = quote(&exe),
    );
    let path = dir.join("sweep.sbatch");
    crate::fsutil::write_bytes_atomic(&path, text.as_bytes())?;
    Ok(path)
}

//! `samhost sweep`: a grid of settings (and seeds) over one script, each point a `samhost run`
//! in a folder of its own, run here N at a time or as a Slurm job array, and gathered into
//! `sweep.csv` (the settings, the last and best value of every metric) and `sweep.png`.
//!
//! A sweep folder holds `sweep.json` (the script, the grid, the points), `points/NNN/` (the
//! runs folder of point NNN, its `log.txt`, and for Slurm its output), `sweep.sbatch` when asked,
//! and the gathered `sweep.csv` / `sweep.png`.

pub mod collect;
pub mod grid;
pub mod local;
pub mod slurm;

pub use grid::{Sweep, SweepPoint};

use anyhow::Result;

/// `samhost sweep`: runs, writes the Slurm script, runs one task or gathers, as the arguments say;
/// returns the exit code and the lines to print.
pub fn command(a: crate::cli::SweepArgs) -> Result<(i32, Vec<String>)> {
    if let (Some(task), Some(dir)) = (a.task, &a.dir) {
        return Ok((local::run_task(dir, task)?, Vec::new()));
    }
    if let Some(dir) = &a.collect {
        let c = collect::collect(dir, a.metric.as_deref())?;
        return Ok((0, written(&c)));
    }
    let Some(script) = &a.script else { anyhow::bail!("give the script to sweep") };
    let grid = a.grid.iter().map(|g| grid::parse_grid(g)).collect::<Result<Vec<_>>>()?;
    let mut run_args = Vec::new();
    for (flag, v) in [("--device", &a.device), ("--dtype", &a.dtype)] {
        if let Some(v) = v {
            run_args.extend([flag.to_string(), v.clone()]);
        }
    }
    if a.offline {
        run_args.push("--offline".into());
    }
    let sweep = Sweep::new(script, grid, a.set.clone(), run_args, a.seeds)?;
    let dir = sweep.create_dir(&a.runs_dir)?;
    sweep.write(&dir)?;
    if a.slurm {
        for p in &sweep.points {
            std::fs::create_dir_all(Sweep::point_dir(&dir, p.index))?;
        }
        let path = slurm::write_sbatch(&sweep, &dir)?;
        return Ok((
            0,
            vec![
                format!("{} point(s); wrote {}", sweep.points.len(), path.display()),
                format!("submit: sbatch {}    gather: samhost sweep --collect {}", path.display(), dir.display()),
            ],
        ));
    }
    eprintln!(
        "sweep: {} point(s) of {}, {} at a time, in {}",
        sweep.points.len(),
        script.display(),
        a.jobs.max(1),
        dir.display()
    );
    let not_finished = local::run_all(&sweep, &dir, a.jobs)?;
    let c = collect::collect(&dir, a.metric.as_deref())?;
    Ok((if not_finished > 0 { 1 } else { 0 }, written(&c)))
}

fn written(c: &collect::Collected) -> Vec<String> {
    let mut out = collect::report(c);
    out.push(format!("wrote {}", c.csv.display()));
    if let Some(p) = &c.png {
        out.push(format!("wrote {}", p.display()));
    }
    out
}

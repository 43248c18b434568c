//! Running sweep points as `samhost run` processes: here, at most N at a time, or one point (the
//! task of a Slurm job array).

use super::grid::{Sweep, SweepPoint};
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The program that runs the points: this samhost binary.
fn samhost_exe() -> Result<PathBuf> {
    std::env::current_exe().context("cannot find the samhost binary to run the sweep's points")
}

/// Starts point `p` of the sweep in `dir`, its output into `points/NNN/log.txt`. `threads` sets
/// `RAYON_NUM_THREADS` unless the environment already does.
fn start(sweep: &Sweep, dir: &Path, p: &SweepPoint, threads: Option<usize>) -> Result<Child> {
    let pdir = Sweep::point_dir(dir, p.index);
    std::fs::create_dir_all(&pdir).with_context(|| format!("{}: cannot create", pdir.display()))?;
    let resume = resumable(&pdir.join("runs"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resume.is_some())
        .truncate(resume.is_none())
        .open(pdir.join("log.txt"))
        .with_context(|| format!("{}: cannot write log.txt", pdir.display()))?;
    let mut args = sweep.run_command(p, &pdir.join("runs"));
    if let Some(run) = &resume {
        args.extend(["--resume".to_string(), run.display().to_string()]);
    }
    let mut cmd = Command::new(samhost_exe()?);
    cmd.args(args).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    if let (Some(n), None) = (threads, std::env::var_os("RAYON_NUM_THREADS")) {
        cmd.env("RAYON_NUM_THREADS", n.to_string());
    }
    cmd.spawn().with_context(|| format!("point {} ({}): cannot start samhost run", p.index, p.label()))
}

/// The point's run to continue: its newest run folder when that did not finish and has a
/// checkpoint (a Slurm task requeued after preemption, or a point rerun with `--task`).
fn resumable(runs: &Path) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::fs::read_dir(runs).ok()?.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    let run = dirs.pop()?;
    let status = std::fs::read_to_string(run.join("summary.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["status"].as_str().map(str::to_string));
    let has_checkpoint = std::fs::read_dir(run.join("checkpoints")).is_ok_and(|mut d| d.next().is_some());
    (status.as_deref() != Some("finished") && has_checkpoint).then_some(run)
}

/// Notes how point `index`'s run ended (`points/NNN/exit.json`: its exit code), so a run that
/// failed before keeping a run folder is still reported as failed.
fn note_exit(dir: &Path, index: usize, code: i32) -> Result<()> {
    let text = serde_json::json!({ "exit_code": code }).to_string();
    crate::fsutil::write_bytes_atomic(&Sweep::point_dir(dir, index).join("exit.json"), text.as_bytes())
}

/// Runs one point in the foreground (a Slurm task); returns its exit code.
pub fn run_task(dir: &Path, index: usize) -> Result<i32> {
    let sweep = Sweep::read(dir)?;
    let Some(p) = sweep.points.get(index) else {
        anyhow::bail!(
            "task {index}: the sweep in {} has points 0..{}",
            dir.display(),
            sweep.points.len().saturating_sub(1)
        );
    };
    eprintln!("sweep task {index}: {}", p.label());
    let status = start(&sweep, dir, p, None)?.wait().context("waiting for the point's run")?;
    let code = status.code().unwrap_or(1);
    note_exit(dir, index, code)?;
    Ok(code)
}

/// Runs every point, `jobs` at a time, printing one line per point as it ends. Ctrl-C stops
/// starting points (those running get the signal too, checkpoint and stop). Returns how many
/// points did not finish.
pub fn run_all(sweep: &Sweep, dir: &Path, jobs: usize) -> Result<usize> {
    let jobs = jobs.max(1);
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let threads = (cores / jobs).max(1);
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    let total = sweep.points.len();
    let mut pending = sweep.points.iter();
    let mut running: Vec<(usize, Child, Instant)> = Vec::new();
    let (mut done, mut failed) = (0usize, 0usize);
    loop {
        while running.len() < jobs && !stop.load(Ordering::SeqCst) {
            let Some(p) = pending.next() else { break };
            running.push((p.index, start(sweep, dir, p, Some(threads))?, Instant::now()));
        }
        if running.is_empty() {
            break;
        }
        let mut i = 0;
        while i < running.len() {
            if let Some(status) = running[i].1.try_wait().context("waiting for a point's run")? {
                let (index, _, started) = running.remove(i);
                note_exit(dir, index, status.code().unwrap_or(1))?;
                done += 1;
                let p = &sweep.points[index];
                let secs = started.elapsed().as_secs_f64();
                if status.success() {
                    eprintln!("[{done}/{total}] {}: finished in {secs:.0} s", p.label());
                } else {
                    failed += 1;
                    let log = Sweep::point_dir(dir, index).join("log.txt");
                    let last = std::fs::read_to_string(&log)
                        .ok()
                        .and_then(|t| t.lines().rev().find(|l| l.starts_with("error")).map(str::to_string))
                        .unwrap_or_else(|| format!("exit status {status}"));
                    eprintln!("[{done}/{total}] {}: failed after {secs:.0} s: {last} ({})", p.label(), log.display());
                }
            } else {
                i += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let not_started = total - done;
    if not_started > 0 {
        eprintln!(
            "sweep interrupted: {not_started} point(s) not run; `samhost sweep --collect {}` gathers the rest",
            dir.display()
        );
    }
    Ok(failed + not_started)
}

//! `samhost sweep`: a grid run here N at a time, gathered into sweep.csv and sweep.png; a failing
//! setting reported per point; the Slurm job-array script run task by task as Slurm would (by
//! setting SLURM_ARRAY_TASK_ID), then `--collect`.

use crate::common::*;
use std::path::{Path, PathBuf};

const SCRIPT: &str = r#"
let cfg = config(#{ lr: 0.1, width: 8, seed: 42 });
let train = synthetic(#{ n: 64, classes: 3, shape: [1, 4, 4], seed: 1 });
let m = mlp([16, cfg.width, 3]);
let opt = sgd(m, #{ lr: cfg.lr });
for e in 0..2 {
    for b in train.batches(32, #{ seed: cfg.seed, epoch: e }) { sam_step(m, opt, b, #{ rho: 0.05 }); }
    let ev = evaluate(m, train);
    log("test", #{ epoch: e + 1, accuracy: ev.accuracy, loss: ev.loss });
}
"#;

fn sweep_dir(runs: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(runs).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(dirs.len(), 1, "one sweep folder: {dirs:?}");
    dirs[0].clone()
}

fn csv(dir: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(dir.join("sweep.csv"))
        .unwrap()
        .lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn a_grid_runs_here_and_is_gathered() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "s.rhai", SCRIPT);
    let o = run_in(
        tmp.path(),
        &[
            "sweep",
            "s.rhai",
            "--grid",
            "lr=0.05,0.2",
            "--grid",
            "width=4,16",
            "--seeds",
            "2",
            "--jobs",
            "2",
            "--runs-dir",
            "out",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = sweep_dir(&tmp.path().join("out"));
    let rows = csv(&dir);
    assert_eq!(rows[0][..7], ["point", "lr", "width", "seed", "status", "error", "run_dir"]);
    assert!(rows[0].contains(&"test.accuracy".to_string()) && rows[0].contains(&"test.loss.best".to_string()));
    assert_eq!(rows.len(), 9, "a header and 8 points");
    let col = |name: &str| rows[0].iter().position(|h| h == name).unwrap();
    for row in &rows[1..] {
        assert_eq!(row[col("status")], "finished", "{row:?}");
        // The run got the point's settings and seed.
        let config = json(&PathBuf::from(&row[col("run_dir")]).join("config.json"));
        assert_eq!(config["config"]["lr"].as_f64().unwrap().to_string(), row[col("lr")]);
        assert_eq!(config["config"]["width"].to_string(), row[col("width")]);
        assert_eq!(config["seed"].to_string(), row[col("seed")]);
        let acc: f64 = row[col("test.accuracy")].parse().unwrap();
        assert!((0.0..=1.0).contains(&acc));
    }
    assert_eq!(rows[1][1..4], ["0.05", "4", "1"]);
    assert_eq!(rows[8][1..4], ["0.2", "16", "2"]);
    assert!(dir.join("sweep.png").is_file());
    let err = stderr(&o);
    assert!(err.contains("[8/8]") && err.contains("test.accuracy (last; higher is better)"), "{err}");
    assert!(err.contains("lr=0.2 width=16") && err.contains("2/2 finished"), "{err}");
}

#[test]
fn a_failing_setting_is_reported_per_point() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "s.rhai", SCRIPT);
    let o = run_in(tmp.path(), &["sweep", "s.rhai", "--grid", "lrr=0.1,0.2", "--runs-dir", "out"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("failed after"), "{}", stderr(&o));
    let rows = csv(&sweep_dir(&tmp.path().join("out")));
    let (status, error) =
        (rows[0].iter().position(|h| h == "status").unwrap(), rows[0].iter().position(|h| h == "error").unwrap());
    for row in &rows[1..] {
        assert_eq!(row[status], "failed");
        assert!(row[error].contains("lrr"), "the error names the unknown setting: {row:?}");
    }
    for (args, needle) in [
        (vec!["sweep", "s.rhai", "--grid", "lr"], "expected KEY=V1,V2"),
        (vec!["sweep", "s.rhai", "--grid", "lr=0.1", "--set", "lr=0.2"], "both a --grid key and a --set"),
        (vec!["sweep", "--collect", "."], "sweep.json: cannot read"),
        (vec!["sweep", "nope.rhai", "--grid", "lr=1"], "nope.rhai: no such script"),
    ] {
        let o = run_in(tmp.path(), &args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        assert!(stderr(&o).contains(needle), "{args:?}: {}", stderr(&o));
    }
}

#[test]
fn the_slurm_array_script_runs_one_point_per_task() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "s.rhai", SCRIPT);
    let o = run_in(
        tmp.path(),
        &["sweep", "s.rhai", "--grid", "lr=0.05,0.2", "--seeds", "2", "--slurm", "--runs-dir", "out"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = sweep_dir(&tmp.path().join("out"));
    let sbatch = dir.join("sweep.sbatch");
    let text = std::fs::read_to_string(&sbatch).unwrap();
    assert!(text.contains("#SBATCH --array=0-3") && text.contains("SLURM_ARRAY_TASK_ID"), "{text}");
    assert!(!dir.join("points/000/runs").exists(), "--slurm runs nothing itself");
    // Slurm runs the script with the task's id set: tasks 2 and 0.
    for task in ["2", "0"] {
        let o = std::process::Command::new("bash")
            .arg(&sbatch)
            .env("SLURM_ARRAY_TASK_ID", task)
            .env("SLURM_JOB_ID", "77")
            .current_dir(tmp.path())
            .output()
            .unwrap();
        assert!(o.status.success(), "task {task}: {}", stderr(&o));
    }
    let o = run_in(tmp.path(), &["sweep", "--collect", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = csv(&dir);
    let status = rows[0].iter().position(|h| h == "status").unwrap();
    let got: Vec<&str> = rows[1..].iter().map(|r| r[status].as_str()).collect();
    assert_eq!(got, ["finished", "not run", "finished", "not run"]);
    assert_eq!(rows[3][1..3], ["0.2", "1"], "task 2 is lr=0.2, seed 1");
    // A task beyond the array is refused.
    let o = run_in(tmp.path(), &["sweep", "--task", "9", "--dir", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("points 0..3"), "{}", stderr(&o));
}

#[test]
fn a_point_killed_before_its_summary_is_reported_failed_not_running() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "s.rhai", SCRIPT);
    let o = run_in(tmp.path(), &["sweep", "s.rhai", "--grid", "lr=0.05,0.2", "--slurm", "--runs-dir", "out"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = sweep_dir(&tmp.path().join("out"));
    // Point 0: a run folder without summary.json and an exit code (killed); point 1: still going.
    for p in ["000", "001"] {
        std::fs::create_dir_all(dir.join("points").join(p).join("runs/s-20261201-000000")).unwrap();
        std::fs::write(dir.join("points").join(p).join("log.txt"), "").unwrap();
    }
    std::fs::write(dir.join("points/000/exit.json"), r#"{"exit_code": 137}"#).unwrap();
    let o = run_in(tmp.path(), &["sweep", "--collect", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = csv(&dir);
    let (status, error) =
        (rows[0].iter().position(|h| h == "status").unwrap(), rows[0].iter().position(|h| h == "error").unwrap());
    assert_eq!(rows[1][status], "failed");
    assert!(rows[1][error].contains("exit code 137"), "{:?}", rows[1]);
    assert_eq!(rows[2][status], "running");
    let text = std::fs::read_to_string(dir.join("sweep.sbatch")).unwrap();
    assert!(text.contains("/points/%3a/slurm-%A_%a.out\""), "Slurm output in each point's folder: {text}");
}

#[test]
fn a_task_whose_run_stopped_with_a_checkpoint_resumes_it() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "train.rhai", crate::runs::TRAIN);
    let o = run_in(tmp.path(), &["sweep", "train.rhai", "--grid", "epochs=2", "--slurm", "--runs-dir", "out"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dir = sweep_dir(&tmp.path().join("out"));
    let task = |_: ()| run_in(tmp.path(), &["sweep", "--task", "0", "--dir", dir.to_str().unwrap()]);
    assert!(task(()).status.success());
    let runs = dir.join("points/000/runs");
    let run = std::fs::read_dir(&runs).unwrap().flatten().next().unwrap().path();
    // As if preempted after its checkpoint: the requeued task continues that run, no new folder.
    let summary = run.join("summary.json");
    let text = std::fs::read_to_string(&summary).unwrap().replace("\"finished\"", "\"interrupted\"");
    std::fs::write(&summary, text).unwrap();
    let o = task(());
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read_dir(&runs).unwrap().count(), 1, "the same run folder");
    let config = json(&run.join("config.json"));
    assert!(config["resumed"].as_array().is_some_and(|r| !r.is_empty()), "recorded as resumed: {config}");
    assert!(std::fs::read_to_string(&summary).unwrap().contains("\"finished\""));
}

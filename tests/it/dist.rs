//! Data-parallel runs: `mpirun -np 2 samhost run` against one process (built with `--features
//! mpi`; `.ci/run` runs these with OpenMPI installed), and the refusal of a build without a
//! backend.

use super::common::*;
#[cfg(feature = "mpi")]
use std::path::Path;

/// A script that trains a small network with `sam_step` (or `train_step`, or the script-written
/// SAM of `lib/variants.rhai`), evaluates after every epoch, checkpoints, and saves its weights.
const SCRIPT: &str = r#"
import "lib/variants" as v;
let c = config(#{ m: 0, variant: "sam", adaptive: false, epochs: 2, out: "out", step: "sam", bn: true, n: 64, eval_batch: 21 });
let ds = synthetic(#{ n: c.n, classes: 3, shape: [1, 8, 8], seed: 3 });
let m = if c.bn {
    sequential([conv2d(1, 4, 3, #{ padding: 1 }), batch_norm2d(4), relu(), flatten(), linear(256, 3)])
} else {
    sequential([flatten(), linear(64, 16), relu(), linear(16, 3)])
};
let opt = sgd(m, #{ lr: 0.05, momentum: 0.9 });
let start = resume(m, opt);
let skip = start.skip;
let st = #{};
for epoch in start.epoch..c.epochs {
    for b in batches(ds, 16, #{ epoch: epoch, seed: 5 }) {
        if skip > 0 { skip -= 1; continue; }
        let o = #{ rho: 0.05, variant: c.variant, adaptive: c.adaptive };
        if c.m > 0 { o.m_sharpness = c.m; }
        let r = if c.step == "sam" {
            sam_step(m, opt, b, o)
        } else if c.step == "script" {
            let out = v::sam(m, opt, b, #{ rho: 0.05 }, st);
            st = out.state;
            out
        } else {
            train_step(m, opt, b)
        };
        log("train", #{ loss: r.loss, grad_norm: r.grad_norm, accuracy: r.accuracy });
    }
    log("eval", evaluate(m, ds, #{ batch: c.eval_batch }));
    save_checkpoint(m, opt, #{ epoch: epoch + 1 });
}
print(`ranks ${world_size()}`);
m.save(c.out + ".safetensors");
"#;

/// A folder with the script and the variants library it imports.
fn fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temporary folder");
    write(dir.path(), "dp.rhai", SCRIPT);
    let lib = std::fs::read_to_string(repo().join("scripts/lib/variants.rhai")).expect("variants library");
    write(dir.path(), "lib/variants.rhai", &lib);
    dir
}

#[cfg(not(feature = "mpi"))]
#[test]
fn a_launch_by_mpirun_is_refused_by_a_build_without_the_mpi_feature() {
    let dir = fixture();
    let o = samhost()
        .current_dir(dir.path())
        .args(["run", "dp.rhai", "--runs-dir", "runs"])
        .env("OMPI_COMM_WORLD_RANK", "0")
        .env("OMPI_COMM_WORLD_SIZE", "2")
        .output()
        .expect("samhost runs");
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("mpirun started 2 ranks") && err.contains("--features mpi"), "{err}");
    assert!(!dir.path().join("runs").exists() || std::fs::read_dir(dir.path().join("runs")).unwrap().next().is_none());
}

#[cfg(feature = "mpi")]
/// The weights a run saved, by name.
fn weights(path: &Path) -> Vec<(String, Vec<f32>)> {
    let mut w: Vec<(String, Vec<f32>)> = samhost::models::params::load_safetensors(path)
        .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()))
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("f32 weights")))
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

#[cfg(feature = "mpi")]
/// The largest difference between two saved sets of weights (same names required).
fn max_diff(a: &Path, b: &Path) -> f64 {
    let (a, b) = (weights(a), weights(b));
    assert_eq!(a.iter().map(|x| &x.0).collect::<Vec<_>>(), b.iter().map(|x| &x.0).collect::<Vec<_>>());
    a.iter().zip(&b).flat_map(|((_, x), (_, y))| x.iter().zip(y).map(|(p, q)| (p - q).abs() as f64)).fold(0.0, f64::max)
}

#[cfg(feature = "mpi")]
/// Every logged loss, gradient norm and accuracy of the one run in `dir/runs/`, in order, as
/// (tag, metric, value).
fn logged(dir: &Path) -> Vec<(String, String, f64)> {
    let runs: Vec<_> = std::fs::read_dir(dir.join("runs")).expect("runs folder").flatten().map(|e| e.path()).collect();
    assert_eq!(runs.len(), 1, "one run folder in {}", dir.display());
    let records = samhost::run::metrics::read_records(&runs[0].join("metrics.jsonl")).expect("metrics.jsonl");
    let mut out = Vec::new();
    for r in records {
        let tag = r["tag"].as_str().unwrap_or_default().to_string();
        for key in ["loss", "grad_norm", "accuracy"] {
            if let Some(v) = r.get(key).and_then(|v| v.as_f64()) {
                out.push((tag.clone(), key.to_string(), v));
            }
        }
    }
    out
}

#[cfg(feature = "mpi")]
mod mpi {
    use super::*;
    use std::process::{Command, Output};

    /// `mpirun -np 2 samhost ARGS` in `dir` (as root where CI runs it; more ranks than cores allowed).
    /// Each launch keeps its session files in a folder of its own: Open MPI 4 launches started at
    /// once (the tests run in parallel) race to create the same one in /tmp, and one fails.
    fn mpirun(dir: &Path, args: &[&str]) -> Command {
        let session = dir.join("mpi-tmp");
        std::fs::create_dir_all(&session).expect("Open MPI's session folder");
        let mut c = Command::new("mpirun");
        c.current_dir(dir)
            .env("TMPDIR", &session)
            .env("OMPI_MCA_orte_tmpdir_base", &session)
            .args(["--allow-run-as-root", "--oversubscribe", "-np", "2", env!("CARGO_BIN_EXE_samhost")])
            .args(args)
            .env("HF_HUB_OFFLINE", "1")
            .env("RAYON_NUM_THREADS", "1");
        c
    }

    fn ok(o: Output, what: &str) -> Output {
        assert!(o.status.success(), "{what}: {}\n{}", stderr(&o), stdout(&o));
        o
    }

    /// Runs the script once under 2 ranks and once alone with `alone` settings added, in two
    /// folders; returns the folders.
    fn pair(common: &[&str], alone: &[&str]) -> (tempfile::TempDir, tempfile::TempDir) {
        let (par, one) = (fixture(), fixture());
        let mut args = vec!["run", "dp.rhai", "--runs-dir", "runs", "-q"];
        args.extend(common.iter().flat_map(|s| ["--set", s]));
        let o = ok(mpirun(par.path(), &args).output().expect("mpirun runs"), "2 ranks");
        assert!(stdout(&o).contains("ranks 2"), "rank 0 prints: {}", stdout(&o));
        assert_eq!(stdout(&o).matches("ranks 2").count(), 1, "only rank 0 prints");
        args.extend(alone.iter().flat_map(|s| ["--set", s]));
        ok(run_in(one.path(), &args), "one process");
        (par, one)
    }

    fn assert_same_run(what: &str, par: &Path, one: &Path, tol: f64) {
        let d = max_diff(&par.join("out.safetensors"), &one.join("out.safetensors"));
        assert!(d <= tol, "{what}: weights differ by {d:e}");
        let (a, b) = (logged(par), logged(one));
        assert_eq!(a.len(), b.len(), "{what}: logged values");
        for ((tag, key, x), (_, _, y)) in a.iter().zip(&b) {
            assert!((x - y).abs() <= tol * y.abs().max(1.0), "{what}: {tag}.{key} {x} vs {y}");
        }
    }

    #[test]
    fn two_ranks_equal_one_process_with_m_sharpness_of_half_the_batch() {
        // Batch 16 over 2 ranks: each rank perturbs with its own 8 examples, as m_sharpness 8
        // does in one process; BatchNorm normalises each half on its own in both.
        for (variant, adaptive) in [("sam", "false"), ("gsam", "false"), ("sam", "true"), ("fisher", "false")] {
            let v = format!("variant={variant}");
            let a = format!("adaptive={adaptive}");
            let (par, one) = pair(&[&v, &a], &["m=8"]);
            assert_same_run(&format!("{variant} adaptive={adaptive}"), par.path(), one.path(), 1e-5);
        }
    }

    #[test]
    fn train_step_over_two_ranks_equals_the_full_batch_step() {
        let (par, one) = pair(&["step=train", "bn=false"], &[]);
        assert_same_run("train_step", par.path(), one.path(), 1e-5);
    }

    #[test]
    fn the_script_written_sam_over_two_ranks_equals_the_built_in() {
        let (a, b) = (fixture(), fixture());
        for (dir, step) in [(&a, "step=script"), (&b, "step=sam")] {
            let args = ["run", "dp.rhai", "--runs-dir", "runs", "-q", "--set", step];
            ok(mpirun(dir.path(), &args).output().expect("mpirun runs"), step);
        }
        assert_same_run("variants.rhai sam", a.path(), b.path(), 1e-5);
    }

    /// The pid of rank `rank` among the children of process `parent`.
    fn rank_pid(parent: u32, rank: usize) -> Option<u32> {
        for entry in std::fs::read_dir("/proc").ok()?.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // pid (comm) state ppid ...
            let ppid = stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)).and_then(|p| p.parse().ok());
            if ppid != Some(parent) {
                continue;
            }
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let want = format!("OMPI_COMM_WORLD_RANK={rank}");
            if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
                return Some(pid);
            }
        }
        None
    }

    #[test]
    fn a_sigterm_to_one_rank_stops_both_and_the_run_resumes_exactly() {
        // LookSAM keeps state between steps: rank 1 resumes with what rank 0 checkpointed.
        let settings = ["--set", "n=2048", "--set", "epochs=3", "--set", "variant=looksam", "--set", "m=0"];
        let full = fixture();
        let mut args = vec!["run", "dp.rhai", "--runs-dir", "runs", "-q"];
        args.extend(settings);
        ok(mpirun(full.path(), &args).output().expect("mpirun runs"), "uninterrupted");

        let cut = fixture();
        let mut child = mpirun(cut.path(), &args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("mpirun starts");
        // Signal rank 1 only (as Slurm signals each task) once the first epoch is checkpointed.
        let runs = cut.path().join("runs");
        let start = std::time::Instant::now();
        let mut signalled = false;
        while start.elapsed().as_secs() < 120 {
            let checkpointed = std::fs::read_dir(&runs)
                .into_iter()
                .flatten()
                .flatten()
                .any(|r| std::fs::read_dir(r.path().join("checkpoints")).is_ok_and(|mut c| c.next().is_some()));
            if checkpointed {
                if let Some(pid) = rank_pid(child.id(), 1) {
                    // SAFETY: kill with a valid signal number on a pid read from /proc.
                    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                    signalled = true;
                    break;
                }
            }
            if child.try_wait().expect("wait").is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let o = child.wait_with_output().expect("mpirun ends");
        assert!(signalled, "the run ended before a rank could be signalled: {}", stderr(&o));
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(143), "{err}");
        assert!(err.contains("interrupted at step"), "rank 0 stops too and says so: {err}");
        let run = std::fs::read_dir(&runs).expect("run folder").flatten().next().expect("one run").path();
        let cks: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
            .expect("checkpoints")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(cks.iter().any(|c| c.contains("-step-")), "an interrupt checkpoint: {cks:?}");

        let run_arg = run.display().to_string();
        let resume = ["run", "dp.rhai", "--runs-dir", "runs", "-q", "--resume", &run_arg];
        ok(mpirun(cut.path(), &resume).output().expect("mpirun runs"), "resumed");
        let d = max_diff(&full.path().join("out.safetensors"), &cut.path().join("out.safetensors"));
        assert!(d <= 1e-6, "resumed weights differ from the uninterrupted run's by {d:e}");
        assert_eq!(logged(full.path()).len(), logged(cut.path()).len(), "metrics.jsonl has each step once");
    }
}

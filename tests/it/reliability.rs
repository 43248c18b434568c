//! What a cluster and a long sweep do to a run: SIGTERM and SIGHUP, SIGKILL in the middle of a
//! checkpoint write, a diverging loss, a run that fails at once, optimizer state that does not
//! fit the model, a loss closure that reaches into the step.

use crate::common::*;
use crate::runs::{json, only_run, run_samhost, spawn_run, weights, TRAIN};
use samhost::session::Session;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Evaluates a script in-process and returns its error message ("" when it succeeds).
fn script_error(body: &str) -> String {
    let engine = samhost::script::build_engine(&Rc::new(Session::cpu()));
    match engine.run(body) {
        Ok(()) => String::new(),
        Err(e) => e.to_string(),
    }
}

/// Waits until `cut` holds a run folder with the checkpoint `epoch-0001`; returns the run folder.
pub(crate) fn wait_for_checkpoint(cut: &Path) -> PathBuf {
    let start = Instant::now();
    loop {
        let found = std::fs::read_dir(cut).ok().and_then(|mut d| d.next()).map(|e| e.unwrap().path());
        if let Some(run) = found.filter(|p| p.join("checkpoints/epoch-0001").is_dir()) {
            return run;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no checkpoint appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn sigterm_and_sighup_stop_the_run_like_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "train.rhai", TRAIN);
    let slow = ["--set", "epochs=60", "--set", "delay=20", "-q"];
    let full = dir.path().join("full");
    let o = run_samhost(dir.path(), &full, &[&["run", "train.rhai"][..], &slow].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    for (sig, code) in [("TERM", 143), ("HUP", 129)] {
        let cut = dir.path().join(format!("cut-{sig}"));
        let child = spawn_run(dir.path(), &cut, &[&["run", "train.rhai"][..], &slow].concat());
        let run = wait_for_checkpoint(&cut);
        let kill = std::process::Command::new("kill").args([&format!("-{sig}"), &child.id().to_string()]).status();
        assert!(kill.unwrap().success());
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "SIG{sig}: {err}");
        assert!(err.contains(&format!("SIG{sig}")) && err.contains("--resume"), "{err}");
        assert_eq!(json(&run.join("summary.json"))["status"], "interrupted", "SIG{sig}");
        if sig == "TERM" {
            let o = run_samhost(dir.path(), &cut, &["run", "train.rhai", "-q", "--resume", run.to_str().unwrap()]);
            assert!(o.status.success(), "{}", stderr(&o));
            let a = weights(&only_run(&full).join("final.safetensors"));
            assert_eq!(a, weights(&run.join("final.safetensors")), "stopped by SIGTERM and resumed: the same weights");
        }
    }
}

/// Writes checkpoints in a loop, replacing folders of the same name, and is killed with SIGKILL
/// at varied moments; after every kill the newest visible checkpoint loads and a resumed run
/// finishes.
#[test]
fn sigkill_during_checkpoint_writes_always_leaves_a_loadable_checkpoint() {
    const SAVER: &str = r#"
let cfg = config(#{ epochs: 100000 });
let model = mlp([64, 256, 10]);
let opt = sgd(model, #{ lr: 0.1, momentum: 0.9 });
let st = resume(model, opt);
let b = batch(randn([8, 64]), tensor([0, 1, 2, 3, 4, 5, 6, 7]));
for epoch in st.epoch..cfg.epochs {
    sam_step(model, opt, b);
    // Three folder names in turn: most saves replace an existing checkpoint.
    save_checkpoint(model, opt, #{ epoch: epoch % 3 + 1, keep: 0 });
}
"#;
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "saver.rhai", SAVER);
    let runs = dir.path().join("runs");
    let mut delays = 7u64;
    for round in 0..12 {
        let child = samhost()
            .current_dir(dir.path())
            .args(["run", "saver.rhai", "-q", "--runs-dir"])
            .arg(&runs)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let run = wait_for_checkpoint(&runs);
        delays = delays.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        std::thread::sleep(Duration::from_millis(10 + (delays >> 33) % 150));
        let _ = std::process::Command::new("kill").args(["-KILL", &child.id().to_string()]).status();
        let _ = child.wait_with_output();
        // The newest visible checkpoint is complete: a resumed run loads it and goes on.
        let o = run_samhost(
            dir.path(),
            &runs,
            &["run", "saver.rhai", "-q", "--set", "epochs=0", "--resume", run.to_str().unwrap()],
        );
        assert!(o.status.success(), "round {round}: resuming after SIGKILL: {}", stderr(&o));
        std::fs::remove_dir_all(&run).unwrap();
    }
}

#[test]
fn a_diverging_loss_stops_the_run_naming_the_step() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "blowup.rhai",
        r#"
let m = mlp([4, 3]);
let o = sgd(m, #{ lr: 0.1 });
let b = batch(randn([4, 4]), tensor([0, 1, 2, 0]));
train_step(m, o, b);
log("train", #{ step: 1 });
train_step(m, o, b, #{ loss: |l, y| cross_entropy(l, y) * 1e25 });
"#,
    );
    let o = run_samhost(dir.path(), &dir.path().join("runs"), &["run", "blowup.rhai"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("at step 2 exceeds") && err.contains("--max-loss"), "{err}");
    let o = run_samhost(dir.path(), &dir.path().join("runs2"), &["run", "blowup.rhai", "--max-loss", "1e-3"]);
    assert!(stderr(&o).contains("at step 1 exceeds 1e-3 (--max-loss)"), "{}", stderr(&o));
}

#[test]
fn a_run_that_fails_before_its_first_step_leaves_no_run_folder() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "cfg.rhai", "let cfg = config(#{ epochs: 3 });\nlet m = mlp([4, 3]);\n");
    let runs = dir.path().join("runs");
    let o = run_samhost(dir.path(), &runs, &["run", "cfg.rhai", "--set", "epochs=three"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("--set epochs=three"), "{}", stderr(&o));
    let left: Vec<_> = std::fs::read_dir(&runs).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "no run folder is left behind: {left:?}");
}

#[test]
fn optimizer_state_that_does_not_fit_the_model_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("opt.safetensors");
    let bad = dir.path().join("bad.safetensors");
    let err = script_error(&format!(
        r#"
let m = mlp([4, 3]);
let o = sgd(m, #{{ lr: 0.1, momentum: 0.9 }});
train_step(m, o, batch(randn([4, 4]), tensor([0, 1, 2, 0])));
o.save("{}");
let m2 = mlp([5, 3]);
let o2 = sgd(m2, #{{ lr: 0.1, momentum: 0.9 }});
o2.load("{}");
let before = m2.params();
try {{ train_step(m2, o2, batch(randn([4, 5]), tensor([0, 1, 2, 0]))); }} catch (e) {{
    if (m2.params() - before).norm() != 0.0 {{ throw "a refused step changed the weights"; }}
    throw e;
}}
"#,
        state.display(),
        state.display()
    ));
    assert!(err.contains("momentum buffer of `fc1.weight` has shape [3, 4], the parameter [3, 5]"), "{err}");
    let err = script_error(&format!(
        r#"
save_tensors("{}", #{{ steps: zeros([0]) }});
let m = mlp([4, 3]);
let o = sgd(m, #{{ lr: 0.1 }});
o.load("{}");
"#,
        bad.display(),
        bad.display()
    ));
    assert!(err.contains("`steps`: an empty tensor"), "{err}");
}

/// A resumed checkpoint whose optimizer state names tensors the model lacks is refused, naming
/// the tensor.
#[test]
fn a_checkpoint_for_another_model_is_refused_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "train.rhai", TRAIN);
    let runs = dir.path().join("runs");
    let o = run_samhost(dir.path(), &runs, &["run", "train.rhai", "-q", "--set", "epochs=1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = only_run(&runs);
    write(dir.path(), "other.rhai", &TRAIN.replace("mlp([16, 8, 3])", "mlp([16, 9, 3])"));
    let o = run_samhost(dir.path(), &runs, &["run", "other.rhai", "-q", "--resume", run.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("fc1.bias") && err.contains("shape"), "{err}");
}

/// Labels outside the head are an error in every step function, in evaluate and in
/// cross_entropy (a one-hot target of such a label is all zeros: it trained with loss 0 before),
/// naming the label and the head; a closure loss decides what labels mean.
#[test]
fn labels_outside_the_head_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"
let ds = synthetic(#{ n: 64, classes: 10, shape: [1, 4, 4], seed: 1 });
let m = mlp([16, 8, 5]);
let opt = sgd(m, #{ lr: 0.1 });
let b = ();
for x in ds.batches(16, #{ seed: 1 }) { if b == () { b = x; } }
let w = m.parameters();
try { train_step(m, opt, b); print("train_step ran"); } catch (e) { print(`E1 ${e}`); }
try { sam_step(m, opt, b); print("sam_step ran"); } catch (e) { print(`E2 ${e}`); }
try { grad(m, b); print("grad ran"); } catch (e) { print(`E3 ${e}`); }
try { evaluate(m, ds); print("evaluate ran"); } catch (e) { print(`E4 ${e}`); }
try { cross_entropy(m.forward(b.images), b.labels); print("cross_entropy ran"); } catch (e) { print(`E5 ${e}`); }
let same = true;
for k in w.keys() { if (w[k] - m.parameters()[k]).abs().sum().item() != 0.0 { same = false; } }
print(`unchanged=${same}`);
let g = grad(m, b, #{ loss: |logits, labels| (logits * 0.0).sum() });
print(`closure=${g.loss}`);
let ok = mlp([16, 8, 10]);
print(`fits=${evaluate(ok, ds).accuracy >= 0.0}`);
"#;
    write(dir.path(), "labels.rhai", script);
    let o = run_in(dir.path(), &["run", "labels.rhai", "--quiet"]);
    let out = stdout(&o);
    assert!(o.status.success(), "{}\n{out}", stderr(&o));
    for tag in ["E1", "E2", "E3"] {
        let line = out.lines().find(|l| l.starts_with(tag)).unwrap_or_else(|| panic!("{tag} missing:\n{out}"));
        assert!(line.contains(" is outside the model's head `fc2` of 5 classes"), "{line}");
    }
    assert!(
        out.contains("E4 evaluate: the dataset's labels go up to 9")
            && out.contains("label 9 is outside the model's head `fc2` of 5 classes"),
        "{out}"
    );
    assert!(
        out.contains("E5 cross_entropy: label ") && out.contains(" is outside the 5 classes of the logits"),
        "{out}"
    );
    assert!(out.contains("unchanged=true"), "a refused step leaves the weights alone:\n{out}");
    assert!(out.contains("closure=0") && out.contains("fits=true"), "{out}");
}

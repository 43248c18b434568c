//! The run record: run folders, summaries, plots, checkpoints, resume, Ctrl-C and NaN.

use crate::common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;

/// A small training script that checkpoints every epoch and resumes exactly (explicit shuffle
/// seeds; the batches done before a Ctrl-C are skipped). `delay` slows each step down.
pub(crate) const TRAIN: &str = r#"
let cfg = config(#{ epochs: 4, seed: 3, delay: 0, poison_after: -1 });
let train = synthetic(#{ n: 96, classes: 3, shape: [1, 4, 4], seed: 1 });
let model = mlp([16, 8, 3]);
let opt = sgd(model, #{ lr: 0.1, momentum: 0.9 });
let sched = schedule(opt, #{ kind: "step", step_size: 5, gamma: 0.7 });
let st = resume(model, opt, sched);
let skip = st.skip;
let step = st.step;
for epoch in st.epoch..cfg.epochs {
    model.train();
    let loss = 0.0;
    for b in train.batches(16, #{ seed: cfg.seed, epoch: epoch }) {
        if skip > 0 { skip -= 1; continue; }
        let s = sam_step(model, opt, b, #{ rho: 0.05 });
        sched.step();
        step += 1;
        loss = s.loss;
        for i in 0..cfg.delay { zeros([96, 96]).matmul(zeros([96, 96])); }
    }
    log("train", #{ epoch: epoch + 1, step: step, loss: loss, lr: opt.lr });
    save_checkpoint(model, opt, sched, #{ epoch: epoch + 1, note: "ok" });
    if epoch + 1 == cfg.poison_after {
        model.save(run_dir() + "/good.safetensors");
        let w = model.parameters()["fc2.weight"];
        model.set_parameters(#{ "fc2.weight": w / zeros(w.shape) });
    }
}
model.save(run_dir() + "/final.safetensors");
"#;

pub(crate) fn run_samhost(dir: &Path, runs: &Path, args: &[&str]) -> Output {
    samhost().current_dir(dir).args(args).arg("--runs-dir").arg(runs).output().expect("the samhost binary runs")
}

/// Starts samhost with `args` in `dir`, runs under `runs`, stderr captured (to be signalled).
pub(crate) fn spawn_run(dir: &Path, runs: &Path, args: &[&str]) -> std::process::Child {
    samhost()
        .current_dir(dir)
        .args(args)
        .arg("--runs-dir")
        .arg(runs)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("the samhost binary starts")
}

/// The single run folder under `runs` (panics when there is not exactly one).
pub(crate) fn only_run(runs: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> = std::fs::read_dir(runs).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    dirs[0].clone()
}

pub(crate) fn json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Every tensor of a safetensors file as raw f32 bits, by name.
pub(crate) fn weights(path: &Path) -> Vec<(String, Vec<u32>)> {
    let map = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap();
    let mut out: Vec<(String, Vec<u32>)> = map
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|x| x.to_bits()).collect()))
        .collect();
    out.sort();
    out
}

fn png_size(path: &Path) -> (u32, u32) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reader = png::Decoder::new(std::io::BufReader::new(file)).read_info().unwrap();
    (reader.info().width, reader.info().height)
}

#[test]
fn a_run_folder_holds_the_complete_record() {
    let runs = tempfile::tempdir().unwrap();
    let o = samhost()
        .arg("run")
        .arg(repo().join("scripts/quickstart.rhai"))
        .args(["--quiet", "--set", "smoke=true", "--seed", "5", "--runs-dir"])
        .arg(runs.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).is_empty(), "--quiet prints nothing: {}", stderr(&o));
    let run = only_run(runs.path());
    let name = run.file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("quickstart-") && name.len() == "quickstart-YYYYMMDD-HHMMSS".len(), "{name}");
    assert!(run.join("script/quickstart.rhai").is_file() && run.join("script/lib/common.rhai").is_file());
    assert!(run.join("checkpoints").is_dir());

    let config = json(&run.join("config.json"));
    assert_eq!(config["config"]["smoke"], true);
    assert_eq!(config["overrides"]["smoke"], "true");
    assert_eq!(config["seed"], 5);
    assert_eq!(config["device"], "cpu");
    assert_eq!(config["samhost_version"], env!("CARGO_PKG_VERSION"));
    assert!(config["candle_version"].as_str().unwrap().starts_with("0."), "{config}");
    assert!(config["command_line"].as_array().unwrap().iter().any(|a| a == "smoke=true"));

    let records = lines(&run.join("metrics.jsonl"));
    assert_eq!(records.len(), 2, "one epoch of SGD, one of SAM");
    for (r, tag) in records.iter().zip(["sgd", "sam"]) {
        assert_eq!(r["tag"], tag);
        assert_eq!(r["epoch"], 1);
        assert!(r["step"].as_u64().unwrap() > 0 && r["time"].as_f64().unwrap() >= 0.0);
    }

    let summary = json(&run.join("summary.json"));
    assert_eq!(summary["status"], "finished");
    assert!(summary["error"].is_null());
    for tag in ["sgd", "sam"] {
        let acc = &summary["metrics"][tag]["accuracy"];
        assert_eq!(acc["last"], records.iter().find(|r| r["tag"] == tag).unwrap()["accuracy"]);
        assert_eq!(acc["goal"], "max");
    }
    for metric in ["accuracy", "loss", "train_loss"] {
        assert_eq!(png_size(&run.join(format!("plots/{metric}.png"))), (1000, 620));
    }
}

#[test]
fn a_failed_run_records_its_error() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "bad.rhai", "log(\"test\", #{ accuracy: 0.5 });\nzeros([2]).item();\n");
    let o = run_samhost(dir.path(), &dir.path().join("runs"), &["run", "bad.rhai"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let run = only_run(&dir.path().join("runs"));
    let summary = json(&run.join("summary.json"));
    assert_eq!(summary["status"], "failed");
    let error = summary["error"].as_str().unwrap();
    assert!(error.contains("bad.rhai:2:") && error.contains("not one element"), "{error}");
    assert_eq!(summary["metrics"]["test"]["accuracy"]["best"], 0.5);
    assert!(run.join("plots/accuracy.png").is_file());
}

#[test]
fn a_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "train.rhai", TRAIN);
    let (full, split) = (dir.path().join("full"), dir.path().join("split"));
    let o = run_samhost(dir.path(), &full, &["run", "train.rhai", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run_samhost(dir.path(), &split, &["run", "train.rhai", "-q", "--set", "epochs=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = only_run(&split);
    let o = run_samhost(
        dir.path(),
        &split,
        &["run", "train.rhai", "--resume", run.to_str().unwrap(), "--set", "epochs=4", "--progress-every", "0"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("resumed from") && stderr(&o).contains("2 epochs done, step 12"), "{}", stderr(&o));
    assert_eq!(only_run(&split), run, "the resumed run stays in its folder");

    let a = weights(&only_run(&full).join("final.safetensors"));
    let b = weights(&run.join("final.safetensors"));
    assert_eq!(a, b, "bit-for-bit the same weights");

    let records = lines(&run.join("metrics.jsonl"));
    let epochs: Vec<u64> = records.iter().map(|r| r["epoch"].as_u64().unwrap()).collect();
    assert_eq!(epochs, [1, 2, 3, 4]);
    assert_eq!(
        records,
        lines(&only_run(&full).join("metrics.jsonl"))
            .iter()
            .zip(&records)
            .map(|(f, r)| {
                let mut f = f.clone();
                f["time"] = r["time"].clone();
                f
            })
            .collect::<Vec<_>>(),
        "the same metrics, wall time aside"
    );
    let config = json(&run.join("config.json"));
    assert_eq!(config["config"]["epochs"], 4);
    assert_eq!(config["resumed"].as_array().unwrap().len(), 1);
    let cks: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    let mut cks = cks;
    cks.sort();
    assert_eq!(cks, ["epoch-0003", "epoch-0004"], "the newest two are kept");
    let state = json(&run.join("checkpoints/epoch-0004/state.json"));
    assert_eq!((state["epoch"].as_u64(), state["step"].as_u64()), (Some(4), Some(24)));
    assert_eq!(state["user"]["note"], "ok");
    assert_eq!(state["schedule"]["count"], 24);
    assert!(run.join("checkpoints/epoch-0004/model.safetensors").is_file());
    assert!(run.join("checkpoints/epoch-0004/optimizer.safetensors").is_file());
}

#[test]
fn ctrl_c_writes_a_checkpoint_and_the_resumed_run_matches() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "train.rhai", TRAIN);
    let slow = ["--set", "epochs=60", "--set", "delay=20", "-q"];
    let (full, cut) = (dir.path().join("full"), dir.path().join("cut"));
    let o = run_samhost(dir.path(), &full, &[&["run", "train.rhai"][..], &slow].concat());
    assert!(o.status.success(), "{}", stderr(&o));

    let child = spawn_run(dir.path(), &cut, &[&["run", "train.rhai"][..], &slow].concat());
    let run = crate::reliability::wait_for_checkpoint(&cut);
    let kill = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted at step") && err.contains("--resume"), "{err}");
    assert_eq!(json(&run.join("summary.json"))["status"], "interrupted");
    let newest = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| json(&e.unwrap().path().join("state.json")))
        .max_by_key(|s| s["seq"].as_u64().unwrap())
        .unwrap();
    assert_eq!(newest["interrupted"], true, "{newest}");
    assert!(newest["epoch"].as_u64().unwrap() < 60, "{newest}");

    let o = run_samhost(dir.path(), &cut, &["run", "train.rhai", "-q", "--resume", run.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(json(&run.join("config.json"))["config"]["epochs"], 60, "the recorded --set values are reused");
    assert_eq!(json(&run.join("summary.json"))["status"], "finished");
    let a = weights(&only_run(&full).join("final.safetensors"));
    let b = weights(&run.join("final.safetensors"));
    assert_eq!(a, b, "interrupted and resumed: bit-for-bit the same weights");
}

#[test]
fn a_nan_loss_names_the_step_and_keeps_the_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "train.rhai", TRAIN);
    let o = run_samhost(dir.path(), &dir.path().join("runs"), &["run", "train.rhai", "-q", "--set", "poison_after=1"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("sam_step: the loss is not finite at step 7"), "{err}");
    let run = only_run(&dir.path().join("runs"));
    let summary = json(&run.join("summary.json"));
    assert_eq!(summary["status"], "failed");
    assert!(summary["error"].as_str().unwrap().contains("at step 7"));
    let names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["epoch-0001"], "no new or temporary checkpoint");
    assert_eq!(weights(&run.join("checkpoints/epoch-0001/model.safetensors")), weights(&run.join("good.safetensors")));
    assert_eq!(json(&run.join("checkpoints/epoch-0001/state.json"))["step"], 6);
}

#[test]
fn progress_lines_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "train.rhai", TRAIN);
    let o = run_samhost(
        dir.path(),
        &dir.path().join("runs"),
        &["run", "train.rhai", "--set", "epochs=2", "--progress-every", "4"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("step 4  epoch 1/2  loss "), "{err}");
    assert!(err.contains("step 8  epoch 2/2  loss ") && err.contains("steps/s  ETA "), "{err}");
    assert!(err.contains("[train] epoch=1  loss="), "{err}");
    assert!(err.contains("finished: ") && err.contains("plots in plots/"), "{err}");
}

#[test]
fn samhost_plot_overlays_runs_and_scripts_can_plot() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "curve.rhai",
        r#"let cfg = config(#{ method: "sgd", gain: 0.01 });
for e in 1..=5 { log("test", #{ epoch: e, accuracy: 0.5 + cfg.gain * e, loss: 1.0 / e }); }
let files = plot(#{ metric: "accuracy", x: "epoch", path: "mine.png" });
if files != ["mine.png"] { throw `plot returned ${files}`; }
if plot().len() != 2 { throw "plot() writes every metric"; }
"#,
    );
    let runs = dir.path().join("runs");
    for (m, g) in [("sgd", "0.01"), ("sam", "0.02")] {
        let o = run_samhost(
            dir.path(),
            &runs,
            &["run", "curve.rhai", "-q", "--set", &format!("method={m}"), "--set", &format!("gain={g}")],
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert_eq!(png_size(&dir.path().join("mine.png")), (1000, 620));
    let mut run_dirs: Vec<PathBuf> = std::fs::read_dir(&runs).unwrap().map(|e| e.unwrap().path()).collect();
    run_dirs.sort();
    let o = samhost().current_dir(dir.path()).arg("plot").args(&run_dirs).args(["-o", "cmp.png"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("wrote cmp.png: accuracy of 2 run(s) (also logged: loss)"), "{}", stderr(&o));
    assert_eq!(png_size(&dir.path().join("cmp.png")), (1000, 620));
    let o = samhost().current_dir(dir.path()).arg("plot").args(&run_dirs).args(["--metric", "loss"]).output().unwrap();
    assert!(o.status.success() && dir.path().join("loss.png").is_file(), "{}", stderr(&o));
    let o = samhost().current_dir(dir.path()).arg("plot").args(&run_dirs).args(["--metric", "nope"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no run logged the metric `nope`; the runs have: accuracy, loss"), "{}", stderr(&o));
    let o = samhost().current_dir(dir.path()).args(["plot", "nowhere"]).output().unwrap();
    assert!(stderr(&o).contains("nowhere: not a run folder"), "{}", stderr(&o));
}

#[test]
fn resume_needs_a_run_folder() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "train.rhai", TRAIN);
    let o = run_samhost(dir.path(), &dir.path().join("runs"), &["run", "train.rhai", "--resume", "nothere"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--resume nothere: no such run folder"), "{}", stderr(&o));
}

/// Prints what each random source gave: the noisy labels (with the explicit `cfg.seed` and with
/// the run's seed by default), the first batch's labels, and the initial weights.
const SEEDED: &str = r#"
let cfg = config(#{ seed: 1, data_seed: 2 });
let clean = synthetic(#{ n: 64, classes: 4, shape: [1, 2, 2], seed: cfg.data_seed });
let a = clean.with_label_noise("symmetric", 0.5, cfg.seed);
let b = clean.with_label_noise("symmetric", 0.5);
let first = ();
for x in a.batches(8, #{ seed: cfg.seed, epoch: 0 }) { if first == () { first = x.labels; } }
let m = mlp([4, 3]);
print(`seed=${cfg.seed}`);
print(`clean=${clean.labels.to_array()}`);
print(`noise=${a.labels.to_array()}`);
print(`default=${b.labels.to_array()}`);
print(`order=${first.to_array()}`);
print(`init=${m.parameters()["fc1.weight"].to_array()}`);
"#;

fn seeded_output(args: &[&str]) -> (std::collections::BTreeMap<String, String>, Output) {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "seeded.rhai", SEEDED);
    let mut all = vec!["run", "seeded.rhai", "--quiet"];
    all.extend_from_slice(args);
    let o = run_samhost(dir.path(), &dir.path().join("runs"), &all);
    let lines =
        stdout(&o).lines().filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string()))).collect();
    if o.status.success() {
        let config = json(&only_run(&dir.path().join("runs")).join("config.json"));
        let seed = config["seed"].as_u64().unwrap();
        assert_eq!(config["config"]["seed"], seed, "config.json records the seed the script used");
    }
    (lines, o)
}

#[test]
fn one_seed_drives_noise_order_and_init() {
    let (s3, o) = seeded_output(&["--seed", "3"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(s3["seed"], "3", "cfg.seed is the run's seed, not the script's default");
    let (again, _) = seeded_output(&["--seed", "3"]);
    assert_eq!(s3, again, "the same seed gives the same run");
    let (set3, _) = seeded_output(&["--set", "seed=3"]);
    assert_eq!(s3, set3, "--set seed=3 is --seed 3");
    let (s4, _) = seeded_output(&["--seed", "4"]);
    assert_eq!(s3["clean"], s4["clean"], "data_seed keeps the data fixed");
    for key in ["noise", "default", "order", "init"] {
        assert_ne!(s3[key], s4[key], "{key}: another seed changes it");
    }
    let (default, _) = seeded_output(&[]);
    assert_eq!(default["seed"], "42", "without --seed the default seed, as the header says");
    let (_, o) = seeded_output(&["--seed", "3", "--set", "seed=4"]);
    assert!(!o.status.success() && stderr(&o).contains("--seed 3 and --set seed=4 disagree"), "{}", stderr(&o));
    let (_, o) = seeded_output(&["--set", "seed=-1"]);
    assert!(!o.status.success() && stderr(&o).contains("--set seed=-1"), "{}", stderr(&o));
}

/// Dropout masks come from a generator that checkpoints save: a resumed WideResNet or ViT run
/// with dropout ends bit-identical to the uninterrupted one (SAM steps, 4 epochs, resumed after 2).
#[test]
fn a_resumed_run_with_dropout_draws_the_same_masks() {
    for model in [
        "wide_resnet(10, 1, 3, #{ dropout: 0.3, num_channels: 1 })",
        "vit(#{ hidden_size: 8, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 16, image_size: 4, \
         patch_size: 2, num_channels: 1, num_labels: 3, hidden_dropout_prob: 0.2, attention_probs_dropout_prob: 0.1 })",
        "sequential([conv2d(1, 4, 3, #{ padding: 1 }), batch_norm2d(4), relu(), dropout(0.3), flatten(), linear(64, 3)])",
        "model(#{ layers: #{ conv: conv2d(1, 4, 3, #{ padding: 1 }), bn: batch_norm2d(4), drop: dropout(0.3), fc: linear(64, 3) }, \
         forward: |x| this.fc.forward(flatten(this.drop.forward(relu(this.bn.forward(this.conv.forward(x)))), 1)) })",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let script = TRAIN
            .replace("let model = mlp([16, 8, 3]);", &format!("let model = {model};"))
            .replace("let w = model.parameters()[\"fc2.weight\"];", "let w = ();")
            .replace("model.set_parameters(#{ \"fc2.weight\": w / zeros(w.shape) });", "");
        write(dir.path(), "train.rhai", &script);
        let (full, split) = (dir.path().join("full"), dir.path().join("split"));
        let o = run_samhost(dir.path(), &full, &["run", "train.rhai", "-q"]);
        assert!(o.status.success(), "{model}: {}", stderr(&o));
        let o = run_samhost(dir.path(), &split, &["run", "train.rhai", "-q", "--set", "epochs=2"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let run = only_run(&split);
        let state = json(&run.join("checkpoints/epoch-0002/state.json"));
        assert!(state["dropout_rng"]["word_pos"].is_string(), "the checkpoint holds the mask generator: {state}");
        let o = run_samhost(
            dir.path(),
            &split,
            &["run", "train.rhai", "-q", "--resume", run.to_str().unwrap(), "--set", "epochs=4"],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        let a = weights(&only_run(&full).join("final.safetensors"));
        let b = weights(&run.join("final.safetensors"));
        assert_eq!(a, b, "{model}: bit-for-bit the same weights");
    }
}

//! The run lifecycle driven from Rust, without a script engine: start, steps, checkpoints, end,
//! and a resumed run that ends with the same weights as an uninterrupted one.

use candle_core::{Device, Tensor};
use samhost::models::mlp::mlp;
use samhost::models::Model;
use samhost::run::checkpoint::TrainState;
use samhost::run::{begin_step, end_step, Run, RunStatus};
use samhost::session::SessionOptions;
use samhost::train::{train_step, LossFn, Sgd, SgdConfig};
use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::rc::Rc;

const EPOCHS: u64 = 4;
const STEPS_PER_EPOCH: usize = 3;

/// A fixed batch `i` of 8 examples with 6 features and 3 classes.
fn batch(i: usize) -> (Tensor, Tensor) {
    let x: Vec<f32> = (0..48).map(|k| (((k * 7 + i * 13) % 17) as f32 - 8.0) / 8.0).collect();
    let y: Vec<u32> = (0..8).map(|k| ((k + i) % 3) as u32).collect();
    (Tensor::from_vec(x, (8, 6), &Device::Cpu).unwrap(), Tensor::from_vec(y, 8, &Device::Cpu).unwrap())
}

fn weights(m: &Model) -> Vec<Vec<f32>> {
    m.params().all().iter().map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect()
}

/// Runs epochs `from..until` of the script-less experiment in a run, checkpointing after each;
/// with `resume`, continues that run folder. Returns the run folder and the final weights.
fn drive(script: &Path, runs: &Path, resume: Option<PathBuf>, until: u64) -> (PathBuf, Vec<Vec<f32>>) {
    let opts = SessionOptions {
        script: Some(script.to_path_buf()),
        runs_dir: Some(runs.to_path_buf()),
        resume,
        seed: 7,
        seed_given: true,
        ..SessionOptions::default()
    };
    let mut run = Run::start(opts).expect("the run starts");
    run.open("// lifecycle test\n", &[]).expect("the run folder opens");
    let session = run.session().clone();
    let model = mlp(&[6, 5, 3], &session.rng, session.device()).expect("mlp");
    let opt = Sgd::new(SgdConfig { lr: 0.1, momentum: 0.9, ..SgdConfig::default() }).expect("sgd");
    let train = TrainState {
        model: model.clone(),
        optim: Rc::new(RefCell::new(Box::new(opt) as Box<dyn samhost::train::Optimizer>)),
        sched: None,
    };
    let point = session.run.borrow_mut().resume(train.clone(), "", &session.rng).expect("resume");
    for epoch in point.epoch..until {
        for i in 0..STEPS_PER_EPOCH {
            begin_step(&session).expect("no interrupt");
            let (x, y) = batch(epoch as usize * STEPS_PER_EPOCH + i);
            let stats = {
                let mut o = train.optim.borrow_mut();
                train_step(&model, o.as_mut(), &x, &y, &LossFn::default(), None).expect("step")
            };
            end_step(&session, "train_step", &stats).expect("finite loss");
        }
        let mut metrics = serde_json::Map::new();
        metrics.insert("epoch".into(), (epoch + 1).into());
        session.record_metrics("train", metrics).expect("log");
        session
            .run
            .borrow_mut()
            .save_checkpoint(train.clone(), "", epoch + 1, serde_json::Map::new(), 2, &session.rng)
            .expect("checkpoint");
    }
    run.end(&RunStatus::Finished).expect("the run ends");
    let dir = session.run.borrow().dir().expect("a run folder").path().to_path_buf();
    (dir, weights(&model))
}

#[test]
fn a_run_driven_from_rust_resumes_to_the_weights_of_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("exp.rhai");
    std::fs::write(&script, "// lifecycle test\n").unwrap();
    let runs = tmp.path().join("runs");

    let (full_dir, full) = drive(&script, &runs, None, EPOCHS);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full_dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["status"], "finished");
    assert_eq!(summary["steps"], EPOCHS * STEPS_PER_EPOCH as u64);
    assert!(full_dir.join("config.json").is_file() && full_dir.join("metrics.jsonl").is_file());

    // Half the epochs, then a second start that resumes the same folder.
    let (half_dir, _) = drive(&script, &runs, None, EPOCHS / 2);
    assert_ne!(half_dir, full_dir);
    let (resumed_dir, resumed) = drive(&script, &runs, Some(half_dir.clone()), EPOCHS);
    assert_eq!(resumed_dir, half_dir, "a resumed run writes into its own folder");
    assert_eq!(resumed, full, "the resumed run ends with the uninterrupted run's weights, bit for bit");
    let lines = std::fs::read_to_string(half_dir.join("metrics.jsonl")).unwrap().lines().count();
    assert_eq!(lines, EPOCHS as usize, "one train record per epoch, none repeated");
}

//! Checkpoints: everything needed to continue a run exactly where it stopped.
//!
//! A checkpoint is a folder under the run's `checkpoints/`, named `epoch-0003` (or
//! `NAME-epoch-0003`, and `…-step-N` when written by Ctrl-C in the middle of an epoch), holding
//! - `model.safetensors` and `config.json`: the model, with Hugging Face tensor names (the folder
//!   loads with `m.load(path)` and in Python's transformers);
//! - `optimizer.safetensors`: the optimizer state (momentum buffers or Adam moments, step count, lr);
//! - `state.json`: epoch, step, schedule, random generator state, the script's own values.
//!
//! The folder is filled under a temporary name and renamed into place, so a checkpoint is either
//! complete or absent; the newest is the one with the highest `seq`.

use crate::fsutil::write_bytes_atomic;
use crate::models::params::{load_safetensors, save_safetensors};
use crate::models::Model;
use crate::rng::{HostRng, RngState};
use crate::train::{Optimizer, Schedule};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// An optimizer shared between the script and the run record.
pub type SharedOptimizer = Rc<RefCell<Box<dyn Optimizer>>>;
/// A learning-rate schedule shared between the script and the run record.
pub type SharedSchedule = Rc<RefCell<Schedule>>;

/// The objects a checkpoint is written from and restored into.
#[derive(Clone)]
pub struct TrainState {
    /// The model (weights and BatchNorm statistics).
    pub model: Model,
    /// Its optimizer.
    pub optim: SharedOptimizer,
    /// The schedule driving the optimizer's learning rate, if any.
    pub sched: Option<SharedSchedule>,
}

/// `state.json`: a checkpoint's position and host state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Order of writing within the run folder (the newest has the highest).
    pub seq: u64,
    /// The checkpoint's name ("" by default), for scripts that train several models.
    #[serde(default)]
    pub name: String,
    /// Epochs done: the epoch a resumed run continues from.
    pub epoch: u64,
    /// Optimizer steps done in the run (`train_step` / `sam_step` calls).
    pub step: u64,
    /// Steps already done after `epoch` epochs (non-zero when Ctrl-C stopped mid-epoch): a
    /// resumed script skips that many batches.
    #[serde(default)]
    pub skip: u64,
    /// Written by Ctrl-C rather than by `save_checkpoint`.
    #[serde(default)]
    pub interrupted: bool,
    /// The optimizer's name.
    pub optimizer: String,
    /// The schedule, if one was saved.
    pub schedule: Option<Schedule>,
    /// The host random generator.
    pub rng: RngState,
    /// The model's dropout-mask generator (models with dropout), so a resumed run draws the masks
    /// an uninterrupted one would have drawn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropout_rng: Option<RngState>,
    /// Records of metrics.jsonl at the time of saving (later ones are dropped on resume).
    pub metrics_records: usize,
    /// Wall time of the run when saved, in seconds.
    pub time: f64,
    /// When it was written (UTC).
    pub saved_at: String,
    /// The script's own values given to `save_checkpoint`.
    #[serde(default)]
    pub user: Map<String, Value>,
}

/// A checkpoint on disk.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    /// Its folder.
    pub dir: PathBuf,
    /// Its `state.json`.
    pub state: CheckpointState,
}

/// The folder name of a checkpoint.
fn folder_name(state: &CheckpointState) -> String {
    let mut n = if state.name.is_empty() { String::new() } else { format!("{}-", state.name) };
    n.push_str(&format!("epoch-{:04}", state.epoch));
    if state.skip > 0 {
        n.push_str(&format!("-step-{}", state.step));
    }
    n
}

/// Checks that a checkpoint name is usable in a folder name.
pub fn check_name(name: &str) -> Result<()> {
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') || name.len() > 64 {
        bail!("checkpoint name `{name}`: use letters, digits, `_` and `-` only (at most 64)");
    }
    Ok(())
}

/// Every complete checkpoint in `dir`, oldest first.
pub fn list(dir: &Path) -> Result<Vec<Checkpoint>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot list", dir.display())),
    };
    for entry in entries {
        let path = entry?.path();
        let hidden = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
        let state_file = path.join("state.json");
        if hidden || !state_file.is_file() {
            continue;
        }
        let text =
            std::fs::read_to_string(&state_file).with_context(|| format!("{}: cannot read", state_file.display()))?;
        let state: CheckpointState = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a samhost checkpoint state", state_file.display()))?;
        out.push(Checkpoint { dir: path, state });
    }
    out.sort_by_key(|c| c.state.seq);
    Ok(out)
}

/// The newest checkpoint in `dir` (of the given name, or of any name when `None`).
pub fn latest(dir: &Path, name: Option<&str>) -> Result<Option<Checkpoint>> {
    Ok(list(dir)?.into_iter().rev().find(|c| name.is_none_or(|n| c.state.name == n)))
}

/// Writes a checkpoint of `train` with `state` into `dir` (its `seq` is set here), then removes
/// the oldest checkpoints of the same name beyond `keep` (0 keeps all). Returns its folder.
pub fn save(dir: &Path, train: &TrainState, mut state: CheckpointState, keep: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let existing = list(dir)?;
    state.seq = existing.last().map_or(1, |c| c.state.seq + 1);
    state.dropout_rng = train.model.dropout_state();
    let final_dir = dir.join(folder_name(&state));
    let tmp = dir.join(format!(".tmp-{}-{}", folder_name(&state), std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot remove", tmp.display()))?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    // The complete checkpoint replaces one of the same folder name in one step (an atomic swap),
    // so a complete checkpoint is visible at every moment.
    let written = write_contents(&tmp, train, &state).and_then(|()| crate::fsutil::replace_dir(&tmp, &final_dir));
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if keep > 0 {
        let same: Vec<Checkpoint> = list(dir)?.into_iter().filter(|c| c.state.name == state.name).collect();
        for old in same.iter().take(same.len().saturating_sub(keep)) {
            if old.dir != final_dir {
                std::fs::remove_dir_all(&old.dir)
                    .with_context(|| format!("{}: cannot remove an old checkpoint", old.dir.display()))?;
            }
        }
    }
    Ok(final_dir)
}

/// The error of a checkpoint taken while a step holds the optimizer or the schedule (from inside
/// a loss closure).
fn busy(what: &str) -> anyhow::Error {
    anyhow::anyhow!("the {what} is in use by the step running now: checkpoint between steps, not inside a loss closure")
}

fn write_contents(tmp: &Path, train: &TrainState, state: &CheckpointState) -> Result<()> {
    train.model.params().save(&tmp.join("model.safetensors"))?;
    let config = serde_json::to_string_pretty(&train.model.network().config())?;
    write_bytes_atomic(&tmp.join("config.json"), config.as_bytes())?;
    let opt_state = train.optim.try_borrow().map_err(|_| busy("optimizer"))?.state()?;
    save_safetensors(&tmp.join("optimizer.safetensors"), &opt_state)?;
    let text = serde_json::to_string_pretty(state)?;
    write_bytes_atomic(&tmp.join("state.json"), text.as_bytes())
}

/// Loads checkpoint `ck` into `train` and moves `rng` to its saved position. The schedule's
/// step count is restored (its shape stays the one the script built), and the optimizer's
/// learning rate follows the schedule.
pub fn restore(ck: &Checkpoint, train: &TrainState, rng: &HostRng) -> Result<()> {
    let at = |f: &str| ck.dir.join(f);
    let s = &ck.state;
    let optim_name = train.optim.try_borrow().map_err(|_| busy("optimizer"))?.name();
    if optim_name != s.optimizer {
        bail!(
            "{}: the checkpoint holds a `{}` optimizer state but the script resumes a `{optim_name}` optimizer",
            ck.dir.display(),
            s.optimizer
        );
    }
    train.model.params().load(&at("model.safetensors"))?;
    let device = train.model.params().all().first().map(|(_, v)| v.device().clone());
    let mut opt_state: BTreeMap<String, Tensor> = BTreeMap::new();
    for (k, t) in load_safetensors(&at("optimizer.safetensors"))? {
        let t = match &device {
            Some(d) => t.to_device(d)?,
            None => t,
        };
        opt_state.insert(k, t);
    }
    crate::train::optim::check_state_matches(&opt_state, &train.model)
        .with_context(|| format!("{}: optimizer.safetensors does not fit the model", ck.dir.display()))?;
    train
        .optim
        .try_borrow_mut()
        .map_err(|_| busy("optimizer"))?
        .load_state(&opt_state)
        .with_context(|| format!("{}: optimizer state", ck.dir.display()))?;
    if let (Some(sched), Some(saved)) = (&train.sched, &s.schedule) {
        let lr = {
            let mut sc = sched.try_borrow_mut().map_err(|_| busy("schedule"))?;
            sc.count = saved.count;
            sc.current()
        };
        train.optim.try_borrow_mut().map_err(|_| busy("optimizer"))?.set_learning_rate(lr);
    }
    rng.restore(&s.rng).with_context(|| format!("{}: state.json", ck.dir.display()))?;
    if let Some(d) = &s.dropout_rng {
        train.model.set_dropout_state(d).with_context(|| format!("{}: state.json", ck.dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::{ScheduleKind, Sgd, SgdConfig};
    use candle_core::Device;

    fn state(epoch: u64, step: u64) -> CheckpointState {
        CheckpointState {
            seq: 0,
            name: String::new(),
            epoch,
            step,
            skip: 0,
            interrupted: false,
            optimizer: "sgd".into(),
            schedule: None,
            rng: HostRng::new(1).state(),
            metrics_records: 0,
            dropout_rng: None,
            time: 0.0,
            saved_at: String::new(),
            user: Map::new(),
        }
    }

    #[test]
    fn save_restore_and_keep_the_newest() {
        let tmp = tempfile::tempdir().unwrap();
        let rng = HostRng::new(3);
        let model = crate::models::mlp::mlp(&[4, 3], &rng, &Device::Cpu).unwrap();
        let optim: SharedOptimizer = Rc::new(RefCell::new(Box::new(
            Sgd::new(SgdConfig { lr: 0.5, momentum: 0.9, ..SgdConfig::default() }).unwrap(),
        )));
        let sched = Rc::new(RefCell::new(Schedule::new(ScheduleKind::Step { step_size: 2, gamma: 0.5 }, 0.5).unwrap()));
        let train = TrainState { model: model.clone(), optim: optim.clone(), sched: Some(sched.clone()) };
        let before = model.params().snapshot().unwrap();
        sched.borrow_mut().count = 3;
        let mut st = state(1, 10);
        st.schedule = Some(sched.borrow().clone());
        save(tmp.path(), &train, st, 2).unwrap();
        save(tmp.path(), &train, state(2, 20), 2).unwrap();
        let third = save(tmp.path(), &train, state(3, 30), 2).unwrap();
        let all = list(tmp.path()).unwrap();
        assert_eq!(all.iter().map(|c| c.state.epoch).collect::<Vec<_>>(), [2, 3], "only the newest two are kept");
        assert_eq!(third.file_name().unwrap(), "epoch-0003");

        // Change the weights, then restore the epoch-3 checkpoint.
        let zeros: std::collections::HashMap<String, Tensor> =
            before.iter().map(|(k, v)| (k.clone(), v.zeros_like().unwrap())).collect();
        model.params().assign(&zeros, false, "test").unwrap();
        restore(&latest(tmp.path(), None).unwrap().unwrap(), &train, &rng).unwrap();
        let after = model.params().snapshot().unwrap();
        for (k, v) in &before {
            let a: Vec<f32> = v.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = after[k].flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(a, b, "{k}");
        }
        assert!(latest(tmp.path(), Some("other")).unwrap().is_none());
        assert!(check_name("sam_1").is_ok() && check_name("a/b").is_err());
    }
}

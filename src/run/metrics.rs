//! The metric log: every `log(tag, map)` call as one JSON object, kept in memory and appended to
//! `metrics.jsonl` when the run has a folder, its scalars also to the TensorBoard event file in
//! `tb/` beside it.

use anyhow::{Context, Result};
use serde_json::{Map, Value};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Instant;

/// Collects metric records; `step` and `epoch` are carried from record to record.
pub struct MetricLog {
    records: Vec<Value>,
    file: Option<BufWriter<File>>,
    tb: Option<super::tensorboard::EventWriter>,
    start: Instant,
    /// Seconds of earlier sessions of a resumed run, added to the wall time.
    offset: f64,
    step: u64,
    epoch: u64,
}

impl Default for MetricLog {
    fn default() -> Self {
        Self { records: Vec::new(), file: None, tb: None, start: Instant::now(), offset: 0.0, step: 0, epoch: 0 }
    }
}

impl MetricLog {
    /// A log that also appends to `path` (created, or appended to when resuming), and writes a
    /// TensorBoard event file into `tb/` beside it.
    pub fn to_file(path: &Path) -> Result<Self> {
        let mut log = Self::open(path)?;
        log.tb = Some(super::tensorboard::EventWriter::create(&Self::tb_dir(path))?);
        Ok(log)
    }

    fn open(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot open for writing", path.display()))?;
        Ok(Self { file: Some(BufWriter::new(file)), ..Self::default() })
    }

    /// The TensorBoard folder of the log at `path` (`tb/` beside it).
    pub fn tb_dir(path: &Path) -> std::path::PathBuf {
        path.parent().unwrap_or(Path::new(".")).join("tb")
    }

    /// The first `keep` records of the log at `path`, continued in memory only (the log of a
    /// rank other than 0, which reads rank 0's file and never writes).
    pub fn detached_from(path: &Path, keep: usize) -> Result<Self> {
        let mut records = if path.exists() { read_records(path)? } else { Vec::new() };
        records.truncate(keep);
        let mut log = Self::default();
        log.continue_after(records);
        Ok(log)
    }

    /// Takes `records` as the log so far: counters and wall time continue from the last one.
    fn continue_after(&mut self, records: Vec<Value>) {
        if let Some(last) = records.last() {
            self.step = last.get("step").and_then(Value::as_u64).unwrap_or(0);
            self.epoch = last.get("epoch").and_then(Value::as_u64).unwrap_or(0);
            self.offset = last.get("time").and_then(Value::as_f64).unwrap_or(0.0);
        }
        self.records = records;
    }

    /// The log of a resumed run: the first `keep` records of `path` are kept (all when `None`),
    /// later ones are dropped from the file (they will be recomputed), and new records are
    /// appended. Counters and wall time continue from the last record kept.
    pub fn resume(path: &Path, keep: Option<usize>) -> Result<Self> {
        let mut records = if path.exists() { read_records(path)? } else { Vec::new() };
        let total = records.len();
        if let Some(k) = keep {
            records.truncate(k);
        }
        if records.len() < total {
            let mut text = String::new();
            for r in &records {
                text.push_str(&serde_json::to_string(r)?);
                text.push('\n');
            }
            crate::fsutil::write_bytes_atomic(path, text.as_bytes())?;
        }
        let mut log = Self::open(path)?;
        log.tb = Some(super::tensorboard::rewrite(&Self::tb_dir(path), &records)?);
        log.continue_after(records);
        Ok(log)
    }

    /// Seconds since the run started (earlier sessions of a resumed run included).
    pub fn elapsed(&self) -> f64 {
        self.offset + self.start.elapsed().as_secs_f64()
    }

    /// The current step and epoch counters.
    pub fn counters(&self) -> (u64, u64) {
        (self.step, self.epoch)
    }

    /// Records `metrics` under `tag`. `step`/`epoch` keys update the counters; otherwise the
    /// current counters are added, with the wall time in seconds since the log started.
    pub fn record(&mut self, tag: &str, metrics: Map<String, Value>) -> Result<()> {
        if let Some(s) = metrics.get("step").and_then(Value::as_u64) {
            self.step = s;
        }
        if let Some(e) = metrics.get("epoch").and_then(Value::as_u64) {
            self.epoch = e;
        }
        let mut rec = Map::new();
        rec.insert("tag".into(), Value::from(tag));
        rec.insert("step".into(), Value::from(self.step));
        rec.insert("epoch".into(), Value::from(self.epoch));
        rec.insert("time".into(), Value::from((self.elapsed() * 1000.0).round() / 1000.0));
        for (k, v) in metrics {
            rec.insert(k, v);
        }
        let rec = Value::Object(rec);
        if let Some(f) = self.file.as_mut() {
            serde_json::to_writer(&mut *f, &rec)?;
            f.write_all(b"\n")?;
            f.flush()?;
        }
        if let Some(tb) = self.tb.as_mut() {
            tb.write(&rec, None)?;
        }
        self.records.push(rec);
        Ok(())
    }

    /// Every record so far.
    pub fn records(&self) -> &[Value] {
        &self.records
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn resuming_drops_records_after_the_checkpoint_and_appends() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("metrics.jsonl");
        let mut log = MetricLog::to_file(&path).unwrap();
        for e in 1..=3u64 {
            log.record("test", map(serde_json::json!({"epoch": e, "step": e * 10, "accuracy": 0.5}))).unwrap();
        }
        drop(log);
        let mut log = MetricLog::resume(&path, Some(2)).unwrap();
        assert_eq!(log.records().len(), 2);
        assert_eq!(log.counters(), (20, 2));
        log.record("test", map(serde_json::json!({"loss": 1.0}))).unwrap();
        let lines: Vec<Value> =
            std::fs::read_to_string(&path).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2]["step"], 20);
        assert_eq!(lines[2]["epoch"], 2);
        assert_eq!(lines[2]["tag"], "test");
    }
}

/// Keys every record carries besides the metrics themselves.
pub const RECORD_KEYS: [&str; 4] = ["tag", "step", "epoch", "time"];

/// One value of a metric, with where it was logged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// The step counter when it was logged.
    pub step: u64,
    /// The epoch counter when it was logged.
    pub epoch: u64,
    /// The value.
    pub value: f64,
}

/// The names of every numeric metric in `records`, sorted.
pub fn metric_names(records: &[Value]) -> Vec<String> {
    let mut names = std::collections::BTreeSet::new();
    for r in records {
        if let Some(obj) = r.as_object() {
            for (k, v) in obj {
                if !RECORD_KEYS.contains(&k.as_str()) && v.is_number() {
                    names.insert(k.clone());
                }
            }
        }
    }
    names.into_iter().collect()
}

/// The values of `metric`, one series per tag (tags in order of first appearance).
pub fn series(records: &[Value], metric: &str) -> Vec<(String, Vec<Point>)> {
    let mut out: Vec<(String, Vec<Point>)> = Vec::new();
    for r in records {
        let Some(value) = r.get(metric).and_then(Value::as_f64) else { continue };
        let tag = r.get("tag").and_then(Value::as_str).unwrap_or("").to_string();
        let p = Point {
            step: r.get("step").and_then(Value::as_u64).unwrap_or(0),
            epoch: r.get("epoch").and_then(Value::as_u64).unwrap_or(0),
            value,
        };
        match out.iter_mut().find(|(t, _)| *t == tag) {
            Some((_, points)) => points.push(p),
            None => out.push((tag, vec![p])),
        }
    }
    out
}

/// Reads the records of a `metrics.jsonl` file.
pub fn read_records(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}: not a JSON object", path.display(), i + 1))
        })
        .collect()
}

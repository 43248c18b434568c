//! The metric log: every `log(tag, map)` call as one JSON object, kept in memory and appended to
//! `metrics.jsonl` when the run has a folder.

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
    start: Instant,
    step: u64,
    epoch: u64,
}

impl Default for MetricLog {
    fn default() -> Self {
        Self { records: Vec::new(), file: None, start: Instant::now(), step: 0, epoch: 0 }
    }
}

impl MetricLog {
    /// A log that also appends to `path` (created, or appended to when resuming).
    pub fn to_file(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot open for writing", path.display()))?;
        Ok(Self { file: Some(BufWriter::new(file)), ..Self::default() })
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
        rec.insert("time".into(), Value::from((self.start.elapsed().as_secs_f64() * 1000.0).round() / 1000.0));
        for (k, v) in metrics {
            rec.insert(k, v);
        }
        let rec = Value::Object(rec);
        if let Some(f) = self.file.as_mut() {
            serde_json::to_writer(&mut *f, &rec)?;
            f.write_all(b"\n")?;
            f.flush()?;
        }
        self.records.push(rec);
        Ok(())
    }

    /// Every record so far.
    pub fn records(&self) -> &[Value] {
        &self.records
    }
}

//! TensorBoard event files: every logged scalar also goes to `tb/events.out.tfevents.*` in the
//! run folder, written as the run goes, so TensorBoard (or W&B reading event files) follows a run
//! live.
//!
//! The format is TensorFlow's record file: per record its length (u64, little-endian), the masked
//! CRC32C of those 8 bytes, the payload and the masked CRC32C of the payload. Each payload is an
//! `Event` protobuf, encoded here (it is four fields): the first has `file_version`
//! `brain.Event:2`, each later one a `wall_time`, a `step` and a `Summary` of `simple_value`s
//! tagged `TAG/METRIC` (`sam/accuracy`).

use super::metrics::RECORD_KEYS;
use anyhow::{Context, Result};
use serde_json::Value;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// TensorFlow's masked CRC32C of `bytes`.
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(field: u64, wire: u64, out: &mut Vec<u8>) {
    varint((field << 3) | wire, out);
}

fn bytes_field(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
    key(field, 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// An `Event` with `wall_time` and `step` and either a `file_version` or scalar values.
fn event(wall_time: f64, step: i64, file_version: Option<&str>, scalars: &[(String, f32)]) -> Vec<u8> {
    let mut out = Vec::new();
    key(1, 1, &mut out);
    out.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        key(2, 0, &mut out);
        varint(step as u64, &mut out);
    }
    if let Some(v) = file_version {
        bytes_field(3, v.as_bytes(), &mut out);
    }
    if !scalars.is_empty() {
        let mut summary = Vec::new();
        for (tag, v) in scalars {
            let mut value = Vec::new();
            bytes_field(1, tag.as_bytes(), &mut value);
            key(2, 5, &mut value);
            value.extend_from_slice(&v.to_le_bytes());
            bytes_field(1, &value, &mut summary);
        }
        bytes_field(5, &summary, &mut out);
    }
    out
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname writes at most that many bytes.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = if ok { String::from_utf8_lossy(&buf[..end]).into_owned() } else { String::new() };
    let safe: String = name.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.').collect();
    if safe.is_empty() {
        "localhost".into()
    } else {
        safe
    }
}

/// The scalars of a metric record: `TAG/METRIC` and its value, for every finite number.
pub fn scalars(record: &Value) -> Vec<(String, f32)> {
    let tag = record.get("tag").and_then(Value::as_str).unwrap_or("metrics");
    let Some(obj) = record.as_object() else { return Vec::new() };
    obj.iter()
        .filter(|(k, _)| !RECORD_KEYS.contains(&k.as_str()))
        .filter_map(|(k, v)| v.as_f64().filter(|x| x.is_finite()).map(|x| (format!("{tag}/{k}"), x as f32)))
        .collect()
}

/// The step a record is drawn at: its step counter, else its epoch.
pub fn record_step(record: &Value) -> i64 {
    let step = record.get("step").and_then(Value::as_i64).unwrap_or(0);
    if step > 0 {
        step
    } else {
        record.get("epoch").and_then(Value::as_i64).unwrap_or(0)
    }
}

/// An open event file.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// A new event file in `dir` (created), starting with the file-version event.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
        let now = unix_now();
        let name = format!("events.out.tfevents.{}.{}.{}", now as u64, hostname(), std::process::id());
        let path = dir.join(name);
        let file = File::create(&path).with_context(|| format!("{}: cannot create", path.display()))?;
        let mut w = Self { file: BufWriter::new(file), path };
        w.write_record(&event(now, 0, Some("brain.Event:2"), &[]))?;
        Ok(w)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let f = &mut self.file;
        f.write_all(&len)?;
        f.write_all(&masked_crc32c(&len).to_le_bytes())?;
        f.write_all(data)?;
        f.write_all(&masked_crc32c(data).to_le_bytes())?;
        Ok(())
    }

    /// Writes the scalars of a metric record, stamped `wall_time` (Unix seconds; now when
    /// `None`), and flushes, so a reader sees it at once.
    pub fn write(&mut self, record: &Value, wall_time: Option<f64>) -> Result<()> {
        let s = scalars(record);
        if s.is_empty() {
            return Ok(());
        }
        let e = event(wall_time.unwrap_or_else(unix_now), record_step(record), None, &s);
        self.write_record(&e)
            .and_then(|()| self.file.flush().map_err(Into::into))
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

/// Starts the event files of a resumed run afresh: removes `dir`'s event files and writes the
/// `kept` records into a new one (their wall times placed before now by their `time`).
pub fn rewrite(dir: &Path, kept: &[Value]) -> Result<EventWriter> {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("events.out.tfevents.") {
                std::fs::remove_file(e.path()).with_context(|| format!("{}: cannot remove", e.path().display()))?;
            }
        }
    }
    let mut w = EventWriter::create(dir)?;
    let now = unix_now();
    let last = kept.last().and_then(|r| r.get("time")).and_then(Value::as_f64).unwrap_or(0.0);
    for r in kept {
        let t = r.get("time").and_then(Value::as_f64).unwrap_or(last);
        w.write(r, Some(now - (last - t)))?;
    }
    Ok(w)
}

//! TensorBoard event files: read back here with a CRC32C written bit by bit (independent of the
//! crate that writes them) and a protobuf decoder of the four fields used; the scalars, tags and
//! steps are those of metrics.jsonl, also after a resume (one file, no repeated steps).

use crate::common::*;
use std::path::{Path, PathBuf};

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit.
fn crc32c_bitwise(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

fn masked(bytes: &[u8]) -> u32 {
    let c = crc32c_bitwise(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// The payloads of a TFRecord file, every checksum verified.
fn records(path: &Path) -> Vec<Vec<u8>> {
    let b = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let len_bytes = &b[i..i + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        assert_eq!(u32::from_le_bytes(b[i + 8..i + 12].try_into().unwrap()), masked(len_bytes), "length checksum");
        let data = &b[i + 12..i + 12 + len];
        assert_eq!(
            u32::from_le_bytes(b[i + 12 + len..i + 16 + len].try_into().unwrap()),
            masked(data),
            "data checksum"
        );
        out.push(data.to_vec());
        i += 16 + len;
    }
    out
}

fn varint(b: &[u8], i: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let byte = b[*i];
        *i += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

/// Protobuf fields `(number, wire type, bytes or value)`.
fn fields(b: &[u8]) -> Vec<(u64, u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let k = varint(b, &mut i);
        let (field, wire) = (k >> 3, k & 7);
        let data = match wire {
            0 => varint(b, &mut i).to_le_bytes().to_vec(),
            1 => {
                i += 8;
                b[i - 8..i].to_vec()
            }
            2 => {
                let n = varint(b, &mut i) as usize;
                i += n;
                b[i - n..i].to_vec()
            }
            5 => {
                i += 4;
                b[i - 4..i].to_vec()
            }
            w => panic!("wire type {w}"),
        };
        out.push((field, wire, data));
    }
    out
}

/// `(step, tag, value)` of every scalar in the event file, and its file_version.
fn scalars(path: &Path) -> (String, Vec<(i64, String, f32)>) {
    let recs = records(path);
    let first = fields(&recs[0]);
    let version = first.iter().find(|f| f.0 == 3).map(|f| String::from_utf8(f.2.clone()).unwrap()).unwrap();
    let mut out = Vec::new();
    for r in &recs[1..] {
        let f = fields(r);
        let wall = f64::from_le_bytes(f.iter().find(|x| x.0 == 1).unwrap().2.clone().try_into().unwrap());
        assert!(wall > 1.7e9, "wall_time is Unix seconds: {wall}");
        let step = f
            .iter()
            .find(|x| x.0 == 2)
            .map(|x| u64::from_le_bytes(x.2.clone().try_into().unwrap()) as i64)
            .unwrap_or(0);
        let summary = &f.iter().find(|x| x.0 == 5).unwrap().2;
        for (_, _, value) in fields(summary) {
            let v = fields(&value);
            let tag = String::from_utf8(v.iter().find(|x| x.0 == 1).unwrap().2.clone()).unwrap();
            let x = f32::from_le_bytes(v.iter().find(|x| x.0 == 2 && x.1 == 5).unwrap().2.clone().try_into().unwrap());
            out.push((step, tag, x));
        }
    }
    (version, out)
}

/// The same triples from metrics.jsonl.
fn from_jsonl(run: &Path) -> Vec<(i64, String, f32)> {
    let mut out = Vec::new();
    for line in std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = samhost::run::tensorboard::record_step(&r);
        let tag = r["tag"].as_str().unwrap().to_string();
        let mut keys: Vec<(&String, &serde_json::Value)> = r.as_object().unwrap().iter().collect();
        keys.retain(|(k, v)| !["tag", "step", "epoch", "time"].contains(&k.as_str()) && v.is_number());
        for (k, v) in keys {
            out.push((step, format!("{tag}/{k}"), v.as_f64().unwrap() as f32));
        }
    }
    out
}

fn event_files(run: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(run.join("tb")).unwrap().flatten().map(|e| e.path()).collect();
    v.sort();
    v
}

#[test]
fn every_logged_scalar_is_in_the_event_file_also_after_a_resume() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "train.rhai", crate::runs::TRAIN);
    let runs = dir.path().join("runs");
    let o = crate::runs::run_samhost(dir.path(), &runs, &["run", "train.rhai", "-q", "--set", "epochs=2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let run = std::fs::read_dir(&runs).unwrap().flatten().next().unwrap().path();
    let files = event_files(&run);
    assert_eq!(files.len(), 1);
    assert!(files[0].file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."));
    let (version, got) = scalars(&files[0]);
    assert_eq!(version, "brain.Event:2");
    assert_eq!(got, from_jsonl(&run));
    assert!(got.iter().any(|(s, t, _)| t == "train/loss" && *s == 12), "{got:?}");

    // Resumed to 4 epochs: one event file, the records of metrics.jsonl, each step once.
    let o = crate::runs::run_samhost(
        dir.path(),
        &runs,
        &["run", "train.rhai", "-q", "--resume", run.to_str().unwrap(), "--set", "epochs=4"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let files = event_files(&run);
    assert_eq!(files.len(), 1, "{files:?}");
    let (_, got) = scalars(&files[0]);
    assert_eq!(got, from_jsonl(&run));
    let loss_steps: Vec<i64> = got.iter().filter(|(_, t, _)| t == "train/loss").map(|(s, _, _)| *s).collect();
    assert_eq!(loss_steps, [6, 12, 18, 24]);
}

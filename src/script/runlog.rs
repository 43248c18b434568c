//! `log(tag, map)`: one line of metrics.jsonl and of the progress display.

use super::convert::{err, to_json, Res};
use crate::session::Session;
use rhai::{Dynamic, Engine, Map};
use std::rc::Rc;

fn format_value(v: &Dynamic) -> String {
    match v.as_float() {
        Ok(f) if f.abs() >= 1e-3 && f.abs() < 1e5 => format!("{f:.4}"),
        Ok(f) => format!("{f:.3e}"),
        Err(_) => v.to_string(),
    }
}

/// Registers `log`.
pub fn register(engine: &mut Engine, session: &Rc<Session>) {
    let s = session.clone();
    api!(engine, "log", "tag: String, metrics: Map",
        "Records one set of metrics under `tag` (e.g. \"train\", \"test\"): a line of the run's metrics.jsonl (with step, epoch and wall time added) and of the progress display. Values should be numbers; `step` and `epoch` keys set the counters.",
        move |tag: &str, metrics: Map| -> Res<()> {
            let json = to_json(&Dynamic::from_map(metrics.clone()))?;
            let obj = json.as_object().ok_or_else(|| err("log: metrics must be a map"))?.clone();
            s.record_metrics(tag, obj).map_err(|e| err(format!("log: {e:#}")))?;
            if !s.quiet {
                let mut keys: Vec<_> = metrics.keys().collect();
                keys.sort();
                let line = keys.iter().map(|k| format!("{k}={}", format_value(&metrics[*k]))).collect::<Vec<_>>().join("  ");
                eprintln!("[{tag}] {line}");
            }
            Ok(())
        });
}

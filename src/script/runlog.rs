//! `log(tag, map)`: one line of metrics.jsonl and of the progress display.

use super::convert::{err, to_json, Res};
use crate::session::Session;
use rhai::{Dynamic, Engine, Map};
use std::rc::Rc;

/// Registers `log`.
pub fn register(engine: &mut Engine, session: &Rc<Session>) {
    let s = session.clone();
    api!(engine, "log", "tag: String, metrics: Map",
        "Records one set of metrics under `tag` (e.g. \"train\", \"test\"): a line of the run's metrics.jsonl (with step, epoch and wall time added) and of the progress display. Values should be numbers; `step` and `epoch` keys set the counters (`epoch`: epochs done, which also moves the epoch progress bar). At the end of the run every numeric metric is plotted into plots/<metric>.png, one line per tag.",
        move |tag: &str, metrics: Map| -> Res<()> {
            let json = to_json(&Dynamic::from_map(metrics))?;
            let obj = json.as_object().ok_or_else(|| err("log: metrics must be a map"))?.clone();
            s.record_metrics(tag, obj).map_err(|e| err(format!("log: {e:#}")))
        });
}

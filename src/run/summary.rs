//! `summary.json`: how a run ended, and the last and best value of every metric per tag.

use super::metrics::{metric_names, series};
use serde_json::{json, Map, Value};

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum RunStatus {
    /// The script ran to its end.
    Finished,
    /// The script stopped with this error.
    Failed(String),
    /// Ctrl-C, SIGTERM or SIGHUP stopped it.
    Interrupted,
    /// The host panicked (a bug in samhost): the message. The run's records are still written.
    Crashed(String),
}

impl RunStatus {
    /// `finished`, `failed`, `interrupted` or `crashed`.
    pub fn name(&self) -> &'static str {
        match self {
            RunStatus::Finished => "finished",
            RunStatus::Failed(_) => "failed",
            RunStatus::Interrupted => "interrupted",
            RunStatus::Crashed(_) => "crashed",
        }
    }

    /// The error message of a failed or crashed run.
    pub fn error(&self) -> Option<&str> {
        match self {
            RunStatus::Failed(e) | RunStatus::Crashed(e) => Some(e),
            _ => None,
        }
    }
}

/// Whether a metric is better high or low.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Goal {
    /// Higher is better (accuracy, the default).
    Max,
    /// Lower is better (losses, errors, the fit of corrupted labels).
    Min,
}

/// The goal of a metric, from its name: names with `loss`, `error`, `err`, `nll` or
/// `perplexity`, and `*_fit` (memorised wrong labels), are minimised; everything else is maximised.
pub fn goal(metric: &str) -> Goal {
    let m = metric.to_ascii_lowercase();
    let low = ["loss", "error", "nll", "perplexity"].iter().any(|w| m.contains(w))
        || m == "err"
        || m.ends_with("_err")
        || m.ends_with("_fit");
    if low {
        Goal::Min
    } else {
        Goal::Max
    }
}

/// `{tag: {metric: {last, best, best_step, best_epoch, goal}}}` over `records`. Non-finite values
/// count as last values but never as the best.
pub fn metric_summary(records: &[Value]) -> Value {
    let mut out = Map::new();
    for metric in metric_names(records) {
        let g = goal(&metric);
        for (tag, points) in series(records, &metric) {
            let Some(last) = points.last() else { continue };
            let best = points.iter().filter(|p| p.value.is_finite()).fold(
                None,
                |b: Option<&super::metrics::Point>, p| match b {
                    Some(b) if (g == Goal::Max && p.value <= b.value) || (g == Goal::Min && p.value >= b.value) => {
                        Some(b)
                    }
                    _ => Some(p),
                },
            );
            let entry = json!({
                "last": last.value,
                "best": best.map(|b| b.value),
                "best_step": best.map(|b| b.step),
                "best_epoch": best.map(|b| b.epoch),
                "goal": if g == Goal::Max { "max" } else { "min" },
            });
            let per_tag = out.entry(tag).or_insert_with(|| Value::Object(Map::new()));
            if let Some(m) = per_tag.as_object_mut() {
                m.insert(metric.clone(), entry);
            }
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_follows_the_metric_goal() {
        let records = vec![
            json!({"tag": "test", "step": 1, "epoch": 1, "accuracy": 0.5, "loss": 2.0}),
            json!({"tag": "test", "step": 2, "epoch": 2, "accuracy": 0.7, "loss": 1.0}),
            json!({"tag": "test", "step": 3, "epoch": 3, "accuracy": 0.6, "loss": 1.5}),
        ];
        let s = metric_summary(&records);
        assert_eq!(s["test"]["accuracy"]["last"], 0.6);
        assert_eq!(s["test"]["accuracy"]["best"], 0.7);
        assert_eq!(s["test"]["accuracy"]["best_epoch"], 2);
        assert_eq!(s["test"]["loss"]["best"], 1.0);
        assert_eq!(s["test"]["loss"]["goal"], "min");
        assert_eq!(goal("noisy_part_fit"), Goal::Min);
        assert_eq!(goal("clean_part_accuracy"), Goal::Max);
    }
}

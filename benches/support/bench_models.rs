//! Models and timing shared by the speed benchmarks.

#![allow(dead_code)]

use candle_core::Device;
use samhost::models::registry::{build_model, resolve_config, ArchConfig};
use samhost::models::Model;
use samhost::rng::HostRng;
use serde_json::{json, Value};

/// The comma-separated values of environment variable `var` (`default` when unset).
pub fn env_list(var: &str, default: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The median of `v`.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A model from a named configuration (with 10 classes) or an inline JSON one, on `device`.
pub fn build_on(spec: &str, device: &Device) -> Model {
    let v: Value = if spec.starts_with('{') {
        serde_json::from_str(spec).expect("json")
    } else {
        let mut v = resolve_config(spec).expect("named config");
        if let Some(o) = v.as_object_mut() {
            if o.contains_key("num_labels") {
                o.insert("num_labels".into(), json!(10));
            }
        }
        v
    };
    let cfg = ArchConfig::from_json(&v, false).expect("config");
    build_model(&cfg, &HostRng::new(0), device).expect("model")
}

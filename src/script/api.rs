//! `samhost api`: the script API reference, generated from the registered functions' metadata
//! (signatures and doc comments), so it cannot drift from the code.

use anyhow::{Context, Result};
use rhai::Engine;
use serde_json::Value;
use std::path::Path;

/// The reference as JSON (Rhai's function metadata, samhost functions only).
pub fn reference_json(engine: &Engine) -> Result<Value> {
    let text = engine.gen_fn_metadata_to_json(false).context("generating the API metadata")?;
    Ok(serde_json::from_str(&text)?)
}

fn doc_text(f: &Value) -> String {
    f.get("docComments")
        .and_then(Value::as_array)
        .map(|d| {
            d.iter()
                .filter_map(Value::as_str)
                .flat_map(|s| s.lines())
                .map(|l| l.trim().trim_start_matches("///").trim())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}

/// The reference as text: one entry per function, its signature and its description.
pub fn reference_text(engine: &Engine) -> Result<String> {
    let json = reference_json(engine)?;
    let mut entries: Vec<(String, String)> = json
        .get("functions")
        .and_then(Value::as_array)
        .map(|fs| {
            fs.iter()
                .map(|f| {
                    let sig = f.get("signature").and_then(Value::as_str).unwrap_or("?").to_string();
                    (sig, doc_text(f))
                })
                .collect()
        })
        .unwrap_or_default();
    entries.sort();
    let mut out = String::from("samhost script API (generated from the registered functions)\n\n");
    for (sig, doc) in entries {
        out.push_str(&sig);
        out.push('\n');
        if !doc.is_empty() {
            out.push_str("    ");
            out.push_str(&doc);
            out.push('\n');
        }
    }
    Ok(out)
}

/// Writes Rhai definition files (`.d.rhai`) for editor autocompletion into `dir`.
pub fn write_definitions(engine: &Engine, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create the folder", dir.display()))?;
    engine
        .definitions()
        .write_to_dir(dir)
        .with_context(|| format!("{}: cannot write the definition files", dir.display()))
}

//! A checkpoint's image preprocessing, read from Hugging Face's `preprocessor_config.json` (an
//! image processor's `size`, `resample`, `do_rescale`/`rescale_factor`, `do_normalize`,
//! `image_mean`, `image_std`), as a list of samhost transforms for the model's input size.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// The preprocessing of a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocessing {
    /// Bicubic resizing (PIL's resample 3), else bilinear.
    pub bicubic: bool,
    /// Per-channel means after rescaling (`None`: no normalisation).
    pub mean: Option<Vec<f64>>,
    /// Per-channel standard deviations after rescaling.
    pub std: Option<Vec<f64>>,
    /// The factor pixel values 0..255 are multiplied by before normalising (1/255 usually).
    pub rescale: f64,
    /// The file as read, written back (with the model's input size) by `save`.
    pub raw: Value,
}

fn numbers(v: &Value, what: &str) -> Result<Vec<f64>> {
    let list = match v {
        Value::Array(a) => {
            a.iter().map(|x| x.as_f64().with_context(|| format!("{what}: {x} is not a number"))).collect()
        }
        Value::Number(n) => Ok(vec![n.as_f64().unwrap_or(0.0)]),
        other => bail!("{what} must be a list of numbers, got {other}"),
    }?;
    if list.is_empty() {
        bail!("{what} is empty");
    }
    Ok(list)
}

impl Preprocessing {
    /// Parses a `preprocessor_config.json`.
    pub fn from_json(v: &Value) -> Result<Self> {
        let obj = v.as_object().context("preprocessor_config.json must hold a JSON object")?;
        let flag = |k: &str, default: bool| obj.get(k).and_then(Value::as_bool).unwrap_or(default);
        // PIL's codes: 3 bicubic and 1 Lanczos (the nearest samhost has: bicubic); 2 bilinear,
        // and nearest (0), box (4), hamming (5) become bilinear.
        let bicubic = matches!(obj.get("resample").and_then(Value::as_u64), Some(1 | 3));
        let rescale = if flag("do_rescale", true) {
            obj.get("rescale_factor").and_then(Value::as_f64).unwrap_or(1.0 / 255.0)
        } else {
            1.0
        };
        if !(rescale.is_finite() && rescale > 0.0) {
            bail!("rescale_factor must be > 0, got {rescale}");
        }
        let (mean, std) = if flag("do_normalize", true) {
            match (obj.get("image_mean"), obj.get("image_std")) {
                (Some(m), Some(s)) => {
                    let (m, s) = (numbers(m, "image_mean")?, numbers(s, "image_std")?);
                    if m.len() != s.len() {
                        bail!("image_mean has {} values but image_std {}", m.len(), s.len());
                    }
                    if s.iter().any(|x| *x <= 0.0 || !x.is_finite()) {
                        bail!("image_std must be > 0");
                    }
                    (Some(m), Some(s))
                }
                _ => (None, None),
            }
        } else {
            (None, None)
        };
        Ok(Self { bicubic, mean, std, rescale, raw: v.clone() })
    }

    /// The transforms (as JSON, for `ds.transform`) that turn images into this model's input:
    /// gray to RGB for a 3-channel model, a resize to `[h, w]` with the processor's resampling, and
    /// the normalisation (samhost reads u8 pixels as /255, so a rescale factor f other than 1/255
    /// is folded into the constants). The processor's resize-then-center-crop is one resize to the
    /// input size here.
    pub fn transforms(&self, [h, w]: [usize; 2], channels: usize) -> Value {
        let mut out = Vec::new();
        if channels == 3 {
            out.push(json!("grayscale_to_rgb"));
        }
        let mode = if self.bicubic { "bicubic" } else { "bilinear" };
        out.push(json!({"resize": [h, w], "mode": mode}));
        if let (Some(m), Some(s)) = (&self.mean, &self.std) {
            let k = 255.0 * self.rescale;
            let m: Vec<f64> = m.iter().map(|x| x / k).collect();
            let s: Vec<f64> = s.iter().map(|x| x / k).collect();
            out.push(json!({"normalize": m, "std": s}));
        }
        Value::Array(out)
    }

    /// The file to save with a model whose input is `[h, w]`: the one read, its sizes set to the
    /// input size and its crop turned off, so Python's image processor makes the same input.
    pub fn to_json(&self, [h, w]: [usize; 2]) -> Value {
        let mut v = self.raw.clone();
        if let Some(obj) = v.as_object_mut() {
            obj.insert("size".into(), json!({"height": h, "width": w}));
            if obj.contains_key("crop_size") {
                obj.insert("crop_size".into(), json!({"height": h, "width": w}));
            }
            if obj.contains_key("do_center_crop") {
                obj.insert("do_center_crop".into(), json!(false));
            }
        }
        v
    }
}

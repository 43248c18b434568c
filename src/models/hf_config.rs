//! The Hugging Face configuration conventions the ViT and DINOv2 share: the head size from
//! `id2label` or `num_labels`, the patch grid, the checks of an encoder's sizes, and the
//! `config.json` transformers writes (architectures, model_type, label maps).

use super::layers::Activation;
use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

use super::vit::Size2;

/// Class names by index, as `config.json` has them.
pub type Id2Label = BTreeMap<String, String>;
/// Class indices by name, as `config.json` has them.
pub type Label2Id = BTreeMap<String, Value>;

/// The head size: the number of `id2label` entries, else `num_labels`.
pub fn head_size(id2label: &Option<Id2Label>, num_labels: Option<usize>) -> Option<usize> {
    match id2label {
        Some(m) if !m.is_empty() => Some(m.len()),
        _ => num_labels,
    }
}

/// Sets the head size to `n`; label maps that no longer fit are dropped (`LABEL_i` on save).
pub fn set_head_size(
    n: usize,
    num_labels: &mut Option<usize>,
    id2label: &mut Option<Id2Label>,
    label2id: &mut Option<Label2Id>,
) {
    if head_size(id2label, *num_labels) != Some(n) {
        *id2label = None;
        *label2id = None;
    }
    *num_labels = Some(n);
}

/// The patch grid `(rows, columns)` of `image` in patches of `patch`.
pub fn patch_grid(what: &str, image: Size2, patch: Size2) -> Result<(usize, usize)> {
    let (h, w) = image.hw();
    let (ph, pw) = patch.hw();
    if ph == 0 || pw == 0 || h == 0 || w == 0 || h % ph != 0 || w % pw != 0 {
        bail!("{what}: image_size {h}x{w} is not a whole number of {ph}x{pw} patches");
    }
    Ok((h / ph, w / pw))
}

/// The `id2label` and `label2id` maps of a head of `n` classes: the given ones when they have
/// `n` entries, else `LABEL_i` names, as transformers writes them.
pub fn hf_label_maps(n: usize, id2label: Option<Id2Label>, label2id: Option<Label2Id>) -> (Id2Label, Label2Id) {
    let id2label = match id2label {
        Some(m) if m.len() == n => m,
        _ => (0..n).map(|i| (i.to_string(), format!("LABEL_{i}"))).collect(),
    };
    let label2id = match label2id {
        Some(m) if m.len() == n => m,
        _ => id2label.iter().map(|(i, l)| (l.clone(), Value::from(i.parse::<u64>().unwrap_or(0)))).collect(),
    };
    (id2label, label2id)
}

/// The sizes of a transformer encoder's configuration, checked by [`check_encoder`].
pub struct EncoderSizes<'a> {
    /// The architecture's name, for the messages.
    pub what: &'a str,
    /// `hidden_size`.
    pub hidden: usize,
    /// `num_attention_heads`.
    pub heads: usize,
    /// `num_hidden_layers`.
    pub layers: usize,
    /// The MLP width, and how the configuration names it.
    pub intermediate: (usize, &'a str),
    /// `num_channels`.
    pub channels: usize,
    /// Probabilities that must lie in [0, 1), by field name.
    pub probabilities: &'a [(&'a str, f64)],
    /// The head size.
    pub classes: Option<usize>,
    /// `hidden_act`.
    pub act: &'a str,
}

/// Rejects encoder sizes that build nothing, naming the field.
pub fn check_encoder(s: &EncoderSizes) -> Result<()> {
    let (what, heads) = (s.what, s.heads);
    if s.hidden == 0 || heads == 0 || !s.hidden.is_multiple_of(heads) {
        bail!("{what}: hidden_size {} must be a positive multiple of num_attention_heads {heads}", s.hidden);
    }
    if s.layers == 0 || s.intermediate.0 == 0 || s.channels == 0 {
        bail!("{what}: num_hidden_layers, {} and num_channels must be > 0", s.intermediate.1);
    }
    for (name, p) in s.probabilities {
        if !(0.0..1.0).contains(p) {
            bail!("{what}: {name} must be in [0, 1), got {p}");
        }
    }
    match s.classes {
        Some(0) | None => bail!("{what}: the classification head needs num_labels (or id2label) > 0"),
        Some(_) => {}
    }
    Activation::from_name(s.act)?;
    Ok(())
}

/// `config.json` as transformers writes it for `architecture`: the configuration's fields
/// (`cfg`, without `num_labels`, `id2label`, `label2id`), its `model_type`, float32 weights and
/// the label maps.
pub fn hf_json(cfg: &impl Serialize, architecture: &str, model_type: &str, labels: (Id2Label, Label2Id)) -> Value {
    let mut v = match serde_json::to_value(cfg) {
        Ok(Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    for k in ["model_type", "architectures", "dtype", "num_labels"] {
        v.remove(k);
    }
    v.insert("architectures".into(), serde_json::json!([architecture]));
    v.insert("model_type".into(), model_type.into());
    v.insert("torch_dtype".into(), "float32".into());
    v.insert("id2label".into(), serde_json::to_value(labels.0).unwrap_or_default());
    v.insert("label2id".into(), serde_json::to_value(labels.1).unwrap_or_default());
    Value::Object(v)
}

//! A dataset in one safetensors file: `images` `[N, C, H, W]` (or `[N, H, W]`, one channel),
//! u8 (stored as u8, read as `v / 255`) or f32 (used exactly as given), and integer `labels`
//! `[N]`. Class names come from the `classes` metadata entry (a JSON list) when present.

use super::dataset::Pixels;
use super::Dataset;
use anyhow::{bail, Context, Result};
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

fn labels_of(path: &Path, view: &safetensors::tensor::TensorView) -> Result<Vec<u32>> {
    let p = path.display();
    if view.shape().len() != 1 {
        bail!("{p}: `labels` must be [N], got {:?}", view.shape());
    }
    let d = view.data();
    let signed = |v: i64, i: usize| -> Result<u32> {
        u32::try_from(v).map_err(|_| anyhow::anyhow!("{p}: label {v} of example {i} is negative or too large"))
    };
    Ok(match view.dtype() {
        Dtype::U8 => d.iter().map(|&v| v as u32).collect(),
        Dtype::I8 => d.iter().enumerate().map(|(i, &v)| signed(v as i8 as i64, i)).collect::<Result<_>>()?,
        Dtype::U16 => d.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as u32).collect(),
        Dtype::I16 => d
            .chunks_exact(2)
            .enumerate()
            .map(|(i, b)| signed(i16::from_le_bytes([b[0], b[1]]) as i64, i))
            .collect::<Result<_>>()?,
        Dtype::U32 => d.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::I32 => d
            .chunks_exact(4)
            .enumerate()
            .map(|(i, b)| signed(i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64, i))
            .collect::<Result<_>>()?,
        Dtype::I64 | Dtype::U64 => d
            .chunks_exact(8)
            .enumerate()
            .map(|(i, b)| {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                if view.dtype() == Dtype::I64 {
                    signed(i64::from_le_bytes(a), i)
                } else {
                    u32::try_from(u64::from_le_bytes(a))
                        .map_err(|_| anyhow::anyhow!("{p}: label of example {i} is too large"))
                }
            })
            .collect::<Result<_>>()?,
        other => bail!("{p}: `labels` must hold integers, got {other:?}"),
    })
}

/// Loads `path`; `classes` overrides the class names (and their number).
pub fn load_safetensors(path: &Path, classes: Option<Vec<String>>) -> Result<Dataset> {
    let p = path.display();
    let bytes = std::fs::read(path).with_context(|| format!("{p}: cannot read"))?;
    let st = SafeTensors::deserialize(&bytes).with_context(|| format!("{p}: not a safetensors file"))?;
    let names: Vec<String> = st.names().into_iter().map(String::from).collect();
    let get =
        |name: &str| st.tensor(name).with_context(|| format!("{p}: no `{name}` tensor (it has: {})", names.join(", ")));
    let images = get("images")?;
    let labels = labels_of(path, &get("labels")?)?;
    let shape = match *images.shape() {
        [n, c, h, w] => [n, c, h, w],
        [n, h, w] => [n, 1, h, w],
        ref s => bail!("{p}: `images` must be [N, C, H, W] (or [N, H, W]), got {s:?}"),
    };
    if shape[0] != labels.len() {
        bail!("{p}: {} images but {} labels", shape[0], labels.len());
    }
    let pixels = match images.dtype() {
        Dtype::U8 => Pixels::U8(images.data().to_vec()),
        Dtype::F32 => {
            Pixels::F32(images.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        }
        other => bail!("{p}: `images` must be u8 or f32, got {other:?}"),
    };
    let from_meta = match SafeTensors::read_metadata(&bytes) {
        Ok((_, meta)) => match meta.metadata().as_ref().and_then(|m| m.get("classes")) {
            Some(text) => Some(
                serde_json::from_str::<Vec<String>>(text)
                    .with_context(|| format!("{p}: the `classes` metadata is not a JSON list of names"))?,
            ),
            None => None,
        },
        Err(_) => None,
    };
    let classes = match classes.or(from_meta) {
        Some(c) => c,
        None => {
            let k = labels.iter().copied().max().map(|m| m as usize + 1).unwrap_or(1).max(2);
            (0..k).map(|i| i.to_string()).collect()
        }
    };
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= classes.len()) {
        bail!("{p}: label {l} of example {i} is outside the {} classes", classes.len());
    }
    Dataset::from_pixels(pixels, labels, [shape[1], shape[2], shape[3]], classes).with_context(|| p.to_string())
}

//! Per-example transforms applied by the loader: conversion to floats, normalisation and the
//! usual augmentations. Random choices come from a generator seeded by `(seed, epoch, stored
//! example index)`, so an example's augmentation never depends on threads or batch order.
//!
//! Transforms are written as a list, each item a string or a map whose one transform key holds
//! the main argument and whose other keys are that transform's extra arguments (see
//! [`parse_transform`]).

use super::dataset::PixelsRef;
use super::seed::{below, derived_rng, Purpose};
use anyhow::{anyhow, bail, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::fmt;

/// One transform.
#[derive(Clone, Debug, PartialEq)]
pub enum Transform {
    /// Pixels as floats; u8 pixels are always converted to `v / 255` first, so this marks the
    /// point in the list for readability and changes nothing.
    ToFloat,
    /// `(x - mean[c]) / std[c]` per channel.
    Normalize {
        /// Per-channel means (one value for all channels, or one per channel).
        mean: Vec<f32>,
        /// Per-channel standard deviations, all > 0.
        std: Vec<f32>,
    },
    /// A random `size` crop of the image zero-padded by `padding` on each side.
    RandomCrop {
        /// Output `[H, W]`.
        size: [usize; 2],
        /// Zeros added on each side before cropping.
        padding: usize,
    },
    /// Horizontal flip with probability `p`.
    HFlip {
        /// Probability of flipping.
        p: f64,
    },
    /// Bilinear (or bicubic, Keys' a = -0.5 as PIL and PyTorch's antialias-free bicubic) resize to
    /// `[H, W]` (half-pixel centres, no antialiasing).
    Resize {
        /// Output `[H, W]`.
        size: [usize; 2],
        /// Bicubic instead of bilinear.
        bicubic: bool,
    },
    /// Zeroes a `size x size` square centred at a random pixel (clipped at the borders).
    Cutout {
        /// Side of the square.
        size: usize,
    },
    /// Repeats a single channel three times (three-channel images pass unchanged).
    GrayscaleToRgb,
}

impl fmt::Display for Transform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transform::ToFloat => write!(f, "to_float"),
            Transform::Normalize { mean, std } => write!(f, "normalize(mean {mean:?}, std {std:?})"),
            Transform::RandomCrop { size, padding } => {
                write!(f, "random_crop({}x{}, padding {padding})", size[0], size[1])
            }
            Transform::HFlip { p } => write!(f, "hflip({p})"),
            Transform::Resize { size, bicubic } => {
                write!(f, "resize({}x{}{})", size[0], size[1], if *bicubic { ", bicubic" } else { "" })
            }
            Transform::Cutout { size } => write!(f, "cutout({size})"),
            Transform::GrayscaleToRgb => write!(f, "grayscale_to_rgb"),
        }
    }
}

impl Transform {
    /// Whether the transform draws random numbers.
    pub fn is_random(&self) -> bool {
        matches!(self, Transform::RandomCrop { .. } | Transform::HFlip { .. } | Transform::Cutout { .. })
    }

    /// The output shape for an input of shape `[C, H, W]`, or why the transform cannot apply.
    pub fn out_shape(&self, [c, h, w]: [usize; 3]) -> Result<[usize; 3]> {
        match self {
            Transform::ToFloat | Transform::HFlip { .. } | Transform::Cutout { .. } => Ok([c, h, w]),
            Transform::Normalize { mean, std } => {
                for (what, v) in [("mean", mean), ("std", std)] {
                    if v.len() != 1 && v.len() != c {
                        bail!("{self}: {} {what} values for {c}-channel images", v.len());
                    }
                }
                Ok([c, h, w])
            }
            Transform::RandomCrop { size, padding } => {
                if size[0] > h + 2 * padding || size[1] > w + 2 * padding {
                    bail!("{self}: larger than the {h}x{w} images plus padding");
                }
                Ok([c, size[0], size[1]])
            }
            Transform::Resize { size, .. } => Ok([c, size[0], size[1]]),
            Transform::GrayscaleToRgb => match c {
                1 | 3 => Ok([3, h, w]),
                _ => bail!("{self}: the images have {c} channels (1 or 3 expected)"),
            },
        }
    }
}

/// Normalisation constants by name: `(mean, std)`.
pub fn normalize_preset(name: &str) -> Option<(Vec<f32>, Vec<f32>)> {
    Some(match name {
        "cifar10" => (vec![0.4914, 0.4822, 0.4465], vec![0.2470, 0.2435, 0.2616]),
        "cifar100" => (vec![0.5071, 0.4865, 0.4409], vec![0.2673, 0.2564, 0.2762]),
        "mnist" => (vec![0.1307], vec![0.3081]),
        "imagenet" => (vec![0.485, 0.456, 0.406], vec![0.229, 0.224, 0.225]),
        "half" => (vec![0.5], vec![0.5]),
        _ => return None,
    })
}

const NAMES: [&str; 7] = ["to_float", "normalize", "random_crop", "hflip", "resize", "cutout", "grayscale_to_rgb"];

fn count(what: &str, v: &Value) -> Result<usize> {
    match v.as_u64() {
        Some(n) => Ok(n as usize),
        None => match v.as_f64() {
            Some(f) if f >= 0.0 && f.fract() == 0.0 => Ok(f as usize),
            _ => bail!("{what} must be a whole number >= 0, got {v}"),
        },
    }
}

fn size2(what: &str, v: &Value) -> Result<[usize; 2]> {
    let s = match v.as_array() {
        Some(a) if a.len() == 2 => [count(what, &a[0])?, count(what, &a[1])?],
        Some(_) => bail!("{what} must be a number or [height, width], got {v}"),
        None => {
            let n = count(what, v)?;
            [n, n]
        }
    };
    if s[0] == 0 || s[1] == 0 {
        bail!("{what} must be > 0, got {v}");
    }
    Ok(s)
}

fn floats(what: &str, v: &Value) -> Result<Vec<f32>> {
    let list = match v.as_array() {
        Some(a) => a.iter().collect::<Vec<_>>(),
        None => vec![v],
    };
    let out = list
        .iter()
        .map(|x| x.as_f64().map(|f| f as f32).ok_or_else(|| anyhow!("{what} must be numbers, got {v}")))
        .collect::<Result<Vec<f32>>>()?;
    if out.is_empty() {
        bail!("{what} is an empty list");
    }
    Ok(out)
}

/// Parses one transform: a string (`"hflip"`, `"to_float"`, `"grayscale_to_rgb"`) or a map
/// with one transform key holding the main argument and extra keys for the other arguments:
/// `#{random_crop: 32, padding: 4}`, `#{hflip: 0.5}`, `#{resize: 224}` or `#{resize: [h, w]}`
/// (`mode: "bicubic"` for bicubic),
/// `#{cutout: 16}`, `#{normalize: "cifar10"}` (presets: cifar10, cifar100, mnist, imagenet,
/// half) or `#{normalize: [0.49, 0.48, 0.45], std: [0.25, 0.24, 0.26]}`.
pub fn parse_transform(v: &Value) -> Result<Transform> {
    if let Some(s) = v.as_str() {
        return match s {
            "to_float" => Ok(Transform::ToFloat),
            "hflip" => Ok(Transform::HFlip { p: 0.5 }),
            "grayscale_to_rgb" => Ok(Transform::GrayscaleToRgb),
            "random_crop" => bail!("random_crop needs a size: #{{random_crop: 32, padding: 4}}"),
            "resize" => bail!("resize needs a size: #{{resize: 224}}"),
            "cutout" => bail!("cutout needs a size: #{{cutout: 16}}"),
            "normalize" => {
                bail!("normalize needs constants: #{{normalize: \"cifar10\"}} or #{{normalize: [means], std: [stds]}}")
            }
            other => bail!("unknown transform `{other}` (known: {})", NAMES.join(", ")),
        };
    }
    let Some(map) = v.as_object() else {
        bail!("a transform is a string or a map like #{{random_crop: 32, padding: 4}}, got {v}");
    };
    let ops: Vec<&str> = map.keys().map(String::as_str).filter(|k| NAMES.contains(k)).collect();
    let op = match ops.as_slice() {
        [op] => *op,
        [] => bail!("no transform named in {v} (known: {})", NAMES.join(", ")),
        many => bail!("one transform per map, found {} in {v}", many.join(" and ")),
    };
    let extra: &[&str] = match op {
        "random_crop" => &["padding"],
        "normalize" => &["std"],
        "resize" => &["mode"],
        _ => &[],
    };
    if let Some(k) = map.keys().find(|k| k.as_str() != op && !extra.contains(&k.as_str())) {
        bail!(
            "{op}: unknown argument `{k}`{}",
            if extra.is_empty() { String::new() } else { format!(" (it takes {})", extra.join(", ")) }
        );
    }
    let main = &map[op];
    Ok(match op {
        "to_float" => Transform::ToFloat,
        "grayscale_to_rgb" => Transform::GrayscaleToRgb,
        "hflip" => {
            let p = match main {
                Value::Bool(true) => 0.5,
                _ => main.as_f64().ok_or_else(|| anyhow!("hflip: the probability must be a number, got {main}"))?,
            };
            if !(0.0..=1.0).contains(&p) {
                bail!("hflip: the probability must be in [0, 1], got {p}");
            }
            Transform::HFlip { p }
        }
        "random_crop" => Transform::RandomCrop {
            size: size2("random_crop size", main)?,
            padding: map.get("padding").map(|p| count("random_crop padding", p)).transpose()?.unwrap_or(0),
        },
        "resize" => {
            let bicubic = match map.get("mode").map(|m| m.as_str()) {
                None | Some(Some("bilinear")) => false,
                Some(Some("bicubic")) => true,
                Some(_) => bail!("resize: mode is \"bilinear\" or \"bicubic\", got {}", map["mode"]),
            };
            Transform::Resize { size: size2("resize size", main)?, bicubic }
        }
        "cutout" => {
            let size = count("cutout size", main)?;
            if size == 0 {
                bail!("cutout size must be > 0");
            }
            Transform::Cutout { size }
        }
        "normalize" => {
            let (mean, std) = match (main.as_str(), map.get("std")) {
                (Some(name), None) => normalize_preset(name).ok_or_else(|| {
                    anyhow!("normalize: unknown preset `{name}` (cifar10, cifar100, mnist, imagenet, half)")
                })?,
                (Some(_), Some(_)) => bail!("normalize: give a preset name or mean and std, not both"),
                (None, Some(std)) => (floats("normalize mean", main)?, floats("normalize std", std)?),
                (None, None) => bail!("normalize: std is missing: #{{normalize: [means], std: [stds]}}"),
            };
            if let Some(s) = std.iter().find(|s| **s <= 0.0 || !s.is_finite()) {
                bail!("normalize: std must be > 0, got {s}");
            }
            Transform::Normalize { mean, std }
        }
        _ => unreachable!("every name in NAMES is handled"),
    })
}

/// Parses a list of transforms (see [`parse_transform`]); errors name the item at fault.
pub fn parse_transforms(v: &Value) -> Result<Vec<Transform>> {
    let Some(items) = v.as_array() else {
        bail!("transforms must be a list, got {v}");
    };
    items.iter().enumerate().map(|(i, t)| parse_transform(t).map_err(|e| anyhow!("transform {i}: {e}"))).collect()
}

/// Reusable buffers of the loader thread.
#[derive(Default, Debug)]
pub struct Scratch {
    a: Vec<f32>,
    b: Vec<f32>,
}

/// A validated list of transforms for images of a given shape.
#[derive(Clone, Debug)]
pub struct Pipeline {
    steps: Vec<Transform>,
    in_shape: [usize; 3],
    out_shape: [usize; 3],
}

impl Pipeline {
    /// No transform: stored pixels as floats.
    pub fn identity(shape: [usize; 3]) -> Self {
        Self { steps: Vec::new(), in_shape: shape, out_shape: shape }
    }

    /// Checks `steps` against images of shape `in_shape`.
    pub fn new(steps: Vec<Transform>, in_shape: [usize; 3]) -> Result<Self> {
        let mut shape = in_shape;
        for (i, t) in steps.iter().enumerate() {
            shape = t.out_shape(shape).map_err(|e| anyhow!("transform {i}: {e}"))?;
        }
        Ok(Self { steps, in_shape, out_shape: shape })
    }

    /// The transforms.
    pub fn steps(&self) -> &[Transform] {
        &self.steps
    }

    /// Shape of the output.
    pub fn out_shape(&self) -> [usize; 3] {
        self.out_shape
    }

    /// Transforms one example into `out` (`out_shape` values). Random transforms draw from a
    /// generator seeded by `(seed, epoch, index)`.
    pub fn apply(&self, src: PixelsRef, seed: u64, epoch: u64, index: u64, out: &mut [f32], scratch: &mut Scratch) {
        if self.steps.is_empty() {
            src.to_f32(out);
            return;
        }
        let mut rng =
            self.steps.iter().any(Transform::is_random).then(|| derived_rng(seed, Purpose::Augment, epoch, index));
        let [mut c, mut h, mut w] = self.in_shape;
        scratch.a.resize(c * h * w, 0.0);
        src.to_f32(&mut scratch.a);
        for step in &self.steps {
            let rng = &mut rng;
            match step {
                Transform::ToFloat => {}
                Transform::Normalize { mean, std } => {
                    let at = |v: &[f32], ch: usize| if v.len() == 1 { v[0] } else { v[ch] };
                    for (ch, plane) in scratch.a.chunks_mut(h * w).enumerate() {
                        let (m, inv) = (at(mean, ch), 1.0 / at(std, ch));
                        plane.iter_mut().for_each(|x| *x = (*x - m) * inv);
                    }
                }
                Transform::HFlip { p } => {
                    let r: f64 = draw(rng).random();
                    if r < *p {
                        scratch.a.chunks_mut(w).for_each(|row| row.reverse());
                    }
                }
                Transform::RandomCrop { size: [sh, sw], padding } => {
                    let (sh, sw, p) = (*sh, *sw, *padding);
                    let oy = below(draw(rng), h + 2 * p - sh + 1);
                    let ox = below(draw(rng), w + 2 * p - sw + 1);
                    crop(
                        &scratch.a,
                        &mut scratch.b,
                        [c, h, w],
                        [sh, sw],
                        oy as isize - p as isize,
                        ox as isize - p as isize,
                    );
                    std::mem::swap(&mut scratch.a, &mut scratch.b);
                    (h, w) = (sh, sw);
                }
                Transform::Cutout { size } => {
                    let (cy, cx) = (below(draw(rng), h) as isize, below(draw(rng), w) as isize);
                    let half = (*size / 2) as isize;
                    let (y0, x0) = ((cy - half).max(0) as usize, (cx - half).max(0) as usize);
                    let (y1, x1) = (
                        ((cy - half + *size as isize).max(0) as usize).min(h),
                        ((cx - half + *size as isize).max(0) as usize).min(w),
                    );
                    for plane in scratch.a.chunks_mut(h * w) {
                        for y in y0..y1 {
                            plane[y * w + x0..y * w + x1].fill(0.0);
                        }
                    }
                }
                Transform::Resize { size: [oh, ow], bicubic } => {
                    if *bicubic {
                        scratch.b.clear();
                        for plane in scratch.a.chunks(h * w) {
                            // The pipeline checked the shapes, so a plane always holds h·w values.
                            match crate::ops::interpolate::bicubic_resize(plane, 1, (h, w), (*oh, *ow)) {
                                Ok(out) => scratch.b.extend_from_slice(&out),
                                Err(_) => scratch.b.resize(scratch.b.len() + oh * ow, 0.0),
                            }
                        }
                    } else {
                        resize_bilinear(&scratch.a, &mut scratch.b, [c, h, w], [*oh, *ow]);
                    }
                    std::mem::swap(&mut scratch.a, &mut scratch.b);
                    (h, w) = (*oh, *ow);
                }
                Transform::GrayscaleToRgb => {
                    if c == 1 {
                        scratch.b.clear();
                        for _ in 0..3 {
                            scratch.b.extend_from_slice(&scratch.a[..h * w]);
                        }
                        std::mem::swap(&mut scratch.a, &mut scratch.b);
                        c = 3;
                    }
                }
            }
        }
        out.copy_from_slice(&scratch.a[..c * h * w]);
    }
}

/// The pipeline's generator; present whenever a random step exists (checked in `apply`).
fn draw(rng: &mut Option<ChaCha8Rng>) -> &mut ChaCha8Rng {
    rng.get_or_insert_with(|| derived_rng(0, Purpose::Augment, 0, 0))
}

/// Copies the `[sh, sw]` window whose top-left corner is at `(oy, ox)` (may be negative or past
/// the border: zeros there).
fn crop(src: &[f32], dst: &mut Vec<f32>, [c, h, w]: [usize; 3], [sh, sw]: [usize; 2], oy: isize, ox: isize) {
    dst.clear();
    dst.resize(c * sh * sw, 0.0);
    let x_lo = (-ox).clamp(0, sw as isize) as usize;
    let x_hi = (w as isize - ox).clamp(0, sw as isize) as usize;
    if x_lo >= x_hi {
        return;
    }
    for ch in 0..c {
        for y in 0..sh {
            let sy = y as isize + oy;
            if sy < 0 || sy >= h as isize {
                continue;
            }
            let s = ch * h * w + sy as usize * w;
            let sx0 = (x_lo as isize + ox) as usize;
            let d = ch * sh * sw + y * sw;
            dst[d + x_lo..d + x_hi].copy_from_slice(&src[s + sx0..s + sx0 + (x_hi - x_lo)]);
        }
    }
}

/// Source index pairs and weights of a bilinear resize along one axis (half-pixel centres).
fn axis_weights(n_in: usize, n_out: usize) -> Vec<(usize, usize, f32)> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|o| {
            let s = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (s.floor() as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            (i0, i1, (s - i0 as f64) as f32)
        })
        .collect()
}

fn resize_bilinear(src: &[f32], dst: &mut Vec<f32>, [c, h, w]: [usize; 3], [oh, ow]: [usize; 2]) {
    let ys = axis_weights(h, oh);
    let xs = axis_weights(w, ow);
    dst.clear();
    dst.reserve(c * oh * ow);
    for ch in 0..c {
        let plane = &src[ch * h * w..(ch + 1) * h * w];
        for &(y0, y1, ly) in &ys {
            let (r0, r1) = (&plane[y0 * w..(y0 + 1) * w], &plane[y1 * w..(y1 + 1) * w]);
            for &(x0, x1, lx) in &xs {
                let top = r0[x0] + (r0[x1] - r0[x0]) * lx;
                let bottom = r1[x0] + (r1[x1] - r1[x0]) * lx;
                dst.push(top + (bottom - top) * ly);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(steps: Vec<Transform>, shape: [usize; 3], px: &[f32], seed: u64) -> Vec<f32> {
        let p = Pipeline::new(steps, shape).unwrap();
        let [c, h, w] = p.out_shape();
        let mut out = vec![0.0; c * h * w];
        p.apply(PixelsRef::F32(px), seed, 0, 0, &mut out, &mut Scratch::default());
        out
    }

    #[test]
    fn parse_forms() {
        assert_eq!(parse_transform(&json!("hflip")).unwrap(), Transform::HFlip { p: 0.5 });
        assert_eq!(
            parse_transform(&json!({"random_crop": 32, "padding": 4})).unwrap(),
            Transform::RandomCrop { size: [32, 32], padding: 4 }
        );
        assert_eq!(
            parse_transform(&json!({"resize": [8, 6]})).unwrap(),
            Transform::Resize { size: [8, 6], bicubic: false }
        );
        assert!(matches!(parse_transform(&json!({"normalize": "cifar10"})).unwrap(), Transform::Normalize { .. }));
        let e = parse_transform(&json!({"random_crop": 32, "pad": 4})).unwrap_err().to_string();
        assert!(e.contains("unknown argument `pad`"), "{e}");
        assert!(parse_transform(&json!({"hflip": 1.5})).is_err());
        assert!(parse_transform(&json!({"normalize": [0.5], "std": [0.0]})).is_err());
        assert!(parse_transform(&json!("blur")).unwrap_err().to_string().contains("unknown transform"));
    }

    #[test]
    fn crop_flip_normalize_resize() {
        // 1 channel, 2x3: [[1,2,3],[4,5,6]]
        let px = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        assert_eq!(run(vec![Transform::HFlip { p: 1.0 }], [1, 2, 3], &px, 0), vec![3.0, 2.0, 1.0, 6.0, 5.0, 4.0]);
        let n = run(vec![Transform::Normalize { mean: vec![1.0], std: vec![2.0] }], [1, 2, 3], &px, 0);
        assert_eq!(n, vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5]);
        // A crop of the full size without padding is the identity.
        assert_eq!(run(vec![Transform::RandomCrop { size: [2, 3], padding: 0 }], [1, 2, 3], &px, 3), px.to_vec());
        // With padding, the output is a window of the zero-padded image.
        let mut dst = Vec::new();
        crop(&px, &mut dst, [1, 2, 3], [2, 3], -1, 1);
        assert_eq!(dst, vec![0.0, 0.0, 0.0, 2.0, 3.0, 0.0]);
        // Upsampling a constant stays constant; 2x downsampling of a 2x2 block gives its mean.
        let up = run(vec![Transform::Resize { size: [5, 7], bicubic: false }], [1, 2, 3], &[2.0; 6], 0);
        assert!(up.iter().all(|&v| (v - 2.0).abs() < 1e-6));
        let down = run(vec![Transform::Resize { size: [1, 1], bicubic: false }], [1, 2, 2], &[1.0, 2.0, 3.0, 4.0], 0);
        assert_eq!(down, vec![2.5]);
        let rgb = run(vec![Transform::GrayscaleToRgb], [1, 1, 2], &[1.0, 2.0], 0);
        assert_eq!(rgb, vec![1.0, 2.0, 1.0, 2.0, 1.0, 2.0]);
        let cut = run(vec![Transform::Cutout { size: 100 }], [1, 2, 3], &px, 0);
        assert_eq!(cut, vec![0.0; 6]);
        assert!(Pipeline::new(vec![Transform::RandomCrop { size: [5, 5], padding: 1 }], [1, 2, 3]).is_err());
        assert!(Pipeline::new(vec![Transform::GrayscaleToRgb], [2, 2, 3]).is_err());
    }

    #[test]
    fn random_transforms_depend_on_seed_epoch_and_index_only() {
        let p = Pipeline::new(
            vec![Transform::RandomCrop { size: [8, 8], padding: 2 }, Transform::HFlip { p: 0.5 }],
            [1, 8, 8],
        )
        .unwrap();
        let px: Vec<f32> = (0..64).map(|v| v as f32).collect();
        let get = |seed, epoch, index| {
            let mut out = vec![0.0; 64];
            p.apply(PixelsRef::F32(&px), seed, epoch, index, &mut out, &mut Scratch::default());
            out
        };
        assert_eq!(get(1, 2, 3), get(1, 2, 3));
        let variants: std::collections::BTreeSet<Vec<u32>> =
            (0..20).map(|e| get(1, e, 3).iter().map(|v| v.to_bits()).collect()).collect();
        assert!(variants.len() > 5, "epochs give different crops");
    }
}

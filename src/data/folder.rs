//! Image folders: `root/<class>/*.png|jpg|jpeg`, one subfolder per class (sorted by name, as
//! torchvision's ImageFolder does), and the PNG/JPEG decoding shared with Hub datasets.

use super::Dataset;
use anyhow::{bail, Context, Result};
use image::imageops::FilterType;
use image::DynamicImage;
use std::path::{Path, PathBuf};

/// Decodes an encoded image (PNG or JPEG) to `channels` (1: gray, 3: RGB) 8-bit planes
/// `[C, H, W]`, resized (bilinear) to `size` `[H, W]` when given. Returns the pixels and shape.
pub fn decode(bytes: &[u8], what: &str, channels: usize, size: Option<[usize; 2]>) -> Result<(Vec<u8>, [usize; 3])> {
    let img = image::load_from_memory(bytes).map_err(|e| anyhow::anyhow!("{what}: unreadable image: {e}"))?;
    Ok(planes(img, channels, size))
}

/// The channel count an image has naturally: 1 for gray, 3 otherwise.
pub fn natural_channels(bytes: &[u8], what: &str) -> Result<usize> {
    let img = image::load_from_memory(bytes).map_err(|e| anyhow::anyhow!("{what}: unreadable image: {e}"))?;
    Ok(if img.color().has_color() { 3 } else { 1 })
}

fn planes(img: DynamicImage, channels: usize, size: Option<[usize; 2]>) -> (Vec<u8>, [usize; 3]) {
    let img = match size {
        Some([h, w]) if (img.height() as usize, img.width() as usize) != (h, w) => {
            img.resize_exact(w as u32, h as u32, FilterType::Triangle)
        }
        _ => img,
    };
    let (w, h) = (img.width() as usize, img.height() as usize);
    if channels == 1 {
        return (img.to_luma8().into_raw(), [1, h, w]);
    }
    let rgb = img.to_rgb8().into_raw();
    let mut out = vec![0u8; 3 * h * w];
    for (i, px) in rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            out[c * h * w + i] = px[c];
        }
    }
    (out, [3, h, w])
}

/// Maps `f` over `items` on all cores, keeping the order.
pub fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(items.len().max(1));
    if threads <= 1 {
        return items.iter().map(&f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> =
            items.chunks(chunk).map(|part| s.spawn(|| part.iter().map(&f).collect::<Vec<R>>())).collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    })
}

/// Decodes many encoded images into one `[N, C, H, W]` buffer. Every image must have the shape
/// of the first unless `size` is given. `channels` None takes the first image's (1 or 3).
/// `name(i)` names image `i` in errors.
pub fn decode_all(
    encoded: &[Vec<u8>],
    name: impl Fn(usize) -> String + Sync,
    channels: Option<usize>,
    size: Option<[usize; 2]>,
) -> Result<(Vec<u8>, [usize; 3])> {
    if encoded.is_empty() {
        bail!("no image to decode");
    }
    let channels = match channels {
        Some(c @ (1 | 3)) => c,
        Some(c) => bail!("channels must be 1 or 3, got {c}"),
        None => natural_channels(&encoded[0], &name(0))?,
    };
    let indexed: Vec<usize> = (0..encoded.len()).collect();
    let decoded = par_map(&indexed, |&i| decode(&encoded[i], &name(i), channels, size));
    let mut shape = None;
    let mut pixels = Vec::new();
    for (i, d) in decoded.into_iter().enumerate() {
        let (px, s) = d?;
        match shape {
            None => {
                shape = Some(s);
                pixels.reserve(px.len() * encoded.len());
            }
            Some(first) if first != s => bail!(
                "{} is {}x{} but {} is {}x{}; give size: [h, w] to resize all images",
                name(i),
                s[2],
                s[1],
                name(0),
                first[2],
                first[1]
            ),
            _ => {}
        }
        pixels.extend_from_slice(&px);
    }
    Ok((pixels, shape.unwrap_or([channels, 0, 0])))
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .is_some_and(|e| e == "png" || e == "jpg" || e == "jpeg")
}

fn visible_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list the folder", dir.display()))? {
        let p = e.with_context(|| format!("{}: cannot list the folder", dir.display()))?.path();
        if !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// Whether `dir` looks like an image folder: some subfolder holds a PNG or JPEG file.
pub fn is_image_folder(dir: &Path) -> bool {
    visible_entries(dir)
        .map(|es| {
            es.iter()
                .filter(|p| p.is_dir())
                .any(|d| visible_entries(d).map(|fs| fs.iter().any(|f| is_image(f))).unwrap_or(false))
        })
        .unwrap_or(false)
}

/// Loads `root/<class>/<image>`; with `split`, `root/<split>/<class>/<image>`.
pub fn load_folder(
    root: &Path,
    split: Option<&str>,
    channels: Option<usize>,
    size: Option<[usize; 2]>,
) -> Result<Dataset> {
    let root = match split {
        Some(s) => {
            let d = root.join(s);
            if !d.is_dir() {
                bail!("{}: no `{s}` subfolder for split `{s}`", root.display());
            }
            d
        }
        None => root.to_path_buf(),
    };
    let class_dirs: Vec<PathBuf> = visible_entries(&root)?.into_iter().filter(|p| p.is_dir()).collect();
    if class_dirs.is_empty() {
        bail!("{}: empty folder (expected one subfolder of PNG/JPEG images per class)", root.display());
    }
    let mut files = Vec::new();
    let mut labels = Vec::new();
    let mut classes = Vec::new();
    for (k, d) in class_dirs.iter().enumerate() {
        let imgs: Vec<PathBuf> = visible_entries(d)?.into_iter().filter(|p| p.is_file() && is_image(p)).collect();
        if imgs.is_empty() {
            bail!("{}: class folder with no PNG/JPEG image", d.display());
        }
        classes.push(d.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        labels.extend(std::iter::repeat_n(k as u32, imgs.len()));
        files.extend(imgs);
    }
    let encoded = par_map(&files, |f| std::fs::read(f).with_context(|| format!("{}: cannot read", f.display())))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let (pixels, shape) = decode_all(&encoded, |i| files[i].display().to_string(), channels, size)?;
    Dataset::from_u8(pixels, labels, shape, classes).with_context(|| root.display().to_string())
}

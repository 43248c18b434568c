//! MNIST / Fashion-MNIST IDX files, gzipped or not.
//!
//! An IDX file is two zero bytes, a type byte (0x08 for unsigned bytes), the number of
//! dimensions, each dimension as a big-endian u32, then the data. Images are `[N, H, W]`
//! (`*-images-idx3-ubyte`), labels `[N]` (`*-labels-idx1-ubyte`).

use super::Dataset;
use anyhow::{bail, Context, Result};
use flate2::read::MultiGzDecoder;
use std::io::Read;
use std::path::{Path, PathBuf};

/// An IDX array of unsigned bytes.
#[derive(Debug)]
pub struct IdxArray {
    /// Dimensions.
    pub dims: Vec<usize>,
    /// Values, row-major.
    pub data: Vec<u8>,
}

/// The most a gzip stream can expand (deflate's limit is about 1032:1), with room for headers:
/// more decompressed bytes than this per compressed byte means a corrupt or hostile file.
const MAX_GZIP_RATIO: u64 = 1100;

/// Reads a file, gunzipping it when it starts with the gzip magic bytes (never more than
/// [`MAX_GZIP_RATIO`] times the file's size).
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let limit = raw.len() as u64 * MAX_GZIP_RATIO + (1 << 20);
        let mut out = Vec::new();
        MultiGzDecoder::new(&raw[..])
            .take(limit + 1)
            .read_to_end(&mut out)
            .with_context(|| format!("{}: corrupt gzip data", path.display()))?;
        if out.len() as u64 > limit {
            bail!("{}: the gzip data expands beyond {limit} bytes: a corrupt file", path.display());
        }
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX file of unsigned bytes with `rank` dimensions.
pub fn read_idx(path: &Path, rank: usize) -> Result<IdxArray> {
    let bytes = read_maybe_gz(path)?;
    let p = path.display();
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        let magic: Vec<String> = bytes.iter().take(4).map(|b| format!("{b:02x}")).collect();
        bail!("{p}: not an IDX file (wrong magic number {}; expected 00 00 08 0{rank})", magic.join(" "));
    }
    if bytes[2] != 0x08 {
        bail!("{p}: IDX data type 0x{:02x} is not supported (only unsigned bytes, 0x08)", bytes[2]);
    }
    if bytes[3] as usize != rank {
        bail!("{p}: IDX magic number says {} dimensions, {rank} expected here", bytes[3]);
    }
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        bail!("{p}: truncated IDX header");
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| u32::from_be_bytes([bytes[4 + 4 * i], bytes[5 + 4 * i], bytes[6 + 4 * i], bytes[7 + 4 * i]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .with_context(|| format!("{p}: the header's dimensions {dims:?} overflow"))?;
    if bytes.len() - header != expected {
        bail!(
            "{p}: the header says {dims:?} ({expected} bytes of data) but the file has {} bytes of data",
            bytes.len() - header
        );
    }
    Ok(IdxArray { dims, data: bytes[header..].to_vec() })
}

/// The file of `stem` (`train-images-idx3-ubyte`, ...) in `dir`: plain or `.gz`, with a dash or
/// a dot before `idx`.
fn find(dir: &Path, prefix: &str, kind: &str) -> Option<PathBuf> {
    for sep in ['-', '.'] {
        for ext in ["", ".gz"] {
            let p = dir.join(format!(
                "{prefix}-{kind}{sep}{}{ext}",
                if kind == "images" { "idx3-ubyte" } else { "idx1-ubyte" }
            ));
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Whether `dir` holds IDX files with the standard names.
pub fn is_idx_dir(dir: &Path) -> bool {
    ["train", "t10k"].iter().any(|p| find(dir, p, "images").is_some())
}

/// The labels file beside an images file (`...images-idx3-ubyte...` -> `...labels-idx1-ubyte...`).
pub fn labels_beside(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_string_lossy().into_owned();
    for (from, to) in [("images-idx3", "labels-idx1"), ("images.idx3", "labels.idx1")] {
        if name.contains(from) {
            let p = images.with_file_name(name.replace(from, to));
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Loads a folder of IDX files (`split` train or test) or an images file and its labels file.
pub fn load_idx(
    path: &Path,
    split: Option<&str>,
    labels: Option<&Path>,
    classes: Option<Vec<String>>,
) -> Result<Dataset> {
    let (images_path, labels_path) = if path.is_dir() {
        let prefix = match split.unwrap_or("train") {
            "train" => "train",
            "test" => "t10k",
            other => bail!("{}: unknown split `{other}` (train or test)", path.display()),
        };
        let img = find(path, prefix, "images")
            .with_context(|| format!("{}: no {prefix}-images-idx3-ubyte[.gz]", path.display()))?;
        let lab = match labels {
            Some(l) => l.to_path_buf(),
            None => find(path, prefix, "labels")
                .with_context(|| format!("{}: no {prefix}-labels-idx1-ubyte[.gz]", path.display()))?,
        };
        (img, lab)
    } else {
        if let Some(s) = split {
            bail!("{}: split `{s}` is for a folder of IDX files; this is a single file", path.display());
        }
        let lab = match labels {
            Some(l) => l.to_path_buf(),
            None => labels_beside(path).with_context(|| {
                format!("{}: no labels file beside it; give labels: \"...-labels-idx1-ubyte\"", path.display())
            })?,
        };
        (path.to_path_buf(), lab)
    };
    let img = read_idx(&images_path, 3)?;
    let lab = read_idx(&labels_path, 1)?;
    if img.dims[0] != lab.dims[0] {
        bail!(
            "{} has {} images but {} has {} labels",
            images_path.display(),
            img.dims[0],
            labels_path.display(),
            lab.dims[0]
        );
    }
    let k = match &classes {
        Some(c) => c.len(),
        None => 10.max(lab.data.iter().copied().max().map(|m| m as usize + 1).unwrap_or(0)),
    };
    if let Some((i, &l)) = lab.data.iter().enumerate().find(|(_, &l)| l as usize >= k) {
        bail!("{}: label {l} of example {i} is outside the {k} classes", labels_path.display());
    }
    let classes = classes.unwrap_or_else(|| (0..k).map(|i| i.to_string()).collect());
    let labels = lab.data.iter().map(|&l| l as u32).collect();
    Dataset::from_u8(img.data, labels, [1, img.dims[1], img.dims[2]], classes)
        .with_context(|| images_path.display().to_string())
}

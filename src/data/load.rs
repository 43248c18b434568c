//! `load_dataset`: one entry point for every file format, which it detects from the path when
//! `format` is not given.

use super::cifar::{self, CifarKind, CifarLabel};
use super::hub::{load_parquet, HubOptions};
use super::{folder, idx, safetensors, Dataset};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Options of `load_dataset`. Each applies to some formats only; giving one to another format
/// is an error.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoadOptions {
    /// `cifar10`, `cifar100`, `cifar`, `mnist` (or `idx`), `folder`, `safetensors`, `parquet`;
    /// detected from the path when absent.
    pub format: Option<String>,
    /// `train` or `test` (folders; default train).
    pub split: Option<String>,
    /// CIFAR-100: `fine` (default) or `coarse`.
    pub label: Option<String>,
    /// IDX: the labels file, when it is not the images file's standard sibling.
    pub labels: Option<PathBuf>,
    /// Class names (replacing the format's own).
    pub classes: Option<Vec<String>>,
    /// Image folders and parquet: 1 (gray) or 3 (RGB); default as the first image.
    pub channels: Option<usize>,
    /// Image folders and parquet: resize every image to `[H, W]` while loading.
    pub size: Option<[usize; 2]>,
    /// Parquet: the image and label columns.
    pub image_column: Option<String>,
    /// Parquet: the label column.
    pub label_column: Option<String>,
}

/// A file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// CIFAR binary records; the kind detected when `None`.
    Cifar(Option<CifarKind>),
    /// MNIST-style IDX files.
    Idx,
    /// One subfolder of images per class.
    Folder,
    /// `images` and `labels` tensors.
    Safetensors,
    /// Hub-style parquet (image bytes and labels).
    Parquet,
}

impl Format {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "cifar10" => Format::Cifar(Some(CifarKind::Ten)),
            "cifar100" => Format::Cifar(Some(CifarKind::Hundred)),
            "cifar" => Format::Cifar(None),
            "mnist" | "fashion_mnist" | "idx" => Format::Idx,
            "folder" => Format::Folder,
            "safetensors" => Format::Safetensors,
            "parquet" => Format::Parquet,
            other => {
                bail!("unknown format `{other}` (cifar10, cifar100, cifar, mnist, idx, folder, safetensors, parquet)")
            }
        })
    }
}

fn name_of(path: &Path) -> String {
    path.file_name().map(|n| n.to_string_lossy().to_ascii_lowercase()).unwrap_or_default()
}

/// Detects the format of `path` (a file or a folder).
pub fn detect_format(path: &Path, split: Option<&str>) -> Result<Format> {
    if path.is_file() {
        let name = name_of(path);
        return Ok(if name.ends_with(".safetensors") {
            Format::Safetensors
        } else if name.ends_with(".parquet") {
            Format::Parquet
        } else if name.ends_with(".bin") {
            Format::Cifar(None)
        } else if name.contains("idx3-ubyte") || name.contains("idx1-ubyte") || name.ends_with(".gz") {
            Format::Idx
        } else {
            bail!("{}: cannot tell the format from the name; give format", path.display())
        });
    }
    if !path.is_dir() {
        bail!("{}: no such file or folder", path.display());
    }
    if cifar::find_dir(path).is_some() {
        return Ok(Format::Cifar(None));
    }
    if idx::is_idx_dir(path) {
        return Ok(Format::Idx);
    }
    if path.join(format!("{}.safetensors", split.unwrap_or("train"))).is_file() {
        return Ok(Format::Safetensors);
    }
    let sub = split.map(|s| path.join(s)).filter(|d| d.is_dir()).unwrap_or_else(|| path.to_path_buf());
    if folder::is_image_folder(&sub) {
        return Ok(Format::Folder);
    }
    if std::fs::read_dir(path).map(|mut d| d.next().is_none()).unwrap_or(false) {
        bail!("{}: empty folder", path.display());
    }
    bail!(
        "{}: cannot tell the format (no CIFAR .bin files, IDX files, <split>.safetensors or class subfolders of images); give format",
        path.display()
    )
}

fn reject(fmt: &str, opts: &LoadOptions, allowed: &[&str]) -> Result<()> {
    let given = [
        ("split", opts.split.is_some()),
        ("label", opts.label.is_some()),
        ("labels", opts.labels.is_some()),
        ("channels", opts.channels.is_some()),
        ("size", opts.size.is_some()),
        ("image_column", opts.image_column.is_some()),
        ("label_column", opts.label_column.is_some()),
    ];
    if let Some((k, _)) = given.iter().find(|(k, g)| *g && !allowed.contains(k)) {
        bail!("option `{k}` does not apply to {fmt} data");
    }
    Ok(())
}

/// Loads a dataset from `path` (see [`LoadOptions`]).
pub fn load_dataset(path: &Path, opts: &LoadOptions) -> Result<Dataset> {
    let split = opts.split.as_deref();
    let format = match &opts.format {
        Some(f) => Format::parse(f)?,
        None => detect_format(path, split)?,
    };
    if !path.exists() {
        bail!("{}: no such file or folder", path.display());
    }
    let ds = match format {
        Format::Cifar(kind) => {
            reject("CIFAR", opts, &["split", "label"])?;
            let label = match opts.label.as_deref() {
                None | Some("fine") => CifarLabel::Fine,
                Some("coarse") => CifarLabel::Coarse,
                Some(other) => bail!("label must be \"fine\" or \"coarse\", got `{other}`"),
            };
            cifar::load_cifar(path, kind, split, label)?
        }
        Format::Idx => {
            reject("IDX", opts, &["split", "labels"])?;
            return idx::load_idx(path, split, opts.labels.as_deref(), opts.classes.clone());
        }
        Format::Folder => {
            reject("image folder", opts, &["split", "channels", "size"])?;
            folder::load_folder(path, split, opts.channels, opts.size)?
        }
        Format::Safetensors => {
            reject("safetensors", opts, &["split"])?;
            let file = if path.is_dir() {
                let f = path.join(format!("{}.safetensors", split.unwrap_or("train")));
                if !f.is_file() {
                    bail!("{}: no {} for split `{}`", path.display(), name_of(&f), split.unwrap_or("train"));
                }
                f
            } else {
                if let Some(s) = split {
                    bail!("{}: split `{s}` is for a folder; this is a single file", path.display());
                }
                path.to_path_buf()
            };
            return safetensors::load_safetensors(&file, opts.classes.clone());
        }
        Format::Parquet => {
            reject("parquet", opts, &["channels", "size", "image_column", "label_column"])?;
            let ho = HubOptions {
                image_column: opts.image_column.clone(),
                label_column: opts.label_column.clone(),
                channels: opts.channels,
                size: opts.size,
                classes: opts.classes.clone(),
                ..HubOptions::default()
            };
            return load_parquet(&[path.to_path_buf()], &ho);
        }
    };
    match &opts.classes {
        Some(names) => ds.with_class_names(names.clone()).with_context(|| format!("{}: classes", path.display())),
        None => Ok(ds),
    }
}

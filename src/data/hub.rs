//! Hub datasets stored as parquet: an image column (the `datasets` layout, a struct
//! `{bytes, path}` of PNG/JPEG bytes, or plain bytes) and an integer label column. Files are found
//! in the Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`): `datasets--ORG--NAME/refs/<revision>` holds the commit,
//! `snapshots/<commit>/...` the files. A split that is not in the cache is downloaded into it
//! (see [`super::hub_download`]) unless offline. Class names come from the `huggingface`
//! metadata the `datasets` library writes into each file (the label's ClassLabel names).
//!
//! Parquet is read with the `parquet` crate's record API (no arrow).

use super::folder::decode_all;
pub use super::hub_download::download_dataset_files;
use super::Dataset;
use crate::models::hub as access;
use anyhow::{bail, Context, Result};
use parquet::basic::Compression;
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::writer::SerializedFileWriter;
use parquet::record::Field;
use parquet::schema::parser::parse_message_type;
use parquet::schema::types::Type;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Options of `hub_dataset` (and of `load_dataset` on a parquet file).
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HubOptions {
    /// Which split: files under a folder of that name or named `<split>-*.parquet`.
    pub split: String,
    /// The image column (default: the first of img, image).
    pub image_column: Option<String>,
    /// The label column (default: the first of label, labels, fine_label).
    pub label_column: Option<String>,
    /// Branch, tag or commit.
    pub revision: String,
    /// The dataset configuration (first folder of the files), when the repo has several.
    pub config: Option<String>,
    /// 1 (gray) or 3 (RGB); default: as the first image.
    pub channels: Option<usize>,
    /// Resize every image to `[H, W]` while loading.
    pub size: Option<[usize; 2]>,
    /// Class names (overrides the file's metadata).
    pub classes: Option<Vec<String>>,
}

impl Default for HubOptions {
    fn default() -> Self {
        Self {
            split: "train".into(),
            image_column: None,
            label_column: None,
            revision: "main".into(),
            config: None,
            channels: None,
            size: None,
            classes: None,
        }
    }
}

/// The Hugging Face hub cache folder, as Python's huggingface_hub finds it (the one the model
/// side uses).
pub fn hub_cache_dir() -> PathBuf {
    crate::models::hub_cache::hub_cache_dir()
}

/// Whether `HF_HUB_OFFLINE` asks for the cache only.
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| crate::models::hub_cache::env_flag(&v))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
        let p = e.with_context(|| format!("{}: cannot list", dir.display()))?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "parquet") {
            out.push(p);
        }
    }
    Ok(())
}

/// Whether a file (path relative to the snapshot) belongs to `split`.
pub(crate) fn in_split(rel: &Path, split: &str) -> bool {
    let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dirs = rel.parent().map(|p| p.iter().any(|c| c == split)).unwrap_or(false);
    dirs || name.starts_with(&format!("{split}-")) || name.starts_with(&format!("{split}."))
}

/// The split a parquet file (path relative to the snapshot) holds, by the naming rules of
/// [`in_split`]: the name up to its first `-` or `.` (`train-00000-of-00001.parquet`), or the
/// folder when the name is a number (`plain_text/train/0000.parquet`).
pub(crate) fn split_of(rel: &Path) -> String {
    let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let head = name.split(['-', '.']).next().unwrap_or_default();
    if head.is_empty() || head.bytes().all(|b| b.is_ascii_digit()) {
        if let Some(dir) = rel.parent().and_then(|p| p.file_name()) {
            return dir.to_string_lossy().into_owned();
        }
    }
    head.to_string()
}

/// The configuration of a file in a snapshot: the first folder under
/// `.../snapshots/<commit>/`, or "" for a file at the top.
fn config_of(p: &Path) -> String {
    let parts: Vec<String> = p.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    let at = parts.iter().rposition(|c| c == "snapshots").map(|i| i + 2).unwrap_or(0);
    if at + 1 < parts.len() {
        parts[at].clone()
    } else {
        String::new()
    }
}

/// Of the files of `split` (paths under `.../snapshots/<commit>/`), those of `config`; with no
/// config, all of them when they are of one configuration, else an error naming the
/// configurations. `what` names the dataset in errors.
pub(crate) fn select_config(
    what: &str,
    split: &str,
    mut files: Vec<PathBuf>,
    config: Option<&str>,
) -> Result<Vec<PathBuf>> {
    let mut configs: Vec<String> = files.iter().map(|f| config_of(f)).collect();
    configs.sort();
    configs.dedup();
    match config {
        Some(c) => {
            files.retain(|f| config_of(f) == c);
            if files.is_empty() {
                bail!(
                    "{what}: no `{split}` files under config `{c}` (configs with that split: {})",
                    configs.join(", ")
                );
            }
        }
        None if configs.len() > 1 => {
            bail!("{what}: split `{split}` exists in several configs ({}); give config", configs.join(", "))
        }
        None => {}
    }
    Ok(files)
}

/// The parquet files of `split` of dataset `repo` at `revision` in the cache folder `cache`.
pub fn resolve_dataset_files_in(cache: &Path, repo: &str, revision: &str, split: &str) -> Result<Vec<PathBuf>> {
    let root = cache.join(format!("datasets--{}", repo.replace('/', "--")));
    if !root.is_dir() {
        bail!("dataset {repo} is not in the cache ({})", root.display());
    }
    let is_commit = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit && root.join("snapshots").join(revision).is_dir() {
        revision.to_string()
    } else {
        let r = root.join("refs").join(revision);
        std::fs::read_to_string(&r)
            .with_context(|| format!("dataset {repo}: revision `{revision}` is not in the cache ({})", r.display()))?
            .trim()
            .to_string()
    };
    let snap = root.join("snapshots").join(&commit);
    if !snap.is_dir() {
        bail!("dataset {repo}: the cache names commit {commit} for `{revision}` but {} is missing", snap.display());
    }
    let mut all = Vec::new();
    walk(&snap, &mut all)?;
    let mut files: Vec<PathBuf> =
        all.iter().filter(|p| p.strip_prefix(&snap).map(|r| in_split(r, split)).unwrap_or(false)).cloned().collect();
    files.sort();
    if files.is_empty() {
        let names: Vec<String> =
            all.iter().filter_map(|p| p.strip_prefix(&snap).ok()).map(|p| p.display().to_string()).collect();
        bail!(
            "dataset {repo}@{revision}: no parquet file for split `{split}` in the cache (parquet files: {})",
            if names.is_empty() { "none".into() } else { names.join(", ") }
        );
    }
    Ok(files)
}

/// The parquet files of `split` of dataset `repo` at `revision`, from the local Hugging Face
/// cache only (no network).
pub fn resolve_dataset_files(repo: &str, revision: &str, split: &str) -> Result<Vec<PathBuf>> {
    resolve_dataset_files_in(&hub_cache_dir(), repo, revision, split)
}

/// The parquet files of a Hub dataset split (of `config`, when given): from the cache
/// `hub.cache_dir`, else downloaded into it (unless `hub.offline`).
pub fn hub_dataset_files(
    hub: &access::HubOptions,
    repo: &str,
    revision: &str,
    split: &str,
    config: Option<&str>,
) -> Result<Vec<PathBuf>> {
    let offline_note = "offline (HF_HUB_OFFLINE or --offline): the Hugging Face cache only";
    let cached = match resolve_dataset_files_in(&hub.cache_dir, repo, revision, split) {
        // The split is cached: the config rules decide, except that a config missing from the
        // cache may be on the Hub.
        Ok(found) => match select_config(&format!("dataset {repo}@{revision}"), split, found, config) {
            Ok(f) => return Ok(f),
            Err(e) if config.is_none() => return Err(e),
            Err(e) => e,
        },
        Err(e) => e,
    };
    if hub.offline {
        return Err(cached.context(offline_note));
    }
    download_dataset_files(hub, repo, revision, split, config)
}

/// Loads a Hub dataset (see the module doc), reaching the Hub as the environment says
/// (`HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_OFFLINE`, `SAMHOST_HTTP_TIMEOUT_SECS`), without progress bars.
pub fn hub_dataset(repo: &str, opts: &HubOptions) -> Result<Dataset> {
    hub_dataset_with(repo, opts, &access::HubOptions::from_env(false, false)?)
}

/// Loads a Hub dataset (see the module doc), reaching the Hub with `hub`.
pub fn hub_dataset_with(repo: &str, opts: &HubOptions, hub: &access::HubOptions) -> Result<Dataset> {
    let files = hub_dataset_files(hub, repo, &opts.revision, &opts.split, opts.config.as_deref())?;
    load_parquet(&files, opts).with_context(|| format!("dataset {repo}"))
}

fn pick(have: &[String], asked: &Option<String>, defaults: &[&str], what: &str, file: &Path) -> Result<String> {
    match asked {
        Some(c) if have.contains(c) => Ok(c.clone()),
        Some(c) => bail!("{}: no column `{c}` (columns: {})", file.display(), have.join(", ")),
        None => defaults.iter().find(|d| have.iter().any(|h| h == *d)).map(|d| d.to_string()).with_context(|| {
            format!(
                "{}: no {what} column among {} (columns: {}); give {what}_column",
                file.display(),
                defaults.join(", "),
                have.join(", ")
            )
        }),
    }
}

fn class_names_from_metadata(reader: &SerializedFileReader<std::fs::File>, label: &str) -> Option<Vec<String>> {
    let kv = reader.metadata().file_metadata().key_value_metadata()?;
    let text = kv.iter().find(|k| k.key == "huggingface")?.value.as_ref()?;
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let names = v.pointer(&format!("/info/features/{label}/names"))?.as_array()?;
    names.iter().map(|n| n.as_str().map(String::from)).collect()
}

/// Loads parquet files of images and labels (see the module doc).
pub fn load_parquet(files: &[PathBuf], opts: &HubOptions) -> Result<Dataset> {
    let mut encoded: Vec<Vec<u8>> = Vec::new();
    let mut labels: Vec<u32> = Vec::new();
    let mut origin: Vec<(usize, usize)> = Vec::new();
    let mut names: Option<Vec<String>> = None;
    for (fi, file) in files.iter().enumerate() {
        let p = file.display();
        let f = std::fs::File::open(file).with_context(|| format!("{p}: cannot open"))?;
        let reader = SerializedFileReader::new(f).with_context(|| format!("{p}: not a readable parquet file"))?;
        let root = reader.metadata().file_metadata().schema_descr().root_schema();
        let fields = root.get_fields();
        let have: Vec<String> = fields.iter().map(|t| t.name().to_string()).collect();
        let img_col = pick(&have, &opts.image_column, &["img", "image"], "image", file)?;
        let lab_col = pick(&have, &opts.label_column, &["label", "labels", "fine_label"], "label", file)?;
        if names.is_none() {
            names = class_names_from_metadata(&reader, &lab_col);
        }
        let projection = Type::group_type_builder(root.name())
            .with_fields(fields.iter().filter(|t| t.name() == img_col || t.name() == lab_col).cloned().collect())
            .build()
            .with_context(|| format!("{p}: cannot select the columns"))?;
        let rows = reader.get_row_iter(Some(projection)).with_context(|| format!("{p}: cannot read rows"))?;
        for (ri, row) in rows.enumerate() {
            let row = row.with_context(|| format!("{p}: row {ri} is unreadable"))?;
            let (mut img, mut lab) = (None, None);
            for (name, field) in row.get_column_iter() {
                if *name == img_col {
                    img = Some(image_bytes(field).with_context(|| format!("{p}: row {ri}, column `{img_col}`"))?);
                } else if *name == lab_col {
                    lab = Some(label_value(field).with_context(|| format!("{p}: row {ri}, column `{lab_col}`"))?);
                }
            }
            match (img, lab) {
                (Some(i), Some(l)) => {
                    encoded.push(i);
                    labels.push(l);
                    origin.push((fi, ri));
                }
                _ => bail!("{p}: row {ri} lacks `{img_col}` or `{lab_col}`"),
            }
        }
    }
    if encoded.is_empty() {
        bail!("{}: no rows", files.first().map(|f| f.display().to_string()).unwrap_or_default());
    }
    let name = |i: usize| format!("{}: row {}", files[origin[i].0].display(), origin[i].1);
    let (pixels, shape) = decode_all(&encoded, name, opts.channels, opts.size)?;
    let classes = match opts.classes.clone().or(names) {
        Some(c) => c,
        None => {
            let k = labels.iter().copied().max().map(|m| m as usize + 1).unwrap_or(1).max(2);
            (0..k).map(|i| i.to_string()).collect()
        }
    };
    if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= classes.len()) {
        bail!("{}: label {l} is outside the {} classes", name(i), classes.len());
    }
    Dataset::from_u8(pixels, labels, shape, classes)
}

fn image_bytes(field: &Field) -> Result<Vec<u8>> {
    match field {
        Field::Bytes(b) => Ok(b.data().to_vec()),
        Field::Group(row) => {
            for (name, f) in row.get_column_iter() {
                if name == "bytes" {
                    return match f {
                        Field::Bytes(b) => Ok(b.data().to_vec()),
                        Field::Null => bail!("the image has no bytes (only a path, which is not read)"),
                        other => bail!("`bytes` is not binary: {other}"),
                    };
                }
            }
            bail!("an image struct without a `bytes` field")
        }
        Field::Null => bail!("no image"),
        other => bail!("not image bytes: {other}"),
    }
}

fn label_value(field: &Field) -> Result<u32> {
    let v: i64 = match *field {
        Field::Byte(v) => v as i64,
        Field::Short(v) => v as i64,
        Field::Int(v) => v as i64,
        Field::Long(v) => v,
        Field::UByte(v) => v as i64,
        Field::UShort(v) => v as i64,
        Field::UInt(v) => v as i64,
        Field::ULong(v) => i64::try_from(v).unwrap_or(i64::MAX),
        Field::Null => bail!("no label"),
        ref other => bail!("the label is not an integer: {other}"),
    };
    u32::try_from(v).map_err(|_| anyhow::anyhow!("label {v} is negative or too large"))
}

/// Writes a parquet file in the `datasets` image layout: column `image_column` a struct
/// `{bytes, path}` of encoded images, column `label_column` int64, the class names in the
/// `huggingface` metadata, snappy-compressed. For tests and for exporting small sets.
pub fn write_image_parquet(
    path: &Path,
    image_column: &str,
    label_column: &str,
    images: &[Vec<u8>],
    labels: &[i64],
    class_names: Option<&[String]>,
) -> Result<()> {
    if images.len() != labels.len() {
        bail!("{} images but {} labels", images.len(), labels.len());
    }
    let schema = parse_message_type(&format!(
        "message schema {{ optional group {image_column} {{ optional binary bytes; optional binary path (STRING); }} optional int64 {label_column}; }}"
    ))?;
    let mut meta = Vec::new();
    if let Some(names) = class_names {
        let hf = serde_json::json!({"info": {"features": {
            image_column: {"_type": "Image"},
            label_column: {"_type": "ClassLabel", "names": names},
        }}});
        meta.push(KeyValue::new("huggingface".into(), hf.to_string()));
    }
    let props =
        WriterProperties::builder().set_compression(Compression::SNAPPY).set_key_value_metadata(Some(meta)).build();
    crate::fsutil::write_atomic(path, |tmp| {
        let file = std::fs::File::create(tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        let mut w = SerializedFileWriter::new(file, Arc::new(schema), Arc::new(props))?;
        let mut rg = w.next_row_group()?;
        let n = images.len();
        // img.bytes: present in every row (definition level 2).
        let mut col = rg.next_column()?.context("parquet schema: img.bytes column")?;
        let values: Vec<ByteArray> = images.iter().map(|b| ByteArray::from(b.clone())).collect();
        col.typed::<ByteArrayType>().write_batch(&values, Some(&vec![2; n]), None)?;
        col.close()?;
        // img.path: null in every row (the struct present, the field not: level 1).
        let mut col = rg.next_column()?.context("parquet schema: img.path column")?;
        col.typed::<ByteArrayType>().write_batch(&[], Some(&vec![1; n]), None)?;
        col.close()?;
        let mut col = rg.next_column()?.context("parquet schema: label column")?;
        col.typed::<Int64Type>().write_batch(labels, Some(&vec![1; n]), None)?;
        col.close()?;
        rg.close()?;
        w.close()?;
        Ok(())
    })
}

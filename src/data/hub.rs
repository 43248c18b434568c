//! Hub datasets stored as parquet: an image column (the `datasets` layout, a struct
//! `{bytes, path}` of PNG/JPEG bytes, or plain bytes) and an integer label column. Files are found
//! in the Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`): `datasets--ORG--NAME/refs/<revision>` holds the commit,
//! `snapshots/<commit>/...` the files. A split that is not in the cache is downloaded into it
//! (see [`crate::hub::datasets`]) unless offline. Class names come from the `huggingface`
//! metadata the `datasets` library writes into each file (the label's ClassLabel names).
//!
//! Parquet is read with the `parquet` crate's record API (no arrow).

use super::folder::decode_all;
use super::Dataset;
use crate::hub::{self as access, hub_dataset_files};
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

/// Loads parquet files of images and labels (see the module doc). The `parquet` crate can panic
/// on a corrupt file (seen by the file fuzzer): that is turned into an error naming the files.
pub fn load_parquet(files: &[PathBuf], opts: &HubOptions) -> Result<Dataset> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read_parquet(files, opts))) {
        Ok(r) => r,
        Err(_) => {
            let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
            bail!("{}: a corrupt parquet file (the reader failed inside)", names.join(", "))
        }
    }
}

fn read_parquet(files: &[PathBuf], opts: &HubOptions) -> Result<Dataset> {
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

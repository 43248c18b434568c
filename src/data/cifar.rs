//! CIFAR-10 and CIFAR-100 in their official binary layout.
//!
//! A CIFAR-10 record is 1 label byte + 3072 pixel bytes (R, G, B planes of 32x32); a CIFAR-100
//! record is a coarse label byte, a fine label byte, then the same 3072 pixel bytes. Folders:
//! `cifar-10-batches-bin/` (`data_batch_1.bin` .. `data_batch_5.bin`, `test_batch.bin`,
//! `batches.meta.txt`) and `cifar-100-binary/` (`train.bin`, `test.bin`,
//! `fine_label_names.txt`, `coarse_label_names.txt`).

use super::Dataset;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Pixel bytes of one record.
pub const IMAGE_BYTES: usize = 3 * 32 * 32;

/// Which CIFAR layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CifarKind {
    /// 1 label byte per record, 10 classes.
    Ten,
    /// Coarse and fine label bytes per record, 20 / 100 classes.
    Hundred,
}

/// Which CIFAR-100 label to train on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CifarLabel {
    /// The 100 fine classes.
    Fine,
    /// The 20 superclasses.
    Coarse,
}

impl CifarKind {
    /// Bytes per record.
    pub fn record_bytes(self) -> usize {
        match self {
            CifarKind::Ten => 1 + IMAGE_BYTES,
            CifarKind::Hundred => 2 + IMAGE_BYTES,
        }
    }
}

/// CIFAR-10 class names.
pub const CIFAR10_CLASSES: [&str; 10] =
    ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];

/// CIFAR-100 fine class names, in label order.
pub const CIFAR100_FINE: [&str; 100] = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
];

/// CIFAR-100 coarse class names, in label order.
pub const CIFAR100_COARSE: [&str; 20] = [
    "aquatic_mammals",
    "fish",
    "flowers",
    "food_containers",
    "fruit_and_vegetables",
    "household_electrical_devices",
    "household_furniture",
    "insects",
    "large_carnivores",
    "large_man-made_outdoor_things",
    "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores",
    "medium_mammals",
    "non-insect_invertebrates",
    "people",
    "reptiles",
    "small_mammals",
    "trees",
    "vehicles_1",
    "vehicles_2",
];

/// Parses the records of one file: pixels appended to `pixels`, labels to `labels`.
pub fn read_records(
    path: &Path,
    kind: CifarKind,
    label: CifarLabel,
    pixels: &mut Vec<u8>,
    labels: &mut Vec<u32>,
) -> Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let rec = kind.record_bytes();
    if bytes.is_empty() || !bytes.len().is_multiple_of(rec) {
        bail!(
            "{}: {} bytes is not a whole number of {rec}-byte CIFAR-{} records",
            path.display(),
            bytes.len(),
            if kind == CifarKind::Ten { "10" } else { "100" }
        );
    }
    let (offset, classes) = match (kind, label) {
        (CifarKind::Ten, _) => (0, 10),
        (CifarKind::Hundred, CifarLabel::Coarse) => (0, 20),
        (CifarKind::Hundred, CifarLabel::Fine) => (1, 100),
    };
    let header = rec - IMAGE_BYTES;
    pixels.reserve(bytes.len() / rec * IMAGE_BYTES);
    for (i, r) in bytes.chunks_exact(rec).enumerate() {
        let l = r[offset];
        if l as usize >= classes {
            bail!("{}: record {i} has label {l}, outside the {classes} classes", path.display());
        }
        labels.push(l as u32);
        pixels.extend_from_slice(&r[header..]);
    }
    Ok(())
}

/// Class names from a text file of one name per line (empty lines skipped), if present.
fn names_file(path: &Path, expected: usize) -> Result<Option<Vec<String>>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let names: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if names.len() != expected {
        bail!("{}: {} class names, {expected} expected", path.display(), names.len());
    }
    Ok(Some(names))
}

/// The files of `split` in a CIFAR folder and the kind they are.
fn split_files(dir: &Path, kind: CifarKind, split: &str) -> Result<Vec<PathBuf>> {
    let files: Vec<PathBuf> = match (kind, split) {
        (CifarKind::Ten, "train") if dir.join("data_batch_1.bin").is_file() => {
            (1..=5).map(|i| dir.join(format!("data_batch_{i}.bin"))).collect()
        }
        (CifarKind::Ten, "test") if dir.join("test_batch.bin").is_file() => vec![dir.join("test_batch.bin")],
        (_, "train" | "test") => vec![dir.join(format!("{split}.bin"))],
        _ => bail!("{}: unknown split `{split}` (train or test)", dir.display()),
    };
    if let Some(missing) = files.iter().find(|f| !f.is_file()) {
        bail!("{}: {} is missing", dir.display(), missing.file_name().map(|n| n.to_string_lossy()).unwrap_or_default());
    }
    Ok(files)
}

/// Tells CIFAR-10 from CIFAR-100 for a file: by its name, meta files beside it, then its size.
pub fn detect_kind(file: &Path) -> Result<CifarKind> {
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dir = file.parent().unwrap_or(Path::new("."));
    if name.starts_with("data_batch_") || name == "test_batch.bin" || dir.join("batches.meta.txt").is_file() {
        return Ok(CifarKind::Ten);
    }
    if dir.join("fine_label_names.txt").is_file() {
        return Ok(CifarKind::Hundred);
    }
    let len = std::fs::metadata(file).with_context(|| format!("{}: cannot read", file.display()))?.len() as usize;
    let ten = len.is_multiple_of(CifarKind::Ten.record_bytes());
    let hundred = len.is_multiple_of(CifarKind::Hundred.record_bytes());
    match (ten, hundred) {
        (true, false) => Ok(CifarKind::Ten),
        (false, true) => Ok(CifarKind::Hundred),
        (true, true) => bail!(
            "{}: the size fits both CIFAR-10 and CIFAR-100 records; give format \"cifar10\" or \"cifar100\"",
            file.display()
        ),
        (false, false) => bail!(
            "{}: {len} bytes is not a whole number of CIFAR records (3073 bytes for CIFAR-10, 3074 for CIFAR-100)",
            file.display()
        ),
    }
}

/// The CIFAR folder under `path` (`path` itself, or its `cifar-10-batches-bin` /
/// `cifar-100-binary` subfolder), if any.
pub fn find_dir(path: &Path) -> Option<PathBuf> {
    for sub in ["", "cifar-10-batches-bin", "cifar-100-binary"] {
        let d = if sub.is_empty() { path.to_path_buf() } else { path.join(sub) };
        if ["data_batch_1.bin", "test_batch.bin", "train.bin", "test.bin"].iter().any(|f| d.join(f).is_file()) {
            return Some(d);
        }
    }
    None
}

/// Loads CIFAR from a folder (`split` train or test) or one file of records (`split` None).
/// `kind` None detects it.
pub fn load_cifar(path: &Path, kind: Option<CifarKind>, split: Option<&str>, label: CifarLabel) -> Result<Dataset> {
    let files = if path.is_dir() {
        let dir = find_dir(path).with_context(|| {
            format!("{}: no CIFAR files (data_batch_1.bin, test_batch.bin, train.bin or test.bin)", path.display())
        })?;
        let split = split.unwrap_or("train");
        let probe = if dir.join("data_batch_1.bin").is_file() || dir.join("test_batch.bin").is_file() {
            CifarKind::Ten
        } else {
            kind.unwrap_or(CifarKind::Hundred)
        };
        split_files(&dir, kind.unwrap_or(probe), split)?
    } else {
        if let Some(s) = split {
            bail!("{}: split `{s}` is for a CIFAR folder; this is a single file", path.display());
        }
        vec![path.to_path_buf()]
    };
    let kind = match kind {
        Some(k) => k,
        None => detect_kind(&files[0])?,
    };
    if kind == CifarKind::Ten && label == CifarLabel::Coarse {
        bail!("{}: CIFAR-10 has no coarse labels", path.display());
    }
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for f in &files {
        read_records(f, kind, label, &mut pixels, &mut labels)?;
    }
    let dir = files[0].parent().unwrap_or(Path::new("."));
    let classes = match (kind, label) {
        (CifarKind::Ten, _) => names_file(&dir.join("batches.meta.txt"), 10)?
            .unwrap_or_else(|| CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect()),
        (CifarKind::Hundred, CifarLabel::Fine) => names_file(&dir.join("fine_label_names.txt"), 100)?
            .unwrap_or_else(|| CIFAR100_FINE.iter().map(|s| s.to_string()).collect()),
        (CifarKind::Hundred, CifarLabel::Coarse) => names_file(&dir.join("coarse_label_names.txt"), 20)?
            .unwrap_or_else(|| CIFAR100_COARSE.iter().map(|s| s.to_string()).collect()),
    };
    Dataset::from_u8(pixels, labels, [3, 32, 32], classes).with_context(|| path.display().to_string())
}

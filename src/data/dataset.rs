//! An in-memory image classification dataset: pixels stored once (u8 as u8, f32 as f32), labels,
//! optional label-noise bookkeeping, class names, a transform pipeline applied by the loader,
//! and cheap views (subsets, splits) that share the pixels.

use super::seed::{below, derived_rng, Purpose};
use super::transforms::{Pipeline, Scratch, Transform};
use anyhow::{bail, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Stored pixels of every example, `[N, C, H, W]` row-major. u8 pixels stand for `v / 255`.
#[derive(Debug)]
pub enum Pixels {
    /// 8-bit pixels (CIFAR, MNIST, PNG/JPEG), a quarter of the memory of floats.
    U8(Vec<u8>),
    /// Float pixels, used exactly as given.
    F32(Vec<f32>),
}

impl Pixels {
    /// Number of stored values.
    pub fn len(&self) -> usize {
        match self {
            Pixels::U8(v) => v.len(),
            Pixels::F32(v) => v.len(),
        }
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `"u8"` or `"f32"`.
    pub fn dtype(&self) -> &'static str {
        match self {
            Pixels::U8(_) => "u8",
            Pixels::F32(_) => "f32",
        }
    }
}

/// The stored pixels of one example.
#[derive(Clone, Copy, Debug)]
pub enum PixelsRef<'a> {
    /// 8-bit pixels (`v / 255` as floats).
    U8(&'a [u8]),
    /// Float pixels.
    F32(&'a [f32]),
}

impl PixelsRef<'_> {
    /// Writes the pixels as floats into `out` (u8 scaled to [0, 1]).
    pub fn to_f32(&self, out: &mut [f32]) {
        match self {
            PixelsRef::U8(s) => {
                let table = u8_table();
                for (o, &v) in out.iter_mut().zip(s.iter()) {
                    *o = table[v as usize];
                }
            }
            PixelsRef::F32(s) => out.copy_from_slice(s),
        }
    }
}

/// `v / 255` for every byte value (exactly the division, as torchvision's `ToTensor`).
fn u8_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|i| i as f32 / 255.0))
}

/// A dataset, or a view of one. Cloning is cheap and shares the pixels.
#[derive(Clone, Debug)]
pub struct Dataset {
    pixels: Arc<Pixels>,
    /// Shape `[C, H, W]` of a stored example.
    stored_shape: [usize; 3],
    /// Training labels, one per stored example.
    labels: Arc<Vec<u32>>,
    /// True labels, one per stored example, when label noise was applied.
    clean_labels: Option<Arc<Vec<u32>>>,
    classes: Arc<Vec<String>>,
    /// Which stored examples this view holds, in order (all of them when `None`).
    indices: Option<Arc<Vec<usize>>>,
    /// Transforms applied by the loader.
    pipeline: Arc<Pipeline>,
    /// Epochs handed out by [`Dataset::next_epoch`], shared by the clones of this value.
    epochs: Arc<AtomicU64>,
}

impl Dataset {
    /// A dataset of float pixels (`images.len() = N·C·H·W`). Checks sizes and label range.
    pub fn new(images: Vec<f32>, labels: Vec<u32>, shape: [usize; 3], classes: Vec<String>) -> Result<Self> {
        Self::from_pixels(Pixels::F32(images), labels, shape, classes)
    }

    /// A dataset of 8-bit pixels.
    pub fn from_u8(images: Vec<u8>, labels: Vec<u32>, shape: [usize; 3], classes: Vec<String>) -> Result<Self> {
        Self::from_pixels(Pixels::U8(images), labels, shape, classes)
    }

    /// A dataset from stored pixels. Checks sizes and label range.
    pub fn from_pixels(pixels: Pixels, labels: Vec<u32>, shape: [usize; 3], classes: Vec<String>) -> Result<Self> {
        let per = shape.iter().product::<usize>();
        if per == 0 {
            bail!("dataset: image shape {shape:?} has no pixels");
        }
        if classes.is_empty() {
            bail!("dataset: no class");
        }
        if pixels.len() != per * labels.len() {
            bail!(
                "dataset: {} labels but {} pixel values ({} images of shape {shape:?})",
                labels.len(),
                pixels.len(),
                pixels.len() as f64 / per as f64
            );
        }
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= classes.len()) {
            bail!("dataset: label {l} of example {i} is outside the {} classes", classes.len());
        }
        Ok(Self {
            pixels: Arc::new(pixels),
            stored_shape: shape,
            labels: Arc::new(labels),
            clean_labels: None,
            classes: Arc::new(classes),
            indices: None,
            pipeline: Arc::new(Pipeline::identity(shape)),
            epochs: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Number of examples in this view.
    pub fn len(&self) -> usize {
        match &self.indices {
            Some(ix) => ix.len(),
            None => self.labels.len(),
        }
    }

    /// Whether the view holds no example.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The stored index of the `i`-th example of this view.
    pub fn stored_index(&self, i: usize) -> usize {
        match &self.indices {
            Some(ix) => ix[i],
            None => i,
        }
    }

    /// Shape `[C, H, W]` of an example as the loader yields it (after the transforms).
    pub fn shape(&self) -> [usize; 3] {
        self.pipeline.out_shape()
    }

    /// Shape `[C, H, W]` of a stored example (before the transforms).
    pub fn stored_shape(&self) -> [usize; 3] {
        self.stored_shape
    }

    /// `"u8"` or `"f32"`: how the pixels are stored.
    pub fn pixel_dtype(&self) -> &'static str {
        self.pixels.dtype()
    }

    /// Class names.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }

    /// A copy with other class names (as many as there are classes).
    pub fn with_class_names(&self, names: Vec<String>) -> Result<Self> {
        if names.len() != self.classes.len() {
            bail!("{} class names given for {} classes", names.len(), self.classes.len());
        }
        Ok(Self { classes: Arc::new(names), ..self.clone() })
    }

    /// The (possibly noisy) training label of example `i` of this view.
    pub fn label(&self, i: usize) -> u32 {
        self.labels[self.stored_index(i)]
    }

    /// The clean label of example `i` (equal to [`Dataset::label`] without label noise).
    pub fn clean_label(&self, i: usize) -> u32 {
        let s = self.stored_index(i);
        match &self.clean_labels {
            Some(c) => c[s],
            None => self.labels[s],
        }
    }

    /// Whether label noise was applied.
    pub fn is_noisy(&self) -> bool {
        self.clean_labels.is_some()
    }

    /// The stored pixels of example `i` of this view.
    pub fn pixels(&self, i: usize) -> PixelsRef<'_> {
        let per = self.stored_shape.iter().product::<usize>();
        let s = self.stored_index(i);
        match self.pixels.as_ref() {
            Pixels::U8(v) => PixelsRef::U8(&v[s * per..(s + 1) * per]),
            Pixels::F32(v) => PixelsRef::F32(&v[s * per..(s + 1) * per]),
        }
    }

    /// The stored pixels of example `i` as floats (u8 scaled to [0, 1]), without the transforms.
    pub fn image(&self, i: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.stored_shape.iter().product()];
        self.pixels(i).to_f32(&mut out);
        out
    }

    /// Writes example `i` as the loader yields it (transforms applied; random ones drawn from
    /// `(seed, epoch, stored index)`) into `out`, which holds `shape()` values.
    pub fn example_into(&self, i: usize, seed: u64, epoch: u64, out: &mut [f32], scratch: &mut Scratch) {
        let stored = self.stored_index(i);
        self.pipeline.apply(self.pixels(i), seed, epoch, stored as u64, out, scratch);
    }

    /// The transforms the loader applies.
    pub fn transforms(&self) -> &[Transform] {
        self.pipeline.steps()
    }

    /// The same examples with `steps` as the loader's transforms (replacing any earlier list).
    pub fn with_transforms(&self, steps: Vec<Transform>) -> Result<Self> {
        let pipeline = Pipeline::new(steps, self.stored_shape)?;
        Ok(Self { pipeline: Arc::new(pipeline), epochs: Arc::new(AtomicU64::new(0)), ..self.clone() })
    }

    /// The same examples with the random transforms (crops, flips, cutout) left out, as
    /// evaluation takes them. A random crop that changes the image's size stays (leaving it out
    /// would change the shape the model sees).
    pub fn without_augmentation(&self) -> Result<Self> {
        let steps = self.transforms();
        if !steps.iter().any(Transform::is_random) {
            return Ok(self.clone());
        }
        let mut kept: Vec<Transform> = Vec::new();
        for t in steps {
            let keep = match t {
                Transform::RandomCrop { size, .. } => {
                    let [_, h, w] = Pipeline::new(kept.clone(), self.stored_shape)?.out_shape();
                    *size != [h, w]
                }
                t => !t.is_random(),
            };
            if keep {
                kept.push(t.clone());
            }
        }
        self.with_transforms(kept)
    }

    /// The next epoch number of this dataset (0, 1, 2, ...), for loaders that are not told one.
    pub fn next_epoch(&self) -> u64 {
        self.epochs.fetch_add(1, Ordering::Relaxed)
    }

    /// A view of the examples at `positions` (indices into this view).
    pub fn select(&self, positions: &[usize]) -> Result<Self> {
        let n = self.len();
        if let Some(p) = positions.iter().find(|&&p| p >= n) {
            bail!("dataset: index {p} out of range for {n} examples");
        }
        let stored: Vec<usize> = positions.iter().map(|&p| self.stored_index(p)).collect();
        Ok(Self { indices: Some(Arc::new(stored)), epochs: Arc::new(AtomicU64::new(0)), ..self.clone() })
    }

    /// The first `n` examples (all of them when `n` is larger).
    pub fn subset(&self, n: usize) -> Result<Self> {
        self.select(&(0..n.min(self.len())).collect::<Vec<_>>())
    }

    /// A seeded random split into `(first, rest)`, `round(fraction·N)` examples in the first
    /// part (e.g. a validation set). Each part keeps the order of this view.
    pub fn split(&self, fraction: f64, seed: u64) -> Result<(Self, Self)> {
        if !(0.0..=1.0).contains(&fraction) {
            bail!("split: the fraction must be in [0, 1], got {fraction}");
        }
        let n = self.len();
        let k = (fraction * n as f64).round() as usize;
        let mut order: Vec<usize> = (0..n).collect();
        let mut rng = derived_rng(seed, Purpose::Split, 0, 0);
        for i in 0..k {
            order.swap(i, i + below(&mut rng, n - i));
        }
        let (a, b) = order.split_at_mut(k);
        a.sort_unstable();
        b.sort_unstable();
        Ok((self.select(a)?, self.select(b)?))
    }

    /// The same examples with new training labels (one per example of this view); the current
    /// clean labels stay the clean ones. The pixels are shared, not copied.
    pub fn with_labels(&self, noisy: Vec<u32>) -> Result<Self> {
        if noisy.len() != self.len() {
            bail!("dataset: {} new labels for {} examples", noisy.len(), self.len());
        }
        if let Some((i, l)) = noisy.iter().enumerate().find(|(_, &l)| l as usize >= self.classes.len()) {
            bail!("dataset: new label {l} of example {i} is outside the {} classes", self.classes.len());
        }
        let clean: Vec<u32> = match &self.clean_labels {
            Some(c) => c.to_vec(),
            None => self.labels.to_vec(),
        };
        let mut labels = self.labels.to_vec();
        let mut seen = vec![false; labels.len()];
        for (i, &l) in noisy.iter().enumerate() {
            let s = self.stored_index(i);
            if std::mem::replace(&mut seen[s], true) {
                bail!("dataset: this view holds stored example {s} twice; new labels would conflict");
            }
            labels[s] = l;
        }
        Ok(Self {
            labels: Arc::new(labels),
            clean_labels: Some(Arc::new(clean)),
            epochs: Arc::new(AtomicU64::new(0)),
            ..self.clone()
        })
    }

    /// The training labels of this view, in order.
    pub fn labels(&self) -> Vec<u32> {
        (0..self.len()).map(|i| self.label(i)).collect()
    }

    /// The clean labels of this view, in order.
    pub fn clean_labels(&self) -> Vec<u32> {
        (0..self.len()).map(|i| self.clean_label(i)).collect()
    }

    /// Which examples of this view carry a corrupted label.
    pub fn noise_mask(&self) -> Vec<bool> {
        (0..self.len()).map(|i| self.label(i) != self.clean_label(i)).collect()
    }

    /// The realised share of corrupted labels in this view (0 without noise or when empty).
    pub fn noise_rate(&self) -> f64 {
        if self.is_empty() {
            return 0.0;
        }
        self.noise_mask().iter().filter(|&&b| b).count() as f64 / self.len() as f64
    }

    /// The realised transition matrix `T[i][j]`: the share of examples of true class `i` that
    /// carry label `j` (rows of absent classes are all zero).
    pub fn transition_matrix(&self) -> Vec<Vec<f64>> {
        let k = self.num_classes();
        let mut counts = vec![vec![0usize; k]; k];
        for i in 0..self.len() {
            counts[self.clean_label(i) as usize][self.label(i) as usize] += 1;
        }
        counts
            .into_iter()
            .map(|row| {
                let n: usize = row.iter().sum();
                row.into_iter().map(|c| if n == 0 { 0.0 } else { c as f64 / n as f64 }).collect()
            })
            .collect()
    }

    /// A one-line description: size, shape, storage, classes, noise and transforms.
    pub fn describe(&self) -> String {
        let [c, h, w] = self.stored_shape;
        let mut s = format!(
            "Dataset({} examples, {c}x{h}x{w} {}, {} classes",
            self.len(),
            self.pixels.dtype(),
            self.num_classes()
        );
        if self.is_noisy() {
            s += &format!(", label noise {:.4}", self.noise_rate());
        }
        if !self.transforms().is_empty() {
            let names: Vec<String> = self.transforms().iter().map(|t| t.to_string()).collect();
            let [c, h, w] = self.shape();
            s += &format!(", transforms [{}] -> {c}x{h}x{w}", names.join(", "));
        }
        s + ")"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Dataset {
        let px: Vec<u8> = (0..6 * 2).map(|v| v as u8).collect();
        Dataset::from_u8(px, vec![0, 1, 2, 0, 1, 2], [1, 1, 2], vec!["a".into(), "b".into(), "c".into()]).unwrap()
    }

    #[test]
    fn views_share_pixels_and_relabel() {
        let ds = tiny();
        assert_eq!(ds.image(1), vec![2.0 / 255.0, 3.0 / 255.0]);
        let v = ds.select(&[4, 1]).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v.label(0), 1);
        let noisy = v.with_labels(vec![2, 1]).unwrap();
        assert!(noisy.is_noisy());
        assert_eq!(noisy.labels(), vec![2, 1]);
        assert_eq!(noisy.clean_labels(), vec![1, 1]);
        assert_eq!(noisy.noise_mask(), vec![true, false]);
        assert_eq!(noisy.noise_rate(), 0.5);
        assert_eq!(noisy.transition_matrix()[1], vec![0.0, 0.5, 0.5]);
        assert!(ds.select(&[6]).is_err());
        assert!(Dataset::from_u8(vec![0; 3], vec![0], [1, 1, 2], vec!["a".into()]).is_err());
        assert!(Dataset::from_u8(vec![0; 2], vec![3], [1, 1, 2], vec!["a".into()]).is_err());
    }
}

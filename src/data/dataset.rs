//! An in-memory image classification dataset, with optional label noise bookkeeping.

use anyhow::{bail, Result};
use std::sync::Arc;

/// Pixels of every example, `[N, C, H, W]` row-major, as floats.
#[derive(Clone, Debug)]
pub struct Dataset {
    images: Arc<Vec<f32>>,
    labels: Arc<Vec<u32>>,
    clean_labels: Option<Arc<Vec<u32>>>,
    classes: Arc<Vec<String>>,
    shape: [usize; 3],
    /// Which stored examples this view holds, in order (all of them when `None`).
    indices: Option<Arc<Vec<usize>>>,
}

impl Dataset {
    /// A dataset from raw parts. Checks sizes and label range.
    pub fn new(images: Vec<f32>, labels: Vec<u32>, shape: [usize; 3], classes: Vec<String>) -> Result<Self> {
        let per = shape.iter().product::<usize>();
        if per == 0 {
            bail!("dataset: image shape {shape:?} has no pixels");
        }
        if images.len() != per * labels.len() {
            bail!(
                "dataset: {} labels but {} pixel values ({} images of shape {shape:?})",
                labels.len(),
                images.len(),
                images.len() as f64 / per as f64
            );
        }
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= classes.len()) {
            bail!("dataset: label {l} of example {i} is outside the {} classes", classes.len());
        }
        Ok(Self {
            images: Arc::new(images),
            labels: Arc::new(labels),
            clean_labels: None,
            classes: Arc::new(classes),
            shape,
            indices: None,
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

    /// Image shape `[C, H, W]`.
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    /// Class names.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.classes.len()
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

    /// The pixels of example `i` of this view.
    pub fn image(&self, i: usize) -> &[f32] {
        let per = self.shape.iter().product::<usize>();
        let s = self.stored_index(i);
        &self.images[s * per..(s + 1) * per]
    }

    /// A view of the examples at `positions` (indices into this view).
    pub fn select(&self, positions: &[usize]) -> Result<Self> {
        let n = self.len();
        if let Some(p) = positions.iter().find(|&&p| p >= n) {
            bail!("dataset: index {p} out of range for {n} examples");
        }
        let stored: Vec<usize> = positions.iter().map(|&p| self.stored_index(p)).collect();
        Ok(Self { indices: Some(Arc::new(stored)), ..self.clone() })
    }

    /// The same examples with new training labels (one per example of this view); the current
    /// labels become the clean ones. The result is a standalone dataset (no view).
    pub fn with_labels(&self, noisy: Vec<u32>) -> Result<Self> {
        if noisy.len() != self.len() {
            bail!("dataset: {} new labels for {} examples", noisy.len(), self.len());
        }
        let per = self.shape.iter().product::<usize>();
        let mut images = Vec::with_capacity(self.len() * per);
        for i in 0..self.len() {
            images.extend_from_slice(self.image(i));
        }
        let clean: Vec<u32> = (0..self.len()).map(|i| self.clean_label(i)).collect();
        let mut ds = Self::new(images, noisy, self.shape, self.classes.to_vec())?;
        ds.clean_labels = Some(Arc::new(clean));
        Ok(ds)
    }
}

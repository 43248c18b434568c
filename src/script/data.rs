//! Dataset, batch and batch-iterator script types.

use super::convert::{err, op, options, to_usize, Res};
use crate::data::loader::{epoch_order, BatchOptions};
use crate::data::synthetic::{synthetic, SyntheticConfig};
use crate::data::{Batch, Batches, Dataset};
use crate::session::Session;
use candle_core::Tensor;
use rhai::{Array, Dynamic, Engine, EvalAltResult, Map, FLOAT, INT};
use std::rc::Rc;

/// The batches of one epoch, iterable from a Rhai `for` loop.
#[derive(Clone)]
pub struct EpochBatches(pub Batches);

impl IntoIterator for EpochBatches {
    type Item = Result<Batch, Box<EvalAltResult>>;
    type IntoIter = std::iter::Map<Batches, fn(anyhow::Result<Batch>) -> Self::Item>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.map(|r| r.map_err(|e| err(format!("batches: {e:#}"))))
    }
}

/// Registers the data API.
pub fn register(engine: &mut Engine, session: &Rc<Session>) {
    engine.register_type_with_name::<Dataset>("Dataset");
    engine.register_type_with_name::<Batch>("Batch");
    engine.register_type_with_name::<EpochBatches>("Batches");
    engine.register_iterator_result::<EpochBatches, Batch>();

    api!(engine, "synthetic", "options: Map -> Dataset",
        "A built-in dataset with real structure (class prototypes, random shifts and contrast, pixel noise), so experiments and tests need no files. Options: n (1000), classes (10), shape ([3, 16, 16]), seed (0: prototypes and sample), sample_seed (another sample of the same classes, e.g. a test set), noise (0.6), max_shift (2).",
        |o: Map| -> Res<Dataset> { op("synthetic", synthetic(&options::<SyntheticConfig>("synthetic", &o)?)) });

    let s = session.clone();
    api!(engine, "batches", "ds: Dataset, size: int, options: Map -> Batches",
        "The batches of one epoch, for a `for` loop. Options: shuffle (true), seed (drawn from the host generator when absent), drop_last (false), epoch (0: with a fixed seed, each epoch number gives its own order).",
        move |ds: &mut Dataset, size: INT, o: Map| -> Res<EpochBatches> {
            let bo: BatchOptions = options("batches", &o)?;
            let seed = bo.seed.unwrap_or_else(|| s.rng.next_seed());
            let order = epoch_order(ds.len(), bo.shuffle, seed, bo.epoch);
            Ok(EpochBatches(op("batches", Batches::new(ds.clone(), order, to_usize("batch size", size)?, bo.drop_last, s.device.clone()))?))
        });
    let s = session.clone();
    api!(
        engine,
        "batches",
        "ds: Dataset, size: int -> Batches",
        "Shuffled batches of one epoch.",
        move |ds: &mut Dataset, size: INT| -> Res<EpochBatches> {
            let order = epoch_order(ds.len(), true, s.rng.next_seed(), 0);
            Ok(EpochBatches(op(
                "batches",
                Batches::new(ds.clone(), order, to_usize("batch size", size)?, false, s.device.clone()),
            )?))
        }
    );
    api!(
        engine,
        "len",
        "b: Batches -> int",
        "Number of batches in the epoch.",
        |b: &mut EpochBatches| b.0.num_batches() as INT
    );

    api!(
        engine,
        "batch",
        "images: Tensor, labels: Tensor -> Batch",
        "A batch from tensors: images with the batch first, integer labels [N].",
        |x: Tensor, y: Tensor| op("batch", Batch::new(x, y))
    );
    getter!(engine, "images", "Tensor", "The batch's inputs.", |b: &mut Batch| b.images.clone());
    getter!(engine, "labels", "Tensor", "The batch's labels [N] (u32).", |b: &mut Batch| b.labels.clone());
    api!(engine, "len", "b: Batch -> int", "Number of examples in the batch.", |b: &mut Batch| b.len() as INT);

    api!(engine, "len", "ds: Dataset -> int", "Number of examples.", |d: &mut Dataset| d.len() as INT);
    getter!(engine, "num_classes", "int", "Number of classes.", |d: &mut Dataset| d.num_classes() as INT);
    getter!(engine, "classes", "Array", "Class names.", |d: &mut Dataset| -> Array {
        d.classes().iter().map(|c| Dynamic::from(c.clone())).collect()
    });
    getter!(engine, "shape", "Array", "Image shape [C, H, W].", |d: &mut Dataset| -> Array {
        d.shape().iter().map(|&x| Dynamic::from_int(x as INT)).collect()
    });
    api!(engine, "subset", "ds: Dataset, n: int -> Dataset", "The first n examples.", |d: &mut Dataset,
                                                                                       n: INT|
     -> Res<Dataset> {
        let n = to_usize("subset", n)?.min(d.len());
        op("subset", d.select(&(0..n).collect::<Vec<_>>()))
    });
    api!(engine, "split", "ds: Dataset, fraction: float, seed: int -> Array",
        "A seeded random split: [first, rest] with round(fraction·N) examples in the first part (e.g. a validation set).",
        |d: &mut Dataset, f: FLOAT, seed: INT| -> Res<Array> {
            if !(0.0..=1.0).contains(&f) {
                return Err(err(format!("split: fraction must be in [0, 1], got {f}")));
            }
            let order = epoch_order(d.len(), true, seed as u64, 0);
            let k = (f * d.len() as f64).round() as usize;
            let (a, b) = order.split_at(k);
            Ok(vec![Dynamic::from(op("split", d.select(a))?), Dynamic::from(op("split", d.select(b))?)])
        });
}

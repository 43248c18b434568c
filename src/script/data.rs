//! Dataset, batch and batch-iterator script types.

use super::convert::{err, number, op, options, to_json, to_usize, Res};
use crate::data::hub::{hub_dataset_with, HubOptions};
use crate::data::loader::Loader;
use crate::data::noise::parse_class_map;
use crate::data::synthetic::{synthetic, SyntheticConfig};
use crate::data::transforms::parse_transforms;
use crate::data::{load_dataset, Batch, BatchOptions, Batches, Dataset, LoadOptions, NoiseKind};
use crate::hub::HubOptions as HubAccess;
use crate::session::Session;
use candle_core::{Device, Tensor};
use rhai::{Array, Dynamic, Engine, EvalAltResult, Map, FLOAT, INT};
use std::path::Path;
use std::rc::Rc;

/// The batches of one epoch, iterable from a Rhai `for` loop (the loader thread starts with
/// the loop).
#[derive(Clone)]
pub struct EpochBatches(pub Batches);

impl IntoIterator for EpochBatches {
    type Item = Result<Batch, Box<EvalAltResult>>;
    type IntoIter = std::iter::Map<Loader, fn(anyhow::Result<Batch>) -> Self::Item>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter().map(|r| r.map_err(|e| err(format!("batches: {e:#}"))))
    }
}

fn u32_tensor(what: &str, v: Vec<u32>, device: &Device) -> Res<Tensor> {
    let n = v.len();
    op(what, Tensor::from_vec(v, n, device))
}

fn epoch_batches(s: &Session, ds: &Dataset, size: INT, bo: &BatchOptions) -> Res<EpochBatches> {
    let seed = bo.seed.unwrap_or_else(|| s.rng.next_seed());
    let epoch = bo.epoch.unwrap_or_else(|| ds.next_epoch());
    let size = to_usize("batch size", size)?;
    // With several ranks, each takes its share of every batch (the same batches on every rank).
    let w = crate::dist::world();
    let batches = op(
        "batches",
        Batches::epoch(ds, size, bo, seed, epoch, s.device()).and_then(|b| b.sharded(w.rank(), w.size())),
    )?;
    // The progress display learns the epoch's length from the iterator the loop will run over.
    if let Ok(mut r) = s.run.try_borrow_mut() {
        r.progress.begin_epoch(batches.num_batches());
    }
    Ok(EpochBatches(batches))
}

fn noisy(ds: &Dataset, kind: &str, rate: &Dynamic, seed: INT, map: Option<Map>) -> Res<Dataset> {
    let rate = number("with_label_noise rate", rate)?;
    let map = match map {
        Some(m) => match to_json(&Dynamic::from_map(m))? {
            serde_json::Value::Object(o) => Some(op("with_label_noise", parse_class_map(&o, ds.classes()))?),
            _ => return Err(err("with_label_noise: the class map must be a map")),
        },
        None => None,
    };
    let kind = op("with_label_noise", NoiseKind::parse(kind, map))?;
    op("with_label_noise", ds.with_label_noise(&kind, rate, seed as u64))
}

/// Registers the data API.
pub fn register(engine: &mut Engine, session: &Rc<Session>) {
    engine.register_type_with_name::<Dataset>("Dataset");
    engine.register_type_with_name::<Batch>("Batch");
    engine.register_type_with_name::<EpochBatches>("Batches");
    engine.register_iterator_result::<EpochBatches, Batch>();

    api!(engine, "load_dataset", "path: String, options: Map -> Dataset",
        "A dataset from files, the format detected from the path unless `format` is given: CIFAR-10 (`cifar-10-batches-bin/`, or one file of records), CIFAR-100 (`cifar-100-binary/`), MNIST / Fashion-MNIST IDX files (.gz or not: a folder with the standard names, or the images file), an image folder (one subfolder of PNG/JPEG files per class, class names kept), safetensors (`images` [N,C,H,W] u8 or f32, `labels` [N]; a folder with train.safetensors / test.safetensors), or a parquet file. u8 pixels are stored as u8 and read as floats in [0,1]; f32 pixels are taken exactly as they are.\nOptions: format (cifar10, cifar100, cifar, mnist, idx, folder, safetensors, parquet), split (\"train\" (default) or \"test\", for folders), label (CIFAR-100: \"fine\" (default) or \"coarse\"), labels (IDX: the labels file), classes (class names), channels (folders/parquet: 1 or 3), size (folders/parquet: resize to [h, w] while loading), image_column, label_column (parquet). Bad files fail with the file and what is wrong.",
        |path: &str, o: Map| -> Res<Dataset> {
            let lo: LoadOptions = options("load_dataset", &o)?;
            op("load_dataset", load_dataset(Path::new(path), &lo))
        });
    api!(
        engine,
        "load_dataset",
        "path: String -> Dataset",
        "A dataset from files, the format detected from the path (split train).",
        |path: &str| -> Res<Dataset> { op("load_dataset", load_dataset(Path::new(path), &LoadOptions::default())) }
    );

    let s = session.clone();
    let hub = move |repo: &str, o: Map| -> Res<Dataset> {
        let ho: HubOptions = options("hub_dataset", &o)?;
        let access = op("hub_dataset", HubAccess::from_env(s.offline, !s.quiet))?;
        op("hub_dataset", hub_dataset_with(repo, &ho, &access))
    };
    let f = hub.clone();
    api!(engine, "hub_dataset", "repo: String, options: Map -> Dataset",
        "A Hugging Face Hub dataset stored as parquet (image bytes and an integer label), e.g. \"uoft-cs/cifar10\", read from the Hugging Face cache (HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub), else the split's parquet files are downloaded into it with timeouts (HF_ENDPOINT, HF_TOKEN; SAMHOST_HTTP_TIMEOUT_SECS); HF_HUB_OFFLINE=1 or --offline reads the cache only. Class names come from the files' metadata. Options: split (\"train\"), image_column (img or image), label_column (label, labels or fine_label), revision (\"main\"; \"refs/convert/parquet\" for the Hub's parquet copy of a dataset stored otherwise), config (when the repo has several), channels (1 or 3), size ([h, w]: resize while loading), classes.",
        hub);
    api!(
        engine,
        "hub_dataset",
        "repo: String -> Dataset",
        "The train split of a Hub parquet dataset.",
        move |repo: &str| f(repo, Map::new())
    );

    api!(engine, "synthetic", "options: Map -> Dataset",
        "A built-in dataset with real structure (class prototypes sharing a common pattern, random shifts and contrast, pixel noise), so experiments and tests need no files. Options: n (1000), classes (10), shape ([3, 16, 16]), seed (0: prototypes and sample), sample_seed (another sample of the same classes, e.g. a test set), noise (1.5: pixel noise), separation (0.5: how far class prototypes stand from their common pattern), max_shift (2).",
        |o: Map| -> Res<Dataset> { op("synthetic", synthetic(&options::<SyntheticConfig>("synthetic", &o)?)) });

    api!(engine, "transform", "ds: Dataset, transforms: Array -> Dataset",
        "The same examples with transforms the loader applies to each example (replacing any earlier list), in order. An item is a string or a map whose one transform key holds the main argument and whose other keys the extra ones:\n\"to_float\" (u8 -> [0,1] floats; always done first, so optional), #{normalize: \"cifar10\"} (presets cifar10, cifar100, mnist, imagenet, half) or #{normalize: [0.49, 0.48, 0.45], std: [0.25, 0.24, 0.26]}, #{random_crop: 32, padding: 4} (zero padding), \"hflip\" or #{hflip: 0.5}, #{resize: 224} or #{resize: [h, w]} (bilinear), #{cutout: 16}, \"grayscale_to_rgb\".\nRandom transforms are drawn from (seed, epoch, example), so batches are the same whatever the threads. Example: ds.transform([#{random_crop: 32, padding: 4}, \"hflip\", #{normalize: \"cifar10\"}]). split and subset keep the transforms; evaluate applies the deterministic ones only (normalize, resize; random crops that keep the size, flips and cutout are left out unless evaluate's augment: true); ds.transform([]) clears them.",
        |d: &mut Dataset, list: Array| -> Res<Dataset> {
            let steps = op("transform", parse_transforms(&to_json(&Dynamic::from_array(list))?))?;
            op("transform", d.with_transforms(steps))
        });

    let s = session.clone();
    api!(engine, "batches", "ds: Dataset, size: int, options: Map -> Batches",
        "The batches of one epoch, for a `for` loop; the next batch is assembled (transforms applied) on another thread while the current one trains. Options: shuffle (true), seed (of the order and of the random transforms; drawn from the host generator when absent), drop_last (false), epoch (the order and augmentations of epoch e come from (seed, e); when absent the dataset counts its own calls: 0, 1, 2, ...). Under `mpirun -np N` rank r gets rows r·size/N..(r+1)·size/N of every batch (an error when a batch has fewer examples than ranks).",
        move |ds: &mut Dataset, size: INT, o: Map| -> Res<EpochBatches> {
            epoch_batches(&s, ds, size, &options::<BatchOptions>("batches", &o)?)
        });
    let s = session.clone();
    api!(
        engine,
        "batches",
        "ds: Dataset, size: int -> Batches",
        "Shuffled batches of the next epoch.",
        move |ds: &mut Dataset, size: INT| -> Res<EpochBatches> {
            epoch_batches(&s, ds, size, &BatchOptions::default())
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
    getter!(
        engine,
        "shape",
        "Array",
        "Shape [C, H, W] of an example as batches yield it (after the transforms).",
        |d: &mut Dataset| -> Array { d.shape().iter().map(|&x| Dynamic::from_int(x as INT)).collect() }
    );
    getter!(engine, "is_noisy", "bool", "Whether label noise was applied.", |d: &mut Dataset| d.is_noisy());
    let s = session.clone();
    getter!(
        engine,
        "labels",
        "Tensor",
        "The training labels [N] (u32; noisy when label noise was applied).",
        move |d: &mut Dataset| -> Res<Tensor> { u32_tensor("labels", d.labels(), s.device()) }
    );
    let s = session.clone();
    getter!(engine, "clean_labels", "Tensor", "The true labels [N] (u32).", move |d: &mut Dataset| -> Res<Tensor> {
        u32_tensor("clean_labels", d.clean_labels(), s.device())
    });
    api!(engine, "to_string", "ds: Dataset -> String", "A one-line description.", |d: &mut Dataset| d.describe());
    api!(engine, "to_debug", "ds: Dataset -> String", "A one-line description.", |d: &mut Dataset| d.describe());

    api!(
        engine,
        "subset",
        "ds: Dataset, n: int -> Dataset",
        "The first n examples (a view: pixels are shared).",
        |d: &mut Dataset, n: INT| -> Res<Dataset> { op("subset", d.subset(to_usize("subset", n)?)) }
    );
    api!(engine, "split", "ds: Dataset, fraction: float, seed: int -> Array",
        "A seeded random split: [first, rest] with round(fraction·N) examples in the first part (e.g. a validation set); each part keeps the dataset's order, transforms and labels.",
        |d: &mut Dataset, f: FLOAT, seed: INT| -> Res<Array> {
            let (a, b) = op("split", d.split(f, seed as u64))?;
            Ok(vec![Dynamic::from(a), Dynamic::from(b)])
        });

    api!(engine, "with_label_noise", "ds: Dataset, kind: String, rate: float, seed: int -> Dataset",
        "The dataset with corrupted training labels; the clean labels and the noise mask are kept (evaluate then reports accuracy on the clean and the corrupted part). Kinds: \"symmetric\" (exactly round(rate·N) labels, chosen uniformly, each changed to a different class chosen uniformly), \"asymmetric\" (in each mapped class, exactly round(rate·N_c) labels move by the class map; CIFAR-10's by default: truck->automobile, bird->airplane, deer->horse, cat<->dog), \"pairflip\" (class c -> c+1 mod K, the same per-class count). rate in [0, 1]. The same seed gives the same labels on every machine.",
        |d: &mut Dataset, kind: &str, rate: Dynamic, seed: INT| -> Res<Dataset> { noisy(d, kind, &rate, seed, None) });
    let sess = session.clone();
    api!(engine, "with_label_noise", "ds: Dataset, kind: String, rate: float -> Dataset",
        "`with_label_noise(kind, rate, seed)` with the run's seed (`--seed`), so a seed sweep draws new noisy labels per seed.",
        move |d: &mut Dataset, kind: &str, rate: Dynamic| -> Res<Dataset> {
            noisy(d, kind, &rate, sess.seed as INT, None)
        });
    api!(engine, "with_label_noise", "ds: Dataset, kind: String, rate: float, seed: int, map: Map -> Dataset",
        "Asymmetric label noise by a class map whose keys and values are class names or indices, e.g. #{truck: \"automobile\", \"2\": 0}.",
        |d: &mut Dataset, kind: &str, rate: Dynamic, seed: INT, map: Map| -> Res<Dataset> {
            noisy(d, kind, &rate, seed, Some(map))
        });
    api!(
        engine,
        "noise_rate",
        "ds: Dataset -> float",
        "The realised share of corrupted labels (0 without noise).",
        |d: &mut Dataset| d.noise_rate()
    );
    let s = session.clone();
    api!(engine, "transition_matrix", "ds: Dataset -> Tensor",
        "The realised label transition matrix [K, K] (f32): row i is how the examples of true class i are labelled (rows sum to 1; all zero for an absent class).",
        move |d: &mut Dataset| -> Res<Tensor> {
            let t = d.transition_matrix();
            let k = t.len();
            let flat: Vec<f32> = t.into_iter().flatten().map(|v| v as f32).collect();
            op("transition_matrix", Tensor::from_vec(flat, (k, k), s.device()))
        });
    let s = session.clone();
    api!(
        engine,
        "noise_mask",
        "ds: Dataset -> Tensor",
        "1 where the label was corrupted, else 0 ([N], u8).",
        move |d: &mut Dataset| -> Res<Tensor> {
            let m: Vec<u8> = d.noise_mask().into_iter().map(u8::from).collect();
            let n = m.len();
            op("noise_mask", Tensor::from_vec(m, n, s.device()))
        }
    );
}

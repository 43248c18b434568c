//! The data side: every file format on small files written here, label noise, transforms and
//! the loader.

use crate::common::*;
use candle_core::{Device, Tensor};
use samhost::data::loader::{epoch_order, Batches};
use samhost::data::noise::{corrupt_labels, CIFAR10_MAP};
use samhost::data::synthetic::{synthetic, SyntheticConfig};
use samhost::data::transforms::parse_transforms;
use samhost::data::{load_dataset, BatchOptions, Dataset, LoadOptions, NoiseKind};
use samhost::hub::resolve_dataset_files_in;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

fn opts(json: serde_json::Value) -> LoadOptions {
    serde_json::from_value(json).unwrap()
}

fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

/// CIFAR records whose pixels are all `seed + i` and whose labels are given.
fn cifar_records(labels: &[&[u8]], seed: u8) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, l) in labels.iter().enumerate() {
        out.extend_from_slice(l);
        out.extend(std::iter::repeat_n(seed.wrapping_add(i as u8), 3072));
    }
    out
}

#[test]
fn cifar10_folder_split_and_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir(&root).unwrap();
    for b in 1..=5u8 {
        std::fs::write(root.join(format!("data_batch_{b}.bin")), cifar_records(&[&[b], &[9]], 10 * b)).unwrap();
    }
    std::fs::write(root.join("test_batch.bin"), cifar_records(&[&[3], &[4], &[5]], 200)).unwrap();
    let train = load_dataset(dir.path(), &LoadOptions::default()).unwrap();
    assert_eq!((train.len(), train.shape(), train.num_classes()), (10, [3, 32, 32], 10));
    assert_eq!(train.classes()[9], "truck");
    assert_eq!(train.pixel_dtype(), "u8");
    assert_eq!((train.label(0), train.label(1), train.label(8)), (1, 9, 5));
    assert_eq!(train.image(2)[0], 20.0 / 255.0);
    let test = load_dataset(&root, &opts(serde_json::json!({"split": "test"}))).unwrap();
    assert_eq!(test.len(), 3);
    assert_eq!(test.label(2), 5);
    // One file of records; class names from batches.meta.txt when present.
    std::fs::write(root.join("batches.meta.txt"), (0..10).map(|i| format!("c{i}\n")).collect::<String>()).unwrap();
    let one = load_dataset(&root.join("data_batch_3.bin"), &LoadOptions::default()).unwrap();
    assert_eq!((one.len(), one.label(0), one.classes()[3].as_str()), (2, 3, "c3"));
    // A lone train.bin in the CIFAR-10 layout is told apart from CIFAR-100 by its size.
    let lone = dir.path().join("lone");
    std::fs::create_dir(&lone).unwrap();
    std::fs::write(lone.join("train.bin"), cifar_records(&[&[7], &[1], &[2]], 0)).unwrap();
    let d = load_dataset(&lone, &LoadOptions::default()).unwrap();
    assert_eq!((d.len(), d.num_classes(), d.label(0)), (3, 10, 7));
}

#[test]
fn cifar100_fine_and_coarse_labels() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cifar-100-binary");
    std::fs::create_dir(&root).unwrap();
    std::fs::write(root.join("train.bin"), cifar_records(&[&[4, 30], &[19, 99]], 0)).unwrap();
    std::fs::write(root.join("test.bin"), cifar_records(&[&[0, 0]], 0)).unwrap();
    let fine = load_dataset(dir.path(), &opts(serde_json::json!({"format": "cifar100"}))).unwrap();
    assert_eq!((fine.len(), fine.num_classes(), fine.label(0), fine.label(1)), (2, 100, 30, 99));
    assert_eq!(fine.classes()[99], "worm");
    let coarse = load_dataset(dir.path(), &opts(serde_json::json!({"label": "coarse"}))).unwrap();
    assert_eq!((coarse.num_classes(), coarse.label(0), coarse.label(1)), (20, 4, 19));
    assert_eq!(coarse.classes()[19], "vehicles_2");
    let test = load_dataset(dir.path(), &opts(serde_json::json!({"split": "test", "format": "cifar100"}))).unwrap();
    assert_eq!(test.len(), 1);
}

#[test]
fn cifar_bad_files_name_the_file_and_the_fault() {
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.bin");
    let mut bytes = cifar_records(&[&[1], &[2]], 0);
    bytes.truncate(3073 + 100);
    std::fs::write(&cut, &bytes).unwrap();
    let e = err_text(load_dataset(&cut, &LoadOptions::default()));
    assert!(e.contains("cut.bin") && e.contains("not a whole number"), "{e}");
    let bad = dir.path().join("data_batch_1.bin");
    std::fs::write(&bad, cifar_records(&[&[1], &[12]], 0)).unwrap();
    let e = err_text(load_dataset(&bad, &LoadOptions::default()));
    assert!(e.contains("data_batch_1.bin") && e.contains("record 1 has label 12"), "{e}");
    let e = err_text(load_dataset(&dir.path().join("nothing"), &LoadOptions::default()));
    assert!(e.contains("no such file"), "{e}");
    let e = err_text(load_dataset(&bad, &opts(serde_json::json!({"channels": 3}))));
    assert!(e.contains("`channels` does not apply"), "{e}");
}

fn idx_bytes(type_dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 8, type_dims.len() as u8];
    for d in type_dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn idx_plain_gzipped_and_explicit_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pixels: Vec<u8> = (0..3 * 4 * 5).map(|v| v as u8).collect();
    std::fs::write(d.join("train-images-idx3-ubyte.gz"), gz(&idx_bytes(&[3, 4, 5], &pixels))).unwrap();
    std::fs::write(d.join("train-labels-idx1-ubyte.gz"), gz(&idx_bytes(&[3], &[7, 0, 9]))).unwrap();
    std::fs::write(d.join("t10k-images-idx3-ubyte"), idx_bytes(&[1, 4, 5], &pixels[..20])).unwrap();
    std::fs::write(d.join("t10k-labels-idx1-ubyte"), idx_bytes(&[1], &[2])).unwrap();
    let train = load_dataset(d, &LoadOptions::default()).unwrap();
    assert_eq!((train.len(), train.shape(), train.num_classes()), (3, [1, 4, 5], 10));
    assert_eq!((train.label(0), train.label(2)), (7, 9));
    assert_eq!(train.image(1)[0], 20.0 / 255.0);
    let test = load_dataset(d, &opts(serde_json::json!({"split": "test"}))).unwrap();
    assert_eq!((test.len(), test.label(0)), (1, 2));
    // The images file alone finds its labels beside it; or both are named.
    let alone = load_dataset(&d.join("train-images-idx3-ubyte.gz"), &LoadOptions::default()).unwrap();
    assert_eq!(alone.len(), 3);
    let named = load_dataset(
        &d.join("t10k-images-idx3-ubyte"),
        &opts(serde_json::json!({"labels": d.join("t10k-labels-idx1-ubyte")})),
    )
    .unwrap();
    assert_eq!(named.label(0), 2);
}

#[test]
fn idx_bad_files_name_the_file_and_the_fault() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut wrong = idx_bytes(&[2, 2, 2], &[0; 8]);
    wrong[0] = 8;
    std::fs::write(d.join("a-images-idx3-ubyte"), &wrong).unwrap();
    std::fs::write(d.join("a-labels-idx1-ubyte"), idx_bytes(&[2], &[0, 1])).unwrap();
    let e = err_text(load_dataset(&d.join("a-images-idx3-ubyte"), &LoadOptions::default()));
    assert!(e.contains("a-images-idx3-ubyte") && e.contains("wrong magic number"), "{e}");
    std::fs::write(d.join("b-images-idx3-ubyte"), idx_bytes(&[3, 2, 2], &[0; 12])).unwrap();
    std::fs::write(d.join("b-labels-idx1-ubyte"), idx_bytes(&[2], &[0, 1])).unwrap();
    let e = err_text(load_dataset(&d.join("b-images-idx3-ubyte"), &LoadOptions::default()));
    assert!(e.contains("has 3 images but") && e.contains("has 2 labels"), "{e}");
    std::fs::write(d.join("c-images-idx3-ubyte"), idx_bytes(&[3, 2, 2], &[0; 11])).unwrap();
    let e = err_text(load_dataset(
        &d.join("c-images-idx3-ubyte"),
        &opts(serde_json::json!({"labels": d.join("b-labels-idx1-ubyte")})),
    ));
    assert!(e.contains("c-images-idx3-ubyte") && e.contains("the file has 11 bytes of data"), "{e}");
    std::fs::write(d.join("d-labels-idx1-ubyte"), idx_bytes(&[3], &[0, 1, 200])).unwrap();
    let e = err_text(load_dataset(
        &d.join("b-images-idx3-ubyte"),
        &opts(serde_json::json!({"labels": d.join("d-labels-idx1-ubyte"), "classes": ["a", "b"]})),
    ));
    assert!(e.contains("d-labels-idx1-ubyte") && e.contains("label 200"), "{e}");
}

fn save_png(path: &Path, w: u32, h: u32, seed: u8) {
    let px: Vec<u8> = (0..w * h * 3).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)).collect();
    image::RgbImage::from_raw(w, h, px).unwrap().save(path).unwrap();
}

#[test]
fn image_folders_keep_class_names() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("imgs");
    for (class, n) in [("cat", 2), ("dog", 3)] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..n {
            save_png(&root.join(class).join(format!("{i}.png")), 6, 4, i as u8);
        }
    }
    std::fs::write(root.join("dog").join("notes.txt"), "not an image").unwrap();
    let px: Vec<u8> = vec![128; 6 * 4 * 3];
    image::RgbImage::from_raw(6, 4, px).unwrap().save(root.join("cat").join("x.jpg")).unwrap();
    let ds = load_dataset(&root, &LoadOptions::default()).unwrap();
    assert_eq!(ds.classes(), ["cat", "dog"]);
    assert_eq!((ds.len(), ds.shape()), (6, [3, 4, 6]));
    assert_eq!((0..6).map(|i| ds.label(i)).collect::<Vec<_>>(), vec![0, 0, 0, 1, 1, 1]);
    // Channel-planar: pixel (0,0) of 0.png is R=0·7, G=1·7, B=2·7.
    let img = ds.image(0);
    assert_eq!((img[0], img[24], img[48]), (0.0, 7.0 / 255.0, 14.0 / 255.0));
    let gray = load_dataset(&root, &opts(serde_json::json!({"channels": 1, "size": [8, 8]}))).unwrap();
    assert_eq!(gray.shape(), [1, 8, 8]);
    // Mixed sizes, a corrupt image and an empty folder fail with the file at fault.
    save_png(&root.join("dog").join("big.png"), 9, 9, 0);
    let e = err_text(load_dataset(&root, &LoadOptions::default()));
    assert!(e.contains("big.png is 9x9") && e.contains("size"), "{e}");
    std::fs::remove_file(root.join("dog").join("big.png")).unwrap();
    std::fs::write(root.join("cat").join("broken.png"), b"not a png at all").unwrap();
    let e = err_text(load_dataset(&root, &LoadOptions::default()));
    assert!(e.contains("broken.png") && e.contains("unreadable image"), "{e}");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let e = err_text(load_dataset(&empty, &opts(serde_json::json!({"format": "folder"}))));
    assert!(e.contains("empty") && e.contains("empty folder"), "{e}");
}

#[test]
fn safetensors_u8_scaled_and_f32_exact() {
    let dir = tempfile::tempdir().unwrap();
    let d = Device::Cpu;
    let u8s = Tensor::from_vec((0..2 * 3 * 2 * 2).map(|v| v as u8).collect::<Vec<u8>>(), (2, 3, 2, 2), &d).unwrap();
    let labels = Tensor::from_vec(vec![1i64, 2], 2, &d).unwrap();
    let p = dir.path().join("u8.safetensors");
    candle_core::safetensors::save(&HashMap::from([("images", u8s), ("labels", labels.clone())]), &p).unwrap();
    let ds = load_dataset(&p, &LoadOptions::default()).unwrap();
    assert_eq!((ds.len(), ds.shape(), ds.pixel_dtype(), ds.label(1)), (2, [3, 2, 2], "u8", 2));
    assert_eq!(ds.image(1)[1], 13.0 / 255.0);
    let f = Tensor::from_vec(vec![3.5f32, -2.0, 1e6, 0.25], (2, 1, 1, 2), &d).unwrap();
    let p = dir.path().join("f32.safetensors");
    candle_core::safetensors::save(&HashMap::from([("images", f), ("labels", labels)]), &p).unwrap();
    let ds = load_dataset(&p, &LoadOptions::default()).unwrap();
    assert_eq!((ds.image(0), ds.image(1)), (vec![3.5, -2.0], vec![1e6, 0.25]));
    let three = Tensor::from_vec(vec![0u8, 1, 0], 3, &d).unwrap();
    let p = dir.path().join("bad.safetensors");
    let imgs = Tensor::zeros((2, 1, 2, 2), candle_core::DType::U8, &d).unwrap();
    candle_core::safetensors::save(&HashMap::from([("images", imgs), ("labels", three)]), &p).unwrap();
    let e = err_text(load_dataset(&p, &LoadOptions::default()));
    assert!(e.contains("bad.safetensors") && e.contains("2 images but 3 labels"), "{e}");
}

/// A fake Hugging Face cache holding a dataset `org/tiny` at commit `c0ffee...`.
fn fake_hub_cache(root: &Path) {
    let repo = root.join("datasets--org--tiny");
    let commit = "c0ffee0000000000000000000000000000000000";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), format!("{commit}\n")).unwrap();
    let snap = repo.join("snapshots").join(commit).join("plain_text");
    std::fs::create_dir_all(&snap).unwrap();
    write_tiny_parquet(&snap.join("train-00000-of-00001.parquet"), &[0, 1, 2, 1, 0]);
    write_tiny_parquet(&snap.join("test-00000-of-00001.parquet"), &[2, 2]);
}

#[test]
fn hub_dataset_reads_parquet_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    fake_hub_cache(dir.path());
    let files = resolve_dataset_files_in(dir.path(), "org/tiny", "main", "train").unwrap();
    assert_eq!(files.len(), 1);
    assert!(files[0].ends_with("plain_text/train-00000-of-00001.parquet"));
    let e = err_text(resolve_dataset_files_in(dir.path(), "org/tiny", "main", "validation"));
    assert!(e.contains("no parquet file for split `validation`") && e.contains("test-00000-of-00001.parquet"), "{e}");
    // A parquet file loads through load_dataset too.
    let ds = load_dataset(&files[0], &LoadOptions::default()).unwrap();
    assert_eq!((ds.len(), ds.shape(), ds.classes()[2].as_str()), (5, [3, 4, 4], "bird"));
    assert_eq!((ds.label(2), ds.image(1)[0]), (2, 40.0 / 255.0));
    // Through the script, offline, from HF_HUB_CACHE.
    write(
        dir.path(),
        "h.rhai",
        r#"let tr = hub_dataset("org/tiny");
let te = hub_dataset("org/tiny", #{ split: "test", revision: "main", image_column: "img", label_column: "label" });
print(`${tr.len()} ${te.len()} ${tr.classes} ${tr.shape}`);"#,
    );
    let o = samhost().current_dir(dir.path()).env("HF_HUB_CACHE", dir.path()).args(["run", "h.rhai"]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "5 2 [\"airplane\", \"automobile\", \"bird\"] [3, 4, 4]");
    write(dir.path(), "m.rhai", r#"hub_dataset("org/absent");"#);
    let o = samhost().current_dir(dir.path()).env("HF_HUB_CACHE", dir.path()).args(["run", "m.rhai"]).output().unwrap();
    let e = stderr(&o);
    assert!(e.contains("org/absent is not in the cache") && e.contains("HF_HUB_OFFLINE"), "{e}");
}

fn indexed(n: usize, classes: usize) -> Dataset {
    // One pixel per example holding its index; labels cycle over the classes.
    let px: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let labels = (0..n).map(|i| (i % classes) as u32).collect();
    Dataset::new(px, labels, [1, 1, 1], (0..classes).map(|c| format!("c{c}")).collect()).unwrap()
}

#[test]
fn symmetric_noise_exact_count_all_changed_and_deterministic() {
    let ds = indexed(1000, 10);
    let noisy = ds.with_label_noise(&NoiseKind::Symmetric, 0.4, 7).unwrap();
    let mask = noisy.noise_mask();
    assert_eq!(mask.iter().filter(|&&m| m).count(), 400);
    assert_eq!(noisy.noise_rate(), 0.4);
    for (i, &m) in mask.iter().enumerate() {
        assert_eq!(noisy.clean_label(i), ds.label(i));
        assert_eq!(m, noisy.label(i) != noisy.clean_label(i));
    }
    let again = ds.with_label_noise(&NoiseKind::Symmetric, 0.4, 7).unwrap();
    assert_eq!(noisy.labels(), again.labels());
    let other = ds.with_label_noise(&NoiseKind::Symmetric, 0.4, 8).unwrap();
    assert_ne!(noisy.labels(), other.labels());
    // The same labels on every machine: ChaCha8 from the seed, pinned here.
    let first: Vec<u32> = corrupt_labels(&ds.labels()[..20], 10, &NoiseKind::Symmetric, 0.5, 1).unwrap();
    assert_eq!(first, GOLDEN_SYMMETRIC);
    let t = noisy.transition_matrix();
    for row in &t {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }
    assert!((0..10).all(|i| (t[i][i] - 0.6).abs() < 0.15));
    let e = err_text(ds.with_label_noise(&NoiseKind::Symmetric, 1.5, 0));
    assert!(e.contains("rate must be in [0, 1]"), "{e}");
    assert!(noisy.with_label_noise(&NoiseKind::Symmetric, 0.1, 0).is_err(), "noise twice");
}

/// `corrupt_labels` of labels `i % 10`, i < 20, symmetric 0.5, seed 1.
const GOLDEN_SYMMETRIC: [u32; 20] = [0, 9, 4, 3, 1, 5, 6, 7, 8, 6, 5, 1, 4, 3, 8, 5, 3, 9, 8, 4];

#[test]
fn asymmetric_and_pairflip_follow_the_class_map() {
    let ds = indexed(1000, 10);
    let noisy = ds.with_label_noise(&NoiseKind::Asymmetric(None), 0.3, 1).unwrap();
    let map: HashMap<u32, u32> = CIFAR10_MAP.into_iter().collect();
    let mut moved = [0usize; 10];
    for i in 0..1000 {
        let (c, l) = (noisy.clean_label(i), noisy.label(i));
        if c != l {
            assert_eq!(map.get(&c), Some(&l), "class {c} moved to {l}");
            moved[c as usize] += 1;
        }
    }
    // 100 examples per class, 30 moved in each mapped class, none elsewhere.
    for c in 0..10u32 {
        assert_eq!(moved[c as usize], if map.contains_key(&c) { 30 } else { 0 }, "class {c}");
    }
    let t = noisy.transition_matrix();
    assert!((t[9][1] - 0.3).abs() < 1e-12 && (t[3][5] - 0.3).abs() < 1e-12 && t[0][0] == 1.0);
    let flip = ds.with_label_noise(&NoiseKind::Pairflip, 0.2, 1).unwrap();
    for i in 0..1000 {
        let (c, l) = (flip.clean_label(i), flip.label(i));
        assert!(l == c || l == (c + 1) % 10);
    }
    assert_eq!(flip.noise_rate(), 0.2);
    let custom = ds.with_label_noise(&NoiseKind::Asymmetric(Some(vec![(0, 2)])), 1.0, 1).unwrap();
    assert!((0..1000).all(|i| custom.label(i) == if ds.label(i) == 0 { 2 } else { ds.label(i) }));
    let e = err_text(indexed(30, 3).with_label_noise(&NoiseKind::Asymmetric(None), 0.3, 1));
    assert!(e.contains("give a class map"), "{e}");
}

#[test]
fn an_epoch_visits_every_example_once_and_shuffles_differ_by_epoch() {
    let ds = indexed(103, 4);
    let dev = Device::Cpu;
    let seen = |epoch: u64| -> Vec<usize> {
        let b = Batches::epoch(&ds, 10, &BatchOptions::default(), 5, epoch, &dev).unwrap();
        assert_eq!(b.num_batches(), 11);
        let mut order = Vec::new();
        for batch in b {
            let batch = batch.unwrap();
            let px = batch.images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let labels = batch.labels.to_vec1::<u32>().unwrap();
            for (p, l) in px.iter().zip(labels) {
                assert_eq!(l as usize, *p as usize % 4, "labels travel with their image");
                order.push(*p as usize);
            }
        }
        order
    };
    let (e0, e1) = (seen(0), seen(1));
    let mut sorted = e0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..103).collect::<Vec<_>>());
    assert_ne!(e0, e1, "each epoch has its own order");
    assert_eq!(e0, seen(0), "an epoch is reproducible");
    let drop = Batches::epoch(&ds, 10, &BatchOptions { drop_last: true, ..Default::default() }, 5, 0, &dev).unwrap();
    assert_eq!(drop.into_iter().count(), 10);
    assert_eq!(epoch_order(5, false, 1, 1), vec![0, 1, 2, 3, 4]);
}

#[test]
fn prefetched_batches_equal_single_threaded_ones() {
    let cfg = SyntheticConfig { n: 70, shape: [3, 12, 12], ..Default::default() };
    let steps = parse_transforms(&serde_json::json!([
        {"random_crop": 12, "padding": 3}, "hflip", {"cutout": 4}, {"normalize": "cifar10"}, {"resize": 16}
    ]))
    .unwrap();
    let ds = synthetic(&cfg).unwrap().with_transforms(steps).unwrap();
    assert_eq!(ds.shape(), [3, 16, 16]);
    let b = Batches::epoch(&ds, 16, &BatchOptions::default(), 11, 2, &Device::Cpu).unwrap();
    let sync: Vec<Vec<f32>> =
        b.iter_sync().map(|x| x.unwrap().images.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
    let threaded: Vec<Vec<f32>> =
        b.clone().into_iter().map(|x| x.unwrap().images.flatten_all().unwrap().to_vec1::<f32>().unwrap()).collect();
    assert_eq!(sync, threaded);
    // Augmentations change with the epoch, not with the batch size or order.
    let other = Batches::epoch(&ds, 16, &BatchOptions::default(), 11, 3, &Device::Cpu).unwrap();
    let first_other =
        other.iter_sync().next().unwrap().unwrap().images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_ne!(sync[0], first_other);
    let in_order = BatchOptions { shuffle: false, ..Default::default() };
    let a = Batches::epoch(&ds, 7, &in_order, 11, 2, &Device::Cpu).unwrap().iter_sync().next().unwrap().unwrap();
    let c = Batches::epoch(&ds, 70, &in_order, 11, 2, &Device::Cpu).unwrap().iter_sync().next().unwrap().unwrap();
    assert_eq!(
        a.images.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        c.images.narrow(0, 0, 7).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    // Leaving an epoch early stops the worker.
    let mut it = b.into_iter();
    assert!(it.next().is_some());
    drop(it);
}

#[test]
fn script_data_api_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "d.rhai",
        r#"
let ds = synthetic(#{ n: 200, shape: [3, 8, 8], seed: 4 });
let parts = ds.split(0.25, 1);
if parts[0].len() != 50 || parts[1].len() != 150 { throw "split"; }
if ds.subset(20).len() != 20 { throw "subset"; }
let aug = ds.transform([#{ random_crop: 8, padding: 2 }, "hflip", #{ normalize: 0.5, std: 0.25 }, #{ resize: 12 }]);
if aug.shape != [3, 12, 12] { throw `shape ${aug.shape}`; }
let seen = 0;
for b in aug.batches(64, #{ seed: 3 }) { seen += b.len(); if b.images.shape[1] != 3 { throw "channels"; } }
if seen != 200 { throw `epoch saw ${seen}`; }
let e0 = []; let e1 = [];
for b in ds.batches(200, #{ seed: 9 }) { e0 = b.labels.to_array(); }
for b in ds.batches(200, #{ seed: 9 }) { e1 = b.labels.to_array(); }
if e0 == e1 { throw "the second call is the next epoch"; }
let noisy = ds.with_label_noise("symmetric", 0.4, 2);
if noisy.noise_rate() != 0.4 || !noisy.is_noisy { throw "rate"; }
if noisy.noise_mask().sum().item() != 80.0 { throw "mask"; }
let t = noisy.transition_matrix();
if t.shape != [10, 10] { throw "matrix"; }
let named = ds.with_label_noise("asymmetric", 0.5, 2, #{ class0: "class1" });
if named.noise_rate() <= 0.0 { throw "named map"; }
let m = mlp([192, 16, 10]);
let r = evaluate(m, noisy, #{ batch: 64 });
for k in ["loss", "accuracy", "accuracy_clean", "clean_part_accuracy", "noisy_part_fit", "noisy_part_recovered"] {
    if !(k in r) { throw `evaluate lacks ${k}`; }
}
if "noisy_part_fit" in evaluate(m, ds) { throw "clean dataset has no noisy fields"; }
print(ds);
"#,
    );
    let o = run_in(dir.path(), &["run", "d.rhai"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Dataset(200 examples, 3x8x8 f32, 10 classes"), "{}", stdout(&o));
    let cases = [
        ("rate.rhai", r#"synthetic(#{ n: 10 }).with_label_noise("symmetric", 1.5, 0);"#, "rate must be in [0, 1]"),
        ("kind.rhai", r#"synthetic(#{ n: 10 }).with_label_noise("uniform", 0.1, 0);"#, "unknown label noise `uniform`"),
        ("tf.rhai", r#"synthetic(#{ n: 10 }).transform([#{ blur: 3 }]);"#, "no transform named"),
        ("crop.rhai", r#"synthetic(#{ n: 10 }).transform([#{ random_crop: 40 }]);"#, "larger than the 16x16 images"),
        ("load.rhai", r#"load_dataset("missing_dir");"#, "missing_dir: no such file or folder"),
        ("opt.rhai", r#"load_dataset("x", #{ splt: "train" });"#, "unknown field `splt`"),
    ];
    for (name, text, expect) in cases {
        write(dir.path(), name, text);
        let o = run_in(dir.path(), &["run", name]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {e}");
        assert!(e.contains(expect) && e.contains(&format!("{name}:1:")), "{name}: expected `{expect}` in:\n{e}");
    }
}

/// The synthetic default is hard enough that 40% symmetric noise is memorised visibly.
#[test]
fn synthetic_default_shows_memorisation_under_label_noise() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "mem.rhai",
        r#"
let train = synthetic(#{ n: 1000, seed: 1 }).with_label_noise("symmetric", 0.4, 3);
let test = synthetic(#{ n: 500, seed: 1, sample_seed: 99 });
let m = mlp([768, 256, 10]);
let opt = sgd(m, #{ lr: 0.05, momentum: 0.9 });
for e in 0..8 { for b in train.batches(50, #{ seed: 1 }) { train_step(m, opt, b); } }
let tr = evaluate(m, train);
let te = evaluate(m, test);
print(`${te.accuracy} ${tr.noisy_part_fit}`);
"#,
    );
    let o = run_in(dir.path(), &["run", "mem.rhai"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Vec<f64> = stdout(&o).split_whitespace().map(|x| x.parse().unwrap()).collect();
    assert!(v[0] < 0.9, "clean test accuracy {} should be clearly below 100%", v[0]);
    assert!(v[1] > 0.3, "share of corrupted labels memorised {} should be visible", v[1]);
}

/// `evaluate` leaves out a dataset's random transforms (a training set's augmentation) unless
/// asked: memorisation is measured on the images as stored.
#[test]
fn evaluate_takes_no_augmentation_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "e.rhai",
        r#"
let ds = synthetic(#{ n: 64, classes: 3, shape: [3, 8, 8], seed: 1 });
let m = mlp([192, 16, 3]);
let aug = ds.transform([#{ random_crop: 8, padding: 3 }, "hflip", #{ cutout: 4 }]);
let plain = evaluate(m, ds);
let no_aug = evaluate(m, aug);
let with_aug = evaluate(m, aug, #{ augment: true });
print(`${plain.loss == no_aug.loss} ${plain.loss == with_aug.loss}`);
"#,
    );
    let o = run_in(dir.path(), &["run", "e.rhai", "-q", "--runs-dir", "runs"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "true false");
}

/// `lib/common.rhai`'s documented single-file CIFAR path (`--set data=train.bin --set
/// test_data=test.bin`) loads, as does a folder with both splits.
#[test]
fn common_loads_single_cifar_files_and_folders() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("train.bin"), cifar_records(&[&[1], &[2], &[3]], 1)).unwrap();
    std::fs::write(dir.path().join("test.bin"), cifar_records(&[&[4], &[5]], 2)).unwrap();
    let root = dir.path().join("cifar-10-batches-bin");
    std::fs::create_dir_all(&root).unwrap();
    for b in 1..=5u8 {
        std::fs::write(root.join(format!("data_batch_{b}.bin")), cifar_records(&[&[b]], b)).unwrap();
    }
    std::fs::write(root.join("test_batch.bin"), cifar_records(&[&[0], &[6]], 9)).unwrap();
    std::fs::create_dir_all(dir.path().join("lib")).unwrap();
    std::fs::copy(repo().join("scripts/lib/common.rhai"), dir.path().join("lib/common.rhai")).unwrap();
    write(
        dir.path(),
        "c.rhai",
        r#"
import "lib/common" as common;
let files = common::cifar_or_synthetic(#{ data: "train.bin", test_data: "test.bin", seed: 1 }, 0);
let folder = common::cifar_or_synthetic(#{ data: "cifar-10-batches-bin", test_data: "", seed: 1 }, 0);
print(`${files[0].len()} ${files[1].len()} ${folder[0].len()} ${folder[1].len()}`);
"#,
    );
    let o = run_in(dir.path(), &["run", "c.rhai", "-q", "--runs-dir", "runs"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "3 2 5 2");
}

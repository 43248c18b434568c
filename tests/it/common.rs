//! Helpers shared by the integration tests.

#![allow(dead_code)]

use samhost::data::hub::write_image_parquet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The samhost binary built for these tests.
pub fn samhost() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_samhost"));
    c.env("HF_HUB_OFFLINE", "1").env_remove("HF_TOKEN");
    c
}

/// Runs samhost with `args` in `dir`.
pub fn run_in(dir: &Path, args: &[&str]) -> Output {
    samhost().current_dir(dir).args(args).output().expect("the samhost binary runs")
}

/// Text of stderr.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Text of stdout.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).expect("create fixture folder");
    }
    std::fs::write(&p, text).expect("write fixture");
    p
}

/// The repository root (for the example scripts).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Asserts `a` and `b` agree to `tol` relative to max(|b|, 1e-12) element-wise.
pub fn assert_close(what: &str, a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let rel = (x - y).abs() / y.abs().max(1e-12);
        let abs = (x - y).abs();
        assert!(rel <= tol || abs <= tol * 1e-3, "{what}[{i}]: {x} vs {y} (rel {rel:e} > {tol:e})");
    }
}

/// A `w`x`h` RGB PNG whose pixels are all (value, value / 2, 255 - value).
pub fn png_bytes(w: u32, h: u32, value: u8) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(w, h, image::Rgb([value, value / 2, 255 - value]))
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

/// The class names of [`write_tiny_parquet`] files.
pub fn tiny_classes() -> Vec<String> {
    ["airplane", "automobile", "bird"].iter().map(|s| s.to_string()).collect()
}

/// Writes a parquet file in the `datasets` image layout (columns `img`, `label`, the class
/// names of [`tiny_classes`] in its metadata): one 4x4 PNG per label, image `i` all `40 * i`.
pub fn write_tiny_parquet(path: &Path, labels: &[i64]) {
    let imgs: Vec<Vec<u8>> = (0..labels.len()).map(|i| png_bytes(4, 4, 40 * i as u8)).collect();
    write_image_parquet(path, "img", "label", &imgs, labels, Some(&tiny_classes())).unwrap();
}

/// The bytes of a [`write_tiny_parquet`] file (written under `dir`, then removed).
pub fn tiny_parquet_bytes(dir: &Path, labels: &[i64]) -> Vec<u8> {
    let p = dir.join("tiny-parquet.tmp");
    write_tiny_parquet(&p, labels);
    let b = std::fs::read(&p).unwrap();
    std::fs::remove_file(&p).unwrap();
    b
}

/// Defines a test once for every device, from a function taking `&Device`: `$cpu` always runs;
/// `$cuda` is compiled with the `cuda` feature and runs on GPU 0 (scripts/device_check.sh runs
/// these variants on a machine with a GPU).
macro_rules! test_device {
    ($body:ident, $cpu:ident, $cuda:ident) => {
        #[test]
        fn $cpu() {
            $body(&candle_core::Device::Cpu)
        }

        #[cfg(feature = "cuda")]
        #[test]
        fn $cuda() {
            $body(&candle_core::Device::new_cuda(0).expect("CUDA variant: GPU 0 must open"))
        }
    };
}
pub(crate) use test_device;

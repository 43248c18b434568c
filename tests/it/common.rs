//! Helpers shared by the integration tests.

#![allow(dead_code)]

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

//! Fuzzing, in-process and seeded: random programs over the whole script API (wrong types, wrong
//! shapes, NaN, negative and huge numbers, empty tensors, calls in odd orders), and mutated files
//! of every format samhost reads (truncations, bit flips, header edits). Nothing may panic; a
//! mutated file gives an error or a result, and no allocation on the loading thread may exceed
//! what the file's size justifies. `SAMHOST_FUZZ_PROGRAMS` and `SAMHOST_FUZZ_MUTATIONS` scale
//! them up (the test suite runs a few hundred of each; docs/reliability.md reports a long run).

use crate::common::*;
use samhost::session::Session;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::rc::Rc;

/// A small deterministic generator (no dependency on the host's).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 17
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[self.below(from.len())]
    }
}

fn env(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Values of each script type, the odd ones included.
fn values(ty: &str) -> &'static [&'static str] {
    match ty {
        "Tensor" => &[
            "randn([2, 3])",
            "zeros([0])",
            "tensor([1.0, 0.0 / 0.0])",
            "randn([4, 12])",
            "tensor(1e30)",
            "tensor([0, 1, 2, 0])",
            "zeros([3, 0, 2])",
            "randn([2, 1, 8, 8])",
            "tensor([-1.0, 1.0 / 0.0])",
        ],
        "Model" => &["m", "c", "cm", "sequential([linear(12, 4), relu(), linear(4, 3)])"],
        "Optimizer" => &["o", "sgd(c, #{})", "adamw(m, #{})"],
        "Batch" => &[
            "b",
            "batch(randn([0, 12]), zeros([0]))",
            "batch(randn([4, 12]), tensor([0, 7, 2, 0]))",
            "batch(randn([2, 1, 8, 8]), tensor([1, 2]))",
            "batch(randn([4, 12]) * (0.0 / 0.0), tensor([0, 1, 2, 0]))",
        ],
        "Dataset" => &["ds", "ds.subset(0)"],
        "Map" => &[
            "#{}",
            "#{ rho: -1.0 }",
            "#{ variant: \"gsam\", rho_max: 1.0, rho_min: 0.0 }",
            "#{ k: 0 }",
            "#{ lr: 0.0 / 0.0 }",
            "#{ batch: 0 }",
            "#{ variant: \"looksam\", every: 2 }",
            "#{ kind: \"cosine\", total: 0 }",
            "#{ m_sharpness: 3 }",
            "#{ perturb: \"norm\" }",
            "#{ x: 1 }",
            "#{ variant: \"esam\", gamma: 0.01 }",
            "#{ loss: |l, y| l.sum() }",
            "#{ reduction: \"none\" }",
            "#{ descending: true }",
        ],
        "int" | "INT" | "i64" => &["0", "-1", "1", "3", "8"],
        "float" | "FLOAT" | "f64" => &["0.0", "-1.0", "0.5", "0.0 / 0.0", "1e30", "1.0 / 0.0"],
        "String" | "&str" | "ImmutableString" | "&mut ImmutableString" => {
            &["\"\"", "\"fc1\"", "\"gsam\"", "\"f32\"", "\"bf16\"", "\"fc1.weight\""]
        }
        "Array" => &["[]", "[1, 2]", "[b]", "[b, b]", "[2, 3]", "[0]", "[12, 3]", "[\"x\"]"],
        "FnPtr" => &["|x| x", "|a, b| a", "|n, t| t", "|n| true"],
        "TensorSet" => &["g", "g * 0.0", "tensor_set()", "g.filter(|n| false)"],
        "Schedule" => &["sch"],
        "Layer" => &["linear(12, 3)", "relu()", "conv2d(1, 2, 3)", "dropout(0.5)", "residual([linear(3, 3)])", "lay"],
        "bool" => &["true", "false"],
        _ => &["()", "1", "b", "m", "g"],
    }
}

/// Functions the fuzzer leaves out: they write or read files and folders chosen by their string
/// argument, or reach the network; each has its own tests.
const SKIP: [&str; 14] = [
    "save",
    "load",
    "save_tensors",
    "load_tensors",
    "save_checkpoint",
    "resume",
    "plot",
    "load_dataset",
    "hub_dataset",
    "from_pretrained",
    "vit",
    "dinov2",
    "model",
    "config",
];

const PRELUDE: &str = r#"
let m = mlp([12, 5, 3]);
let c = cnn(#{ channels: [2], hidden: 4, classes: 3, input: [1, 8, 8] });
let o = sgd(m, #{ lr: 0.1, momentum: 0.9 });
let b = batch(randn([4, 12]), tensor([0, 1, 2, 0]));
let ds = synthetic(#{ n: 8, classes: 3, shape: [1, 4, 3], seed: 1 });
let g = m.params();
let sch = schedule(o, #{ kind: "constant" });
let cm = model(#{ layers: #{ fc: linear(12, 3), drop: dropout(0.2) }, forward: |x| this.drop.forward(this.fc.forward(x)) });
let lay = 0;
for l in [1] { lay = linear(12, 3); }
"#;

#[test]
fn random_programs_over_the_whole_api_never_panic() {
    let engine = samhost::script::build_engine(&Rc::new(Session::cpu()));
    let reference = samhost::script::api::reference_json(&engine).unwrap();
    let mut fns: Vec<(String, Vec<String>)> = Vec::new();
    for f in reference["functions"].as_array().unwrap() {
        let name = f["name"].as_str().unwrap_or_default().to_string();
        if SKIP.contains(&name.as_str()) || name.contains('$') && !name.starts_with("index$") {
            continue;
        }
        let params: Vec<String> = f["params"]
            .as_array()
            .map(|ps| ps.iter().map(|p| p["type"].as_str().unwrap_or("?").trim().to_string()).collect())
            .unwrap_or_default();
        fns.push((name, params));
    }
    assert!(fns.len() > 100, "the API has {} functions", fns.len());
    let programs = env("SAMHOST_FUZZ_PROGRAMS", 250);
    let mut rng = Lcg(0x5eed);
    let (mut failed_calls, mut ok_calls, mut panics) = (0usize, 0usize, Vec::new());
    let operators = ["+", "-", "*", "/"];
    for p in 0..programs {
        let mut program = String::from(PRELUDE);
        let mut calls = Vec::new();
        for _ in 0..8 {
            let (name, params) = &fns[rng.below(fns.len())];
            let args: Vec<&str> = params.iter().map(|t| rng.pick(values(t))).collect();
            let call = if operators.contains(&name.as_str()) && args.len() == 2 {
                format!("({}) {name} ({})", args[0], args[1])
            } else if name == "index$get$" && args.len() == 2 {
                format!("({})[{}]", args[0], args[1])
            } else if name == "index$set$" && args.len() == 3 {
                format!("let tmp = {}; tmp[{}] = {}", args[0], args[1], args[2])
            } else if name.starts_with("get$") || name.starts_with("set$") || name.contains('$') {
                continue;
            } else {
                format!("{name}({})", args.join(", "))
            };
            calls.push(call.clone());
            program.push_str(&format!("try {{ {call}; ok += 1; }} catch (e) {{ failed += 1; }}\n"));
        }
        let program = format!("let ok = 0; let failed = 0;\n{program}\n[ok, failed]");
        let result = catch_unwind(AssertUnwindSafe(|| engine.eval::<rhai::Array>(&program)));
        match result {
            Ok(Ok(counts)) => {
                ok_calls += counts[0].as_int().unwrap_or(0) as usize;
                failed_calls += counts[1].as_int().unwrap_or(0) as usize;
            }
            Ok(Err(e)) => panic!("program {p} did not run: {e}\n{program}"),
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panics.push(format!("program {p}: {msg}\n  calls: {}", calls.join("; ")));
            }
        }
    }
    eprintln!(
        "script fuzzer: {programs} programs, {} calls ({ok_calls} succeeded, {failed_calls} script errors), {} panics",
        ok_calls + failed_calls,
        panics.len()
    );
    assert!(panics.is_empty(), "panics reachable from a script:\n{}", panics.join("\n"));
    assert!(ok_calls > programs, "the fuzzer must also reach successful calls");
}

/// The largest single allocation on this thread while `f` runs (see `main.rs`'s allocator).
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    crate::TRACK_LARGEST.with(|t| t.set(Some(0)));
    let r = f();
    let largest = crate::TRACK_LARGEST.with(|t| t.replace(None)).unwrap_or(0);
    (r, largest)
}

/// Mutations of `valid`: truncations, bit flips, and `edits` (offset, bytes) over the header.
fn mutations(valid: &[u8], edits: &[(usize, Vec<u8>)], rng: &mut Lcg, n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for cut in [0, 1, 4, 8, 16, valid.len() / 2, valid.len().saturating_sub(1)] {
        out.push(valid[..cut.min(valid.len())].to_vec());
    }
    for (at, bytes) in edits {
        let mut v = valid.to_vec();
        for (i, b) in bytes.iter().enumerate() {
            if let Some(x) = v.get_mut(at + i) {
                *x = *b;
            }
        }
        out.push(v);
    }
    for _ in 0..n {
        let mut v = valid.to_vec();
        for _ in 0..1 + rng.below(8) {
            let i = rng.below(v.len());
            v[i] ^= 1 << rng.below(8);
        }
        // Flips near the start hit the header more often.
        let i = rng.below(64.min(v.len()));
        v[i] ^= 1 << rng.below(8);
        out.push(v);
    }
    out
}

/// Writes each mutation of `valid` to `path`, runs `load`, and checks it neither panics nor
/// allocates more than `budget(file size)` at once. Returns (errors, successes).
fn fuzz_file(
    what: &str,
    path: &Path,
    valid: &[u8],
    edits: &[(usize, Vec<u8>)],
    rng: &mut Lcg,
    n: usize,
    load: &dyn Fn(&Path) -> anyhow::Result<()>,
) -> (usize, usize) {
    assert!(load_ok(path, valid, load), "{what}: the valid file must load");
    let (mut errors, mut oks) = (0, 0);
    for (k, bytes) in mutations(valid, edits, rng, n).into_iter().enumerate() {
        std::fs::write(path, &bytes).unwrap();
        let (result, largest) = largest_allocation(|| catch_unwind(AssertUnwindSafe(|| load(path))));
        match result {
            Ok(Ok(())) => oks += 1,
            Ok(Err(e)) => {
                let msg = format!("{e:#}");
                let folder = path.parent().map(|d| d.display().to_string()).unwrap_or_default();
                let named = msg.contains(&path.display().to_string()) || msg.contains(&folder) || msg.contains(what);
                assert!(named, "{what} #{k}: the error names neither the file nor its folder: {msg}");
                errors += 1;
            }
            Err(_) => panic!("{what} mutation #{k} ({} bytes) panicked", bytes.len()),
        }
        let budget = 64 * bytes.len().max(1 << 12) + (8 << 20);
        assert!(
            largest <= budget,
            "{what} #{k}: one allocation of {largest} bytes for a file of {} bytes",
            bytes.len()
        );
    }
    (errors, oks)
}

fn load_ok(path: &Path, bytes: &[u8], load: &dyn Fn(&Path) -> anyhow::Result<()>) -> bool {
    std::fs::write(path, bytes).unwrap();
    load(path).is_ok()
}

fn dataset(path: &Path) -> anyhow::Result<()> {
    samhost::data::load_dataset(path, &samhost::data::LoadOptions::default()).map(|_| ())
}

#[test]
fn mutated_files_of_every_format_give_errors_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let n = env("SAMHOST_FUZZ_MUTATIONS", 60);
    let mut rng = Lcg(0xf11e);
    let mut report = Vec::new();

    // CIFAR-10 records: 1 label byte + 3072 pixels.
    let mut cifar = Vec::new();
    for i in 0..3u8 {
        cifar.push(i);
        cifar.extend((0..3072).map(|k| (k % 251) as u8));
    }
    let p = dir.path().join("data_batch_1.bin");
    let edits = vec![(0, vec![255]), (3073, vec![200])];
    report.push((
        "cifar",
        fuzz_file("cifar", &p, &cifar, &edits, &mut rng, n, &|p| {
            samhost::data::load_dataset(
                p,
                &samhost::data::LoadOptions { format: Some("cifar10".into()), ..Default::default() },
            )
            .map(|_| ())
        }),
    ));

    // IDX images (3 dims) with their labels beside, plain and gzip.
    let mut idx = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 4, 0, 0, 0, 4];
    idx.extend((0..32).map(|k| k as u8));
    let labels = [0u8, 0, 8, 1, 0, 0, 0, 2, 1, 3];
    std::fs::write(dir.path().join("t10k-labels-idx1-ubyte"), labels).unwrap();
    let p = dir.path().join("t10k-images-idx3-ubyte");
    let edits =
        vec![(4, vec![0xff, 0xff, 0xff, 0xff]), (8, vec![0x7f, 0xff, 0xff, 0xff]), (3, vec![9]), (2, vec![0x0d])];
    report.push(("idx", fuzz_file("idx", &p, &idx, &edits, &mut rng, n, &dataset)));
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&idx).unwrap();
        e.finish().unwrap()
    };
    std::fs::write(dir.path().join("t10k-labels-idx1-ubyte.gz"), labels).unwrap();
    let p = dir.path().join("t10k-images-idx3-ubyte.gz");
    report.push(("idx.gz", fuzz_file("idx.gz", &p, &gz, &[(10, vec![0xff; 4])], &mut rng, n, &dataset)));

    // A safetensors dataset: images [N, C, H, W] u8 and labels [N].
    let st = dir.path().join("valid.safetensors");
    let images =
        candle_core::Tensor::from_vec((0..48u8).collect::<Vec<_>>(), (3, 1, 4, 4), &candle_core::Device::Cpu).unwrap();
    let labels_t = candle_core::Tensor::from_vec(vec![0u8, 1, 2], 3, &candle_core::Device::Cpu).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("images", images), ("labels", labels_t)]), &st)
        .unwrap();
    let valid = std::fs::read(&st).unwrap();
    let p = dir.path().join("data.safetensors");
    let edits = vec![(0, vec![0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]), (0, vec![0x01, 0, 0, 0, 0, 0, 0, 0])];
    report.push(("safetensors", fuzz_file("safetensors", &p, &valid, &edits, &mut rng, n, &dataset)));

    // Parquet in the `datasets` image layout.
    let p = dir.path().join("train-00000-of-00001.parquet");
    let valid = tiny_parquet_bytes(dir.path(), &[0, 1, 2]);
    report.push(("parquet", fuzz_file("parquet", &p, &valid, &[(4, vec![0xff; 8])], &mut rng, n, &dataset)));

    // An image folder: the PNG of one class mutated.
    let folder = dir.path().join("images");
    for (class, v) in [("cat", 10u8), ("dog", 200u8)] {
        write(&folder, &format!("{class}/a.png"), "");
        std::fs::write(folder.join(class).join("a.png"), png_bytes(4, 4, v)).unwrap();
    }
    let p = folder.join("cat/a.png");
    let valid = png_bytes(4, 4, 10);
    report.push((
        "png",
        fuzz_file("png", &p, &valid, &[(16, vec![0x7f, 0xff, 0xff, 0xff])], &mut rng, n, &|_| dataset(&folder)),
    ));

    // A saved model folder: config.json, then model.safetensors.
    let engine = samhost::script::build_engine(&Rc::new(Session::cpu()));
    let saved = dir.path().join("model");
    engine.run(&format!("mlp([4, 3]).save(\"{}\");", saved.display())).unwrap();
    let load_model = |_: &Path| -> anyhow::Result<()> {
        let hub = samhost::hub::HubOptions::new(dir.path(), "http://127.0.0.1:9");
        samhost::models::pretrained::from_pretrained(
            &saved.display().to_string(),
            &Default::default(),
            &hub,
            &samhost::rng::HostRng::new(0),
            &candle_core::Device::Cpu,
        )
        .map(|_| ())
    };
    let config = std::fs::read(saved.join("config.json")).unwrap();
    report.push((
        "config.json",
        fuzz_file("config.json", &saved.join("config.json"), &config, &[(0, b"[".to_vec())], &mut rng, n, &load_model),
    ));
    std::fs::write(saved.join("config.json"), &config).unwrap();
    let weights = std::fs::read(saved.join("model.safetensors")).unwrap();
    report.push((
        "model.safetensors",
        fuzz_file(
            "model.safetensors",
            &saved.join("model.safetensors"),
            &weights,
            &[(0, vec![0xff; 8])],
            &mut rng,
            n,
            &load_model,
        ),
    ));

    // A checkpoint's state.json and optimizer state.
    let runs = dir.path().join("runs");
    write(dir.path(), "ck.rhai", "let m = mlp([4, 3]); let o = sgd(m, #{ lr: 0.1, momentum: 0.9 }); let st = resume(m, o);\ntrain_step(m, o, batch(randn([4, 4]), tensor([0, 1, 2, 0])));\nsave_checkpoint(m, o, #{ epoch: 1 });\n");
    let o = samhost().current_dir(dir.path()).args(["run", "ck.rhai", "-q", "--runs-dir"]).arg(&runs).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let ck = std::fs::read_dir(&runs).unwrap().next().unwrap().unwrap().path().join("checkpoints/epoch-0001");
    let state = std::fs::read(ck.join("state.json")).unwrap();
    let list = |_: &Path| samhost::run::checkpoint::list(ck.parent().unwrap()).map(|_| ());
    report.push((
        "state.json",
        fuzz_file("state.json", &ck.join("state.json"), &state, &[(0, b"{\"seq\": -1}".to_vec())], &mut rng, n, &list),
    ));
    std::fs::write(ck.join("state.json"), &state).unwrap();
    let opt_state = std::fs::read(ck.join("optimizer.safetensors")).unwrap();
    let load_opt = |p: &Path| -> anyhow::Result<()> {
        let state = samhost::models::params::load_safetensors(p)?;
        let mut sgd = samhost::train::Sgd::new(Default::default())?;
        samhost::train::Optimizer::load_state(&mut sgd, &state.into_iter().collect())
            .map_err(|e| e.context(p.display().to_string()))
    };
    report.push((
        "optimizer.safetensors",
        fuzz_file(
            "optimizer.safetensors",
            &ck.join("optimizer.safetensors"),
            &opt_state,
            &[(0, vec![0xff; 8])],
            &mut rng,
            n,
            &load_opt,
        ),
    ));

    for (what, (errors, oks)) in &report {
        eprintln!("file fuzzer: {what}: {} mutations, {errors} errors, {oks} loaded", errors + oks);
    }
}

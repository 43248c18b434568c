//! `from_pretrained`, `save` and the Hub, without a network: a Hugging Face cache written in
//! its real layout, folders written by `save`, a loopback server that plays the Hub (or hangs).

use crate::common::*;
use candle_core::{Device, Tensor};
use samhost::hub::HubOptions;
use samhost::hub::Timeouts;
use samhost::models::params::save_safetensors;
use samhost::models::pretrained::{from_pretrained, PretrainedOptions};
use samhost::models::registry::{build_model, ArchConfig};
use samhost::models::vit::Size2;
use samhost::models::Model;
use samhost::rng::HostRng;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const REPO: &str = "test-org/tiny-vit";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn tiny_vit_config() -> Value {
    json!({
        "architectures": ["ViTForImageClassification"], "model_type": "vit", "hidden_size": 16,
        "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 24, "image_size": 8,
        "patch_size": 4, "num_channels": 3, "qkv_bias": true, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
        "id2label": {"0": "cat", "1": "dog", "2": "bird"}, "label2id": {"cat": 0, "dog": 1, "bird": 2},
        "transformers_version": "4.46.0"
    })
}

/// The tensors of a tiny ViT with random weights (a `ViTForImageClassification` checkpoint).
fn tiny_vit_tensors() -> BTreeMap<String, Tensor> {
    let cfg = ArchConfig::from_json(&tiny_vit_config(), false).unwrap();
    let m = build_model(&cfg, &HostRng::new(77), &Device::Cpu).unwrap();
    m.params().all().into_iter().map(|(n, v)| (n, v.as_tensor().copy().unwrap())).collect()
}

fn config_bytes(v: &Value) -> Vec<u8> {
    serde_json::to_vec_pretty(v).unwrap()
}

fn safetensors_bytes(dir: &Path, tensors: &BTreeMap<String, Tensor>) -> Vec<u8> {
    let p = dir.join("tmp.safetensors");
    save_safetensors(&p, tensors).unwrap();
    let b = std::fs::read(&p).unwrap();
    std::fs::remove_file(&p).unwrap();
    b
}

/// Writes `files` into a Hugging Face cache under `cache` in the real layout: blobs, a snapshot
/// of symbolic links, `refs/main`.
fn write_cache(cache: &Path, repo: &str, files: &[(&str, Vec<u8>)]) -> PathBuf {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    let snap = root.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snap).unwrap();
    for (i, (name, bytes)) in files.iter().enumerate() {
        let etag = format!("{:064x}", 0xabc0 + i);
        std::fs::write(root.join("blobs").join(&etag), bytes).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{etag}"), snap.join(name)).unwrap();
    }
    std::fs::write(root.join("refs").join("main"), format!("{COMMIT}\n")).unwrap();
    snap
}

fn offline(cache: &Path) -> HubOptions {
    HubOptions { offline: true, ..HubOptions::new(cache, "http://127.0.0.1:9") }
}

fn load(
    repo: &str,
    opts: &PretrainedOptions,
    hub: &HubOptions,
) -> anyhow::Result<samhost::models::pretrained::Pretrained> {
    from_pretrained(repo, opts, hub, &HostRng::new(5), &Device::Cpu)
}

fn err_of(r: anyhow::Result<samhost::models::pretrained::Pretrained>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

fn logits(m: &Model, image: usize) -> Vec<Vec<f32>> {
    let n = 2 * 3 * image * image;
    let x = Tensor::from_vec(HostRng::new(1).normal(n, 0.0, 1.0), (2, 3, image, image), &Device::Cpu).unwrap();
    m.forward_t(&x, false).unwrap().to_vec2::<f32>().unwrap()
}

/// A model built from `config` with the weights of `file` loaded directly.
fn direct(config: &Value, file: &Path) -> Model {
    let cfg = ArchConfig::from_json(config, false).unwrap();
    let m = build_model(&cfg, &HostRng::new(123), &Device::Cpu).unwrap();
    m.params().load(file).unwrap();
    m
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn offline_cache_load_equals_the_file_and_a_new_head_keeps_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let tensors = tiny_vit_tensors();
    let snap = write_cache(
        &cache,
        REPO,
        &[
            ("config.json", config_bytes(&tiny_vit_config())),
            ("model.safetensors", safetensors_bytes(tmp.path(), &tensors)),
        ],
    );
    let hub = offline(&cache);
    let p = load(REPO, &PretrainedOptions::default(), &hub).unwrap();
    assert!(p.notes.is_empty(), "{:?}", p.notes);
    let want = direct(&tiny_vit_config(), &snap.join("model.safetensors"));
    assert_eq!(logits(&p.model, 8), logits(&want, 8));
    // The labels survive a save.
    assert_eq!(p.model.network().config()["id2label"]["1"], "dog");

    let opts = PretrainedOptions { num_classes: Some(5), ..Default::default() };
    let p = load(REPO, &opts, &hub).unwrap();
    assert!(p.notes.iter().any(|n| n.contains("new classification head") && n.contains("3 classes")), "{:?}", p.notes);
    for (name, v) in p.model.params().all() {
        if name.starts_with("classifier.") {
            assert_eq!(v.dims()[0], 5, "{name}");
        } else {
            assert_eq!(values(v.as_tensor()), values(&tensors[&name]), "{name}");
        }
    }
    assert_eq!(logits(&p.model, 8)[0].len(), 5);
}

#[test]
fn vit_model_checkpoint_without_head_and_interpolated_positions() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    // A ViTModel: no `vit.` prefix, no classifier, a pooler; its config has no labels.
    let mut base: BTreeMap<String, Tensor> = tiny_vit_tensors()
        .into_iter()
        .filter(|(n, _)| !n.starts_with("classifier."))
        .map(|(n, t)| (n.trim_start_matches("vit.").to_string(), t))
        .collect();
    base.insert("pooler.dense.weight".into(), Tensor::zeros((16, 16), candle_core::DType::F32, &Device::Cpu).unwrap());
    base.insert("pooler.dense.bias".into(), Tensor::zeros(16, candle_core::DType::F32, &Device::Cpu).unwrap());
    let mut cfg = tiny_vit_config();
    cfg["architectures"] = json!(["ViTModel"]);
    cfg.as_object_mut().unwrap().remove("id2label");
    cfg.as_object_mut().unwrap().remove("label2id");
    write_cache(
        &cache,
        "org/vit-base",
        &[("config.json", config_bytes(&cfg)), ("model.safetensors", safetensors_bytes(tmp.path(), &base))],
    );
    let hub = offline(&cache);
    let e = err_of(load("org/vit-base", &PretrainedOptions::default(), &hub));
    assert!(e.contains("no classification head") && e.contains("num_classes"), "{e}");

    let opts = PretrainedOptions { num_classes: Some(4), ..Default::default() };
    let p = load("org/vit-base", &opts, &hub).unwrap();
    let notes = p.notes.join("\n");
    assert!(notes.contains("the checkpoint has none") && notes.contains("vit.pooler.dense.weight"), "{notes}");
    let encoder = p.model.params().get("vit.encoder.layer.1.output.dense.weight").unwrap();
    assert_eq!(values(encoder.as_tensor()), values(&base["encoder.layer.1.output.dense.weight"]));

    // image_size 12: the 2x2 patch grid becomes 3x3; the [CLS] position is kept.
    let opts = PretrainedOptions { num_classes: Some(4), image_size: Some(Size2::Square(12)), ..Default::default() };
    let p = load("org/vit-base", &opts, &hub).unwrap();
    assert!(p.notes.iter().any(|n| n.contains("2x2 to a 3x3")), "{:?}", p.notes);
    let pos = p.model.params().get("vit.embeddings.position_embeddings").unwrap();
    assert_eq!(pos.dims(), [1, 10, 16]);
    let old = &base["embeddings.position_embeddings"];
    assert_eq!(values(&pos.as_tensor().narrow(1, 0, 1).unwrap()), values(&old.narrow(1, 0, 1).unwrap()));
    assert_eq!(logits(&p.model, 12)[0].len(), 4);
    assert_eq!(p.model.network().config()["image_size"], 12);
}

#[test]
fn saved_folders_load_again() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = offline(&tmp.path().join("empty-cache"));
    let rng = HostRng::new(8);
    // A ViT and a ResNet (BatchNorm buffers), saved by `save`, loaded by `from_pretrained(dir)`.
    for (name, cfg, image) in [
        ("vit", tiny_vit_config(), 8),
        ("resnet", json!({"model_type": "cifar_resnet", "depth": 8, "num_labels": 3}), 8),
    ] {
        let m = build_model(&ArchConfig::from_json(&cfg, false).unwrap(), &rng, &Device::Cpu).unwrap();
        // Move the BatchNorm statistics away from their initial values.
        let x = Tensor::from_vec(rng.normal(4 * 3 * 64, 1.0, 2.0), (4, 3, 8, 8), &Device::Cpu).unwrap();
        m.forward_t(&x, true).unwrap();
        let dir = tmp.path().join(name);
        samhost::script::model::save_model(&m, dir.to_str().unwrap()).unwrap();
        assert!(dir.join("config.json").is_file() && dir.join("model.safetensors").is_file());
        let p = load(dir.to_str().unwrap(), &PretrainedOptions::default(), &hub).unwrap();
        assert_eq!(logits(&p.model, image), logits(&m, image), "{name}");
        let m2 = build_model(&ArchConfig::from_json(&cfg, false).unwrap(), &HostRng::new(0), &Device::Cpu).unwrap();
        samhost::script::model::load_model(&m2, dir.join("model.safetensors").to_str().unwrap()).unwrap();
        assert_eq!(logits(&m2, image), logits(&m, image), "{name}: load");
    }
    // The config written for a ViT is Hugging Face's.
    let cfg: Value = serde_json::from_slice(&std::fs::read(tmp.path().join("vit/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"], json!(["ViTForImageClassification"]));
    assert_eq!(cfg["id2label"]["2"], "bird");
    let header = std::fs::read(tmp.path().join("vit/model.safetensors")).unwrap();
    assert!(String::from_utf8_lossy(&header[..200]).contains(r#""format":"pt""#));

    // A sharded checkpoint in a folder.
    let tensors = tiny_vit_tensors();
    let dir = tmp.path().join("sharded");
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b): (BTreeMap<_, _>, BTreeMap<_, _>) =
        tensors.clone().into_iter().partition(|(n, _)| n.contains("layer.0"));
    save_safetensors(&dir.join("model-00001-of-00002.safetensors"), &a).unwrap();
    save_safetensors(&dir.join("model-00002-of-00002.safetensors"), &b).unwrap();
    let map: BTreeMap<&String, &str> = a
        .keys()
        .map(|k| (k, "model-00001-of-00002.safetensors"))
        .chain(b.keys().map(|k| (k, "model-00002-of-00002.safetensors")))
        .collect();
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_vec(&json!({"weight_map": map})).unwrap())
        .unwrap();
    std::fs::write(dir.join("config.json"), config_bytes(&tiny_vit_config())).unwrap();
    let p = load(dir.to_str().unwrap(), &PretrainedOptions::default(), &hub).unwrap();
    let single = tmp.path().join("single.safetensors");
    save_safetensors(&single, &tensors).unwrap();
    assert_eq!(logits(&p.model, 8), logits(&direct(&tiny_vit_config(), &single), 8));
}

#[test]
fn clear_errors_for_bad_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = offline(&tmp.path().join("cache"));
    let tensors = tiny_vit_tensors();
    let folder = |name: &str, cfg: &Value, weights: Option<&BTreeMap<String, Tensor>>| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("config.json"), config_bytes(cfg)).unwrap();
        if let Some(w) = weights {
            save_safetensors(&d.join("model.safetensors"), w).unwrap();
        }
        d.to_str().unwrap().to_string()
    };
    let none = PretrainedOptions::default();

    // Only pickle weights.
    let d = folder("pickle", &tiny_vit_config(), None);
    std::fs::write(Path::new(&d).join("pytorch_model.bin"), b"not read").unwrap();
    let e = err_of(load(&d, &none, &hub));
    assert!(e.contains("pytorch_model.bin") && e.contains("pickle") && e.contains("safetensors"), "{e}");

    // A missing tensor, named.
    let mut missing = tensors.clone();
    missing.remove("vit.encoder.layer.1.intermediate.dense.bias");
    let e = err_of(load(&folder("missing", &tiny_vit_config(), Some(&missing)), &none, &hub));
    assert!(e.contains("`vit.encoder.layer.1.intermediate.dense.bias` is missing"), "{e}");

    // A tensor of the wrong shape, named, with both shapes.
    let mut wrong = tensors.clone();
    wrong.insert("vit.layernorm.weight".into(), Tensor::ones(15, candle_core::DType::F32, &Device::Cpu).unwrap());
    let e = err_of(load(&folder("wrong", &tiny_vit_config(), Some(&wrong)), &none, &hub));
    assert!(e.contains("`vit.layernorm.weight`") && e.contains("[15]") && e.contains("[16]"), "{e}");

    // An unsupported model_type.
    let e =
        err_of(load(&folder("bert", &json!({"model_type": "bert", "hidden_size": 16}), Some(&tensors)), &none, &hub));
    assert!(e.contains("model_type `bert` is not supported") && e.contains("vit"), "{e}");

    // No weights at all; a folder that does not exist; a repo that is not cached while offline.
    let e = err_of(load(&folder("empty", &tiny_vit_config(), None), &none, &hub));
    assert!(e.contains("no model.safetensors"), "{e}");
    let e = err_of(load("./does/not/exist", &none, &hub));
    assert!(e.contains("no such folder"), "{e}");
    let e = err_of(load("org/not-cached", &none, &hub));
    assert!(e.contains("offline") && e.contains("not in the cache"), "{e}");

    // Pickle only, in the cache, offline.
    let cache = tmp.path().join("cache");
    write_cache(
        &cache,
        "org/pickled",
        &[("config.json", config_bytes(&tiny_vit_config())), ("pytorch_model.bin", vec![0; 8])],
    );
    let e = err_of(load("org/pickled", &none, &hub));
    assert!(e.contains("pickle") && e.contains("safetensors"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// A loopback server that plays the Hub.

struct Served {
    /// The repository's URL path: `org/name` for a model, `datasets/org/name` for a dataset.
    repo: &'static str,
    /// The Hub's port (for the absolute `Link` of the next page of a listing).
    port: u16,
    files: HashMap<String, Vec<u8>>,
    /// Every request: method, path, Authorization header.
    log: RequestLog,
}

fn read_request(stream: &mut TcpStream) -> Option<(String, String, Option<String>)> {
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut first = String::new();
    reader.read_line(&mut first).ok()?;
    let mut auth = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("authorization") {
                auth = Some(v.trim().to_string());
            }
        }
    }
    let mut parts = first.split_whitespace();
    Some((parts.next()?.to_string(), parts.next()?.to_string(), auth))
}

fn respond(stream: &mut TcpStream, method: &str, status: &str, headers: &[(&str, String)], body: &[u8]) {
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    if method == "GET" {
        let _ = stream.write_all(body);
    }
    let _ = stream.flush();
}

/// Entries per page of the `tree` listing, small so that the client must follow `Link`.
const TREE_PAGE: usize = 2;

/// The Hub's API: `/api/{models|datasets}/REPO/revision/REV` (the commit) and
/// `/api/.../REPO/tree/REV?recursive=true[&cursor=N]` (every file and folder, a page at a time).
fn api(stream: &mut TcpStream, method: &str, path: &str, served: &Served) {
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    let route = route.strip_prefix("models/").unwrap_or(route);
    let (repo, rev, tree) = match (route.split_once("/revision/"), route.split_once("/tree/")) {
        (Some((repo, rev)), _) => (repo, rev, false),
        (None, Some((repo, rev))) => (repo, rev, true),
        _ => return respond(stream, method, "404 Not Found", &[], b""),
    };
    if repo != served.repo {
        return respond(stream, method, "401 Unauthorized", &[("X-Error-Code", "RepoNotFound".into())], b"");
    }
    if rev != "main" && rev != COMMIT {
        return respond(stream, method, "404 Not Found", &[("X-Error-Code", "RevisionNotFound".into())], b"");
    }
    let json = ("Content-Type", "application/json".to_string());
    if !tree {
        let body = json!({"id": repo.trim_start_matches("datasets/"), "sha": COMMIT}).to_string();
        return respond(stream, method, "200 OK", &[json], body.as_bytes());
    }
    assert!(query.contains("recursive=true"), "{path}");
    // Folders first, then files, as the Hub lists them; a folder per parent of every file.
    let mut names: Vec<&String> = served.files.keys().collect();
    names.sort();
    let mut dirs: Vec<String> = names
        .iter()
        .flat_map(|n| {
            let parts: Vec<&str> = n.split('/').collect();
            (1..parts.len()).map(move |i| parts[..i].join("/"))
        })
        .collect();
    dirs.sort();
    dirs.dedup();
    let entries: Vec<Value> = dirs
        .iter()
        .map(|d| json!({"type": "directory", "oid": "0".repeat(40), "size": 0, "path": d}))
        .chain(
            names
                .iter()
                .map(|n| json!({"type": "file", "oid": "1".repeat(40), "size": served.files[*n].len(), "path": n})),
        )
        .collect();
    let start: usize = query.split('&').find_map(|kv| kv.strip_prefix("cursor=")).map_or(0, |c| c.parse().unwrap());
    let end = (start + TREE_PAGE).min(entries.len());
    let mut headers = vec![json];
    if end < entries.len() {
        let next = format!("http://127.0.0.1:{}/api/{route}?recursive=true&cursor={end}", served.port);
        headers.push(("Link", format!("<{next}>; rel=\"next\"")));
    }
    respond(stream, method, "200 OK", &headers, Value::from(entries[start..end].to_vec()).to_string().as_bytes())
}

fn handle(mut stream: TcpStream, cdn_port: u16, served: &Served) {
    let Some((method, path, auth)) = read_request(&mut stream) else { return };
    served.log.lock().unwrap().push((method.clone(), path.clone(), auth));
    let etag = |name: &str| format!("{:040x}", name.bytes().map(|b| b as u64).sum::<u64>());
    if let Some(name) = path.strip_prefix("/cdn/") {
        let body = served.files.get(name).cloned().unwrap_or_default();
        return respond(&mut stream, &method, "200 OK", &[], &body);
    }
    if let Some(rest) = path.strip_prefix("/api/") {
        return api(&mut stream, &method, rest, served);
    }
    let Some((repo, rest)) = path.trim_start_matches('/').split_once("/resolve/") else {
        return respond(&mut stream, &method, "404 Not Found", &[], b"");
    };
    if repo != served.repo {
        return respond(&mut stream, &method, "401 Unauthorized", &[("X-Error-Code", "RepoNotFound".into())], b"");
    }
    let (rev, file) = rest.split_once('/').unwrap_or((rest, ""));
    if rev != "main" && rev != COMMIT {
        return respond(&mut stream, &method, "404 Not Found", &[("X-Error-Code", "RevisionNotFound".into())], b"");
    }
    let commit = ("X-Repo-Commit", COMMIT.to_string());
    match served.files.get(file) {
        None => {
            respond(&mut stream, &method, "404 Not Found", &[("X-Error-Code", "EntryNotFound".into()), commit], b"")
        }
        Some(body) if file.ends_with(".safetensors") || file.ends_with(".parquet") => {
            // Large files live on a CDN: the Hub redirects to an absolute URL.
            let location = format!("http://127.0.0.1:{cdn_port}/cdn/{file}");
            let headers = [
                commit,
                ("X-Linked-Etag", format!("\"{}\"", etag(file))),
                ("X-Linked-Size", body.len().to_string()),
                ("Location", location),
            ];
            respond(&mut stream, &method, "302 Found", &headers, b"")
        }
        Some(body) => respond(&mut stream, &method, "200 OK", &[commit, ("ETag", format!("\"{}\"", etag(file)))], body),
    }
}

type RequestLog = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

/// Serves `files` of `repo` on a loopback port, large files from a "CDN" on a second port;
/// returns the endpoint and the request log.
fn mock_hub_logged(repo: &'static str, files: Vec<(&str, Vec<u8>)>) -> (String, RequestLog) {
    let hub = TcpListener::bind("127.0.0.1:0").unwrap();
    let cdn = TcpListener::bind("127.0.0.1:0").unwrap();
    let (port, cdn_port) = (hub.local_addr().unwrap().port(), cdn.local_addr().unwrap().port());
    let log = RequestLog::default();
    let files = files.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let served = Served { repo, port, files, log: log.clone() };
    let served = Arc::new(served);
    for listener in [hub, cdn] {
        let served = served.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                handle(stream, cdn_port, &served);
            }
        });
    }
    (format!("http://127.0.0.1:{port}"), log)
}

/// Serves `files` of `repo` on a loopback port; returns the endpoint.
fn mock_hub(repo: &'static str, files: Vec<(&str, Vec<u8>)>) -> String {
    mock_hub_logged(repo, files).0
}

#[test]
fn downloads_into_the_standard_cache_layout_then_works_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let tensors = tiny_vit_tensors();
    let weights = safetensors_bytes(tmp.path(), &tensors);
    let (endpoint, requests) =
        mock_hub_logged(REPO, vec![("config.json", config_bytes(&tiny_vit_config())), ("model.safetensors", weights)]);
    let mut hub = HubOptions::new(&cache, &endpoint);
    hub.timeouts = Timeouts::uniform(5.0);
    hub.token = Some("hf_secret".into());
    let p = load(REPO, &PretrainedOptions::default(), &hub).unwrap();
    assert!(p.notes.iter().any(|n| n.contains("downloaded config.json, model.safetensors")), "{:?}", p.notes);
    // The token goes to the Hub, never to the CDN it redirects to.
    for (method, path, auth) in requests.lock().unwrap().iter() {
        let want = if path.starts_with("/cdn/") { None } else { Some("Bearer hf_secret") };
        assert_eq!(auth.as_deref(), want, "{method} {path}");
    }
    assert!(requests.lock().unwrap().iter().any(|(m, p, _)| m == "GET" && p.starts_with("/cdn/")));

    let root = cache.join("models--test-org--tiny-vit");
    assert_eq!(std::fs::read_to_string(root.join("refs/main")).unwrap(), COMMIT);
    let snap = root.join("snapshots").join(COMMIT);
    for f in ["config.json", "model.safetensors"] {
        let link = std::fs::read_link(snap.join(f)).unwrap();
        assert!(link.starts_with("../../blobs"), "{f} -> {}", link.display());
        assert!(snap.join(f).is_file());
    }
    let single = tmp.path().join("single.safetensors");
    save_safetensors(&single, &tensors).unwrap();
    let want = logits(&direct(&tiny_vit_config(), &single), 8);
    assert_eq!(logits(&p.model, 8), want);

    // Offline now, with the server still up: the cache alone serves it.
    let p = load(REPO, &PretrainedOptions::default(), &offline(&cache)).unwrap();
    assert_eq!(logits(&p.model, 8), want);
    assert!(p.notes.is_empty(), "{:?}", p.notes);
    // Online again: the cache is tried first, so nothing is downloaded.
    let p = load(REPO, &PretrainedOptions::default(), &hub).unwrap();
    assert!(p.notes.is_empty(), "{:?}", p.notes);

    // A repository and a revision that do not exist.
    let e = err_of(load("test-org/nope", &PretrainedOptions::default(), &hub));
    assert!(e.contains("repository `test-org/nope` does not exist"), "{e}");
    let rev = PretrainedOptions { revision: Some("v9".into()), ..Default::default() };
    let e = err_of(load(REPO, &rev, &hub));
    assert!(e.contains("revision `v9` does not exist"), "{e}");
}

#[test]
fn a_hub_repo_with_only_pickle_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let endpoint = mock_hub(
        "org/old",
        vec![("config.json", config_bytes(&tiny_vit_config())), ("pytorch_model.bin", vec![1; 64])],
    );
    let hub = HubOptions { timeouts: Timeouts::uniform(5.0), ..HubOptions::new(&cache, &endpoint) };
    let e = err_of(load("org/old", &PretrainedOptions::default(), &hub));
    assert!(e.contains("pytorch_model.bin") && e.contains("Convert") && e.contains("safetensors"), "{e}");
    // The absence of model.safetensors is recorded where huggingface_hub records it, and the
    // pickle was never downloaded.
    let root = cache.join("models--org--old");
    assert!(root.join(".no_exist").join(COMMIT).join("model.safetensors").exists());
    assert!(!root.join("snapshots").join(COMMIT).join("pytorch_model.bin").exists());
}

#[test]
fn no_network_and_no_cache() {
    let tmp = tempfile::tempdir().unwrap();
    // A port with nothing listening: the connection is refused at once.
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let hub = HubOptions::new(&tmp.path().join("hub"), &format!("http://127.0.0.1:{port}"));
    let e = err_of(load(REPO, &PretrainedOptions::default(), &hub));
    assert!(e.contains("cannot reach") && e.contains("no cached copy"), "{e}");
}

/// A loopback server that accepts connections and never answers.
fn silent_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut open = Vec::new();
        for s in listener.incoming().flatten() {
            open.push(s);
        }
    });
    format!("http://127.0.0.1:{port}")
}

#[test]
fn a_server_that_never_answers_times_out() {
    let tmp = tempfile::tempdir().unwrap();
    write(tmp.path(), "t.rhai", "from_pretrained(\"test-org/tiny-vit\");");
    let start = Instant::now();
    let o = samhost()
        .current_dir(tmp.path())
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_HUB_CACHE", tmp.path().join("hub"))
        .env("HF_ENDPOINT", silent_server())
        .env("SAMHOST_HTTP_TIMEOUT_SECS", "1")
        .args(["run", "t.rhai", "--quiet"])
        .output()
        .unwrap();
    let took = start.elapsed();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("timeout") && e.contains("no answer within 1 s"), "{e}");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn script_from_pretrained_offline_env_and_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    write_cache(
        &cache,
        REPO,
        &[
            ("config.json", config_bytes(&tiny_vit_config())),
            ("model.safetensors", safetensors_bytes(tmp.path(), &tiny_vit_tensors())),
        ],
    );
    write(
        tmp.path(),
        "ft.rhai",
        r#"
let m = from_pretrained("test-org/tiny-vit", #{ num_classes: 5, revision: "main" });
if m.forward(randn([2, 3, 8, 8])).shape != [2, 5] { throw "head"; }
m.freeze("vit.");
if m.num_trainable_parameters() != 16 * 5 + 5 { throw "freeze"; }
m.save("out");
let back = from_pretrained("out");
let x = randn([1, 3, 8, 8]);
m.eval_mode();
back.eval_mode();
if m.training { throw "eval_mode"; }
if (m.forward(x) - back.forward(x)).abs().max().item() != 0.0 { throw "round trip"; }
print("ok");
"#,
    );
    // HF_HUB_OFFLINE=1 is set by `samhost()`; a dead endpoint proves nothing is fetched.
    let o = samhost()
        .current_dir(tmp.path())
        .env("HF_HUB_CACHE", &cache)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .args(["run", "ft.rhai"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("new classification head `classifier` with 5 classes"), "{}", stderr(&o));

    // --offline without HF_HUB_OFFLINE: an uncached repo fails as offline, not as unreachable.
    write(tmp.path(), "miss.rhai", "from_pretrained(\"org/absent\");");
    let o = samhost()
        .current_dir(tmp.path())
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_HUB_CACHE", &cache)
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .args(["run", "miss.rhai", "--quiet", "--offline"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("offline") && stderr(&o).contains("not in the cache"), "{}", stderr(&o));
}

#[test]
fn finetune_example_runs_in_smoke_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let script = repo().join("scripts/finetune_vit.rhai");
    let o = run_in(tmp.path(), &["run", script.to_str().unwrap(), "--set", "smoke=true", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let runs: Vec<PathBuf> = std::fs::read_dir(tmp.path().join("runs")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let out = runs[0].join("finetuned");
    assert!(out.join("config.json").is_file() && out.join("model.safetensors").is_file());
}

#[test]
fn dataset_repositories_use_their_own_urls_and_cache_folders() {
    use samhost::hub::RepoKind;
    use samhost::hub::{HubRepo, Lookup};
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let endpoint = mock_hub("datasets/test-org/data", vec![("train/part-0.txt", b"hello".to_vec())]);
    let hub = HubOptions { timeouts: Timeouts::uniform(5.0), ..HubOptions::new(&cache, &endpoint) };
    let mut repo = HubRepo::of_kind(&hub, RepoKind::Dataset, "test-org/data", None).unwrap();
    let Lookup::Found(p) = repo.file("train/part-0.txt").unwrap() else { panic!("not found") };
    assert_eq!(std::fs::read(&p).unwrap(), b"hello");
    assert!(p.starts_with(cache.join("datasets--test-org--data/snapshots").join(COMMIT)), "{}", p.display());
    assert_eq!(repo.file("test/part-0.txt").unwrap(), Lookup::Missing);
}

// ---------------------------------------------------------------------------------------------
// Hub datasets: the split's parquet files are listed (tree API), downloaded, then read offline.

const DATA_REPO: &str = "test-org/tiny";

/// A dataset repository on the mock Hub: a README and one parquet file per split of config
/// `plain_text` (train: 5 images, test: 2).
fn mock_dataset_hub(tmp: &Path) -> (String, RequestLog) {
    let train = tiny_parquet_bytes(tmp, &[0, 1, 2, 1, 0]);
    let test = tiny_parquet_bytes(tmp, &[2, 2]);
    mock_hub_logged(
        "datasets/test-org/tiny",
        vec![
            ("README.md", b"# tiny".to_vec()),
            ("plain_text/train-00000-of-00001.parquet", train),
            ("plain_text/test-00000-of-00001.parquet", test),
        ],
    )
}

#[test]
fn hub_dataset_downloads_a_split_then_reads_it_offline() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let (endpoint, requests) = mock_dataset_hub(tmp.path());
    write(
        tmp.path(),
        "d.rhai",
        r#"let tr = hub_dataset("test-org/tiny");
let te = hub_dataset("test-org/tiny", #{ split: "test" });
print(`${tr.len()} ${te.len()} ${tr.classes} ${tr.shape} ${te.num_classes}`);"#,
    );
    let run = |offline: bool| {
        let mut c = samhost();
        if !offline {
            c.env_remove("HF_HUB_OFFLINE");
        }
        c.current_dir(tmp.path())
            .env("HF_HUB_CACHE", &cache)
            .env("HF_ENDPOINT", &endpoint)
            .env("SAMHOST_HTTP_TIMEOUT_SECS", "5")
            .args(["run", "d.rhai"])
            .output()
            .unwrap()
    };
    let want = "5 2 [\"airplane\", \"automobile\", \"bird\"] [3, 4, 4] 3";
    let o = run(false);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), want);
    // The download shows progress (the bar itself only on a terminal).
    assert!(stderr(&o).contains("downloading test-org/tiny/plain_text/test-00000-of-00001.parquet"), "{}", stderr(&o));

    let log: Vec<String> = requests.lock().unwrap().iter().map(|(m, p, _)| format!("{m} {p}")).collect();
    assert!(log.contains(&"GET /api/datasets/test-org/tiny/revision/main".to_string()), "{log:?}");
    // The listing was followed over its pages (4 entries: a folder and 3 files).
    let tree = format!("GET /api/datasets/test-org/tiny/tree/{COMMIT}?recursive=true");
    assert!(log.contains(&tree) && log.contains(&format!("{tree}&cursor=2")), "{log:?}");
    assert!(log.iter().any(|r| r.starts_with("GET /cdn/plain_text/train-")), "{log:?}");
    assert!(!log.iter().any(|r| r.contains("README")), "only the split's files are fetched: {log:?}");

    // The standard cache layout: refs/main, snapshot links into blobs/.
    let root = cache.join("datasets--test-org--tiny");
    assert_eq!(std::fs::read_to_string(root.join("refs/main")).unwrap().trim(), COMMIT);
    let snap = root.join("snapshots").join(COMMIT).join("plain_text");
    for f in ["train-00000-of-00001.parquet", "test-00000-of-00001.parquet"] {
        let link = std::fs::read_link(snap.join(f)).unwrap();
        assert!(link.starts_with("../../../blobs"), "{f} -> {}", link.display());
        assert!(snap.join(f).is_file(), "{f}");
    }

    // HF_HUB_OFFLINE=1 with the server still up: the cache alone serves both splits.
    let before = requests.lock().unwrap().len();
    let o = run(true);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), want);
    assert_eq!(requests.lock().unwrap().len(), before, "offline made requests");
}

#[test]
fn hub_dataset_errors_list_the_splits_found() {
    use samhost::data::hub::{hub_dataset_with, HubOptions as DataOptions};
    let tmp = tempfile::tempdir().unwrap();
    let (endpoint, _) = mock_dataset_hub(tmp.path());
    let hub = HubOptions { timeouts: Timeouts::uniform(5.0), ..HubOptions::new(&tmp.path().join("hub"), &endpoint) };
    let split = |s: &str| DataOptions { split: s.into(), ..Default::default() };
    let err = |r: anyhow::Result<samhost::data::Dataset>| match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    };

    let e = err(hub_dataset_with(DATA_REPO, &split("validation"), &hub));
    assert!(e.contains("test-org/tiny@main") && e.contains("no parquet file for split `validation`"), "{e}");
    assert!(e.contains("splits found: test (plain_text), train (plain_text)"), "{e}");

    let e = err(hub_dataset_with("test-org/absent", &split("train"), &hub));
    assert!(e.contains("repository `test-org/absent` does not exist"), "{e}");
    let e = err(hub_dataset_with(DATA_REPO, &DataOptions { revision: "v9".into(), ..split("train") }, &hub));
    assert!(e.contains("revision `v9` does not exist"), "{e}");

    // A config that is not there names the ones that are; the right one loads the labels.
    let e = err(hub_dataset_with(DATA_REPO, &DataOptions { config: Some("other".into()), ..split("test") }, &hub));
    assert!(e.contains("no `test` files under config `other`") && e.contains("plain_text"), "{e}");
    let ds =
        hub_dataset_with(DATA_REPO, &DataOptions { config: Some("plain_text".into()), ..split("test") }, &hub).unwrap();
    assert_eq!((ds.len(), ds.label(0), ds.label(1), ds.classes()[2].as_str()), (2, 2, 2, "bird"));

    // A Hub that never answers: a timeout, named, within the timeout.
    let hub =
        HubOptions { timeouts: Timeouts::uniform(0.5), ..HubOptions::new(&tmp.path().join("hub"), &silent_server()) };
    let start = Instant::now();
    let e = err(hub_dataset_with(DATA_REPO, &split("train"), &hub));
    assert!(e.contains("test-org/tiny@main (split `train`)") && e.contains("timeout"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());

    // A repository without parquet files points at the Hub's parquet copy.
    let endpoint = mock_hub("datasets/test-org/csv", vec![("data/train.csv", b"a,b\n".to_vec())]);
    let hub = HubOptions { timeouts: Timeouts::uniform(5.0), ..HubOptions::new(&tmp.path().join("hub"), &endpoint) };
    let e = err(hub_dataset_with("test-org/csv", &split("train"), &hub));
    assert!(
        e.contains("no parquet files") && e.contains("data/train.csv") && e.contains("refs/convert/parquet"),
        "{e}"
    );
}

/// A checkpoint's preprocessor_config.json (a DINOv2-style processor: bicubic, ImageNet
/// constants, resize then center crop) becomes `m.preprocess` for the model's input size: gray to
/// RGB, a bicubic resize to the model's size, the normalisation; applying it gives the pixels
/// the processor's formula gives; `save` writes it back with the new size, and
/// `vit(model_config(m))` rebuilds the architecture with its unused Hugging Face fields kept.
#[test]
fn the_checkpoints_preprocessing_reaches_the_script() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let mut config = tiny_vit_config();
    config["layerscale_value"] = json!(1.0); // a field samhost does not use
    let processor = json!({
        "image_processor_type": "BitImageProcessor", "do_resize": true, "size": {"shortest_edge": 256},
        "resample": 3, "do_center_crop": true, "crop_size": {"height": 224, "width": 224},
        "do_rescale": true, "rescale_factor": 0.00392156862745098, "do_normalize": true,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]
    });
    write_cache(
        &cache,
        REPO,
        &[
            ("config.json", config_bytes(&config)),
            ("model.safetensors", safetensors_bytes(tmp.path(), &tiny_vit_tensors())),
            ("preprocessor_config.json", config_bytes(&processor)),
        ],
    );
    write(
        tmp.path(),
        "pre.rhai",
        r#"
let m = from_pretrained("test-org/tiny-vit", #{ num_classes: 4, image_size: 12 });
print(`pre=${m.preprocess}`);
// Gray 4x4 images, every pixel 128 (read as 128/255): after the transforms every pixel of
// channel c is (128/255 - mean_c) / std_c (bicubic resizing keeps a constant image constant).
let ds = load_dataset("gray.safetensors").transform(m.preprocess);
let b = ();
for x in ds.batches(2, #{ shuffle: false }) { b = x; }
print(`shape=${b.images.shape}`);
print(`c0=${b.images.narrow(1, 0, 1).mean().item()} c2=${b.images.narrow(1, 2, 1).mean().item()}`);
let twin = vit(model_config(m));
if twin.num_parameters() != m.num_parameters() { throw "rebuilt"; }
m.save("out");
print("ok");
"#,
    );
    let mut gray = BTreeMap::new();
    gray.insert("images".to_string(), Tensor::from_vec(vec![128u8; 2 * 16], (2, 1, 4, 4), &Device::Cpu).unwrap());
    gray.insert("labels".to_string(), Tensor::from_vec(vec![0u8, 1], 2, &Device::Cpu).unwrap());
    save_safetensors(&tmp.path().join("gray.safetensors"), &gray).unwrap();
    let o = samhost().current_dir(tmp.path()).env("HF_HUB_CACHE", &cache).args(["run", "pre.rhai"]).output().unwrap();
    let (out, err) = (stdout(&o), stderr(&o));
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains("\"grayscale_to_rgb\"")
            && out.contains("\"mode\": \"bicubic\"")
            && out.contains("\"resize\": [12, 12]"),
        "{out}"
    );
    assert!(out.contains("shape=[2, 3, 12, 12]"), "{out}");
    let grab = |key: &str| -> f64 {
        out.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}="))).unwrap().parse().unwrap()
    };
    let px = 128.0 / 255.0;
    assert!((grab("c0") - (px - 0.485) / 0.229).abs() < 1e-5, "{out}");
    assert!((grab("c2") - (px - 0.406) / 0.225).abs() < 1e-5, "{out}");
    assert!(err.contains("preprocessing from preprocessor_config.json (bicubic resize, normalisation)"), "{err}");
    assert!(err.contains("fields samhost does not use, kept in config.json: layerscale_value"), "{err}");
    let saved: Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("out/preprocessor_config.json")).unwrap()).unwrap();
    assert_eq!(saved["size"], json!({"height": 12, "width": 12}));
    assert_eq!(saved["crop_size"], json!({"height": 12, "width": 12}));
    assert_eq!(saved["do_center_crop"], false);
    assert_eq!(saved["image_mean"], processor["image_mean"]);
    let cfg: Value = serde_json::from_slice(&std::fs::read(tmp.path().join("out/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["layerscale_value"], 1.0, "unused fields are kept");
}

/// The exact tensor names and shapes of a `Dinov2Model` checkpoint (the Hub's
/// facebook/dinov2-small, shrunk: hidden 8, 2 layers, 2 heads, patch 14 on 28 px), filled with
/// deterministic values, LayerScale and biases away from their initial values.
fn dinov2_hub_tensors(h: usize, layers: usize) -> BTreeMap<String, Tensor> {
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("embeddings.cls_token".into(), vec![1, 1, h]),
        ("embeddings.mask_token".into(), vec![1, h]),
        ("embeddings.position_embeddings".into(), vec![1, 5, h]),
        ("embeddings.patch_embeddings.projection.weight".into(), vec![h, 3, 14, 14]),
        ("embeddings.patch_embeddings.projection.bias".into(), vec![h]),
        ("layernorm.weight".into(), vec![h]),
        ("layernorm.bias".into(), vec![h]),
    ];
    for i in 0..layers {
        let l = format!("encoder.layer.{i}");
        for (name, shape) in [
            ("norm1.weight", vec![h]),
            ("norm1.bias", vec![h]),
            ("attention.attention.query.weight", vec![h, h]),
            ("attention.attention.query.bias", vec![h]),
            ("attention.attention.key.weight", vec![h, h]),
            ("attention.attention.key.bias", vec![h]),
            ("attention.attention.value.weight", vec![h, h]),
            ("attention.attention.value.bias", vec![h]),
            ("attention.output.dense.weight", vec![h, h]),
            ("attention.output.dense.bias", vec![h]),
            ("layer_scale1.lambda1", vec![h]),
            ("norm2.weight", vec![h]),
            ("norm2.bias", vec![h]),
            ("mlp.fc1.weight", vec![4 * h, h]),
            ("mlp.fc1.bias", vec![4 * h]),
            ("mlp.fc2.weight", vec![h, 4 * h]),
            ("mlp.fc2.bias", vec![h]),
            ("layer_scale2.lambda1", vec![h]),
        ] {
            shapes.push((format!("{l}.{name}"), shape));
        }
    }
    let rng = HostRng::new(31);
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let std = if name.ends_with("patch_embeddings.projection.weight") { 0.05 } else { 0.4 };
            let mut v = rng.normal(n, 0.0, std);
            if name.contains("norm") && name.ends_with("weight") || name.ends_with("lambda1") {
                v.iter_mut().for_each(|x| *x += 1.0);
            }
            (name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
        })
        .collect()
}

/// DINOv2's forward pass written out in float64 from candle's elementary ops: patch embedding,
/// `[CLS]` and positions, per layer `x + λ1·attn(LN1(x))` and `x + λ2·mlp(LN2(x))` with the exact
/// GELU, the final layer norm, the head over `[CLS]` ‖ mean(patch tokens).
fn dinov2_reference(t: &BTreeMap<String, Tensor>, x: &Tensor, heads: usize, layers: usize) -> Vec<Vec<f64>> {
    use candle_core::{DType, D};
    let g = |k: &str| t[k].to_dtype(DType::F64).unwrap();
    let ln = |x: &Tensor, p: &str| {
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let c = x.broadcast_sub(&mean).unwrap();
        let var = c.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let y = c.broadcast_div(&(var + 1e-6).unwrap().sqrt().unwrap()).unwrap();
        y.broadcast_mul(&g(&format!("{p}.weight"))).unwrap().broadcast_add(&g(&format!("{p}.bias"))).unwrap()
    };
    let lin = |x: &Tensor, p: &str| {
        x.broadcast_matmul(&g(&format!("{p}.weight")).t().unwrap())
            .unwrap()
            .broadcast_add(&g(&format!("{p}.bias")))
            .unwrap()
    };
    let x = x.to_dtype(DType::F64).unwrap();
    let b = x.dim(0).unwrap();
    let w = g("embeddings.patch_embeddings.projection.weight");
    let h = w.dim(0).unwrap();
    let patches = x.conv2d(&w, 0, 14, 1, 1).unwrap().flatten_from(2).unwrap().transpose(1, 2).unwrap();
    let patches = patches.broadcast_add(&g("embeddings.patch_embeddings.projection.bias")).unwrap();
    let cls = g("embeddings.cls_token").broadcast_as((b, 1, h)).unwrap();
    let mut z = Tensor::cat(&[&cls, &patches], 1).unwrap().broadcast_add(&g("embeddings.position_embeddings")).unwrap();
    let n = z.dim(1).unwrap();
    let d = h / heads;
    for i in 0..layers {
        let l = format!("encoder.layer.{i}");
        let a = ln(&z, &format!("{l}.norm1"));
        let split = |y: Tensor| y.reshape((b, n, heads, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let q = split(lin(&a, &format!("{l}.attention.attention.query")));
        let k = split(lin(&a, &format!("{l}.attention.attention.key")));
        let v = split(lin(&a, &format!("{l}.attention.attention.value")));
        let s = (q.matmul(&k.t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
        let e = s.broadcast_sub(&s.max_keepdim(D::Minus1).unwrap()).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
        let ctx = p.matmul(&v).unwrap().transpose(1, 2).unwrap().reshape((b, n, h)).unwrap();
        let o = lin(&ctx, &format!("{l}.attention.output.dense"));
        z = (&z + o.broadcast_mul(&g(&format!("{l}.layer_scale1.lambda1"))).unwrap()).unwrap();
        let m = lin(
            &lin(&ln(&z, &format!("{l}.norm2")), &format!("{l}.mlp.fc1")).gelu_erf().unwrap(),
            &format!("{l}.mlp.fc2"),
        );
        z = (&z + m.broadcast_mul(&g(&format!("{l}.layer_scale2.lambda1"))).unwrap()).unwrap();
    }
    let z = ln(&z, "layernorm");
    let feats = Tensor::cat(
        &[&z.narrow(1, 0, 1).unwrap().squeeze(1).unwrap(), &z.narrow(1, 1, n - 1).unwrap().mean(1).unwrap()],
        1,
    )
    .unwrap();
    lin(&feats, "classifier").to_vec2::<f64>().unwrap()
}

#[test]
fn a_dinov2_hub_checkpoint_loads_offline_and_gives_the_float64_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("hub");
    let tensors = dinov2_hub_tensors(8, 2);
    // facebook/dinov2-small's config.json and preprocessor_config.json, with the sizes shrunk.
    let cfg = json!({
        "architectures": ["Dinov2Model"], "model_type": "dinov2", "hidden_size": 8, "num_hidden_layers": 2,
        "num_attention_heads": 2, "mlp_ratio": 4, "image_size": 28, "patch_size": 14, "num_channels": 3,
        "layerscale_value": 1.0, "drop_path_rate": 0.0, "layer_norm_eps": 1e-6, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "initializer_range": 0.02,
        "qkv_bias": true, "use_swiglu_ffn": false, "torch_dtype": "float32", "transformers_version": "4.47.0.dev0"
    });
    let pre = json!({
        "crop_size": {"height": 224, "width": 224}, "do_center_crop": true, "do_convert_rgb": true,
        "do_normalize": true, "do_rescale": true, "do_resize": true, "image_mean": [0.485, 0.456, 0.406],
        "image_processor_type": "BitImageProcessor", "image_std": [0.229, 0.224, 0.225], "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 256}
    });
    write_cache(
        &cache,
        "facebook/dinov2-tiny",
        &[
            ("config.json", config_bytes(&cfg)),
            ("model.safetensors", safetensors_bytes(tmp.path(), &tensors)),
            ("preprocessor_config.json", config_bytes(&pre)),
        ],
    );
    let hub = offline(&cache);
    let e = err_of(load("facebook/dinov2-tiny", &PretrainedOptions::default(), &hub));
    assert!(e.contains("no classification head") && e.contains("num_classes"), "{e}");
    let p =
        load("facebook/dinov2-tiny", &PretrainedOptions { num_classes: Some(3), ..Default::default() }, &hub).unwrap();
    let notes = p.notes.join("\n");
    assert!(notes.contains("new classification head") && notes.contains("bicubic resize"), "{notes}");
    assert!(!notes.contains("ignored"), "every checkpoint tensor is used: {notes}");
    let names: Vec<String> = p.model.params().all().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), tensors.len() + 2, "the checkpoint's tensors with the dinov2. prefix, and the head");
    for k in tensors.keys() {
        assert!(names.contains(&format!("dinov2.{k}")), "dinov2.{k}");
    }
    assert_eq!(p.model.params().get("classifier.weight").unwrap().dims(), [3, 16], "[CLS] ‖ mean patch → classes");

    // Logits against float64, with the head the loader drew.
    let mut all = tensors.clone();
    for k in ["classifier.weight", "classifier.bias"] {
        all.insert(k.into(), p.model.params().get(k).unwrap().as_tensor().copy().unwrap());
    }
    let x = Tensor::from_vec(HostRng::new(1).normal(2 * 3 * 28 * 28, 0.0, 1.0), (2, 3, 28, 28), &Device::Cpu).unwrap();
    let got = p.model.forward_t(&x, false).unwrap().to_vec2::<f32>().unwrap();
    let want = dinov2_reference(&all, &x, 2, 2);
    for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
        assert!((*g as f64 - w).abs() <= 1e-5 * w.abs().max(1.0), "{got:?} vs float64 {want:?}");
    }

    // Saved, it is a Dinov2ForImageClassification folder that loads back.
    let out = tmp.path().join("saved");
    samhost::script::model::save_model(&p.model, out.to_str().unwrap()).unwrap();
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(saved["architectures"], json!(["Dinov2ForImageClassification"]));
    assert_eq!(saved["mlp_ratio"], json!(4), "an integer, as transformers' config class requires");
    let back = load(out.to_str().unwrap(), &PretrainedOptions::default(), &hub).unwrap();
    assert_eq!(logits(&back.model, 28), logits(&p.model, 28));
    // A larger input: position embeddings interpolated once, at load.
    let opts = PretrainedOptions { num_classes: Some(3), image_size: Some(Size2::Square(56)), ..Default::default() };
    let p56 = load("facebook/dinov2-tiny", &opts, &hub).unwrap();
    assert_eq!(p56.model.params().get("dinov2.embeddings.position_embeddings").unwrap().dims(), [1, 17, 8]);
    assert_eq!(logits(&p56.model, 56).len(), 2);
}

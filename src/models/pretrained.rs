//! `from_pretrained`: a model from a Hugging Face Hub repository or a local folder holding
//! `config.json` and `model.safetensors` (or a sharded `model.safetensors.index.json`).
//!
//! Hugging Face ViT checkpoints load whether they are a `ViTModel` (no head; names without the
//! `vit.` prefix; a pooler, which is not used) or a `ViTForImageClassification`; DINOv2 ones
//! whether they are a `Dinov2Model` (the Hub's `facebook/dinov2-*`) or a
//! `Dinov2ForImageClassification`. A head whose
//! class count differs from `num_classes` is replaced by a fresh one, and position embeddings
//! are interpolated to a new `image_size`. Folders written by `save` (any architecture) load too.

use super::registry::{build_model, model_type_of, ArchConfig};
use super::vit::Size2;
use super::Model;
use crate::hub::{HubOptions, HubRepo, Lookup};
use crate::ops::interpolate::resize_position_embeddings;
use crate::rng::HostRng;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Options of `from_pretrained`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainedOptions {
    /// Classes of the head; a head of another size is replaced by a fresh one.
    pub num_classes: Option<usize>,
    /// Branch, tag or commit of a Hub repository (`main` by default).
    pub revision: Option<String>,
    /// Input image size of a ViT (a number or `[height, width]`); position embeddings are
    /// interpolated when it differs from the checkpoint's.
    pub image_size: Option<Size2>,
}

/// A loaded model and what the loader has to say about it.
pub struct Pretrained {
    /// The model (in training mode).
    pub model: Model,
    /// The configuration it was built from.
    pub config: ArchConfig,
    /// Things the user should know: a new head, interpolated position embeddings, ignored
    /// tensors, downloads.
    pub notes: Vec<String>,
    /// Where the weights came from (a folder, or `org/name@revision`).
    pub source: String,
}

/// A local folder or a Hub repository.
enum Source {
    Dir(PathBuf),
    Hub(Box<HubRepo>),
}

impl Source {
    fn open(repo_or_dir: &str, revision: Option<&str>, hub: &HubOptions) -> Result<Self> {
        let p = Path::new(repo_or_dir);
        if p.is_dir() {
            if revision.is_some() {
                bail!("{repo_or_dir}: `revision` applies to Hub repositories, not to a local folder");
            }
            return Ok(Self::Dir(p.to_path_buf()));
        }
        if p.is_file() {
            bail!("{repo_or_dir}: give the folder that holds config.json and the weights (or `load` a weights file into a model)");
        }
        let looks_local =
            repo_or_dir.starts_with(['.', '/', '~']) || repo_or_dir.contains('\\') || repo_or_dir.ends_with('/');
        if looks_local || repo_or_dir.split('/').count() > 2 {
            bail!("{repo_or_dir}: no such folder");
        }
        Ok(Self::Hub(Box::new(HubRepo::new(hub, repo_or_dir, revision)?)))
    }

    fn label(&self) -> String {
        match self {
            Self::Dir(d) => d.display().to_string(),
            Self::Hub(h) => h.label(),
        }
    }

    fn file(&mut self, name: &str) -> Result<Lookup> {
        match self {
            Self::Dir(d) => {
                let p = d.join(name);
                Ok(if p.is_file() { Lookup::Found(p) } else { Lookup::Missing })
            }
            Self::Hub(h) => h.file(name),
        }
    }

    fn exists(&mut self, name: &str) -> Result<Lookup> {
        match self {
            Self::Dir(_) => self.file(name),
            Self::Hub(h) => h.exists(name),
        }
    }

    fn offline_error(&self, what: &str) -> anyhow::Error {
        match self {
            Self::Hub(h) => anyhow::anyhow!(
                "offline (HF_HUB_OFFLINE or --offline) and {what} of {} is not in the cache ({}); \
                 run once with the network, or download it with `huggingface-cli download {}`",
                h.label(),
                h.cache_dir().display(),
                h.label().split('@').next().unwrap_or_default()
            ),
            Self::Dir(d) => anyhow::anyhow!("{}: {what} is missing", d.display()),
        }
    }
}

/// Reads the tensors of a safetensors file onto the CPU, naming the file on failure.
fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("{}: not a readable safetensors file", path.display()))
}

/// Finds and reads the weights: `model.safetensors`, else the shards listed by
/// `model.safetensors.index.json`. A repository with only pickle weights gets an error that
/// says to convert them.
fn read_weights(src: &mut Source) -> Result<HashMap<String, Tensor>> {
    let single = src.file("model.safetensors")?;
    if let Lookup::Found(p) = &single {
        return read_safetensors(p);
    }
    let index = src.file("model.safetensors.index.json")?;
    if let Lookup::Found(p) = &index {
        #[derive(Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
        }
        let text = std::fs::read_to_string(p).with_context(|| format!("{}: cannot read", p.display()))?;
        let index: Index =
            serde_json::from_str(&text).with_context(|| format!("{}: not a safetensors index", p.display()))?;
        let shards: BTreeSet<&String> = index.weight_map.values().collect();
        let mut tensors = HashMap::new();
        for shard in shards {
            if shard.contains("..") || shard.starts_with('/') {
                bail!("{}: unsafe shard name `{shard}`", p.display());
            }
            match src.file(shard)? {
                Lookup::Found(path) => tensors.extend(read_safetensors(&path)?),
                Lookup::Missing => {
                    bail!("{}: shard {shard} listed in model.safetensors.index.json is missing", src.label())
                }
                Lookup::NotCached => return Err(src.offline_error(&format!("shard {shard}"))),
            }
        }
        return Ok(tensors);
    }
    for pickle in ["pytorch_model.bin", "pytorch_model.bin.index.json"] {
        if let Lookup::Found(_) = src.exists(pickle)? {
            bail!(
                "{} has only PyTorch pickle weights ({pickle}); samhost never reads pickle files (loading them can run \
                 code). Convert them to safetensors (in Python: `AutoModel.from_pretrained(path).save_pretrained(out, \
                 safe_serialization=True)`, or the Hub's safetensors conversion), or choose a revision that has \
                 model.safetensors",
                src.label()
            );
        }
    }
    if single == Lookup::NotCached || index == Lookup::NotCached {
        return Err(src.offline_error("model.safetensors"));
    }
    bail!("{} has no model.safetensors (nor model.safetensors.index.json)", src.label())
}

/// Renames Hugging Face ViT tensors to this ViT's names: a `ViTModel` checkpoint has no `vit.`
/// prefix. Tensors the model does not use (the pooler, the mask token) are returned apart.
fn vit_names(tensors: HashMap<String, Tensor>) -> (HashMap<String, Tensor>, Vec<String>) {
    let mut out = HashMap::new();
    let mut unused = Vec::new();
    for (name, t) in tensors {
        let full =
            if name.starts_with("vit.") || name.starts_with("classifier.") { name } else { format!("vit.{name}") };
        if full.starts_with("vit.pooler.") || full == "vit.embeddings.mask_token" {
            unused.push(full);
        } else {
            out.insert(full, t);
        }
    }
    (out, unused)
}

/// Renames transformers' DINOv2 tensors to this DINOv2's names: a `Dinov2Model` checkpoint (the
/// Hub's `facebook/dinov2-*`) has no `dinov2.` prefix, and transformers 5 saves the attention as
/// `attention.q_proj` / `attention.o_proj` where checkpoints have `attention.attention.query` /
/// `attention.output.dense`.
fn dinov2_names(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let renames = [
        (".attention.q_proj.", ".attention.attention.query."),
        (".attention.k_proj.", ".attention.attention.key."),
        (".attention.v_proj.", ".attention.attention.value."),
        (".attention.o_proj.", ".attention.output.dense."),
    ];
    tensors
        .into_iter()
        .map(|(name, t)| {
            let mut full = if name.starts_with("dinov2.") || name.starts_with("classifier.") {
                name
            } else {
                format!("dinov2.{name}")
            };
            for (from, to) in renames {
                full = full.replace(from, to);
            }
            (full, t)
        })
        .collect()
}

/// Loads a model from `repo_or_dir` (a Hub repository id or a folder). New tensors (a fresh
/// head) are drawn from `rng`.
pub fn from_pretrained(
    repo_or_dir: &str,
    opts: &PretrainedOptions,
    hub: &HubOptions,
    rng: &HostRng,
    device: &Device,
) -> Result<Pretrained> {
    if opts.num_classes == Some(0) {
        bail!("num_classes must be > 0");
    }
    let mut src = Source::open(repo_or_dir, opts.revision.as_deref(), hub)?;
    let label = src.label();
    let config_path = match src.file("config.json")? {
        Lookup::Found(p) => p,
        Lookup::Missing => {
            bail!("{label} has no config.json (is it a model repository, or a folder written by `save`?)")
        }
        Lookup::NotCached => return Err(src.offline_error("config.json")),
    };
    let text =
        std::fs::read_to_string(&config_path).with_context(|| format!("{}: cannot read", config_path.display()))?;
    let raw: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", config_path.display()))?;
    // Unsupported architectures fail before any weights are downloaded.
    model_type_of(&raw).with_context(|| format!("{label}: config.json"))?;
    let mut cfg = ArchConfig::parse(&raw, false).with_context(|| format!("{label}: config.json"))?;
    let ckpt_cfg = cfg.clone();

    let mut tensors = read_weights(&mut src)?;
    let mut notes = Vec::new();
    if let Source::Hub(h) = &src {
        if !h.downloaded.is_empty() {
            notes.push(format!("downloaded {} into {}", h.downloaded.join(", "), h.cache_dir().display()));
        }
    }
    let mut unused = Vec::new();
    if let ArchConfig::Vit(_) = cfg {
        let (renamed, dropped) = vit_names(tensors);
        tensors = renamed;
        unused = dropped;
    }
    if let ArchConfig::Dinov2(_) = cfg {
        tensors = dinov2_names(tensors);
    }

    // The head.
    let head = cfg.head_prefix();
    let ckpt_classes = tensors.get(&format!("{head}weight")).and_then(|t| t.dims().first().copied());
    let classes = match (opts.num_classes, ckpt_classes) {
        (Some(n), _) | (None, Some(n)) => n,
        (None, None) => bail!(
            "{label}: the checkpoint has no classification head (`{head}weight`; e.g. a ViTModel): give num_classes"
        ),
    };
    let new_head = ckpt_classes != Some(classes);
    if new_head {
        tensors.retain(|k, _| !k.starts_with(&head));
        let had = match ckpt_classes {
            Some(k) => format!("replaces the checkpoint's head of {k} classes"),
            None => "the checkpoint has none".to_string(),
        };
        notes.push(format!(
            "new classification head `{}` with {classes} classes ({had}): freshly initialised",
            head.trim_end_matches('.')
        ));
    }
    cfg.set_num_classes(classes);

    // The image size of a vision transformer.
    if let (Some(old), Some(name)) = (ckpt_cfg.patch_grid(), cfg.position_embeddings_name()) {
        if let Some(size) = opts.image_size {
            cfg.set_image_size(size);
        }
        let from = old?;
        let to = cfg.patch_grid().unwrap_or(Ok(from))?;
        if from != to {
            if let Some(pos) = tensors.get(name) {
                let resized =
                    resize_position_embeddings(pos, from, to).with_context(|| format!("{label}: tensor `{name}`"))?;
                tensors.insert(name.to_string(), resized);
                notes.push(format!(
                    "position embeddings interpolated (bicubic) from a {}x{} to a {}x{} patch grid",
                    from.0, from.1, to.0, to.1
                ));
            }
        }
    } else if opts.image_size.is_some() {
        bail!("image_size applies to ViT and DINOv2 models only ({label} is a {})", cfg.model_type());
    }
    cfg.validate().with_context(|| format!("{label}: config.json"))?;

    let model = build_model(&cfg, rng, device)?;
    let names: BTreeSet<String> = model.params().all().into_iter().map(|(n, _)| n).collect();
    for name in &names {
        if !(tensors.contains_key(name) || new_head && name.starts_with(&head)) {
            bail!("{label}: tensor `{name}` is missing from the checkpoint");
        }
    }
    unused.extend(tensors.keys().filter(|k| !names.contains(*k)).cloned());
    tensors.retain(|k, _| names.contains(k));
    if !unused.is_empty() {
        unused.sort();
        notes.push(format!(
            "ignored {} checkpoint tensor(s) the model does not use: {}",
            unused.len(),
            unused.join(", ")
        ));
    }
    model.params().assign(&tensors, true, &label)?;
    let model = match src.file("preprocessor_config.json")? {
        Lookup::Found(p) => {
            let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", p.display()))?;
            let pre = super::preprocess::Preprocessing::from_json(&v)
                .with_context(|| format!("{label}: preprocessor_config.json"))?;
            notes.push(format!(
                "preprocessing from preprocessor_config.json ({} resize{}): m.preprocess",
                if pre.bicubic { "bicubic" } else { "bilinear" },
                if pre.mean.is_some() { ", normalisation" } else { "" }
            ));
            model.with_preprocessing(pre)
        }
        // Offline, a file that is not cached may not exist at all: the model has no
        // preprocessing then, as for a repository without one.
        Lookup::Missing | Lookup::NotCached => model,
    };
    Ok(Pretrained { model, config: cfg, notes, source: label })
}

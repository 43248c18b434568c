//! `from_pretrained`: models from the Hugging Face Hub or a local folder.

use super::convert::{op, options, Res};
use crate::hub::HubOptions;
use crate::models::pretrained::{from_pretrained, PretrainedOptions};
use crate::models::Model;
use crate::session::Session;
use rhai::{Engine, Map};
use std::rc::Rc;

/// Registers `from_pretrained`.
pub fn register(engine: &mut Engine, session: &Rc<Session>) {
    let s = session.clone();
    let load = move |repo: &str, o: Map| -> Res<Model> {
        let opts: PretrainedOptions = options("from_pretrained", &o)?;
        let hub = op("from_pretrained", HubOptions::from_env(s.offline, !s.quiet))?;
        let p = op("from_pretrained", from_pretrained(repo, &opts, &hub, &s.rng, s.device()))?;
        for note in &p.notes {
            s.say(&format!("from_pretrained {}: {note}", p.source));
        }
        p.model.set_precision(s.precision);
        Ok(p.model)
    };
    let f = load.clone();
    api!(engine, "from_pretrained", "repo_or_dir: String -> Model",
        "A model from a Hugging Face Hub repository (`org/name`) or a folder with config.json and model.safetensors (or a sharded model.safetensors.index.json), e.g. one written by `save`. Hub files come from the shared cache first (HF_HOME, HF_HUB_CACHE), else are downloaded with timeouts (HF_ENDPOINT, HF_TOKEN; SAMHOST_HTTP_TIMEOUT_SECS); HF_HUB_OFFLINE=1 or --offline reads the cache only. Loads ViT checkpoints (ViTModel or ViTForImageClassification) and every samhost architecture; pickle (.bin) is never read.",
        move |repo: &str| f(repo, Map::new()));
    api!(engine, "from_pretrained", "repo_or_dir: String, options: Map -> Model",
        "As `from_pretrained(repo)` with options: num_classes (a head of another size is replaced by a fresh one, and the run says so), revision (branch, tag or commit; main), image_size (a ViT's input size; position embeddings are interpolated).",
        load);
}

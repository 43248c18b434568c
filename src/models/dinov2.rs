//! DINOv2 (Oquab et al. 2023) as Hugging Face's `Dinov2ForImageClassification`: the ViT encoder
//! with LayerScale on both residual branches, stochastic depth, a mask token, and a head over the
//! `[CLS]` token concatenated with the mean patch token. Configuration fields (`config.json`) and
//! tensor names (`dinov2.embeddings...`, `dinov2.encoder.layer.N.norm1`, `...layer_scale1.lambda1`,
//! `...mlp.fc1`, `dinov2.layernorm`, `classifier`) are transformers', so the Hub's
//! `facebook/dinov2-*` checkpoints (a `Dinov2Model`, without the `dinov2.` prefix) load and what
//! samhost saves loads in Python.

use super::encoder::{dense, Backbone, BackboneShape, BlockDims, BlockStyle};
use super::hf_config::{check_encoder, head_size, hf_json, hf_label_maps, patch_grid, set_head_size, EncoderSizes};
use super::layers::{Activation, LayerNorm, Linear};
use super::registry::ArchConfig;
use super::vit::{Size2, KNOWN_HF_KEYS};
use super::Network;
use crate::rng::HostRng;
use anyhow::{bail, Result};
use candle_core::{Module, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// Fields of transformers' `Dinov2Config` for its backbone API that do not change the
/// classification model's computation.
pub const KNOWN_DINOV2_KEYS: [&str; 5] =
    ["out_features", "out_indices", "stage_names", "apply_layernorm", "reshape_hidden_states"];

/// transformers' `Dinov2Config` (the fields that shape the computation) plus the head's labels.
/// Unknown fields of a checkpoint's `config.json` are kept in `extra` and written back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Dinov2Config {
    /// Width of the token embeddings.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// The MLP's width over the token width (written as an integer when whole, as transformers'
    /// config class requires).
    #[serde(serialize_with = "whole_as_int")]
    pub mlp_ratio: f64,
    /// The MLP's activation.
    pub hidden_act: String,
    /// Dropout after the embeddings (transformers 5 applies it there only; its 4.x releases also
    /// after the attention output; every published checkpoint has 0).
    pub hidden_dropout_prob: f64,
    /// Dropout on the attention probabilities.
    pub attention_probs_dropout_prob: f64,
    /// Standard deviation of the normal initialisation of weights.
    pub initializer_range: f64,
    /// Epsilon of every layer norm.
    pub layer_norm_eps: f64,
    /// Input image size (the position-embedding grid).
    pub image_size: Size2,
    /// Patch size.
    pub patch_size: Size2,
    /// Input channels.
    pub num_channels: usize,
    /// Whether query, key and value projections have biases.
    pub qkv_bias: bool,
    /// Initial value of the LayerScale weights.
    pub layerscale_value: f64,
    /// Stochastic depth: the probability that a sample skips a residual branch in training.
    pub drop_path_rate: f64,
    /// The SwiGLU MLP of the giant model (not supported).
    pub use_swiglu_ffn: bool,
    /// Whether the embeddings have a mask token (used in pretraining only; kept for Python).
    pub use_mask_token: bool,
    /// Number of classes of the head, when `id2label` does not say it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_labels: Option<usize>,
    /// Class names by index (the head size is their count).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id2label: Option<BTreeMap<String, String>>,
    /// Class indices by name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label2id: Option<BTreeMap<String, Value>>,
    /// Every other field of the configuration, kept as it was.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

fn whole_as_int<S: serde::Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && *v >= 0.0 && *v < 1e15 {
        s.serialize_u64(*v as u64)
    } else {
        s.serialize_f64(*v)
    }
}

impl Default for Dinov2Config {
    /// transformers' defaults (a ViT-B/14 at 224x224).
    fn default() -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            mlp_ratio: 4.0,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            initializer_range: 0.02,
            layer_norm_eps: 1e-6,
            image_size: Size2::Square(224),
            patch_size: Size2::Square(14),
            num_channels: 3,
            qkv_bias: true,
            layerscale_value: 1.0,
            drop_path_rate: 0.0,
            use_swiglu_ffn: false,
            use_mask_token: true,
            num_labels: None,
            id2label: None,
            label2id: None,
            extra: serde_json::Map::new(),
        }
    }
}

impl Dinov2Config {
    /// The head size: the number of `id2label` entries, else `num_labels`.
    pub fn classes(&self) -> Option<usize> {
        head_size(&self.id2label, self.num_labels)
    }

    /// Sets the head size; labels that no longer fit are dropped.
    pub fn set_classes(&mut self, n: usize) {
        set_head_size(n, &mut self.num_labels, &mut self.id2label, &mut self.label2id)
    }

    /// The MLP width, `int(hidden_size · mlp_ratio)` as transformers.
    pub fn intermediate_size(&self) -> usize {
        (self.hidden_size as f64 * self.mlp_ratio) as usize
    }

    /// The patch grid `(rows, columns)`.
    pub fn grid(&self) -> Result<(usize, usize)> {
        patch_grid("dinov2", self.image_size, self.patch_size)
    }

    /// Fails on an `extra` key that is neither a known field nor used here (a typo in a
    /// script's map).
    pub fn check_known_fields(&self) -> Result<()> {
        let known = |k: &str| KNOWN_HF_KEYS.contains(&k) || KNOWN_DINOV2_KEYS.contains(&k);
        if let Some(k) = self.extra.keys().find(|k| !known(k)) {
            bail!(
                "dinov2: unknown config field `{k}` (fields: hidden_size, num_hidden_layers, num_attention_heads, \
                 mlp_ratio, hidden_act, hidden_dropout_prob, attention_probs_dropout_prob, initializer_range, \
                 layer_norm_eps, image_size, patch_size, num_channels, qkv_bias, layerscale_value, drop_path_rate, \
                 use_mask_token, num_labels, id2label, label2id)"
            );
        }
        Ok(())
    }

    /// Rejects configurations that build nothing.
    pub fn validate(&self) -> Result<()> {
        if self.use_swiglu_ffn {
            bail!("dinov2: use_swiglu_ffn (the SwiGLU MLP of dinov2-giant) is not supported; the small, base and large models are");
        }
        check_encoder(&EncoderSizes {
            what: "dinov2",
            hidden: self.hidden_size,
            heads: self.num_attention_heads,
            layers: self.num_hidden_layers,
            intermediate: (self.intermediate_size(), "hidden_size·mlp_ratio"),
            channels: self.num_channels,
            probabilities: &[
                ("hidden_dropout_prob", self.hidden_dropout_prob),
                ("attention_probs_dropout_prob", self.attention_probs_dropout_prob),
                ("drop_path_rate", self.drop_path_rate),
            ],
            classes: self.classes(),
            act: &self.hidden_act,
        })?;
        self.grid().map(|_| ())
    }

    /// The configuration as transformers writes it for `Dinov2ForImageClassification`.
    pub fn to_hf_json(&self) -> Value {
        let mut cfg = self.clone();
        let labels = hf_label_maps(cfg.classes().unwrap_or(0), cfg.id2label.take(), cfg.label2id.take());
        hf_json(&cfg, "Dinov2ForImageClassification", "dinov2", labels)
    }
}

/// DINOv2 with its classification head.
pub struct Dinov2 {
    cfg: Dinov2Config,
    backbone: Backbone,
    layernorm: LayerNorm,
    classifier: Linear,
    drop_rng: Option<HostRng>,
}

impl Dinov2 {
    /// Creates the layers from `vb` with transformers' initialisation (weights, the `[CLS]`
    /// token and position embeddings normal with `initializer_range`, the mask token and biases
    /// 0, LayerScale `layerscale_value`, layer norms 1/0). Dropout and stochastic-depth masks
    /// come from a generator seeded from `rng`.
    pub fn build(cfg: &Dinov2Config, vb: VarBuilder, rng: &HostRng) -> Result<Self> {
        cfg.validate()?;
        let (h, std) = (cfg.hidden_size, cfg.initializer_range);
        let random =
            cfg.hidden_dropout_prob > 0.0 || cfg.attention_probs_dropout_prob > 0.0 || cfg.drop_path_rate > 0.0;
        let drop_rng = if random { HostRng::new(rng.next_seed()) } else { rng.clone() };
        let base = vb.pp("dinov2");
        let dims = BlockDims {
            hidden: h,
            heads: cfg.num_attention_heads,
            intermediate: cfg.intermediate_size(),
            act: Activation::from_name(&cfg.hidden_act)?,
            qkv_bias: cfg.qkv_bias,
            eps: cfg.layer_norm_eps,
            std,
            attn_drop: cfg.attention_probs_dropout_prob,
            drop: 0.0,
            layerscale: cfg.layerscale_value,
            drop_path: cfg.drop_path_rate,
        };
        let shape = BackboneShape {
            what: "dinov2",
            image: cfg.image_size.hw(),
            patch: cfg.patch_size.hw(),
            channels: cfg.num_channels,
            layers: cfg.num_hidden_layers,
            emb_drop: cfg.hidden_dropout_prob,
            mask_token: cfg.use_mask_token,
        };
        let backbone = Backbone::new(shape, &dims, BlockStyle::Dinov2, &drop_rng, base.clone())?;
        let layernorm = LayerNorm::new(h, cfg.layer_norm_eps, base.pp("layernorm"))?;
        let classifier = dense(2 * h, cfg.classes().unwrap_or(0), true, std, vb.pp("classifier"))?;
        Ok(Self { drop_rng: random.then_some(drop_rng), cfg: cfg.clone(), backbone, layernorm, classifier })
    }
}

impl Network for Dinov2 {
    /// The classifier's input, as transformers' `Dinov2ForImageClassification` builds it: the
    /// final layer norm's `[CLS]` token beside the mean of its patch tokens, `[N, 2·hidden]`.
    fn features_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Option<Tensor>> {
        let (t, b, n) = self.backbone.forward_t(x, train)?;
        let t = self.layernorm.forward(&t)?.reshape((b, n, ()))?;
        let cls = t.narrow(1, 0, 1)?.squeeze(1)?;
        let mean = t.narrow(1, 1, n - 1)?.mean(1)?;
        Tensor::cat(&[&cls, &mean], D::Minus1).map(Some)
    }

    fn head_t(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.classifier.forward(features)
    }

    fn config(&self) -> serde_json::Value {
        ArchConfig::Dinov2(self.cfg.clone()).to_json()
    }

    fn dropout_rng(&self) -> Option<HostRng> {
        self.drop_rng.clone()
    }
}

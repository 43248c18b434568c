//! The Vision Transformer (Dosovitskiy et al. 2021) as Hugging Face's `ViTForImageClassification`:
//! the same configuration fields (`config.json`) and tensor names (`vit.embeddings...`,
//! `vit.encoder.layer.N...`, `vit.layernorm`, `classifier`), so checkpoints go both ways.
//! Built from differentiable ops only: softmax and layer norm from elementary ops, dropout from
//! the seeded generator.

use super::encoder::{dense, Backbone, BackboneShape, BlockDims, BlockStyle};
use super::hf_config::{check_encoder, head_size, hf_json, set_head_size, EncoderSizes};
pub use super::hf_config::{hf_label_maps, patch_grid};
use super::layers::{Activation, LayerNorm, Linear};
use super::registry::ArchConfig;
use super::Network;
use crate::rng::HostRng;
use anyhow::{bail, Result};
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// An image or patch size: one number (square) or `[height, width]`, as Hugging Face allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Size2 {
    /// A square.
    Square(usize),
    /// `[height, width]`.
    Pair([usize; 2]),
}

impl Size2 {
    /// `(height, width)`.
    pub fn hw(self) -> (usize, usize) {
        match self {
            Self::Square(s) => (s, s),
            Self::Pair([h, w]) => (h, w),
        }
    }
}

/// Configuration keys of Hugging Face's `PretrainedConfig` and `ViTConfig` that do not change
/// the computation here; any other unknown key in a script's `vit(#{...})` map is an error.
pub const KNOWN_HF_KEYS: [&str; 14] = [
    "architectures",
    "model_type",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "encoder_stride",
    "pooler_output_size",
    "pooler_act",
    "problem_type",
    "_name_or_path",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "use_mask_token",
];

/// Hugging Face's `ViTConfig` (the fields that shape the computation) plus the head's labels.
/// Unknown fields of a checkpoint's `config.json` are kept in `extra` and written back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VitConfig {
    /// Width of the token embeddings.
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the MLP inside each layer.
    pub intermediate_size: usize,
    /// The MLP's activation (`gelu` is the exact, erf-based GELU).
    pub hidden_act: String,
    /// Dropout after the embeddings, the attention output and the MLP output.
    pub hidden_dropout_prob: f64,
    /// Dropout on the attention probabilities.
    pub attention_probs_dropout_prob: f64,
    /// Standard deviation of the normal initialisation of weights.
    pub initializer_range: f64,
    /// Epsilon of every layer norm.
    pub layer_norm_eps: f64,
    /// Input image size.
    pub image_size: Size2,
    /// Patch size.
    pub patch_size: Size2,
    /// Input channels.
    pub num_channels: usize,
    /// Whether query, key and value projections have biases.
    pub qkv_bias: bool,
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

impl Default for VitConfig {
    /// ViT-B/16 at 224x224, as Hugging Face's defaults.
    fn default() -> Self {
        Self {
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            image_size: Size2::Square(224),
            patch_size: Size2::Square(16),
            num_channels: 3,
            qkv_bias: true,
            num_labels: None,
            id2label: None,
            label2id: None,
            extra: serde_json::Map::new(),
        }
    }
}

impl VitConfig {
    /// The head size: the number of `id2label` entries, else `num_labels`.
    pub fn classes(&self) -> Option<usize> {
        head_size(&self.id2label, self.num_labels)
    }

    /// Sets the head size; labels that no longer fit are dropped (renamed `LABEL_i` on save).
    pub fn set_classes(&mut self, n: usize) {
        set_head_size(n, &mut self.num_labels, &mut self.id2label, &mut self.label2id)
    }

    /// The patch grid `(rows, columns)`.
    pub fn grid(&self) -> Result<(usize, usize)> {
        patch_grid("vit", self.image_size, self.patch_size)
    }

    /// Fails on an `extra` key that is neither a known Hugging Face field nor used here (a
    /// typo in a script's map).
    pub fn check_known_fields(&self) -> Result<()> {
        if let Some(k) = self.extra.keys().find(|k| !KNOWN_HF_KEYS.contains(&k.as_str())) {
            bail!(
                "vit: unknown config field `{k}` (fields: hidden_size, num_hidden_layers, num_attention_heads, \
                 intermediate_size, hidden_act, hidden_dropout_prob, attention_probs_dropout_prob, initializer_range, \
                 layer_norm_eps, image_size, patch_size, num_channels, qkv_bias, num_labels, id2label, label2id)"
            );
        }
        Ok(())
    }

    /// Rejects configurations that build nothing.
    pub fn validate(&self) -> Result<()> {
        check_encoder(&EncoderSizes {
            what: "vit",
            hidden: self.hidden_size,
            heads: self.num_attention_heads,
            layers: self.num_hidden_layers,
            intermediate: (self.intermediate_size, "intermediate_size"),
            channels: self.num_channels,
            probabilities: &[
                ("hidden_dropout_prob", self.hidden_dropout_prob),
                ("attention_probs_dropout_prob", self.attention_probs_dropout_prob),
            ],
            classes: self.classes(),
            act: &self.hidden_act,
        })?;
        self.grid().map(|_| ())
    }

    /// The configuration as Hugging Face writes it for `ViTForImageClassification`.
    pub fn to_hf_json(&self) -> Value {
        let mut cfg = self.clone();
        let labels = hf_label_maps(cfg.classes().unwrap_or(0), cfg.id2label.take(), cfg.label2id.take());
        hf_json(&cfg, "ViTForImageClassification", "vit", labels)
    }
}

/// A Vision Transformer with a classification head on the `[CLS]` token.
pub struct Vit {
    cfg: VitConfig,
    backbone: Backbone,
    layernorm: LayerNorm,
    classifier: Linear,
    drop_rng: Option<HostRng>,
}

impl Vit {
    /// Creates the layers from `vb` with Hugging Face's initialisation (weights normal with
    /// `initializer_range`, biases 0, layer norms 1/0). Dropout masks come from a generator
    /// seeded from `rng`.
    pub fn build(cfg: &VitConfig, vb: VarBuilder, rng: &HostRng) -> Result<Self> {
        cfg.validate()?;
        let (h, std) = (cfg.hidden_size, cfg.initializer_range);
        let dropout = cfg.hidden_dropout_prob > 0.0 || cfg.attention_probs_dropout_prob > 0.0;
        let drop_rng = if dropout { HostRng::new(rng.next_seed()) } else { rng.clone() };
        let vit = vb.pp("vit");
        let dims = BlockDims {
            hidden: h,
            heads: cfg.num_attention_heads,
            intermediate: cfg.intermediate_size,
            act: Activation::from_name(&cfg.hidden_act)?,
            qkv_bias: cfg.qkv_bias,
            eps: cfg.layer_norm_eps,
            std,
            attn_drop: cfg.attention_probs_dropout_prob,
            drop: cfg.hidden_dropout_prob,
            layerscale: 1.0,
            drop_path: 0.0,
        };
        let shape = BackboneShape {
            what: "vit",
            image: cfg.image_size.hw(),
            patch: cfg.patch_size.hw(),
            channels: cfg.num_channels,
            layers: cfg.num_hidden_layers,
            emb_drop: cfg.hidden_dropout_prob,
            mask_token: false,
        };
        let backbone = Backbone::new(shape, &dims, BlockStyle::Vit, &drop_rng, vit.clone())?;
        let layernorm = LayerNorm::new(h, cfg.layer_norm_eps, vit.pp("layernorm"))?;
        let classifier = dense(h, cfg.classes().unwrap_or(0), true, std, vb.pp("classifier"))?;
        Ok(Self { drop_rng: dropout.then_some(drop_rng), cfg: cfg.clone(), backbone, layernorm, classifier })
    }

    /// The configuration.
    pub fn vit_config(&self) -> &VitConfig {
        &self.cfg
    }

    /// Patch embeddings `[N, patches, hidden]`: a convolution with stride equal to its kernel,
    /// computed as a matrix product over the unfolded patches.
    pub fn embed_patches(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.backbone.embed_patches(x)
    }
}

impl Network for Vit {
    /// The classifier's input: the final layer norm of the `[CLS]` token, `[N, hidden]`.
    fn features_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Option<Tensor>> {
        let (t, b, n) = self.backbone.forward_t(x, train)?;
        let cls = t.reshape((b, n, ()))?.narrow(1, 0, 1)?.squeeze(1)?;
        self.layernorm.forward(&cls).map(Some)
    }

    fn head_t(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.classifier.forward(features)
    }

    fn config(&self) -> serde_json::Value {
        ArchConfig::Vit(self.cfg.clone()).to_json()
    }

    fn dropout_rng(&self) -> Option<HostRng> {
        self.drop_rng.clone()
    }
}

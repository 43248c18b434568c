//! What the ViT and DINOv2 share: the pre-norm transformer encoder layer (with Hugging Face's
//! tensor names for each family), the patch embedding, and the backbone of embeddings and layers
//! ([`Backbone`]); built from the fused ops: linear layers over token rows `[b·n, hidden]`, one
//! softmax, layer norms, dropout from the seeded generator.

use super::layers::{cast_as, param, Activation, Dropout, LayerNorm, Linear};
use crate::ops::bias::add_broadcast;
use crate::rng::HostRng;
use anyhow::Result;
use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};

/// Which checkpoint family's names and details an encoder layer has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockStyle {
    /// `ViTLayer`: `layernorm_before`, `intermediate.dense`, `output.dense`, `layernorm_after`;
    /// dropout after the attention output and after the MLP.
    Vit,
    /// `Dinov2Layer`: `norm1`, `mlp.fc1`, `mlp.fc2`, `norm2`, LayerScale (`layer_scale1.lambda1`,
    /// `layer_scale2.lambda1`) on both branches, stochastic depth.
    Dinov2,
}

/// The sizes and settings of one encoder layer.
#[derive(Clone, Debug)]
pub struct BlockDims {
    /// Token width.
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of the MLP.
    pub intermediate: usize,
    /// The MLP's activation.
    pub act: Activation,
    /// Whether query, key and value have biases.
    pub qkv_bias: bool,
    /// Layer norm epsilon.
    pub eps: f64,
    /// Standard deviation of fresh weights.
    pub std: f64,
    /// Dropout on the attention probabilities.
    pub attn_drop: f64,
    /// Dropout on the branch outputs (ViT only).
    pub drop: f64,
    /// The initial LayerScale value (DINOv2 only).
    pub layerscale: f64,
    /// The probability that a sample skips a residual branch (stochastic depth, DINOv2 only).
    pub drop_path: f64,
}

/// A linear layer with normal weights (std `std`) and zero biases, as transformers initialises.
pub fn dense(in_dim: usize, out_dim: usize, bias: bool, std: f64, vb: VarBuilder) -> candle_core::Result<Linear> {
    let w = vb.get_with_hints((out_dim, in_dim), "weight", Init::Randn { mean: 0.0, stdev: std })?;
    let b = if bias { Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?) } else { None };
    Ok(Linear::new(w, b))
}

/// One pre-norm encoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
pub struct EncoderLayer {
    ln_before: LayerNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    ln_after: LayerNorm,
    intermediate: Linear,
    output: Linear,
    act: Activation,
    heads: usize,
    attn_drop: Dropout,
    drop: Dropout,
    /// LayerScale of the attention and MLP branches (DINOv2).
    scales: Option<(Tensor, Tensor)>,
    drop_path: f64,
    rng: HostRng,
}

impl EncoderLayer {
    /// The layer's tensors under `vb` with `style`'s names.
    pub fn new(d: &BlockDims, style: BlockStyle, drop_rng: &HostRng, vb: VarBuilder) -> Result<Self> {
        let (h, std) = (d.hidden, d.std);
        let att = vb.pp("attention");
        let sa = att.pp("attention");
        let (norm1, norm2, fc1, fc2) = match style {
            BlockStyle::Vit => ("layernorm_before", "layernorm_after", "intermediate.dense", "output.dense"),
            BlockStyle::Dinov2 => ("norm1", "norm2", "mlp.fc1", "mlp.fc2"),
        };
        let scales = match style {
            BlockStyle::Vit => None,
            BlockStyle::Dinov2 => {
                let init = Init::Const(d.layerscale);
                Some((
                    vb.pp("layer_scale1").get_with_hints(h, "lambda1", init)?,
                    vb.pp("layer_scale2").get_with_hints(h, "lambda1", init)?,
                ))
            }
        };
        Ok(Self {
            ln_before: LayerNorm::new(h, d.eps, vb.pp(norm1))?,
            query: dense(h, h, d.qkv_bias, std, sa.pp("query"))?,
            key: dense(h, h, d.qkv_bias, std, sa.pp("key"))?,
            value: dense(h, h, d.qkv_bias, std, sa.pp("value"))?,
            attn_out: dense(h, h, true, std, att.pp("output").pp("dense"))?,
            ln_after: LayerNorm::new(h, d.eps, vb.pp(norm2))?,
            intermediate: dense(h, d.intermediate, true, std, vb.pp(fc1))?,
            output: dense(d.intermediate, h, true, std, vb.pp(fc2))?,
            act: d.act,
            heads: d.heads,
            attn_drop: Dropout::new(d.attn_drop, drop_rng)?,
            drop: Dropout::new(d.drop, drop_rng)?,
            scales,
            drop_path: d.drop_path,
            rng: drop_rng.clone(),
        })
    }

    /// `[b·n, hidden]` to `[b, heads, n, head_dim]`.
    fn split_heads(&self, x: &Tensor, b: usize, n: usize) -> candle_core::Result<Tensor> {
        let h = x.dim(1)?;
        x.reshape((b, n, self.heads, h / self.heads))?.transpose(1, 2)?.contiguous()
    }

    /// The query, key and value projections as one linear layer `[3·hidden, hidden]` (`[q | k |
    /// v]` rows `[b·n, 3·hidden]`), when all three have biases or none has; the parameters stay
    /// three tensors, and their gradients come back to each through the concatenation.
    fn qkv(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dt = x.dtype();
        let parts = [&self.query, &self.key, &self.value];
        let w = parts.iter().map(|l| cast_as(l.weight(), dt)).collect::<candle_core::Result<Vec<_>>>()?;
        let biases: Vec<&Tensor> = parts.iter().filter_map(|l| l.bias()).collect();
        let b = match biases.len() {
            0 => None,
            3 => Some(Tensor::cat(&biases.iter().map(|b| param(b)).collect::<Vec<_>>(), 0)?),
            _ => return Ok(None),
        };
        crate::ops::linear::dense(x, &Tensor::cat(&w, 0)?, b.as_ref(), false).map(Some)
    }

    /// Self-attention over tokens given as rows `[b·n, hidden]` (so every projection is one
    /// matrix product): on the CPU in f32, one projection and one fused op
    /// ([`crate::ops::attention`]) unless the probabilities are dropped out; elsewhere candle's ops.
    fn attention(&self, x: &Tensor, b: usize, n: usize, train: bool) -> candle_core::Result<Tensor> {
        let h = x.dim(1)?;
        let scale = 1.0 / ((h / self.heads) as f64).sqrt();
        let dropped = train && self.attn_drop.p() > 0.0;
        if crate::ops::attention::fused(x) && !dropped {
            if let Some(qkv) = self.qkv(x)? {
                let ctx = crate::ops::attention::attention(&qkv, b, self.heads, scale)?;
                return self.drop.forward_t(&self.attn_out.forward(&ctx)?, train);
            }
        }
        let q = self.split_heads(&self.query.forward(x)?, b, n)?;
        let k = self.split_heads(&self.key.forward(x)?, b, n)?;
        let v = self.split_heads(&self.value.forward(x)?, b, n)?;
        let scores = (crate::ops::bmm::bmm(&q, &k, true)? * scale)?;
        let probs = self.attn_drop.forward_t(&crate::ops::softmax_last(&scores)?, train)?;
        let ctx = crate::ops::bmm::bmm(&probs, &v, false)?.transpose(1, 2)?.contiguous()?.reshape((b * n, h))?;
        self.drop.forward_t(&self.attn_out.forward(&ctx)?, train)
    }

    /// A residual branch's output scaled by LayerScale and, in training, dropped per sample
    /// with probability `drop_path` (the kept ones scaled by 1/(1-p), as stochastic depth).
    fn branch(&self, y: Tensor, scale: Option<&Tensor>, b: usize, train: bool) -> candle_core::Result<Tensor> {
        let y = match scale {
            Some(s) => y.broadcast_mul(&cast_as(s, y.dtype())?)?,
            None => y,
        };
        if !train || self.drop_path == 0.0 {
            return Ok(y);
        }
        let keep = 1.0 - self.drop_path;
        let mask: Vec<f32> = self
            .rng
            .uniform(b, 0.0, 1.0)
            .into_iter()
            .map(|u| if (u as f64) < self.drop_path { 0.0 } else { (1.0 / keep) as f32 })
            .collect();
        let rows = y.dim(0)? / b.max(1);
        let mask = Tensor::from_vec(mask, (b, 1, 1), y.device())?.to_dtype(y.dtype())?;
        y.reshape((b, rows, ()))?.broadcast_mul(&mask)?.reshape(y.shape())
    }

    /// The layer as one fused op ([`crate::ops::encoder_layer`]) where it applies: exact GELU,
    /// no dropout or stochastic depth in this pass.
    fn fused(&self, x: &Tensor, b: usize, train: bool) -> candle_core::Result<Option<Tensor>> {
        let dropped = train && (self.attn_drop.p() > 0.0 || self.drop.p() > 0.0 || self.drop_path > 0.0);
        if self.act != Activation::Gelu || dropped {
            return Ok(None);
        }
        let two = |a: &Tensor, b: &Tensor| [param(a), param(b)];
        let linear = |l: &Linear| -> Option<[Tensor; 2]> { l.bias().map(|b| two(l.weight(), b)) };
        let (Some(out), Some(fc1), Some(fc2)) =
            (linear(&self.attn_out), linear(&self.intermediate), linear(&self.output))
        else {
            return Ok(None);
        };
        let parts = [&self.query, &self.key, &self.value];
        let biases: Vec<Tensor> = parts.iter().filter_map(|l| l.bias().map(param)).collect();
        let qkv_bias = match <[Tensor; 3]>::try_from(biases) {
            Ok(b) => Some(b),
            Err(v) if v.is_empty() => None,
            Err(_) => return Ok(None),
        };
        let tensors = crate::ops::encoder_layer::EncoderTensors {
            ln1: two(self.ln_before.weight(), self.ln_before.bias()),
            qkv: parts.map(|l| param(l.weight())),
            qkv_bias,
            out,
            ln2: two(self.ln_after.weight(), self.ln_after.bias()),
            fc1,
            fc2,
            scales: self.scales.as_ref().map(|(a, c)| two(a, c)),
        };
        crate::ops::encoder_layer::encoder_layer(
            x,
            &tensors,
            b,
            self.heads,
            (self.ln_before.eps(), self.ln_after.eps()),
        )
    }

    /// One encoder layer over rows `[b·n, hidden]`.
    pub fn forward_t(&self, x: &Tensor, b: usize, n: usize, train: bool) -> candle_core::Result<Tensor> {
        if let Some(y) = self.fused(x, b, train)? {
            return Ok(y);
        }
        let (s1, s2) = match &self.scales {
            Some((a, c)) => (Some(a), Some(c)),
            None => (None, None),
        };
        let a = self.attention(&self.ln_before.forward(x)?, b, n, train)?;
        let x = (self.branch(a, s1, b, train)? + x)?;
        let normed = self.ln_after.forward(&x)?;
        let h = match self.act {
            Activation::Gelu => self.intermediate.forward_gelu(&normed)?,
            act => act.apply(&self.intermediate.forward(&normed)?)?,
        };
        let m = self.drop.forward_t(&self.output.forward(&h)?, train)?;
        self.branch(m, s2, b, train)? + x
    }
}

/// Patch embeddings `[N, patches, hidden]` of images `[N, C, H, W]`: a convolution with stride
/// equal to its kernel (`weight [hidden, C, ph, pw]`, `bias [hidden]`), computed as a matrix
/// product over the unfolded patches.
pub fn embed_patches(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    (ph, pw): (usize, usize),
) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (gh, gw) = (h / ph, w / pw);
    let patches = x
        .reshape((b, c, gh, ph, gw, pw))?
        .permute((0, 2, 4, 1, 3, 5))?
        .contiguous()?
        .reshape((b * gh * gw, c * ph * pw))?;
    let hidden = weight.dim(0)?;
    let weight = cast_as(weight, x.dtype())?.reshape((hidden, c * ph * pw))?;
    add_broadcast(&crate::ops::linear::linear(&patches, &weight)?, &param(bias))?.reshape((b, gh * gw, hidden))
}

/// The `[CLS]` token and the patch embeddings with position embeddings added: `[N, 1 + patches,
/// hidden]`.
pub fn tokens(patches: &Tensor, cls_token: &Tensor, position_embeddings: &Tensor) -> candle_core::Result<Tensor> {
    let cls = add_broadcast(&patches.zeros_like()?.narrow(1, 0, 1)?, &param(cls_token))?;
    add_broadcast(&Tensor::cat(&[&cls, patches], 1)?, &param(position_embeddings))
}

/// The shape of a [`Backbone`].
#[derive(Clone, Debug)]
pub struct BackboneShape {
    /// The architecture's name, for error messages.
    pub what: &'static str,
    /// Input `(height, width)`.
    pub image: (usize, usize),
    /// Patch `(height, width)`.
    pub patch: (usize, usize),
    /// Input channels.
    pub channels: usize,
    /// Number of encoder layers.
    pub layers: usize,
    /// Dropout on the embeddings.
    pub emb_drop: f64,
    /// Whether the embeddings keep a (pretraining) mask token, `[1, hidden]`, zero-initialised.
    pub mask_token: bool,
}

/// The embeddings (`[CLS]`, position embeddings, patch projection) and the encoder layers of a
/// vision transformer, under `embeddings.` and `encoder.layer.N.` of its prefix.
pub struct Backbone {
    shape: BackboneShape,
    patch_weight: Tensor,
    patch_bias: Tensor,
    cls_token: Tensor,
    position_embeddings: Tensor,
    layers: Vec<EncoderLayer>,
    drop: Dropout,
}

impl Backbone {
    /// The backbone's tensors under `vb` (weights, the `[CLS]` token and the position embeddings
    /// normal with `dims.std`, biases 0).
    pub fn new(
        shape: BackboneShape,
        dims: &BlockDims,
        style: BlockStyle,
        drop_rng: &HostRng,
        vb: VarBuilder,
    ) -> Result<Self> {
        let (h, normal) = (dims.hidden, Init::Randn { mean: 0.0, stdev: dims.std });
        let ((ih, iw), (ph, pw)) = (shape.image, shape.patch);
        let grid = (ih / ph.max(1)) * (iw / pw.max(1));
        let emb = vb.pp("embeddings");
        let cls_token = emb.get_with_hints((1, 1, h), "cls_token", normal)?;
        if shape.mask_token {
            emb.get_with_hints((1, h), "mask_token", Init::Const(0.0))?;
        }
        let position_embeddings = emb.get_with_hints((1, grid + 1, h), "position_embeddings", normal)?;
        let proj = emb.pp("patch_embeddings").pp("projection");
        let patch_weight = proj.get_with_hints((h, shape.channels, ph, pw), "weight", normal)?;
        let patch_bias = proj.get_with_hints(h, "bias", Init::Const(0.0))?;
        let layers = (0..shape.layers)
            .map(|i| EncoderLayer::new(dims, style, drop_rng, vb.pp("encoder").pp("layer").pp(i.to_string())))
            .collect::<Result<Vec<_>>>()?;
        let drop = Dropout::new(shape.emb_drop, drop_rng)?;
        Ok(Self { shape, patch_weight, patch_bias, cls_token, position_embeddings, layers, drop })
    }

    /// Patch embeddings `[N, patches, hidden]` of images of the configured size and channels.
    pub fn embed_patches(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (_, c, h, w) = x.dims4()?;
        let (ih, iw) = self.shape.image;
        if c != self.shape.channels || h != ih || w != iw {
            candle_core::bail!(
                "{} expects images [N, {}, {ih}, {iw}], got {:?} (resize the input, or give image_size to \
                 from_pretrained to interpolate the position embeddings)",
                self.shape.what,
                self.shape.channels,
                x.dims()
            );
        }
        embed_patches(x, &self.patch_weight, &self.patch_bias, self.shape.patch)
    }

    /// The encoder's output as token rows `[b·n, hidden]`, with `b` and `n` (`[CLS]` first).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<(Tensor, usize, usize)> {
        let patches = self.embed_patches(x)?;
        let (b, _, h) = patches.dims3()?;
        let tokens = tokens(&patches, &self.cls_token, &self.position_embeddings)?;
        let n = tokens.dim(1)?;
        let mut t = self.drop.forward_t(&tokens, train)?.reshape((b * n, h))?;
        for layer in &self.layers {
            t = layer.forward_t(&t, b, n, train)?;
        }
        Ok((t, b, n))
    }
}

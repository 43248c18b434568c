//! [`Layer`]: a [`LayerSpec`] built over named tensors, and [`Sequence`], layers applied in
//! order with the fused CPU ops the built-in architectures use: a convolution followed by a ReLU
//! and a 2x2 max-pool is one op, and so is a linear layer, a BatchNorm or a residual sum
//! followed by a ReLU; so a model runs as fast however it was written.

use super::pool::{adaptive_avg_pool2d, pool2d, PoolKind};
use super::spec::{LayerSpec, ShortcutSpec};
use crate::models::layers::{
    batch_norm, conv2d, global_avg_pool, param, subsample2, Activation, BatchNorm2d, Conv, ConvShape, Dropout,
    LayerNorm, Linear,
};
use crate::rng::HostRng;
use candle_core::{DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// What a residual block adds to its body's output, built.
enum Shortcut {
    Identity,
    Pad,
    Project(Sequence),
}

enum Kind {
    Linear(Linear),
    Conv(Conv),
    BatchNorm(BatchNorm2d),
    LayerNorm(LayerNorm),
    Dropout(Dropout),
    Act(Option<Activation>),
    Tanh,
    Sigmoid,
    Pool { kind: PoolKind, k: usize, s: usize, p: usize },
    Adaptive { oh: usize, ow: usize },
    Flatten(usize),
    Embedding(Tensor),
    Sequence(Sequence),
    Residual { body: Sequence, shortcut: Shortcut },
}

/// A layer with its tensors (shared with the model's parameter map).
pub struct Layer {
    spec: LayerSpec,
    kind: Kind,
}

/// What a layer absorbs of the layers after it.
#[derive(Clone, Copy, Debug, Default)]
struct Fuse {
    relu: bool,
    pool: bool,
    flatten: bool,
}

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

impl Layer {
    /// Builds `spec` with its tensors under `vb` (fresh ones drawn as the spec's initialisation
    /// says); dropout masks come from `drop_rng`.
    pub fn build(spec: &LayerSpec, vb: VarBuilder, drop_rng: &HostRng) -> anyhow::Result<Self> {
        spec.validate()?;
        let kind = match spec {
            LayerSpec::Linear { in_features, out_features, bias, init } => {
                let (i, o) = (*in_features, *out_features);
                let w = vb.get_with_hints((o, i), "weight", init.weight(i))?;
                let b = if *bias { Some(vb.get_with_hints(o, "bias", init.bias(i))?) } else { None };
                Kind::Linear(Linear::new(w, b))
            }
            LayerSpec::Conv2d { in_channels, out_channels, kernel_size, stride, padding, groups, bias, init } => {
                let shape = ConvShape {
                    c_in: *in_channels,
                    c_out: *out_channels,
                    kernel: *kernel_size,
                    stride: *stride,
                    padding: *padding,
                    groups: *groups,
                };
                Kind::Conv(conv2d(shape, *bias, *init, vb)?)
            }
            LayerSpec::BatchNorm2d { num_features, eps, momentum } => {
                Kind::BatchNorm(batch_norm(*num_features, vb)?.with_eps_momentum(*eps, *momentum))
            }
            LayerSpec::LayerNorm { normalized_shape, eps } => {
                Kind::LayerNorm(LayerNorm::new(*normalized_shape, *eps, vb)?)
            }
            LayerSpec::Dropout { p } => Kind::Dropout(Dropout::new(*p, drop_rng)?),
            LayerSpec::Relu => Kind::Act(Some(Activation::Relu)),
            LayerSpec::Gelu { approximate } => {
                Kind::Act(Some(if approximate == "tanh" { Activation::GeluTanh } else { Activation::Gelu }))
            }
            LayerSpec::Sigmoid => Kind::Sigmoid,
            LayerSpec::Tanh => Kind::Tanh,
            LayerSpec::Identity => Kind::Act(None),
            LayerSpec::MaxPool2d { kernel_size, stride, padding } => {
                Kind::Pool { kind: PoolKind::Max, k: *kernel_size, s: *stride, p: *padding }
            }
            LayerSpec::AvgPool2d { kernel_size, stride, padding } => {
                Kind::Pool { kind: PoolKind::Avg, k: *kernel_size, s: *stride, p: *padding }
            }
            LayerSpec::AdaptiveAvgPool2d { output_size: [oh, ow] } => Kind::Adaptive { oh: *oh, ow: *ow },
            LayerSpec::Flatten { start_dim } => Kind::Flatten(*start_dim),
            LayerSpec::Embedding { num_embeddings, embedding_dim } => Kind::Embedding(vb.get_with_hints(
                (*num_embeddings, *embedding_dim),
                "weight",
                Init::Randn { mean: 0.0, stdev: 1.0 },
            )?),
            LayerSpec::Sequential { layers } => Kind::Sequence(Sequence::build(layers, vb, drop_rng)?),
            LayerSpec::Residual { body, shortcut } => {
                let body = Sequence::build(body, vb.clone(), drop_rng)?;
                let shortcut = match shortcut {
                    ShortcutSpec::Named(n) if n == "pad" => Shortcut::Pad,
                    ShortcutSpec::Named(_) => Shortcut::Identity,
                    ShortcutSpec::Layers(ls) => Shortcut::Project(Sequence::build(ls, vb.pp("shortcut"), drop_rng)?),
                };
                Kind::Residual { body, shortcut }
            }
        };
        Ok(Self { spec: spec.clone(), kind })
    }

    /// The layer's description.
    pub fn spec(&self) -> &LayerSpec {
        &self.spec
    }

    /// Applies the layer in training (`train`: batch statistics, dropout) or evaluation mode.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_fused(x, train, Fuse::default())
    }

    fn forward_fused(&self, x: &Tensor, train: bool, fuse: Fuse) -> Result<Tensor> {
        let then_relu = |y: Tensor| if fuse.relu { crate::ops::relu(&y) } else { Ok(y) };
        match &self.kind {
            Kind::Linear(l) => {
                let i = l.weight().dim(1)?;
                if x.rank() == 0 || x.dim(x.rank() - 1)? != i {
                    return Err(err(format!("expects inputs [.., {i}], got {:?}", x.dims())));
                }
                l.forward_act(x, fuse.relu)
            }
            Kind::Conv(c) => {
                let ci = c.weight().dim(1)?;
                if x.rank() != 4 {
                    return Err(err(format!("expects images [N, C, H, W], got {:?}", x.dims())));
                }
                let groups = match &self.spec {
                    LayerSpec::Conv2d { groups, .. } => *groups,
                    _ => 1,
                };
                if x.dim(1)? != ci * groups {
                    return Err(err(format!("expects {} input channels, got {:?}", ci * groups, x.dims())));
                }
                c.forward_block(x, fuse.relu, fuse.pool)
            }
            Kind::BatchNorm(b) => b.forward_act(x, train, fuse.relu),
            Kind::LayerNorm(l) => then_relu(candle_core::Module::forward(l, x)?),
            Kind::Dropout(d) => then_relu(d.forward_t(x, train)?),
            Kind::Act(Some(a)) => then_relu(a.apply(x)?),
            Kind::Act(None) => then_relu(x.clone()),
            Kind::Tanh => then_relu(x.tanh()?),
            Kind::Sigmoid => then_relu(crate::models::layers::sigmoid(x)?),
            Kind::Pool { kind, k, s, p } => then_relu(pool2d(x, *kind, *k, *s, *p)?),
            Kind::Adaptive { oh: 1, ow: 1 } if fuse.flatten => {
                if x.rank() != 4 {
                    return Err(err(format!("expects images [N, C, H, W], got {:?}", x.dims())));
                }
                then_relu(global_avg_pool(x)?)
            }
            Kind::Adaptive { oh, ow } => then_relu(adaptive_avg_pool2d(x, *oh, *ow)?),
            Kind::Flatten(start) => {
                if *start >= x.rank().max(1) {
                    return Err(err(format!("start_dim {start} is out of range for an input {:?}", x.dims())));
                }
                then_relu(x.flatten_from(*start)?)
            }
            Kind::Embedding(w) => then_relu(embed(w, x)?),
            Kind::Sequence(s) => then_relu(s.forward_t(x, train)?),
            Kind::Residual { body, shortcut } => {
                let y = body.forward_t(x, train)?;
                let s = match shortcut {
                    Shortcut::Identity => x.clone(),
                    Shortcut::Pad => pad_shortcut(x, y.dims())?,
                    Shortcut::Project(p) => p.forward_t(x, train).map_err(|e| e.context("shortcut"))?,
                };
                if s.dims() != y.dims() {
                    return Err(err(format!(
                        "the body gives {:?} but the shortcut {:?}: give a shortcut (a projection, or \"pad\")",
                        y.dims(),
                        s.dims()
                    )));
                }
                if fuse.relu {
                    crate::ops::add_relu(&y, &s)
                } else {
                    y + s
                }
            }
        }
    }
}

/// Rows of `w` for the integer indices `x` (any shape; float indices must be whole numbers):
/// the result has `x`'s shape with the embedding dimension added.
fn embed(w: &Tensor, x: &Tensor) -> Result<Tensor> {
    let n = w.dim(0)?;
    let flat = x.flatten_all()?;
    let as_f = flat.to_dtype(DType::F64)?;
    if flat.elem_count() > 0 {
        let (lo, hi) = (as_f.min(0)?.to_scalar::<f64>()?, as_f.max(0)?.to_scalar::<f64>()?);
        if lo < 0.0 || hi >= n as f64 {
            return Err(err(format!("indices must be in 0..{n}, got values from {lo} to {hi}")));
        }
        if x.dtype().is_float() && (as_f.clone() - as_f.floor()?)?.abs()?.max(0)?.to_scalar::<f64>()? > 0.0 {
            return Err(err("indices must be whole numbers".into()));
        }
    }
    let idx = flat.to_dtype(DType::U32)?;
    let rows = param(w).index_select(&idx, 0)?;
    let mut shape = x.dims().to_vec();
    shape.push(w.dim(1)?);
    rows.reshape(shape)
}

/// Option A of He et al. 2016: `x` subsampled by 2 when the body halves the resolution and
/// zero-padded to the body's channels, half before and half after.
fn pad_shortcut(x: &Tensor, target: &[usize]) -> Result<Tensor> {
    let (_, c, h, _) = x.dims4()?;
    let [_, tc, th, _] = target else {
        return Err(err(format!("a \"pad\" shortcut needs images, the body gives {target:?}")));
    };
    let x = if *th < h { subsample2(x)? } else { x.clone() };
    let extra = tc.saturating_sub(c);
    if extra == 0 {
        return Ok(x);
    }
    x.pad_with_zeros(1, extra / 2, extra - extra / 2)
}

/// Layers applied in order, named `0`, `1`, ... under the sequence's prefix, with the fusions
/// of the module documentation planned once when built.
pub struct Sequence {
    layers: Vec<Layer>,
    /// Per step: the index of the layer that runs, what it absorbs, how many layers it covers.
    plan: Vec<(usize, Fuse, usize)>,
}

impl Sequence {
    /// Builds `specs` with the tensors of layer `i` under `vb.pp(i)`.
    pub fn build(specs: &[LayerSpec], vb: VarBuilder, drop_rng: &HostRng) -> anyhow::Result<Self> {
        let layers = specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                Layer::build(s, vb.pp(i.to_string()), drop_rng)
                    .map_err(|e| e.context(format!("layer {i} ({})", s.describe())))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self { plan: plan(specs), layers })
    }

    /// The layers.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }

    /// Applies the layers in order; an error names the layer.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let mut h = x.clone();
        for &(i, fuse, _) in &self.plan {
            let layer = &self.layers[i];
            h = layer
                .forward_fused(&h, train, fuse)
                .map_err(|e| err(format!("layer {i} ({}): {e}", layer.spec.describe())))?;
        }
        Ok(h)
    }
}

/// Which layers run fused with the ones after them (see the module documentation).
fn plan(specs: &[LayerSpec]) -> Vec<(usize, Fuse, usize)> {
    let fusable_pool =
        |s: Option<&LayerSpec>| matches!(s, Some(LayerSpec::MaxPool2d { kernel_size: 2, stride: 2, padding: 0 }));
    let mut out = Vec::new();
    let mut i = 0;
    while i < specs.len() {
        let next = |k: usize| specs.get(i + k);
        let mut fuse = Fuse::default();
        let mut len = 1;
        match &specs[i] {
            LayerSpec::Conv2d { .. } => {
                if matches!(next(1), Some(LayerSpec::Relu)) {
                    fuse.relu = true;
                    len = 2;
                }
                if fusable_pool(next(len)) {
                    fuse.pool = true;
                    len += 1;
                }
            }
            LayerSpec::Linear { .. } | LayerSpec::BatchNorm2d { .. } | LayerSpec::Residual { .. } => {
                if matches!(next(1), Some(LayerSpec::Relu)) {
                    fuse.relu = true;
                    len = 2;
                }
            }
            LayerSpec::AdaptiveAvgPool2d { output_size: [1, 1] } => {
                if matches!(next(1), Some(LayerSpec::Flatten { start_dim: 1 })) {
                    fuse.flatten = true;
                    len = 2;
                }
            }
            _ => {}
        }
        out.push((i, fuse, len));
        i += len;
    }
    out
}

/// The number of classes and the tensor prefix of a sequence's head: its last layer with
/// tensors, when that is a linear layer at the top level.
pub fn head_of(specs: &[LayerSpec], prefix: &str) -> Option<(String, usize)> {
    let (i, last) = specs.iter().enumerate().rev().find(|(_, s)| s.has_tensors())?;
    match last {
        LayerSpec::Linear { out_features, .. } => Some((format!("{prefix}{i}."), *out_features)),
        _ => None,
    }
}

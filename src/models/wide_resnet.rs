//! Wide Residual Networks (Zagoruyko & Komodakis 2016) for CIFAR: WRN-d-k has three groups of
//! (d-4)/6 pre-activation basic blocks with 16k, 32k and 64k channels, dropout between the two
//! convolutions of a block, BatchNorm2d-ReLU, global average pooling and a linear classifier.
//! Tensor names follow the common PyTorch implementation (`conv1`, `block1.layer.0.bn1`,
//! `block1.layer.0.convShortcut`, ..., `bn1`, `fc`).

use super::batch_norm::update_running;
use super::layers::{
    batch_norm, bn_relu, conv_no_bias, global_avg_pool, linear_init, BatchNorm2d, Conv, Dropout, Linear,
};
use super::no_grad::param;
use super::registry::ArchConfig;
use super::Network;
use crate::ops::res_block::{preact_block_train, preact_chain_train, PreActTensors};
use crate::rng::HostRng;
use anyhow::{bail, Result};
use candle_core::{Module, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

/// The configuration of a WideResNet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WideResNetConfig {
    /// Total depth, 6n+4 (10, 16, 22, 28, 40, ...).
    pub depth: usize,
    /// The widening factor k.
    pub widen_factor: usize,
    /// Number of classes.
    pub num_labels: usize,
    /// Input channels.
    pub num_channels: usize,
    /// Dropout probability between the two convolutions of each block (0.3 in the paper's
    /// dropout runs; 0 for SAM's).
    pub dropout: f64,
}

impl Default for WideResNetConfig {
    fn default() -> Self {
        Self { depth: 28, widen_factor: 10, num_labels: 10, num_channels: 3, dropout: 0.0 }
    }
}

impl WideResNetConfig {
    /// Blocks per group, `(depth - 4) / 6`.
    pub fn blocks_per_group(&self) -> Result<usize> {
        if self.depth < 10 || !(self.depth - 4).is_multiple_of(6) {
            bail!("wide_resnet: depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {}", self.depth);
        }
        Ok((self.depth - 4) / 6)
    }

    /// Rejects configurations that build nothing.
    pub fn validate(&self) -> Result<()> {
        self.blocks_per_group()?;
        if self.widen_factor == 0 || self.num_labels == 0 || self.num_channels == 0 {
            bail!("wide_resnet: width, classes and input channels must be > 0");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("wide_resnet: dropout must be in [0, 1), got {}", self.dropout);
        }
        Ok(())
    }
}

struct Block {
    bn1: BatchNorm2d,
    conv1: Conv,
    bn2: BatchNorm2d,
    conv2: Conv,
    shortcut: Option<Conv>,
    dropout: Dropout,
    stride: usize,
}

impl Block {
    fn new(c_in: usize, c_out: usize, stride: usize, dropout: Dropout, vb: VarBuilder) -> Result<Self> {
        let shortcut = if c_in == c_out && stride == 1 {
            None
        } else {
            Some(conv_no_bias(c_in, c_out, 1, stride, 0, true, vb.pp("convShortcut"))?)
        };
        Ok(Self {
            bn1: batch_norm(c_in, vb.pp("bn1"))?,
            conv1: conv_no_bias(c_in, c_out, 3, stride, 1, true, vb.pp("conv1"))?,
            bn2: batch_norm(c_out, vb.pp("bn2"))?,
            conv2: conv_no_bias(c_out, c_out, 3, 1, 1, true, vb.pp("conv2"))?,
            shortcut,
            dropout,
            stride,
        })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if train && self.dropout.p() == 0.0 {
            if let Some(y) = self.forward_fused(x)? {
                return Ok(y);
            }
        }
        let a = bn_relu(&self.bn1, x, train)?;
        let h = bn_relu(&self.bn2, &self.conv1.forward(&a)?, train)?;
        let h = self.conv2.forward(&self.dropout.forward_t(&h, train)?)?;
        // The shortcut of a block that changes shape sees the pre-activated input.
        match &self.shortcut {
            None => h + x,
            Some(conv) => h + conv.forward(&a)?,
        }
    }

    /// The block in training mode without dropout as one op ([`preact_block_train`]) with the
    /// running statistics moved, or `None` where that op does not apply.
    fn forward_fused(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some(out) = preact_block_train(x, &self.fused_tensors())? else { return Ok(None) };
        update_running(self.norms(), &out)?;
        Ok(Some(out.y))
    }

    /// The tensors and settings the fused op reads.
    fn fused_tensors(&self) -> PreActTensors {
        let (bn1, eps1) = self.bn1.train_params();
        let (bn2, eps2) = self.bn2.train_params();
        PreActTensors {
            bn1,
            conv1: param(self.conv1.weight()),
            bn2,
            conv2: param(self.conv2.weight()),
            shortcut: self.shortcut.as_ref().map(|c| param(c.weight())),
            eps: (eps1, eps2),
            stride: self.stride,
        }
    }

    /// The block's BatchNorms in the order of the fused op's statistics.
    fn norms(&self) -> [&BatchNorm2d; 2] {
        [&self.bn1, &self.bn2]
    }
}

/// A WideResNet.
pub struct WideResNet {
    cfg: WideResNetConfig,
    conv1: Conv,
    blocks: Vec<Block>,
    bn1: BatchNorm2d,
    fc: Linear,
    drop_rng: Option<HostRng>,
}

impl WideResNet {
    /// Creates the layers from `vb` as the reference PyTorch code (xternalz/WideResNet-pytorch,
    /// the source of these tensor names): convolutions N(0, 2/fan_out) with fan_out = k·k·out
    /// channels, BatchNorm2d weight 1 and bias 0, the classifier's weight `nn.Linear`'s default
    /// U(±1/√fan_in) and its bias 0. Dropout masks come from a generator seeded from `rng`.
    pub fn build(cfg: &WideResNetConfig, vb: VarBuilder, rng: &HostRng) -> Result<Self> {
        cfg.validate()?;
        let n = cfg.blocks_per_group()?;
        let k = cfg.widen_factor;
        let drop_rng = if cfg.dropout > 0.0 { HostRng::new(rng.next_seed()) } else { rng.clone() };
        let conv1 = conv_no_bias(cfg.num_channels, 16, 3, 1, 1, true, vb.pp("conv1"))?;
        let mut blocks = Vec::with_capacity(3 * n);
        let mut c_in = 16;
        for (g, width) in [16 * k, 32 * k, 64 * k].into_iter().enumerate() {
            for i in 0..n {
                let stride = if g > 0 && i == 0 { 2 } else { 1 };
                let dropout = Dropout::new(cfg.dropout, &drop_rng)?;
                blocks.push(Block::new(c_in, width, stride, dropout, vb.pp(format!("block{}.layer.{i}", g + 1)))?);
                c_in = width;
            }
        }
        let bn1 = batch_norm(c_in, vb.pp("bn1"))?;
        let bound = 1.0 / (c_in as f64).sqrt();
        let fc =
            linear_init(c_in, cfg.num_labels, Init::Uniform { lo: -bound, up: bound }, Init::Const(0.0), vb.pp("fc"))?;
        let drop_rng = (cfg.dropout > 0.0).then_some(drop_rng);
        Ok(Self { cfg: cfg.clone(), conv1, blocks, bn1, fc, drop_rng })
    }

    /// Every block in training mode as one op ([`preact_chain_train`]) with the running
    /// statistics moved, or `None` where that op does not apply.
    fn blocks_fused(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let tensors: Vec<PreActTensors> = self.blocks.iter().map(Block::fused_tensors).collect();
        let Some(out) = preact_chain_train(x, &tensors)? else { return Ok(None) };
        update_running(self.blocks.iter().flat_map(Block::norms), &out)?;
        Ok(Some(out.y))
    }
}

impl Network for WideResNet {
    /// The classifier's input: the final BatchNorm and ReLU averaged over space, `[N, 64·k]`.
    fn features_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Option<Tensor>> {
        if x.rank() != 4 || x.dim(1)? != self.cfg.num_channels {
            candle_core::bail!("wide_resnet expects images [N, {}, H, W], got {:?}", self.cfg.num_channels, x.dims());
        }
        let mut h = self.conv1.forward(x)?;
        // In training without dropout, the blocks as one op where it applies (no activation
        // gradient between them goes through candle's gradient store), else one by one.
        let fused = if train && self.cfg.dropout == 0.0 { self.blocks_fused(&h)? } else { None };
        match fused {
            Some(y) => h = y,
            None => {
                for block in &self.blocks {
                    h = block.forward_t(&h, train)?;
                }
            }
        }
        let h = bn_relu(&self.bn1, &h, train)?;
        global_avg_pool(&h).map(Some)
    }

    fn head_t(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.fc.forward(features)
    }

    fn config(&self) -> serde_json::Value {
        ArchConfig::WideResNet(self.cfg.clone()).to_json()
    }

    fn dropout_rng(&self) -> Option<HostRng> {
        self.drop_rng.clone()
    }
}

//! The CIFAR ResNets of He et al. 2016 ("Deep Residual Learning", section 4.2): depth 6n+2, three
//! stages of n basic blocks with 16, 32 and 64 channels on 32x32 inputs, global average pooling
//! and a linear classifier. Tensor names follow the common PyTorch implementation
//! (`conv1`, `bn1`, `layer1.0.conv1`, ..., `linear`).

use super::batch_norm::update_running;
use super::layers::{
    batch_norm, bn, bn_relu, conv_no_bias, global_avg_pool, linear_scheme, subsample2, BatchNorm2d, Conv, Linear,
};
use super::no_grad::param;
use super::registry::ArchConfig;
use super::Network;
use crate::ops::res_block::{res_block_train, res_chain_train, BlockSkip, BlockTensors};
use anyhow::{bail, Result};
use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

/// How a block that changes width and resolution forms its shortcut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Shortcut {
    /// Option A of the paper (used for its CIFAR results): subsample by 2 and pad the new
    /// channels with zeros; no parameters.
    A,
    /// Option B: a 1x1 convolution with stride 2 and BatchNorm2d (`shortcut.0`, `shortcut.1`).
    B,
}

/// The configuration of a CIFAR ResNet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResNetConfig {
    /// Total depth, 6n+2 (20, 32, 44, 56, 110, ...).
    pub depth: usize,
    /// Number of classes.
    pub num_labels: usize,
    /// Input channels.
    pub num_channels: usize,
    /// Shortcut type of the blocks that change width.
    pub shortcut: Shortcut,
}

impl Default for ResNetConfig {
    fn default() -> Self {
        Self { depth: 20, num_labels: 10, num_channels: 3, shortcut: Shortcut::A }
    }
}

impl ResNetConfig {
    /// Blocks per stage, `(depth - 2) / 6`.
    pub fn blocks_per_stage(&self) -> Result<usize> {
        if self.depth < 8 || !(self.depth - 2).is_multiple_of(6) {
            bail!("resnet: depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), got {}", self.depth);
        }
        Ok((self.depth - 2) / 6)
    }

    /// Rejects configurations that build nothing.
    pub fn validate(&self) -> Result<()> {
        self.blocks_per_stage()?;
        if self.num_labels == 0 || self.num_channels == 0 {
            bail!("resnet: classes and input channels must be > 0");
        }
        Ok(())
    }
}

enum Skip {
    Identity,
    Pad { left: usize, right: usize },
    Conv { conv: Conv, bn: BatchNorm2d },
}

struct Block {
    conv1: Conv,
    bn1: BatchNorm2d,
    conv2: Conv,
    bn2: BatchNorm2d,
    skip: Skip,
    stride: usize,
}

impl Block {
    fn new(c_in: usize, c_out: usize, stride: usize, shortcut: Shortcut, vb: VarBuilder) -> Result<Self> {
        let conv1 = conv_no_bias(c_in, c_out, 3, stride, 1, false, vb.pp("conv1"))?;
        let bn1 = batch_norm(c_out, vb.pp("bn1"))?;
        let conv2 = conv_no_bias(c_out, c_out, 3, 1, 1, false, vb.pp("conv2"))?;
        let bn2 = batch_norm(c_out, vb.pp("bn2"))?;
        let skip = if stride == 1 && c_in == c_out {
            Skip::Identity
        } else {
            match shortcut {
                Shortcut::A => {
                    let extra = c_out.saturating_sub(c_in);
                    Skip::Pad { left: extra / 2, right: extra - extra / 2 }
                }
                Shortcut::B => Skip::Conv {
                    conv: conv_no_bias(c_in, c_out, 1, stride, 0, false, vb.pp("shortcut.0"))?,
                    bn: batch_norm(c_out, vb.pp("shortcut.1"))?,
                },
            }
        };
        Ok(Self { conv1, bn1, conv2, bn2, skip, stride })
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        if train {
            if let Some(y) = self.forward_fused(x)? {
                return Ok(y);
            }
        }
        let h = bn_relu(&self.bn1, &self.conv1.forward(x)?, train)?;
        let h = bn(&self.bn2, &self.conv2.forward(&h)?, train)?;
        let s = match &self.skip {
            Skip::Identity => x.clone(),
            Skip::Pad { left, right } => subsample2(x)?.pad_with_zeros(1, *left, *right)?,
            Skip::Conv { conv, bn: norm } => bn(norm, &conv.forward(x)?, train)?,
        };
        crate::ops::add_relu(&h, &s)
    }

    /// The block in training mode as one op ([`res_block_train`]) with the running statistics
    /// moved, or `None` where that op does not apply.
    fn forward_fused(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let Some(out) = res_block_train(x, &self.fused_tensors())? else { return Ok(None) };
        update_running(self.norms(), &out)?;
        Ok(Some(out.y))
    }

    /// The block's tensors as the fused op reads them.
    fn fused_tensors(&self) -> BlockTensors {
        let (bn1, eps1) = self.bn1.train_params();
        let (bn2, eps2) = self.bn2.train_params();
        let skip = match &self.skip {
            Skip::Identity => BlockSkip::Identity,
            Skip::Pad { left, right } => BlockSkip::Pad { left: *left, right: *right },
            Skip::Conv { conv, bn } => {
                let (bn, eps) = bn.train_params();
                BlockSkip::Conv { kernel: param(conv.weight()), bn, eps }
            }
        };
        BlockTensors {
            conv1: param(self.conv1.weight()),
            bn1,
            conv2: param(self.conv2.weight()),
            bn2,
            eps: (eps1, eps2),
            stride: self.stride,
            skip,
        }
    }

    /// The block's BatchNorms in the order of the fused op's statistics.
    fn norms(&self) -> Vec<&BatchNorm2d> {
        let mut norms = vec![&self.bn1, &self.bn2];
        if let Skip::Conv { bn, .. } = &self.skip {
            norms.push(bn);
        }
        norms
    }
}

/// A CIFAR ResNet.
pub struct ResNet {
    cfg: ResNetConfig,
    conv1: Conv,
    bn1: BatchNorm2d,
    blocks: Vec<Block>,
    linear: Linear,
}

impl ResNet {
    /// Creates the layers from `vb` as the reference PyTorch code (akamaster/pytorch_resnet_cifar10,
    /// whose `_weights_init` applies `kaiming_normal_` to every `nn.Conv2d` and `nn.Linear`):
    /// convolution and classifier weights He-normal with the fan-in, N(0, 2/fan_in); the
    /// classifier's bias keeps `nn.Linear`'s U(±1/√fan_in); BatchNorm2d weight 1, bias 0.
    pub fn build(cfg: &ResNetConfig, vb: VarBuilder) -> Result<Self> {
        let n = cfg.blocks_per_stage()?;
        cfg.validate()?;
        let conv1 = conv_no_bias(cfg.num_channels, 16, 3, 1, 1, false, vb.pp("conv1"))?;
        let bn1 = batch_norm(16, vb.pp("bn1"))?;
        let mut blocks = Vec::with_capacity(3 * n);
        let mut c_in = 16;
        for (stage, &width) in [16usize, 32, 64].iter().enumerate() {
            for i in 0..n {
                let stride = if stage > 0 && i == 0 { 2 } else { 1 };
                let name = format!("layer{}.{i}", stage + 1);
                blocks.push(Block::new(c_in, width, stride, cfg.shortcut, vb.pp(name))?);
                c_in = width;
            }
        }
        let linear = linear_scheme(64, cfg.num_labels, super::init::InitScheme::He, vb.pp("linear"))?;
        Ok(Self { cfg: cfg.clone(), conv1, bn1, blocks, linear })
    }

    /// Every block in training mode as one op ([`res_chain_train`]) with the running statistics
    /// moved, or `None` where that op does not apply.
    fn blocks_fused(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let tensors: Vec<BlockTensors> = self.blocks.iter().map(Block::fused_tensors).collect();
        let Some(out) = res_chain_train(x, &tensors)? else { return Ok(None) };
        update_running(self.blocks.iter().flat_map(Block::norms), &out)?;
        Ok(Some(out.y))
    }
}

impl Network for ResNet {
    /// The classifier's input: the last stage's feature maps averaged over space, `[N, 64]`.
    fn features_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Option<Tensor>> {
        if x.rank() != 4 || x.dim(1)? != self.cfg.num_channels {
            candle_core::bail!("resnet expects images [N, {}, H, W], got {:?}", self.cfg.num_channels, x.dims());
        }
        let mut h = bn_relu(&self.bn1, &self.conv1.forward(x)?, train)?;
        // In training, the blocks as one op where it applies (no activation gradient between
        // them goes through candle's gradient store), else one by one.
        let fused = if train { self.blocks_fused(&h)? } else { None };
        match fused {
            Some(y) => h = y,
            None => {
                for block in &self.blocks {
                    h = block.forward_t(&h, train)?;
                }
            }
        }
        global_avg_pool(&h).map(Some)
    }

    fn head_t(&self, features: &Tensor) -> candle_core::Result<Tensor> {
        self.linear.forward(features)
    }

    fn config(&self) -> serde_json::Value {
        ArchConfig::ResNet(self.cfg.clone()).to_json()
    }
}

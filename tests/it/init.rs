//! Default initialisation: every tensor of every built-in architecture has the empirical
//! statistics its reference implementation's formula gives (PyTorch's `nn.Linear`/`nn.Conv2d`
//! defaults for mlp and cnn, the reference CIFAR ResNet and WideResNet code, transformers' ViT).
//!
//! Tolerances are 5 standard errors of each statistic for the tensor's size (variance of a
//! uniform: sqrt(0.8/n) relative, of a normal: sqrt(2/n); the share of values within one
//! standard deviation: sqrt(p(1-p)/n)), so a wrong formula (a factor sqrt(3) or sqrt(2) in
//! scale, uniform for normal) fails while the right one passes for any seed.

use candle_core::Device;
use samhost::models::registry::{build_model, ArchConfig};
use samhost::models::Model;
use samhost::rng::HostRng;
use serde_json::json;

/// What a tensor's values should look like.
#[derive(Clone, Copy, Debug)]
enum Expect {
    /// U(-bound, bound).
    Uniform(f64),
    /// N(0, std²).
    Normal(f64),
    /// Every value equal to this.
    Const(f64),
}

fn values(m: &Model, name: &str) -> Vec<f64> {
    let v = m.params().get(name).unwrap_or_else(|| panic!("no tensor {name}"));
    v.as_tensor().flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1::<f64>().unwrap()
}

fn check(m: &Model, name: &str, expect: Expect) {
    let x = values(m, name);
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| v * v).sum::<f64>() / n; // about a known mean of 0
    match expect {
        Expect::Const(c) => assert!(x.iter().all(|&v| v == c), "{name}: expected every value {c}"),
        Expect::Uniform(b) => {
            let max = x.iter().fold(0.0f64, |a, v| a.max(v.abs()));
            assert!(max <= b * (1.0 + 1e-6), "{name}: |value| {max} beyond the bound {b}");
            let want = b * b / 3.0;
            assert!(
                (var / want - 1.0).abs() < 5.0 * (0.8 / n).sqrt() + 1e-9,
                "{name}: variance {var}, U(±{b}) has {want}"
            );
            assert!(mean.abs() < 5.0 * (want / n).sqrt(), "{name}: mean {mean}");
            if n >= 1000.0 {
                // A uniform puts 1/sqrt(3) of its mass within one standard deviation.
                let p = 1.0 / 3f64.sqrt();
                let within = x.iter().filter(|v| v.abs() <= want.sqrt()).count() as f64 / n;
                assert!(
                    (within - p).abs() < 5.0 * (p * (1.0 - p) / n).sqrt(),
                    "{name}: {within} within 1 std, uniform {p}"
                );
            }
        }
        Expect::Normal(s) => {
            let want = s * s;
            assert!((var / want - 1.0).abs() < 5.0 * (2.0 / n).sqrt(), "{name}: variance {var}, N(0, {s}²) has {want}");
            assert!(mean.abs() < 5.0 * s / n.sqrt(), "{name}: mean {mean}");
            if n >= 1000.0 {
                let p = 0.682_689_492;
                let within = x.iter().filter(|v| v.abs() <= s).count() as f64 / n;
                assert!(
                    (within - p).abs() < 5.0 * (p * (1.0 - p) / n).sqrt(),
                    "{name}: {within} within 1 std, normal {p}"
                );
            }
        }
    }
}

fn build(v: serde_json::Value, seed: u64) -> Model {
    let cfg = ArchConfig::from_json(&v, true).expect("a valid config");
    build_model(&cfg, &HostRng::new(seed), &Device::Cpu).unwrap()
}

fn fan_bound(fan_in: usize) -> f64 {
    1.0 / (fan_in as f64).sqrt()
}

fn he(fan: usize) -> f64 {
    (2.0 / fan as f64).sqrt()
}

#[test]
fn mlp_and_cnn_start_as_pytorchs_layer_defaults() {
    for seed in [1, 2] {
        let m = build(json!({"model_type": "mlp", "sizes": [784, 512, 512, 10]}), seed);
        for (layer, fan) in [("fc1", 784), ("fc2", 512), ("fc3", 512)] {
            check(&m, &format!("{layer}.weight"), Expect::Uniform(fan_bound(fan)));
            check(&m, &format!("{layer}.bias"), Expect::Uniform(fan_bound(fan)));
        }
        let m = build(json!({"model_type": "cnn"}), seed);
        for (layer, fan) in [("conv1", 27), ("conv2", 32 * 9), ("conv3", 64 * 9), ("fc", 128 * 16), ("classifier", 256)]
        {
            check(&m, &format!("{layer}.weight"), Expect::Uniform(fan_bound(fan)));
            check(&m, &format!("{layer}.bias"), Expect::Uniform(fan_bound(fan)));
        }
    }
}

#[test]
fn the_he_option_draws_he_normal_weights() {
    let m = build(json!({"model_type": "mlp", "sizes": [784, 512, 10], "init": "he"}), 3);
    check(&m, "fc1.weight", Expect::Normal(he(784)));
    check(&m, "fc2.weight", Expect::Normal(he(512)));
    check(&m, "fc1.bias", Expect::Uniform(fan_bound(784)));
    let m = build(json!({"model_type": "cnn", "init": "he"}), 3);
    check(&m, "conv2.weight", Expect::Normal(he(32 * 9)));
    check(&m, "fc.weight", Expect::Normal(he(128 * 16)));
    check(&m, "conv2.bias", Expect::Uniform(fan_bound(32 * 9)));
    // The option survives the config round trip; the default is left out of it.
    assert_eq!(m.network().config()["init"], "he");
    assert!(build(json!({"model_type": "cnn"}), 3).network().config().get("init").is_none());
    assert!(ArchConfig::from_json(&json!({"model_type": "mlp", "sizes": [2, 2], "init": "xavier"}), true).is_err());
}

#[test]
fn cifar_resnet_starts_as_its_reference_code() {
    let m = build(json!({"model_type": "cifar_resnet", "depth": 20, "num_labels": 10, "shortcut": "B"}), 4);
    check(&m, "conv1.weight", Expect::Normal(he(27)));
    check(&m, "layer1.0.conv1.weight", Expect::Normal(he(16 * 9)));
    check(&m, "layer2.0.conv1.weight", Expect::Normal(he(16 * 9)));
    check(&m, "layer3.2.conv2.weight", Expect::Normal(he(64 * 9)));
    check(&m, "layer2.0.shortcut.0.weight", Expect::Normal(he(16)));
    check(&m, "linear.weight", Expect::Normal(he(64)));
    check(&m, "linear.bias", Expect::Uniform(fan_bound(64)));
    for bn in ["bn1", "layer1.0.bn1", "layer3.2.bn2", "layer2.0.shortcut.1"] {
        check(&m, &format!("{bn}.weight"), Expect::Const(1.0));
        check(&m, &format!("{bn}.bias"), Expect::Const(0.0));
        check(&m, &format!("{bn}.running_mean"), Expect::Const(0.0));
        check(&m, &format!("{bn}.running_var"), Expect::Const(1.0));
    }
}

#[test]
fn wide_resnet_starts_as_its_reference_code() {
    let m = build(json!({"model_type": "wide_resnet", "depth": 16, "widen_factor": 4, "num_labels": 10}), 5);
    check(&m, "conv1.weight", Expect::Normal(he(16 * 9)));
    check(&m, "block1.layer.0.conv1.weight", Expect::Normal(he(64 * 9)));
    check(&m, "block2.layer.0.conv1.weight", Expect::Normal(he(128 * 9)));
    check(&m, "block2.layer.0.convShortcut.weight", Expect::Normal(he(128)));
    check(&m, "fc.weight", Expect::Uniform(fan_bound(256)));
    check(&m, "fc.bias", Expect::Const(0.0));
    for bn in ["bn1", "block1.layer.0.bn1", "block3.layer.1.bn2"] {
        check(&m, &format!("{bn}.weight"), Expect::Const(1.0));
        check(&m, &format!("{bn}.bias"), Expect::Const(0.0));
    }
}

#[test]
fn vit_starts_as_transformers_vit() {
    let m = build(
        json!({"model_type": "vit", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "intermediate_size": 128, "image_size": 32, "patch_size": 4, "num_labels": 10,
               "initializer_range": 0.05}),
        6,
    );
    let s = 0.05;
    for name in [
        "vit.embeddings.cls_token",
        "vit.embeddings.position_embeddings",
        "vit.embeddings.patch_embeddings.projection.weight",
        "vit.encoder.layer.0.attention.attention.query.weight",
        "vit.encoder.layer.1.attention.output.dense.weight",
        "vit.encoder.layer.1.intermediate.dense.weight",
        "vit.encoder.layer.0.output.dense.weight",
        "classifier.weight",
    ] {
        // The [CLS] token has 64 values: too few for the shape test, enough for the moments.
        check(&m, name, Expect::Normal(s));
    }
    for name in [
        "vit.embeddings.patch_embeddings.projection.bias",
        "vit.encoder.layer.0.attention.attention.key.bias",
        "vit.encoder.layer.1.output.dense.bias",
        "vit.layernorm.bias",
        "classifier.bias",
    ] {
        check(&m, name, Expect::Const(0.0));
    }
    check(&m, "vit.encoder.layer.0.layernorm_before.weight", Expect::Const(1.0));
    check(&m, "vit.layernorm.weight", Expect::Const(1.0));
}

#[test]
fn dinov2_starts_as_transformers_dinov2() {
    let m = build(
        json!({"model_type": "dinov2", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "mlp_ratio": 2, "image_size": 28, "patch_size": 7, "num_labels": 10,
               "initializer_range": 0.05, "layerscale_value": 0.5}),
        7,
    );
    for name in [
        "dinov2.embeddings.cls_token",
        "dinov2.embeddings.position_embeddings",
        "dinov2.embeddings.patch_embeddings.projection.weight",
        "dinov2.encoder.layer.0.attention.attention.query.weight",
        "dinov2.encoder.layer.1.attention.output.dense.weight",
        "dinov2.encoder.layer.1.mlp.fc1.weight",
        "dinov2.encoder.layer.0.mlp.fc2.weight",
        "classifier.weight",
    ] {
        check(&m, name, Expect::Normal(0.05));
    }
    for name in [
        "dinov2.embeddings.mask_token",
        "dinov2.embeddings.patch_embeddings.projection.bias",
        "dinov2.encoder.layer.0.attention.attention.key.bias",
        "dinov2.encoder.layer.1.mlp.fc2.bias",
        "dinov2.layernorm.bias",
        "classifier.bias",
    ] {
        check(&m, name, Expect::Const(0.0));
    }
    check(&m, "dinov2.encoder.layer.0.layer_scale1.lambda1", Expect::Const(0.5));
    check(&m, "dinov2.encoder.layer.1.layer_scale2.lambda1", Expect::Const(0.5));
    check(&m, "dinov2.encoder.layer.0.norm1.weight", Expect::Const(1.0));
    check(&m, "dinov2.layernorm.weight", Expect::Const(1.0));
    assert_eq!(m.params().get("classifier.weight").unwrap().dims(), [10, 128]);
}

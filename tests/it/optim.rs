//! Optimizer settings fine-tuning needs: AdamW's bias correction counted per tensor (checked
//! against the closed form of a first Adam step), saved and restored with the state; parameter
//! groups, layer-wise learning-rate decay, the head's multiplier and no decay on biases and
//! normalization weights (checked against a step written out by hand from the same gradient).

use candle_core::{Device, Tensor};
use samhost::models::registry::{build_model, ArchConfig};
use samhost::models::Model;
use samhost::rng::HostRng;
use samhost::train::grads::{grad_of, GradOptions};
use samhost::train::param_groups::{GroupOptions, GroupSpec, ParamGroups, Prefixes};
use samhost::train::{train_step, AdamW, AdamWConfig, LossFn, Optimizer, Sgd, SgdConfig};
use std::collections::BTreeMap;

fn mlp(seed: u64) -> Model {
    let cfg = ArchConfig::from_json(&serde_json::json!({"model_type": "mlp", "sizes": [6, 5, 3]}), true).unwrap();
    build_model(&cfg, &HostRng::new(seed), &Device::Cpu).unwrap()
}

fn data() -> (Tensor, Tensor) {
    let x = Tensor::from_vec(HostRng::new(8).normal(8 * 6, 0.0, 1.0), (8, 6), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(vec![0u32, 1, 2, 0, 1, 2, 0, 1], 8, &Device::Cpu).unwrap();
    (x, y)
}

fn values(m: &Model) -> BTreeMap<String, Vec<f64>> {
    m.params()
        .all()
        .into_iter()
        .map(|(n, v)| {
            (n, v.as_tensor().flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1().unwrap())
        })
        .collect()
}

fn grad_values(g: &samhost::train::GradOutput, name: &str) -> Vec<f64> {
    g.grads.get(name).unwrap().flatten_all().unwrap().to_dtype(candle_core::DType::F64).unwrap().to_vec1().unwrap()
}

#[test]
fn adamw_bias_correction_is_per_tensor() {
    let (x, y) = data();
    let m = mlp(1);
    let (lr, wd) = (1e-2, 0.1);
    let mut opt = AdamW::new(AdamWConfig { lr, weight_decay: wd, ..AdamWConfig::default() }).unwrap();
    m.params().freeze("fc1.");
    for _ in 0..5 {
        train_step(&m, &mut opt, &x, &y, &LossFn::default(), None).unwrap();
    }
    // fc1 unfrozen after 5 steps: its first step is Adam's first, lr·g/(|g| + eps') ≈ lr·sign(g)
    // with bias correction t = 1 (a global count t = 6 would scale it by (1-b1)/(1-b1^6)·
    // sqrt(1-b2^6)/sqrt(1-b2) ≈ 0.4).
    m.params().unfreeze("fc1.");
    let before = values(&m);
    let g = grad_of(&m, &m.params().trainable(), &x, &y, &LossFn::default(), GradOptions::default()).unwrap();
    train_step(&m, &mut opt, &x, &y, &LossFn::default(), None).unwrap();
    let after = values(&m);
    let eps = 1e-8;
    for name in ["fc1.weight", "fc1.bias"] {
        let gv = grad_values(&g, name);
        for ((w0, w1), gi) in before[name].iter().zip(&after[name]).zip(&gv) {
            // m̂ = g, v̂ = g² at t = 1.
            let want = w0 * (1.0 - lr * wd) - lr * gi / (gi.abs() + eps);
            assert!((w1 - want).abs() <= 1e-6 * (1.0 + want.abs()), "{name}: {w1} vs {want} (g {gi})");
        }
    }
    // The counts travel with the state: a restored optimizer steps exactly as the original.
    let state = opt.state().unwrap();
    assert_eq!(state["step.fc1.weight"].to_vec1::<f64>().unwrap(), [1.0]);
    assert_eq!(state["step.fc2.weight"].to_vec1::<f64>().unwrap(), [6.0]);
    let twin = mlp(1);
    let copies: std::collections::HashMap<String, Tensor> =
        m.params().all().into_iter().map(|(n, v)| (n, v.as_tensor().copy().unwrap())).collect();
    twin.params().assign(&copies, false, "test").unwrap();
    let mut restored = AdamW::new(AdamWConfig { lr, weight_decay: wd, ..AdamWConfig::default() }).unwrap();
    restored.load_state(&state).unwrap();
    train_step(&m, &mut opt, &x, &y, &LossFn::default(), None).unwrap();
    train_step(&twin, &mut restored, &x, &y, &LossFn::default(), None).unwrap();
    assert_eq!(values(&m), values(&twin));
}

#[test]
fn parameter_groups_set_each_tensors_rate_and_decay() {
    let (x, y) = data();
    let m = mlp(2);
    let (lr, wd) = (0.1, 0.01);
    let opts = GroupOptions {
        groups: vec![GroupSpec {
            params: Prefixes::One("fc1.".into()),
            lr: Some(0.02),
            lr_scale: None,
            weight_decay: Some(0.5),
        }],
        no_decay_bias_norm: true,
        layer_decay: None,
        head_lr_scale: Some(3.0),
    };
    let groups = ParamGroups::resolve(&m, lr, wd, &opts).unwrap();
    let mut opt = Sgd::new(SgdConfig { lr, weight_decay: wd, ..SgdConfig::default() }).unwrap().with_groups(groups);
    let before = values(&m);
    let g = grad_of(&m, &m.params().trainable(), &x, &y, &LossFn::default(), GradOptions::default()).unwrap();
    train_step(&m, &mut opt, &x, &y, &LossFn::default(), None).unwrap();
    let after = values(&m);
    // (rate multiplier, weight decay) written out: fc1 is the group (lr 0.02 = 0.2x, wd 0.5; its
    // bias no decay), fc2 the head (3x, wd 0.01; its bias no decay).
    for (name, scale, decay) in
        [("fc1.weight", 0.2, 0.5), ("fc1.bias", 0.2, 0.0), ("fc2.weight", 3.0, wd), ("fc2.bias", 3.0, 0.0)]
    {
        let gv = grad_values(&g, name);
        for ((w0, w1), gi) in before[name].iter().zip(&after[name]).zip(&gv) {
            let want = w0 - lr * scale * (gi + decay * w0);
            assert!((w1 - want).abs() <= 1e-6, "{name}: {w1} vs {want}");
        }
    }
    let bad = GroupOptions {
        groups: vec![GroupSpec {
            params: Prefixes::One("nothing.".into()),
            lr: None,
            lr_scale: Some(2.0),
            weight_decay: None,
        }],
        ..GroupOptions::default()
    };
    let e = ParamGroups::resolve(&m, lr, wd, &bad).unwrap_err().to_string();
    assert!(e.contains("no parameter of the model starts with"), "{e}");
    let e = ParamGroups::resolve(&m, lr, wd, &GroupOptions { layer_decay: Some(0.7), ..GroupOptions::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("layer_decay needs a transformer"), "{e}");
}

#[test]
fn layer_decay_scales_a_vits_layers() {
    let cfg = ArchConfig::from_json(
        &serde_json::json!({"model_type": "vit", "hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2,
                            "intermediate_size": 16, "image_size": 4, "patch_size": 2, "num_labels": 3}),
        true,
    )
    .unwrap();
    let m = build_model(&cfg, &HostRng::new(1), &Device::Cpu).unwrap();
    let opts = GroupOptions { layer_decay: Some(0.5), head_lr_scale: Some(10.0), ..GroupOptions::default() };
    let g = ParamGroups::resolve(&m, 1e-3, 0.05, &opts).unwrap();
    for (name, want) in [
        ("vit.embeddings.patch_embeddings.projection.weight", 0.125),
        ("vit.embeddings.cls_token", 0.125),
        ("vit.encoder.layer.0.attention.attention.query.weight", 0.25),
        ("vit.encoder.layer.1.output.dense.bias", 0.5),
        ("vit.layernorm.weight", 1.0),
        ("classifier.weight", 10.0),
    ] {
        assert_eq!(g.get(name, 0.05).lr_scale, want, "{name}");
        assert_eq!(g.get(name, 0.05).weight_decay, 0.05, "{name}");
    }
}

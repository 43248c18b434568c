//! Architectures: every trainable tensor gets a gradient, published parameter counts, train and
//! eval modes, seeded dropout, the ViT's patch embedding and layer norm against candle's own.

use crate::common::*;
use candle_core::{DType, Device, Module, Tensor};
use samhost::models::init::seeded_var_builder;
use samhost::models::registry::{self, build_model, count_parameters, ArchConfig};
use samhost::models::vit::{Vit, VitConfig};
use samhost::models::{layers, Model, Precision};
use samhost::rng::HostRng;
use samhost::train::grads::gradients;
use samhost::train::loss::cross_entropy;
use serde_json::json;

fn cfg(v: serde_json::Value) -> ArchConfig {
    ArchConfig::from_json(&v, true).expect("a valid config")
}

fn input(rng: &HostRng, dims: &[usize], device: &Device) -> Tensor {
    let n: usize = dims.iter().product();
    Tensor::from_vec(rng.normal(n, 0.0, 1.0), dims, device).unwrap()
}

fn labels(n: usize, classes: usize, device: &Device) -> Tensor {
    Tensor::from_vec((0..n).map(|i| (i % classes) as u32).collect::<Vec<_>>(), n, device).unwrap()
}

/// Builds the model on `device`, runs a training-mode forward and backward in f32 and in bf16
/// mixed precision, and checks that every trainable tensor (all of them but the buffers) gets a
/// finite, non-zero f32 gradient both times.
fn assert_all_gradients(c: ArchConfig, x_dims: &[usize], device: &Device) -> Model {
    let rng = HostRng::new(3);
    let m = build_model(&c, &rng, device).unwrap();
    let classes = c.num_classes().unwrap();
    let x = input(&rng, x_dims, device);
    for precision in [Precision::F32, Precision::Bf16] {
        m.set_precision(precision);
        let logits = m.forward_t(&x, true).unwrap();
        assert_eq!(logits.dims(), [x_dims[0], classes]);
        assert_eq!(logits.dtype(), DType::F32);
        let loss = cross_entropy(&logits, &labels(x_dims[0], classes, device), 0.0).unwrap();
        let params = m.params().trainable();
        let non_buffers = m.params().all().iter().filter(|(n, _)| !samhost::models::is_buffer(n)).count();
        assert_eq!(params.len(), non_buffers);
        let grads = gradients(&loss, &params).unwrap();
        if precision == Precision::F32 {
            // The gradients the custom ops hand over directly equal those candle's own store
            // collects when nothing captures them.
            let store = loss.backward().unwrap();
            for ((name, v), g) in params.iter().zip(&grads) {
                let plain = store.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient in candle's store"));
                let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_eq!(flat(plain), flat(g), "{name}: captured and stored gradients differ");
            }
        }
        for ((name, _), g) in params.iter().zip(&grads) {
            assert_eq!(g.dtype(), DType::F32, "{name}: gradients of the f32 master weights are f32");
            let s = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            let arch = c.model_type();
            assert!(s.is_finite() && s > 0.0, "{arch} {precision}: tensor `{name}` got no gradient (|g| sum {s})");
        }
    }
    m.set_precision(Precision::F32);
    m
}

fn mlp_all_tensors_get_gradients(device: &Device) {
    assert_all_gradients(cfg(json!({"model_type": "mlp", "sizes": [12, 8, 3]})), &[4, 3, 2, 2], device);
}
test_device!(mlp_all_tensors_get_gradients, mlp_gradients_cpu, mlp_gradients_cuda);

fn cnn_all_tensors_get_gradients(device: &Device) {
    // 12 -> 6 -> 3 -> 1: the last pooling drops a row and a column.
    let c = cfg(json!({"model_type": "cnn", "channels": [4, 6, 8], "hidden": 10, "classes": 3, "input": [2, 12, 12]}));
    assert_all_gradients(c, &[4, 2, 12, 12], device);
}
test_device!(cnn_all_tensors_get_gradients, cnn_gradients_cpu, cnn_gradients_cuda);

fn resnet_all_tensors_get_gradients(device: &Device) {
    let a = cfg(json!({"model_type": "cifar_resnet", "depth": 8, "num_labels": 3}));
    assert_all_gradients(a, &[3, 3, 8, 8], device);
    let b = cfg(json!({"model_type": "cifar_resnet", "depth": 8, "num_labels": 3, "shortcut": "B"}));
    let m = assert_all_gradients(b, &[3, 3, 7, 7], device);
    assert!(m.params().get("layer2.0.shortcut.0.weight").is_some());
}
test_device!(resnet_all_tensors_get_gradients, resnet_gradients_cpu, resnet_gradients_cuda);

fn wide_resnet_all_tensors_get_gradients(device: &Device) {
    let c = cfg(json!({"model_type": "wide_resnet", "depth": 10, "widen_factor": 1, "num_labels": 3, "dropout": 0.2}));
    let m = assert_all_gradients(c, &[3, 3, 8, 8], device);
    for name in
        ["conv1.weight", "block1.layer.0.bn1.weight", "block2.layer.0.convShortcut.weight", "bn1.bias", "fc.weight"]
    {
        assert!(m.params().get(name).is_some(), "{name}");
    }
    // Width 1: the first group keeps 16 channels, so it has no shortcut convolution.
    assert!(m.params().get("block1.layer.0.convShortcut.weight").is_none());
}
test_device!(wide_resnet_all_tensors_get_gradients, wide_resnet_gradients_cpu, wide_resnet_gradients_cuda);

fn tiny_vit(extra: serde_json::Value) -> serde_json::Value {
    let mut v = json!({
        "model_type": "vit", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 24, "image_size": 8, "patch_size": 4, "num_channels": 3, "num_labels": 3
    });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

fn vit_all_tensors_get_gradients(device: &Device) {
    let c = cfg(tiny_vit(json!({"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1})));
    let m = assert_all_gradients(c, &[2, 3, 8, 8], device);
    let names: Vec<String> = m.params().all().into_iter().map(|(n, _)| n).collect();
    for name in [
        "vit.embeddings.cls_token",
        "vit.embeddings.position_embeddings",
        "vit.embeddings.patch_embeddings.projection.weight",
        "vit.encoder.layer.1.attention.attention.query.bias",
        "vit.encoder.layer.0.attention.output.dense.weight",
        "vit.encoder.layer.0.intermediate.dense.weight",
        "vit.encoder.layer.0.output.dense.bias",
        "vit.encoder.layer.0.layernorm_before.weight",
        "vit.encoder.layer.0.layernorm_after.bias",
        "vit.layernorm.weight",
        "classifier.weight",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} missing from {names:?}");
    }
    assert_eq!(names.len(), 4 + 16 * 2 + 2 + 2);
    // Non-square images and patches, no qkv bias, the tanh GELU.
    let c = cfg(tiny_vit(
        json!({"image_size": [8, 12], "patch_size": [4, 6], "qkv_bias": false, "hidden_act": "gelu_new"}),
    ));
    let m = assert_all_gradients(c, &[2, 3, 8, 12], device);
    assert!(m.params().get("vit.encoder.layer.0.attention.attention.key.bias").is_none());
}
test_device!(vit_all_tensors_get_gradients, vit_gradients_cpu, vit_gradients_cuda);

#[test]
fn parameter_counts_match_the_papers() {
    // (config, exact count of this implementation, published figure, its significant digits)
    for (name, exact, published, digits) in [
        ("resnet20", 269_722, 0.27e6, 2),
        ("resnet32", 464_154, 0.46e6, 2),
        ("resnet110", 1_727_962, 1.7e6, 2),
        ("wrn-16-8", 10_961_370, 11.0e6, 3),
        ("wrn-28-10", 36_479_194, 36.5e6, 3),
        ("vit-b16", 86_567_656, 86.6e6, 3),
    ] {
        let c = ArchConfig::from_json(&registry::resolve_config(name).unwrap(), true).unwrap();
        let n = count_parameters(&c).unwrap();
        assert_eq!(n, exact, "{name}");
        // Within 1% of the published figure, or equal to it at the precision it was published
        // with: He et al.'s "1.7M" for ResNet-110 is 1.73M rounded (1.6% away).
        let rel = (n as f64 - published).abs() / published;
        let scale = 10f64.powi(published.log10().floor() as i32 + 1 - digits);
        let rounded = (n as f64 / scale).round() * scale;
        assert!(
            rel < 0.01 || (rounded - published).abs() < scale * 1e-6,
            "{name}: {n} parameters, published {published} ({:.2}% off)",
            rel * 100.0
        );
    }
    // The count without building equals the built model's.
    let rng = HostRng::new(0);
    for c in [
        cfg(json!({"model_type": "cifar_resnet", "depth": 20, "num_labels": 10})),
        cfg(json!({"model_type": "wide_resnet", "depth": 10, "widen_factor": 2, "num_labels": 10})),
        cfg(json!({"model_type": "cnn"})),
        cfg(tiny_vit(json!({}))),
    ] {
        let m = build_model(&c, &rng, &Device::Cpu).unwrap();
        assert_eq!(m.params().num_parameters(), count_parameters(&c).unwrap(), "{}", c.model_type());
    }
}

#[test]
fn batch_norm_updates_running_stats_only_in_training() {
    let c = cfg(json!({"model_type": "cifar_resnet", "depth": 8, "num_labels": 3}));
    let rng = HostRng::new(5);
    let m = build_model(&c, &rng, &Device::Cpu).unwrap();
    let x = input(&rng, &[4, 3, 8, 8], &Device::Cpu);
    let mean = || m.params().get("bn1.running_mean").unwrap().as_tensor().to_vec1::<f32>().unwrap();
    let before = mean();
    m.set_training(false);
    let a = m.forward(&x).unwrap();
    assert_eq!(mean(), before, "eval mode leaves running stats alone");
    let b = m.forward(&x).unwrap();
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    m.set_training(true);
    m.forward(&x).unwrap();
    assert_ne!(mean(), before, "training mode updates running stats");
}

#[test]
fn dropout_is_seeded_and_off_in_eval() {
    let c = cfg(json!({"model_type": "wide_resnet", "depth": 10, "widen_factor": 1, "num_labels": 3, "dropout": 0.5}));
    let run = |seed| {
        let rng = HostRng::new(seed);
        let m = build_model(&c, &rng, &Device::Cpu).unwrap();
        let x = input(&HostRng::new(9), &[2, 3, 8, 8], &Device::Cpu);
        let t1 = m.forward_t(&x, true).unwrap().to_vec2::<f32>().unwrap();
        let t2 = m.forward_t(&x, true).unwrap().to_vec2::<f32>().unwrap();
        let e1 = m.forward_t(&x, false).unwrap().to_vec2::<f32>().unwrap();
        let e2 = m.forward_t(&x, false).unwrap().to_vec2::<f32>().unwrap();
        assert_ne!(t1, t2, "two training passes draw different masks");
        assert_eq!(e1, e2, "evaluation is deterministic");
        (t1, t2)
    };
    assert_eq!(run(11), run(11), "the same seed gives the same masks");
}

#[test]
fn vit_patch_embedding_equals_a_strided_convolution() {
    let c: VitConfig = serde_json::from_value(tiny_vit(json!({}))).unwrap();
    let rng = HostRng::new(2);
    let varmap = candle_nn::VarMap::new();
    let vit = Vit::build(&c, seeded_var_builder(&varmap, &rng, &Device::Cpu), &rng).unwrap();
    let x = input(&rng, &[2, 3, 8, 8], &Device::Cpu);
    let data = varmap.data().lock().unwrap();
    let w = data["vit.embeddings.patch_embeddings.projection.weight"].as_tensor().clone();
    let b = data["vit.embeddings.patch_embeddings.projection.bias"].as_tensor().clone();
    // Hugging Face: Conv2d(kernel = stride = patch), flatten(2), transpose(1, 2).
    let want = x
        .conv2d(&w, 0, 4, 1, 1)
        .unwrap()
        .broadcast_add(&b.reshape((16, 1, 1)).unwrap())
        .unwrap()
        .flatten_from(2)
        .unwrap()
        .transpose(1, 2)
        .unwrap();
    let got = vit.embed_patches(&x).unwrap();
    assert_eq!(got.dims(), [2, 4, 16]);
    let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-5, "patch embedding differs from conv2d by {diff}");
}

#[test]
fn layer_norm_matches_candles_fused_kernel() {
    let rng = HostRng::new(4);
    let varmap = candle_nn::VarMap::new();
    let vb = seeded_var_builder(&varmap, &rng, &Device::Cpu);
    let ln = layers::LayerNorm::new(6, 1e-12, vb).unwrap();
    let x = input(&rng, &[3, 5, 6], &Device::Cpu);
    let ones = Tensor::ones(6, DType::F32, &Device::Cpu).unwrap();
    let zeros = Tensor::zeros(6, DType::F32, &Device::Cpu).unwrap();
    let fused = candle_nn::ops::layer_norm(&x, &ones, &zeros, 1e-12).unwrap();
    let ours = ln.forward(&x).unwrap();
    let diff = (ours - fused).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-5, "layer norm differs by {diff}");
}

/// Windows with ties (common in bf16) send the gradient to one input each, in f32 and bf16.
fn max_pool_ties_get_one_gradient(device: &Device) {
    for dtype in [DType::F32, DType::BF16] {
        let x = Tensor::from_vec(vec![2f32, 2., 2., 2., 1., 3., 3., 0.], (1, 2, 2, 2), device).unwrap();
        let x = candle_core::Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
        let y = samhost::ops::max_pool2(x.as_tensor()).unwrap();
        let yv = y.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(yv, [2.0, 3.0], "{dtype:?}");
        let g = y.to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let gx = gx.to_vec1::<f32>().unwrap();
        assert_eq!(gx.iter().sum::<f32>(), 2.0, "{dtype:?}: one unit of gradient per window, got {gx:?}");
        assert_eq!(gx.iter().filter(|&&v| v == 1.0).count(), 2, "{dtype:?}: {gx:?}");
    }
}
test_device!(max_pool_ties_get_one_gradient, max_pool_ties_cpu, max_pool_ties_cuda);

#[test]
fn max_pool_backward_is_exact_on_odd_sizes() {
    // A 3x3 map: PyTorch's 2x2 pooling sees only the top-left 2x2 window.
    let x = candle_core::Var::from_tensor(
        &Tensor::from_vec(vec![1f32, 5., 9., 2., 3., 8., 7., 6., 4.], (1, 1, 3, 3), &Device::Cpu).unwrap(),
    )
    .unwrap();
    let y = samhost::ops::max_pool2(x.as_tensor()).unwrap();
    assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), [5.0]);
    let g = y.sum_all().unwrap().backward().unwrap();
    let gx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(gx, [0., 1., 0., 0., 0., 0., 0., 0., 0.]);
}

#[test]
fn script_constructors_and_named_configs() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "m.rhai",
        r#"
let x = randn([2, 3, 32, 32]);
if resnet(20, 10).num_parameters() != 269722 { throw "resnet20"; }
if resnet(8, 4, #{ shortcut: "B" }).forward(x).shape != [2, 4] { throw "resnet B"; }
let w = wide_resnet(10, 1, 5, #{ dropout: 0.3 });
if w.forward(x).shape != [2, 5] { throw "wrn"; }
if cnn(#{ channels: [4], hidden: 8, classes: 3 }).forward(x).shape != [2, 3] { throw "cnn"; }
let v = vit(#{ hidden_size: 16, num_hidden_layers: 1, num_attention_heads: 2, intermediate_size: 16,
               image_size: 32, patch_size: 8, num_labels: 7 });
if v.forward(x).shape != [2, 7] { throw "vit"; }
if v.model_config().model_type != "vit" { throw "model_config"; }
let r = model("resnet20", #{ num_labels: 100 });
if r.forward(x).shape != [2, 100] { throw "model(name, overrides)"; }
if v.freeze("vit.") == 0 || v.num_trainable_parameters() != 16 * 7 + 7 { throw "freeze"; }
v.unfreeze("vit.encoder");
if v.num_trainable_parameters() <= 16 * 7 + 7 { throw "unfreeze"; }
print("ok");
"#,
    );
    let o = run_in(dir.path(), &["run", "m.rhai", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    write(dir.path(), "bad.rhai", "vit(#{ hidden_sise: 16 });");
    let o = run_in(dir.path(), &["run", "bad.rhai", "--quiet"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("hidden_sise"), "{}", stderr(&o));
    write(dir.path(), "bad2.rhai", "model(\"resnet21\");");
    let o = run_in(dir.path(), &["run", "bad2.rhai", "--quiet"]);
    assert!(stderr(&o).contains("resnet20"), "the error lists the built-in names: {}", stderr(&o));
    write(dir.path(), "bad3.rhai", "resnet(21, 10);");
    let o = run_in(dir.path(), &["run", "bad3.rhai", "--quiet"]);
    assert!(stderr(&o).contains("6n+2"), "{}", stderr(&o));
}

#[test]
fn batch_norm_matches_candle_nn() {
    use candle_nn::ModuleT;
    let rng = HostRng::new(6);
    let x = input(&rng, &[4, 3, 5, 5], &Device::Cpu).affine(2.0, 1.0).unwrap();
    let ours_map = candle_nn::VarMap::new();
    let ours = layers::batch_norm(3, seeded_var_builder(&ours_map, &rng, &Device::Cpu)).unwrap();
    let theirs_map = candle_nn::VarMap::new();
    let cfg = candle_nn::BatchNormConfig { eps: 1e-5, remove_mean: true, affine: true, momentum: 0.1 };
    let theirs = candle_nn::batch_norm(3, cfg, seeded_var_builder(&theirs_map, &rng, &Device::Cpu)).unwrap();
    let close = |a: &Tensor, b: &Tensor, what: &str| {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-5, "{what}: differs by {d}");
    };
    for train in [true, true, false] {
        close(&ours.forward_t(&x, train).unwrap(), &theirs.forward_t(&x, train).unwrap(), &format!("train={train}"));
    }
    let stat = |m: &candle_nn::VarMap, n: &str| m.data().lock().unwrap()[n].as_tensor().clone();
    close(&stat(&ours_map, "running_var"), &stat(&theirs_map, "running_var"), "running_var");
    close(&stat(&ours_map, "running_mean"), &stat(&theirs_map, "running_mean"), "running_mean");
}

#[test]
fn fused_batch_norm_matches_elementary_ops_with_gradients() {
    let rng = HostRng::new(12);
    let varmap = candle_nn::VarMap::new();
    let b = layers::batch_norm(4, seeded_var_builder(&varmap, &rng, &Device::Cpu)).unwrap();
    // Weight and bias away from 1 and 0.
    for (name, v) in varmap.data().lock().unwrap().iter() {
        if name == "weight" || name == "bias" {
            v.set(&input(&rng, &[4], &Device::Cpu)).unwrap();
        }
    }
    let diff = |a: &Tensor, b: &Tensor| {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
            / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6)
    };
    // A small batch, and one with 2,304 values per channel; without and with the fused ReLU.
    for (dims, relu) in [([3, 4, 5, 5], false), ([3, 4, 5, 5], true), ([16, 4, 12, 12], false), ([16, 4, 12, 12], true)]
    {
        let case = format!("{dims:?} relu {relu}");
        let x = candle_core::Var::from_tensor(&input(&rng, &dims, &Device::Cpu).affine(1.5, 0.3).unwrap()).unwrap();
        let r = input(&rng, &dims, &Device::Cpu);
        let fused = b.forward_act(x.as_tensor(), true, relu).unwrap();
        let (plain, _, _) = b.forward_train_unfused(x.as_tensor()).unwrap();
        let plain = if relu { plain.relu().unwrap() } else { plain };
        assert!(diff(&fused, &plain) < 1e-5, "{case}: outputs differ");
        let gf = (fused * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (plain * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let data = varmap.data().lock().unwrap();
        for (what, t) in
            [("x", x.as_tensor()), ("weight", data["weight"].as_tensor()), ("bias", data["bias"].as_tensor())]
        {
            let d = diff(gf.get(t).unwrap(), gp.get(t).unwrap());
            assert!(d < 1e-4, "{case}: gradient of {what} differs by {d} (relative)");
        }
    }
}

#[test]
fn fused_transformer_ops_match_elementary_ops_with_gradients() {
    use samhost::ops as fused;
    let rng = HostRng::new(21);
    let rel = |a: &Tensor, b: &Tensor| {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
            / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6)
    };
    let var = |dims: &[usize], scale: f64| {
        candle_core::Var::from_tensor(&input(&rng, dims, &Device::Cpu).affine(scale, 0.1).unwrap()).unwrap()
    };
    let x = var(&[3, 5, 7], 3.0);
    let w = var(&[7], 1.0);
    let b = var(&[7], 1.0);
    let r = input(&rng, &[3, 5, 7], &Device::Cpu);
    type Pair = (Box<dyn Fn() -> Tensor>, Box<dyn Fn() -> Tensor>);
    let (xt, wt, bt) = (x.as_tensor().clone(), w.as_tensor().clone(), b.as_tensor().clone());
    let cases: Vec<(&str, Pair)> = vec![
        (
            "gelu",
            (
                Box::new({
                    let x = xt.clone();
                    move || fused::gelu_erf(&x).unwrap()
                }),
                Box::new({
                    let x = xt.clone();
                    move || x.gelu_erf().unwrap()
                }),
            ),
        ),
        (
            "softmax",
            (
                Box::new({
                    let x = xt.clone();
                    move || fused::softmax_last(&x).unwrap()
                }),
                Box::new({
                    let x = xt.clone();
                    move || candle_nn::ops::softmax(&x, candle_core::D::Minus1).unwrap()
                }),
            ),
        ),
        (
            "layer_norm",
            (
                Box::new({
                    let (x, w, b) = (xt.clone(), wt.clone(), bt.clone());
                    move || fused::layer_norm(&x, &w, &b, 1e-5).unwrap()
                }),
                Box::new({
                    let (x, w, b) = (xt.clone(), wt.clone(), bt.clone());
                    move || fused::layer_norm_ops(&x, &w, &b, 1e-5).unwrap()
                }),
            ),
        ),
    ];
    for (name, (fast, slow)) in cases {
        let (yf, ys) = (fast(), slow());
        assert!(rel(&yf, &ys) < 1e-5, "{name}: outputs differ by {}", rel(&yf, &ys));
        let gf = (yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gs = (ys * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for (what, t) in [("x", &xt), ("weight", &wt), ("bias", &bt)] {
            match (gf.get(t), gs.get(t)) {
                (Some(a), Some(b)) => assert!(rel(a, b) < 1e-4, "{name}: gradient of {what} differs by {}", rel(a, b)),
                (None, None) => {}
                _ => panic!("{name}: gradient of {what} present on one side only"),
            }
        }
    }
}

//! Models from the script: `sequential`, `residual` and forward closures rebuild the built-in
//! architectures with the same weights and give their logits (1e-6) and gradients (1e-5); a
//! state dict in PyTorch's nn.Sequential layout loads and gives the logits of a float64
//! computation written here; the pooling that is composed from strided views matches loops and
//! finite differences.

use crate::common::repo;
use candle_core::{DType, Device, Tensor};
use samhost::models::Model;
use samhost::session::Session;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

/// Evaluates `script` beside scripts/ (so `import "lib/models"` resolves) and returns the
/// models of the array it ends with.
fn models(script: &str) -> Vec<Model> {
    let path = repo().join("scripts").join("compose_test.rhai");
    let engine = samhost::script::build_engine(&Rc::new(Session::cpu_for(&path)));
    let out: rhai::Array = engine.eval(script).unwrap_or_else(|e| panic!("script failed: {e}\n{script}"));
    out.into_iter().map(|d| d.try_cast::<Model>().expect("the script returns models")).collect()
}

/// Copies the tensors of `from` into `to`, renamed by `rename`; every tensor of `to` is set.
fn copy_weights(from: &Model, to: &Model, rename: impl Fn(&str) -> String) {
    let tensors: HashMap<String, Tensor> =
        from.params().snapshot().unwrap().into_iter().map(|(n, t)| (rename(&n), t)).collect();
    to.params().assign(&tensors, false, "copy").unwrap();
}

fn values(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap()
}

/// The logits and, by parameter name, the cross-entropy gradients of a pass in `train` mode.
fn pass(m: &Model, x: &Tensor, y: &Tensor, train: bool) -> (Vec<f64>, BTreeMap<String, Vec<f64>>) {
    let params = m.params().trainable();
    let logits = m.forward_t(x, train).unwrap();
    let loss = samhost::train::loss::cross_entropy(&logits, y, 0.0).unwrap();
    let grads = samhost::train::grads::gradients(&loss, &params).unwrap();
    let grads = params.iter().zip(&grads).map(|((n, _), g)| (n.clone(), values(g))).collect();
    (values(&logits), grads)
}

/// Max |a - b| over max |b|.
fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// `script`'s model (second) on the weights of the built-in (first) gives its logits and
/// gradients, in training and evaluation mode, and every parameter gets a gradient.
fn assert_same_network(what: &str, ms: &[Model], rename: impl Fn(&str) -> String, x: &Tensor, y: &Tensor) {
    let (builtin, composed) = (&ms[0], &ms[1]);
    copy_weights(builtin, composed, &rename);
    for train in [true, false] {
        let (la, ga) = pass(builtin, x, y, train);
        let (lb, gb) = pass(composed, x, y, train);
        let r = rel(&lb, &la);
        assert!(r <= 1e-6, "{what} (train {train}): logits differ by {r:e}");
        assert_eq!(ga.len(), gb.len(), "{what}: the same number of trainable tensors");
        for (name, g) in &ga {
            let other = &gb[&rename(name)];
            let r = rel(other, g);
            assert!(r <= 1e-5, "{what} (train {train}): the gradient of {name} differs by {r:e}");
            if train {
                assert!(other.iter().any(|v| *v != 0.0), "{what}: {} gets no gradient", rename(name));
            }
        }
    }
    // Training-mode passes moved the running statistics of both alike.
    let (a, b) = (builtin.params().snapshot().unwrap(), composed.params().snapshot().unwrap());
    for (name, t) in &a {
        let r = rel(&values(&b[&rename(name)]), &values(t));
        assert!(r <= 1e-6, "{what}: {name} after the passes differs by {r:e}");
    }
}

fn images(n: usize, c: usize, h: usize, seed: u64) -> Tensor {
    let rng = samhost::rng::HostRng::new(seed);
    Tensor::from_vec(rng.normal(n * c * h * h, 0.0, 1.0), (n, c, h, h), &Device::Cpu).unwrap()
}

fn labels(v: &[u32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).unwrap()
}

#[test]
fn a_sequential_cnn_is_the_builtin_cnn() {
    let ms = models(
        r#"import "lib/models" as arch;
        [cnn(#{ channels: [8, 16], hidden: 32, classes: 5, input: [3, 16, 16] }),
         arch::small_cnn([3, 16, 16], [8, 16], 32, 5)]"#,
    );
    let names = ms[1].params().all().into_iter().map(|(n, _)| n).collect::<Vec<_>>();
    assert_eq!(names, ["0.bias", "0.weight", "3.bias", "3.weight", "7.bias", "7.weight", "9.bias", "9.weight"]);
    let rename = |n: &str| {
        let (module, leaf) = n.split_once('.').unwrap();
        let i = match module {
            "conv1" => 0,
            "conv2" => 3,
            "fc" => 7,
            _ => 9,
        };
        format!("{i}.{leaf}")
    };
    assert_same_network("cnn", &ms, rename, &images(4, 3, 16, 1), &labels(&[0, 1, 4, 2]));
    assert_eq!(ms[1].head(), Some(("9.", 5)), "the last linear layer is the head");
}

/// The sequence index of the built-in ResNet's tensor `name` in `arch::cifar_resnet`.
fn resnet_name(name: &str, blocks_per_stage: usize) -> String {
    let parts: Vec<&str> = name.split('.').collect();
    match parts[0] {
        "conv1" => format!("0.{}", parts[1]),
        "bn1" => format!("1.{}", parts[1]),
        "linear" => format!("{}.{}", 3 + 2 * 3 * blocks_per_stage + 2, parts[1]),
        stage => {
            let s: usize = stage.trim_start_matches("layer").parse().unwrap();
            let i: usize = parts[1].parse().unwrap();
            let index = 3 + 2 * ((s - 1) * blocks_per_stage + i);
            let inner = match parts[2] {
                "conv1" => "0".to_string(),
                "bn1" => "1".to_string(),
                "conv2" => "3".to_string(),
                "bn2" => "4".to_string(),
                "shortcut" => format!("shortcut.{}", parts[3]),
                other => panic!("unexpected {other}"),
            };
            let leaf = parts.last().unwrap();
            format!("{index}.{inner}.{leaf}")
        }
    }
}

#[test]
fn a_sequential_resnet20_is_the_builtin_resnet20() {
    let x = images(4, 3, 16, 2);
    let y = labels(&[3, 1, 0, 9]);
    let ms = models(r#"import "lib/models" as arch; [resnet(20, 10), arch::cifar_resnet(20, 10, "pad")]"#);
    assert_same_network("resnet20 (option A)", &ms, |n| resnet_name(n, 3), &x, &y);
    let ms = models(
        r#"import "lib/models" as arch; [resnet(20, 10, #{ shortcut: "B" }), arch::cifar_resnet(20, 10, "conv")]"#,
    );
    assert!(ms[1].params().get("9.shortcut.1.running_var").is_some(), "projection tensors under shortcut.");
    assert_same_network("resnet20 (option B)", &ms, |n| resnet_name(n, 3), &x, &y);
}

#[test]
fn a_forward_closure_model_is_the_builtin_cnn() {
    let ms = models(
        r#"let net = model(#{
            layers: #{ conv1: conv2d(3, 8, 3, #{ padding: 1 }), conv2: conv2d(8, 16, 3, #{ padding: 1 }),
                       fc: linear(16 * 4 * 4, 32), classifier: linear(32, 5) },
            forward: |x| {
                let h = max_pool2d(relu(this.conv1.forward(x)), 2);
                h = max_pool2d(relu(this.conv2.forward(h)), 2);
                this.classifier.forward(relu(this.fc.forward(flatten(h, 1))))
            }
        });
        [cnn(#{ channels: [8, 16], hidden: 32, classes: 5, input: [3, 16, 16] }), net]"#,
    );
    assert_same_network("closure cnn", &ms, |n| n.to_string(), &images(4, 3, 16, 3), &labels(&[0, 1, 4, 2]));
}

#[test]
fn a_forward_closure_names_lists_maps_and_nested_sequences_as_pytorch() {
    let ms = models(
        r#"let scale = 0.5;
        fn double(t) { t * 2.0 }
        let net = model(#{
            layers: #{ stem: sequential([conv2d(1, 4, 3, #{ padding: 1 }), batch_norm2d(4), relu()]),
                       blocks: [arch_block(4), arch_block(4)],
                       heads: #{ main: linear(4, 3) } },
            forward: |x| {
                let h = this.stem.forward(x);
                for b in this.blocks { h = relu(b.forward(h)); }
                double(this.heads.main.forward(flatten(avg_pool2d(h, 4), 1))) * scale
            }
        });
        fn arch_block(c) { residual([conv2d(c, c, 3, #{ padding: 1, bias: false }), batch_norm2d(c)]) }
        [net]"#,
    );
    let m = &ms[0];
    let names: Vec<String> = m.params().all().into_iter().map(|(n, _)| n).collect();
    for expected in
        ["stem.0.weight", "stem.1.running_mean", "blocks.0.0.weight", "blocks.1.1.bias", "heads.main.weight"]
    {
        assert!(names.iter().any(|n| n == expected), "{expected} in {names:?}");
    }
    let (_, grads) = pass(m, &images(2, 1, 4, 4), &labels(&[0, 2]), true);
    for (name, g) in &grads {
        assert!(g.iter().any(|v| *v != 0.0), "{name} gets no gradient");
    }
}

/// A deterministic value per index.
fn wave(n: usize, phase: f64) -> Vec<f32> {
    (0..n).map(|i| ((i as f64 * 0.7 + phase).sin() * 0.5) as f32).collect()
}

#[test]
fn a_pytorch_sequential_state_dict_loads_and_gives_its_logits() {
    // nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
    //               nn.Flatten(), nn.Linear(16, 3)): the tensors of its state_dict().
    let dir = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let t = |v: Vec<f32>, s: &[usize]| Tensor::from_vec(v, s, &dev).unwrap();
    let mut sd = BTreeMap::new();
    sd.insert("0.weight".to_string(), t(wave(72, 0.1), &[4, 2, 3, 3]));
    sd.insert("0.bias".to_string(), t(wave(4, 0.2), &[4]));
    sd.insert("1.weight".to_string(), t(wave(4, 0.3).iter().map(|v| v + 1.0).collect(), &[4]));
    sd.insert("1.bias".to_string(), t(wave(4, 0.4), &[4]));
    sd.insert("1.running_mean".to_string(), t(wave(4, 0.5), &[4]));
    sd.insert("1.running_var".to_string(), t(wave(4, 0.6).iter().map(|v| v + 1.0).collect(), &[4]));
    sd.insert("1.num_batches_tracked".to_string(), Tensor::new(7i64, &dev).unwrap());
    sd.insert("5.weight".to_string(), t(wave(48, 0.7), &[3, 16]));
    sd.insert("5.bias".to_string(), t(wave(3, 0.8), &[3]));
    let path = dir.path().join("torch.safetensors");
    samhost::models::params::save_safetensors(&path, &sd).unwrap();

    let x = wave(2 * 2 * 4 * 4, 0.9);
    let ms = models(&format!(
        r#"let m = sequential([conv2d(2, 4, 3, #{{ padding: 1 }}), batch_norm2d(4), relu(), max_pool2d(2), flatten(),
                                linear(16, 3)]);
        m.load("{}");
        m.eval_mode();
        [m]"#,
        path.display()
    ));
    let logits = values(&ms[0].forward(&t(x.clone(), &[2, 2, 4, 4])).unwrap());

    // The same network in float64, written out.
    let f = |k: &str| values(&sd[k]);
    let (w, b, g, beta, mean, var, lw, lb) = (
        f("0.weight"),
        f("0.bias"),
        f("1.weight"),
        f("1.bias"),
        f("1.running_mean"),
        f("1.running_var"),
        f("5.weight"),
        f("5.bias"),
    );
    let x: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let mut expected = Vec::new();
    for n in 0..2 {
        let mut feat = [0f64; 16];
        for o in 0..4 {
            let mut map = [[0f64; 4]; 4];
            for (i, row) in map.iter_mut().enumerate() {
                for (j, cell) in row.iter_mut().enumerate() {
                    let mut s = b[o];
                    for c in 0..2 {
                        for di in 0..3 {
                            for dj in 0..3 {
                                let (ii, jj) = (i as i64 + di as i64 - 1, j as i64 + dj as i64 - 1);
                                if (0..4).contains(&ii) && (0..4).contains(&jj) {
                                    s += w[((o * 2 + c) * 3 + di) * 3 + dj]
                                        * x[((n * 2 + c) * 4 + ii as usize) * 4 + jj as usize];
                                }
                            }
                        }
                    }
                    let bn = (s - mean[o]) / (var[o] + 1e-5).sqrt() * g[o] + beta[o];
                    *cell = bn.max(0.0);
                }
            }
            for pi in 0..2 {
                for pj in 0..2 {
                    let m = (0..2)
                        .flat_map(|a| (0..2).map(move |c| (a, c)))
                        .map(|(a, c)| map[2 * pi + a][2 * pj + c])
                        .fold(f64::MIN, f64::max);
                    feat[o * 4 + pi * 2 + pj] = m;
                }
            }
        }
        for k in 0..3 {
            expected.push(lb[k] + (0..16).map(|i| lw[k * 16 + i] * feat[i]).sum::<f64>());
        }
    }
    let r = rel(&logits, &expected);
    assert!(r <= 1e-5, "logits {logits:?} vs float64 {expected:?} ({r:e})");

    // The reverse: what samhost saves has the state dict's names (PyTorch fills in the counter).
    let out = dir.path().join("saved.safetensors");
    samhost::script::model::save_model(&ms[0], out.to_str().unwrap()).unwrap();
    let saved = samhost::models::params::load_safetensors(&out).unwrap();
    let mut names: Vec<&String> = saved.keys().collect();
    names.sort();
    let torch: Vec<&String> = sd.keys().filter(|k| !k.ends_with("num_batches_tracked")).collect();
    assert_eq!(names, torch);
}

#[test]
fn composed_pooling_matches_loops_and_finite_differences() {
    // max_pool2d(3, stride 2, padding 1) then avg_pool2d(3, stride 1, padding 1): windows that do
    // not tile the input take the composed path.
    let ms = models(
        r#"[sequential([conv2d(2, 2, 1), max_pool2d(3, #{ stride: 2, padding: 1 }), avg_pool2d(3, #{ stride: 1, padding: 1 }),
                        flatten(), linear(2 * 4 * 4, 3)])]"#,
    );
    let m = &ms[0];
    let x = images(2, 2, 7, 5);
    // Forward against loops, from the 1x1 convolution's output.
    let conv = m.params().get("0.weight").unwrap();
    let cb = m.params().get("0.bias").unwrap();
    let (w, b, xv) = (values(conv.as_tensor()), values(cb.as_tensor()), values(&x));
    let at = |n: usize, c: usize, i: usize, j: usize| -> f64 {
        b[c] + (0..2).map(|k| w[c * 2 + k] * xv[((n * 2 + k) * 7 + i) * 7 + j]).sum::<f64>()
    };
    let mut pooled = vec![0f64; 2 * 2 * 4 * 4];
    for n in 0..2 {
        for c in 0..2 {
            let mut mx = [[0f64; 4]; 4];
            for (oi, row) in mx.iter_mut().enumerate() {
                for (oj, cell) in row.iter_mut().enumerate() {
                    let mut best = f64::NEG_INFINITY;
                    for a in 0..3 {
                        for d in 0..3 {
                            let (i, j) = (2 * oi as i64 + a - 1, 2 * oj as i64 + d - 1);
                            if (0..7).contains(&i) && (0..7).contains(&j) {
                                best = best.max(at(n, c, i as usize, j as usize));
                            }
                        }
                    }
                    *cell = best;
                }
            }
            for oi in 0..4 {
                for oj in 0..4 {
                    let mut s = 0.0;
                    for a in -1i64..=1 {
                        for d in -1i64..=1 {
                            let (i, j) = (oi as i64 + a, oj as i64 + d);
                            if (0..4).contains(&i) && (0..4).contains(&j) {
                                s += mx[i as usize][j as usize];
                            }
                        }
                    }
                    pooled[((n * 2 + c) * 4 + oi) * 4 + oj] = s / 9.0;
                }
            }
        }
    }
    let lw = values(m.params().get("4.weight").unwrap().as_tensor());
    let lbias = values(m.params().get("4.bias").unwrap().as_tensor());
    let expected: Vec<f64> = (0..2)
        .flat_map(|n| {
            let (pooled, lw, lbias) = (&pooled, &lw, &lbias);
            (0..3).map(move |k| lbias[k] + (0..32).map(|i| lw[k * 32 + i] * pooled[n * 32 + i]).sum::<f64>())
        })
        .collect();
    let logits = values(&m.forward_t(&x, false).unwrap());
    assert!(rel(&logits, &expected) <= 1e-5, "{logits:?} vs {expected:?}");

    // The gradient of the convolution's weight through both poolings against central
    // differences (f32 model, step 1e-2: 2e-2 relative).
    let y = labels(&[1, 2]);
    let (_, grads) = pass(m, &x, &y, true);
    let loss_at = |delta: f32, k: usize| {
        let mut v: Vec<f32> = w.iter().map(|&a| a as f32).collect();
        v[k] += delta;
        conv.set(&Tensor::from_vec(v, (2, 2, 1, 1), &Device::Cpu).unwrap()).unwrap();
        let l = samhost::train::loss::cross_entropy(&m.forward_t(&x, true).unwrap(), &y, 0.0).unwrap();
        l.to_scalar::<f32>().unwrap() as f64
    };
    let fd: Vec<f64> = (0..4).map(|k| (loss_at(1e-2, k) - loss_at(-1e-2, k)) / 2e-2).collect();
    let r = rel(&grads["0.weight"], &fd);
    assert!(r <= 2e-2, "{:?} vs finite differences {fd:?} ({r:e})", grads["0.weight"]);
}

#[test]
fn script_models_report_their_errors_by_layer() {
    let path = repo().join("scripts").join("compose_test.rhai");
    let engine = samhost::script::build_engine(&Rc::new(Session::cpu_for(&path)));
    let fails = |script: &str, needle: &str| {
        let e =
            engine.eval::<rhai::Dynamic>(script).err().unwrap_or_else(|| panic!("{script} should fail")).to_string();
        assert!(e.contains(needle), "{script}: `{e}` should mention `{needle}`");
    };
    fails(
        "sequential([linear(4, 8), relu(), linear(9, 2)]).forward(randn([2, 4]))",
        "layer 2 (linear(9, 2)): expects inputs [.., 9]",
    );
    fails("sequential([conv2d(3, 8, 3)]).forward(randn([2, 1, 8, 8]))", "expects 3 input channels");
    fails("sequential([])", "at least one layer");
    fails("conv2d(3, 8, 3, #{ strid: 2 })", "unknown field `strid`");
    fails("conv2d(3, 8, 3, #{ groups: 2 })", "groups (2) must divide");
    fails("dropout(1.5)", "p must be in [0, 1)");
    fails("linear(3, 4).forward(randn([1, 3]))", "belongs to no model yet");
    fails("sequential([42])", "expected a layer");
    fails("residual([linear(2, 3)], #{ shortcut: \"zero\" })", "shortcut must be");
    fails(
        "sequential([residual([linear(2, 3)])]).forward(randn([1, 2]))",
        "the body gives [1, 3] but the shortcut [1, 2]",
    );
    fails("model(#{ layers: #{ fc: linear(2, 3) } })", "give forward");
    fails(
        "model(#{ layers: #{ fc: linear(2, 3) }, forward: |x| this.nope.forward(x) }).forward(randn([1, 2]))",
        "forward closure",
    );
    fails("model(#{ layers: #{ fc: linear(2, 3) }, forward: |x| 42 }).forward(randn([1, 2]))", "must return a Tensor");
    fails("model(#{ layers: #{ fc: linear(2, 3) }, forward: |x| x, extra: 1 })", "unknown field `extra`");
}

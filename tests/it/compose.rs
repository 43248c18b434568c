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

/// Runs `script` with the models `a` and `b` in scope and returns its array.
fn run_with(a: &Model, b: &Model, script: &str) -> rhai::Array {
    let path = repo().join("scripts").join("compose_test.rhai");
    let engine = samhost::script::build_engine(&Rc::new(Session::cpu_for(&path)));
    let mut scope = rhai::Scope::new();
    scope.push("a", a.clone());
    scope.push("b", b.clone());
    engine.eval_with_scope(&mut scope, script).unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
}

/// Three SAM steps (BatchNorm statistics from the first pass), a plain step, a gradient and an
/// evaluation on a built-in (`a`) and on the script model (`b`) from the same weights.
const STEPS: &str = r#"
let ds = synthetic(#{ n: 24, classes: 3, shape: SHAPE, seed: 4 });
let oa = sgd(a, #{ lr: 0.1, momentum: 0.9, weight_decay: 5e-4 });
let ob = sgd(b, #{ lr: 0.1, momentum: 0.9, weight_decay: 5e-4 });
let out = [];
for bt in ds.batches(8, #{ seed: 1, epoch: 0 }) {
    let sa = sam_step(a, oa, bt, #{ rho: 0.05 });
    let sb = sam_step(b, ob, bt, #{ rho: 0.05 });
    out += [sa.loss, sb.loss];
}
let bt = ();
for x in ds.batches(8, #{ seed: 2, epoch: 0 }) { bt = x; break; }
out += [train_step(a, oa, bt).loss, train_step(b, ob, bt).loss];
let ga = grad(a, bt);
let gb = grad(b, bt);
out += [ga.grads.norm(), gb.grads.norm()];
let ea = evaluate(a, ds);
let eb = evaluate(b, ds);
out += [ea.loss, eb.loss, ea.accuracy, eb.accuracy];
out
"#;

fn assert_pairs(what: &str, out: &rhai::Array) {
    let v: Vec<f64> = out.iter().map(|d| d.as_float().unwrap()).collect();
    for pair in v.chunks(2) {
        let r = (pair[0] - pair[1]).abs() / pair[0].abs().max(1e-12);
        assert!(r <= 1e-5, "{what}: {} vs {} in {v:?}", pair[0], pair[1]);
    }
}

#[test]
fn every_step_function_trains_a_script_model_as_the_builtin() {
    // A sequential ResNet-8 (BatchNorm, option-A shortcuts) against the built-in.
    let ms = models(r#"import "lib/models" as arch; [resnet(8, 3), arch::cifar_resnet(8, 3, "pad")]"#);
    copy_weights(&ms[0], &ms[1], |n| resnet_name(n, 1));
    let out = run_with(&ms[0], &ms[1], &STEPS.replace("SHAPE", "[3, 8, 8]"));
    assert_pairs("resnet8", &out);
    let (a, b) = (ms[0].params().snapshot().unwrap(), ms[1].params().snapshot().unwrap());
    for (name, t) in &a {
        let r = rel(&values(&b[&resnet_name(name, 1)]), &values(t));
        assert!(r <= 1e-5, "resnet8: {name} after training differs by {r:e}");
    }

    // A forward closure with BatchNorm and dropout against the same network as a sequence
    // (keys "0", "1", ... give the sequence's names); dropout masks come from each model's
    // generator, so with p > 0 the two draw alike only from the same seed: both are built
    // right after one reseed.
    let ms = models(
        r#"let s = sequential([conv2d(3, 4, 3, #{ padding: 1 }), batch_norm2d(4), relu(), dropout(0.25), flatten(), linear(4 * 8 * 8, 3)]);
        let c = model(#{
            layers: #{ "0": conv2d(3, 4, 3, #{ padding: 1 }), "1": batch_norm2d(4), "3": dropout(0.25), "5": linear(4 * 8 * 8, 3) },
            forward: |x| this["5"].forward(flatten(this["3"].forward(relu(this["1"].forward(this["0"].forward(x)))), 1))
        });
        [s, c]"#,
    );
    copy_weights(&ms[0], &ms[1], |n| n.to_string());
    ms[1].set_dropout_state(&ms[0].dropout_state().unwrap()).unwrap();
    let out = run_with(&ms[0], &ms[1], &STEPS.replace("SHAPE", "[3, 8, 8]"));
    assert_pairs("closure with dropout", &out);
}

#[test]
fn script_models_freeze_save_load_and_compute_in_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("seq");
    let closure = dir.path().join("closure");
    let ms = models(&format!(
        r#"let s = sequential([conv2d(1, 4, 3, #{{ padding: 1 }}), batch_norm2d(4), relu(), max_pool2d(2), flatten(), linear(16, 3)]);
        let c = model(#{{ layers: #{{ conv: conv2d(1, 4, 3), fc: linear(4, 3) }},
                          forward: |x| this.fc.forward(relu(this.conv.forward(x)).mean(-1).mean(-1)) }});
        let ds = synthetic(#{{ n: 16, classes: 3, shape: [1, 4, 4], seed: 2 }});
        let bt = ();
        for x in ds.batches(16, #{{ seed: 1, epoch: 0 }}) {{ bt = x; break; }}
        // Frozen tensors stay, the others move.
        let w0 = s.parameters()["0.weight"];
        let l0 = s.parameters()["5.weight"];
        if s.freeze("0.") != 2 {{ throw "freeze(\"0.\") matches the first layer's two tensors"; }}
        let o = sgd(s, #{{ lr: 0.1 }});
        sam_step(s, o, bt, #{{ rho: 0.05 }});
        if (s.parameters()["0.weight"] - w0).abs().max().item() != 0.0 {{ throw "a frozen tensor moved"; }}
        if (s.parameters()["5.weight"] - l0).abs().max().item() == 0.0 {{ throw "a trainable tensor stayed"; }}
        s.unfreeze("0.");
        // A saved sequential model is rebuilt by from_pretrained.
        s.eval_mode();
        s.save("{folder}");
        let r = from_pretrained("{folder}");
        r.eval_mode();
        if (r.forward(bt.images) - s.forward(bt.images)).abs().max().item() > 1e-6 {{ throw "from_pretrained differs"; }}
        // A closure model loads its weights into a model the script builds.
        c.save("{closure}");
        let c2 = model(#{{ layers: #{{ conv: conv2d(1, 4, 3), fc: linear(4, 3) }},
                           forward: |x| this.fc.forward(relu(this.conv.forward(x)).mean(-1).mean(-1)) }});
        c2.load("{closure}");
        if (c2.forward(bt.images) - c.forward(bt.images)).abs().max().item() != 0.0 {{ throw "load differs"; }}
        // bf16: both train, with losses near the f32 ones.
        s.train();
        let f32_loss = grad(s, bt).loss;
        let fc = grad(c, bt).loss;
        s.set_precision("bf16");
        c.set_precision("bf16");
        let bs = sam_step(s, sgd(s, #{{ lr: 0.0 }}), bt, #{{ rho: 0.05 }}).loss;
        let bc = sam_step(c, sgd(c, #{{ lr: 0.0 }}), bt, #{{ rho: 0.05 }}).loss;
        if (bs - f32_loss).abs() > 0.05 * f32_loss || (bc - fc).abs() > 0.05 * fc {{ throw `bf16 ${{bs}}/${{bc}} vs ${{f32_loss}}/${{fc}}`; }}
        [s, c]"#,
        folder = folder.display(),
        closure = closure.display()
    ));
    assert_eq!(ms.len(), 2);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(closure.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "scripted");
    assert_eq!(cfg["layers"]["conv"]["type"], "conv2d");
    let path = repo().join("scripts").join("compose_test.rhai");
    let engine = samhost::script::build_engine(&Rc::new(Session::cpu_for(&path)));
    let e =
        engine.eval::<rhai::Dynamic>(&format!("from_pretrained(\"{}\")", closure.display())).unwrap_err().to_string();
    assert!(e.contains("forward closure") && e.contains("m.load"), "{e}");
}

#[test]
fn a_nested_model_brings_its_weights_and_a_closure_sees_imports_and_constants() {
    let ms = models(
        r#"let inner = sequential([linear(4, 8), relu()]);
        let outer = sequential([inner, linear(8, 2)]);
        let net = model(#{ layers: #{ backbone: inner, head: linear(8, 2) },
                           forward: |x| this.head.forward(this.backbone.forward(x)) });
        [inner, outer, net]"#,
    );
    let w = |m: &Model, n: &str| values(m.params().get(n).unwrap().as_tensor());
    assert_eq!(w(&ms[1], "0.0.weight"), w(&ms[0], "0.weight"), "sequential keeps the nested model's weights");
    assert_eq!(w(&ms[2], "backbone.0.bias"), w(&ms[0], "0.bias"), "a closure's layers too");
    let path = repo().join("scripts").join("compose_test.rhai");
    let engine = samhost::script::build_engine(&Rc::new(Session::cpu_for(&path)));
    let e = engine.eval::<rhai::Dynamic>("residual([sequential([linear(2, 2)])])").unwrap_err().to_string();
    assert!(e.contains("would lose its weights"), "{e}");

    // A closure calling an imported module's function and a constant, as its script does.
    let dir = tempfile::tempdir().unwrap();
    crate::common::write(dir.path(), "lib/h.rhai", "fn twice(t) { t * 2.0 }");
    crate::common::write(
        dir.path(),
        "s.rhai",
        r#"import "lib/h" as h;
const SCALE = 3.0;
let net = model(#{ layers: #{ fc: linear(2, 3) }, forward: |x| h::twice(this.fc.forward(x)) * SCALE });
let x = randn([4, 2]);
let d = (net.forward(x) - net.parameters()["fc.weight"].matmul(x.transpose(0, 1)).transpose(0, 1) * 6.0).abs().max().item();
print(`${d}`);"#,
    );
    let o = crate::common::run_in(dir.path(), &["run", "s.rhai", "-q", "--runs-dir", "runs"]);
    assert!(o.status.success(), "{}", crate::common::stderr(&o));
    let printed = crate::common::stdout(&o);
    // The bias is included in the closure's result: the difference is 6·bias, bounded by 6/sqrt(2).
    let d: f64 = printed.trim().parse().unwrap_or_else(|_| panic!("{printed}"));
    assert!(d <= 6.0 / 2f64.sqrt() + 1e-5, "{d}");
}

#[test]
fn adaptive_pooling_takes_rectangular_windows() {
    let ms = models("[sequential([adaptive_avg_pool2d([2, 2]), flatten()])]");
    let x = Tensor::arange(0f32, 32.0, &Device::Cpu).unwrap().reshape((1, 1, 8, 4)).unwrap();
    let got = values(&ms[0].forward_t(&x, false).unwrap());
    // Blocks of 4 rows x 2 columns of the 8x4 map 0..32.
    let block = |r0: usize, c0: usize| {
        (0..4).flat_map(|r| (0..2).map(move |c| ((r0 + r) * 4 + c0 + c) as f64)).sum::<f64>() / 8.0
    };
    assert_eq!(got, [block(0, 0), block(0, 2), block(4, 0), block(4, 2)]);
}

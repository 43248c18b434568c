//! The SAM family written as scripts (scripts/lib/variants.rhai, from grad, TensorSet
//! arithmetic, perturb, restore and opt.step) gives the built-in `sam_step`'s weights, step after
//! step, to 1e-6 relative; and the script primitives behave as documented.

use samhost::session::Session;
use std::rc::Rc;

/// Evaluates `body` as a script beside scripts/ (so `import "lib/variants"` resolves) and
/// returns its value as a float.
fn eval(body: &str) -> f64 {
    let path = crate::common::repo().join("scripts").join("variants_test.rhai");
    let engine = samhost::script::build_engine(&Rc::new(Session::cpu_for(&path)));
    match engine.eval::<rhai::FLOAT>(body) {
        Ok(v) => v,
        Err(e) => panic!("script failed: {e}\n{body}"),
    }
}

/// The relative weight difference after `steps` steps of the built-in with `opts` and of the
/// script function `func` with the same options, on two copies of one MLP and the same batches.
fn script_vs_builtin(func: &str, opts: &str, steps: usize, lr_schedule: bool) -> f64 {
    let set_lr = if lr_schedule { "oa.lr = 0.1 / (i + 1); oc.lr = 0.1 / (i + 1);" } else { "" };
    eval(&format!(
        r#"
import "lib/variants" as v;
let a = mlp([6, 16, 3]);
let c = mlp([6, 16, 3]);
c.set_parameters(a.parameters());
let oa = sgd(a, #{{ lr: 0.1, momentum: 0.9 }});
let oc = sgd(c, #{{ lr: 0.1, momentum: 0.9 }});
let labels = tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0]);
let st = #{{}};
let worst = 0.0;
for i in 0..{steps} {{
    {set_lr}
    let b = batch(randn([16, 6]) * 1.5, labels);
    let sa = sam_step(a, oa, b, {opts});
    let out = v::{func}(c, oc, b, {opts}, st);
    st = out.state;
    if (sa.loss - out.loss).abs() > 1e-6 * sa.loss.abs() {{ throw `step ${{i}}: loss ${{sa.loss}} vs ${{out.loss}}`; }}
    let d = (a.params() - c.params()).norm() / a.params().norm();
    if d > worst {{ worst = d; }}
}}
worst
"#
    ))
}

#[test]
fn every_variant_written_as_a_script_equals_the_built_in() {
    for (func, opts, lr) in [
        ("sam", "#{ rho: 0.2 }", false),
        ("gsam", "#{ variant: \"gsam\", rho: 0.2, alpha: 0.3 }", false),
        ("gsam", "#{ variant: \"gsam\", rho_max: 0.3, rho_min: 0.05, alpha: 0.2 }", true),
        ("looksam", "#{ variant: \"looksam\", rho: 0.2, k: 3 }", false),
        ("every", "#{ every: 2, rho: 0.2 }", false),
        ("fisher", "#{ variant: \"fisher\", rho: 0.2, eta: 20.0 }", false),
        ("friendly", "#{ variant: \"friendly\", rho: 0.2, lambda: 0.6 }", false),
        ("esam", "#{ variant: \"esam\", rho: 0.2, beta: 1.0, gamma: 0.5 }", false),
    ] {
        let d = script_vs_builtin(func, opts, 5, lr);
        assert!(d <= 1e-6, "{func} {opts}: the script's weights differ from the built-in's by {d:e} (relative)");
    }
}

#[test]
fn perturb_and_restore_are_exact_and_checked() {
    let v = eval(
        r#"
let m = mlp([4, 5, 3]);
let w = m.params();
let e = w.map(|n, t| t * 0.0 + 0.25);
m.perturb(e);
m.perturb(e);
if !m.perturbed { throw "perturbed"; }
let moved = (m.params() - w - e - e).norm();
m.restore();
if m.perturbed { throw "restored"; }
let back = (m.params() - w).norm();
let errors = 0;
try { m.restore(); } catch (err) { if `${err}`.contains("not perturbed") { errors += 1; } }
try { m.perturb(e.filter(|n| n == "fc1.bias") * 1.0 + tensor_set()); } catch (err) { errors += 1; }
let s = tensor_set();
s["nope.weight"] = zeros([2]);
try { m.perturb(s); } catch (err) { if `${err}`.contains("nope.weight") { errors += 1; } }
back + moved * 0.0 + if moved < 1e-6 { 0.0 } else { 100.0 } + if errors == 3 { 0.0 } else { 1000.0 }
"#,
    );
    assert_eq!(v, 0.0, "restore must be bit-exact, perturb must add, and misuse must fail ({v})");
}

#[test]
fn grad_gives_losses_per_example_and_leaves_batch_norm_alone_when_asked() {
    let v = eval(
        r#"
let m = resnet(8, 3);
let b = batch(randn([4, 3, 32, 32]), tensor([0, 1, 2, 0]));
let before = m.parameters();
let r = grad(m, b, #{ update_bn: false });
let after = m.parameters();
for k in before.keys() {
    if k.ends_with("running_mean") && (before[k] - after[k]).abs().max().item() != 0.0 { throw `${k} moved`; }
}
let r2 = grad(m, b);
if (m.parameters()["bn1.running_mean"] - before["bn1.running_mean"]).abs().max().item() == 0.0 { throw "update_bn: true updates"; }
let mean = r.losses.mean().item();
if (mean - r.loss).abs() > 1e-5 { throw `mean of losses ${mean} vs loss ${r.loss}`; }
if r.losses.shape != [4] { throw "losses shape"; }
if r.grads.len() != m.params().len() { throw "grads cover the trainable parameters"; }
r.grads.norm()
"#,
    );
    assert!(v.is_finite() && v > 0.0, "a non-zero gradient norm, got {v}");
}

#[test]
fn a_loss_closure_that_reaches_the_optimizer_gets_an_error_not_a_panic() {
    let v = eval(
        r#"
let m = mlp([4, 3]);
let o = sgd(m, #{ lr: 0.1 });
let b = batch(randn([4, 4]), tensor([0, 1, 2, 0]));
let caught = 0;
let reads_lr = |logits, labels| { let x = o.lr; cross_entropy(logits, labels) };
try { sam_step(m, o, b, #{ loss: reads_lr }); } catch (e) { if `${e}`.contains("in use") { caught += 1; } }
let steps = |logits, labels| { sam_step(m, o, b); cross_entropy(logits, labels) };
try { train_step(m, o, b, #{ loss: steps }); } catch (e) { if `${e}`.contains("in use") { caught += 1; } }
// sam_step over micro-batches.
let r = sam_step(m, o, [b, b], #{ rho: 0.1 });
try { sam_step(m, o, [b, 3], #{}); } catch (e) { if `${e}`.contains("element 1") { caught += 1; } }
caught.to_float()
"#,
    );
    assert_eq!(v, 3.0, "each misuse is a script error");
}

//! The script host: tensors, config, errors, check, api.

use crate::common::*;

#[test]
fn tensor_arithmetic_and_reductions() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "t.rhai",
        r#"
let a = tensor([[1, 2], [3, 4]]);
let b = tensor([10, 20]);
let c = a + b;
if c.to_array() != [[11.0, 22.0], [13.0, 24.0]] { throw `broadcast add: ${c.to_array()}`; }
if (a * 2 - 1).sum().item() != 16.0 { throw "scalar ops"; }
if (2 / tensor([4])).item() != 0.5 { throw "number / tensor"; }
if a.matmul(a).to_array() != [[7.0, 10.0], [15.0, 22.0]] { throw "matmul"; }
if a.sum(0).to_array() != [4.0, 6.0] { throw "sum(0)"; }
if a.mean(-1).to_array() != [1.5, 3.5] { throw "mean(-1)"; }
if a.argmax(1).to_array() != [1, 1] { throw "argmax"; }
if a.max().item() != 4.0 || a.min().item() != 1.0 { throw "max/min"; }
if a.reshape([4, -1]).shape != [4, 1] { throw "reshape"; }
if a.transpose(0, 1).to_array() != [[1.0, 3.0], [2.0, 4.0]] { throw "transpose"; }
if a.narrow(1, 1, 1).to_array() != [[2.0], [4.0]] { throw "narrow"; }
if cat([a, a], 0).shape != [4, 2] { throw "cat"; }
let s = tensor([[0, 0]]).softmax(1).to_array();
if s != [[0.5, 0.5]] { throw `softmax ${s}`; }
if (tensor([0]).sigmoid().item() - 0.5).abs() > 1e-7 { throw "sigmoid"; }
if zeros([2, 3]).shape != [2, 3] || ones([2]).sum().item() != 2.0 { throw "zeros/ones"; }
if arange(4).to_array() != [0.0, 1.0, 2.0, 3.0] { throw "arange"; }
if randn([3, 4]).shape != [3, 4] { throw "randn"; }
if a.dtype != "f32" || a.device != "cpu" { throw "dtype/device"; }
save_tensors("x.safetensors", #{ w: a, b: b });
let back = load_tensors("x.safetensors");
if back.w.to_array() != a.to_array() { throw "safetensors round trip"; }
print("ok");
"#,
    );
    let o = run_in(dir.path(), &["run", "t.rhai", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn same_seed_same_numbers() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "r.rhai",
        "print(randn([5]).to_array()); print(mlp([3, 2]).parameters()[\"fc1.weight\"].to_array());",
    );
    let a = run_in(dir.path(), &["run", "r.rhai", "--seed", "7"]);
    let b = run_in(dir.path(), &["run", "r.rhai", "--seed", "7"]);
    let c = run_in(dir.path(), &["run", "r.rhai", "--seed", "8"]);
    assert!(a.status.success(), "{}", stderr(&a));
    assert_eq!(stdout(&a), stdout(&b));
    assert_ne!(stdout(&a), stdout(&c));
    assert!(stderr(&a).contains("seed 7"), "the seed is printed: {}", stderr(&a));
    let d = run_in(dir.path(), &["run", "r.rhai"]);
    assert!(stderr(&d).contains("seed 42 (the default"), "{}", stderr(&d));
}

#[test]
fn config_overrides_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "c.rhai",
        r#"let c = config(#{ epochs: 10, lr: 0.1, name: "x", smoke: false, sizes: [1, 2] });
print(`${c.epochs} ${c.lr} ${c.name} ${c.smoke} ${c.sizes}`);"#,
    );
    let o = run_in(
        dir.path(),
        &["run", "c.rhai", "--set", "epochs=3", "--set", "lr=1", "--set", "smoke=true", "--set", "sizes=[4,5]"],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "3 1.0 x true [4, 5]");
    let o = run_in(dir.path(), &["run", "c.rhai", "--set", "epochs=abc"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("--set epochs=abc") && e.contains("not an integer") && e.contains("c.rhai:1:"), "{e}");
    let o = run_in(dir.path(), &["run", "c.rhai", "--set", "epoch=3"]);
    let e = stderr(&o);
    assert!(e.contains("unknown key") && e.contains("epochs, lr, name, sizes, smoke"), "{e}");
}

/// Each bad script gives a located error and no panic.
#[test]
fn script_errors_are_located_and_never_panic() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, &str); 8] = [
        ("shape.rhai", "let a = zeros([2, 3]);\nlet b = zeros([4, 5]);\nlet c = a.matmul(b);", "shape.rhai:3:"),
        ("add.rhai", "let c = zeros([2, 3]) + zeros([4]);", "`+` of tensors [2, 3] and [4]"),
        ("type.rhai", "let a = zeros(\"x\");", "zeros"),
        ("unknown.rhai", "\n\nfrobnicate(1);", "unknown.rhai:3:"),
        ("ragged.rhai", "tensor([[1, 2], [3]]);", "ragged"),
        ("item.rhai", "zeros([2]).item();", "not one element"),
        ("dim.rhai", "zeros([2]).sum(3);", "dimension 3 is out of range"),
        ("opts.rhai", "let m = mlp([2, 2]);\nsgd(m, #{ lr: 0.1, momentun: 0.9 });", "unknown field `momentun`"),
    ];
    for (name, text, expect) in cases {
        write(dir.path(), name, text);
        let o = run_in(dir.path(), &["run", name]);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {e}");
        assert!(e.contains("error: ") && e.contains(expect), "{name}: expected `{expect}` in:\n{e}");
        assert!(!e.contains("panicked"), "{name} panicked: {e}");
    }
    let o = run_in(dir.path(), &["run", "missing.rhai"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("missing.rhai: cannot read the script"), "{}", stderr(&o));
    let o = run_in(dir.path(), &["run", "unknown.rhai", "--device", "cuda"]);
    if !cfg!(feature = "cuda") {
        assert!(stderr(&o).contains("--features cuda"), "{}", stderr(&o));
    }
}

#[test]
fn runtime_error_shows_line_and_caret() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "e.rhai", "let a = 1;\nlet b = zeros([2]).item();\n");
    let o = run_in(dir.path(), &["run", "e.rhai"]);
    let e = stderr(&o);
    assert!(e.contains("error: e.rhai:2:"), "{e}");
    assert!(e.contains("2 | let b = zeros([2]).item();"), "{e}");
    assert!(e.contains('^'), "{e}");
}

#[test]
fn check_reports_syntax_errors_and_unknown_functions() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = vec!["let x = 1;"; 6];
    lines.push("let y = (1 + ;");
    write(dir.path(), "syntax.rhai", &lines.join("\n"));
    let o = run_in(dir.path(), &["check", "syntax.rhai"]);
    assert_ne!(o.status.code(), Some(0));
    assert!(stderr(&o).contains("syntax.rhai:7:"), "{}", stderr(&o));

    write(dir.path(), "lib/common.rhai", "fn helper(x) { x + 1 }\nfn broken() { nosuchfn(); }");
    write(
        dir.path(),
        "calls.rhai",
        "import \"lib/common\" as common;\nprint(\"side effect\");\nlet f = |x| x * 2;\nprint(common::helper(f.call(1)));\nundefined_thing(3);\ncommon::nothere();\n",
    );
    let o = run_in(dir.path(), &["check", "calls.rhai"]);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert!(e.contains("calls.rhai:5:") && e.contains("unknown function `undefined_thing`"), "{e}");
    assert!(e.contains("module `common` has no function `nothere`"), "{e}");
    assert!(e.contains("common.rhai:2:") && e.contains("nosuchfn"), "{e}");
    assert!(stdout(&o).is_empty(), "check runs nothing: {}", stdout(&o));

    write(dir.path(), "lib/clean.rhai", "fn helper(x) { x + 1 }");
    write(dir.path(), "good.rhai", "import \"lib/clean\" as common;\nprint(common::helper(1));\n");
    let o = run_in(dir.path(), &["check", "good.rhai"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = run_in(dir.path(), &["run", "good.rhai"]);
    assert_eq!(stdout(&o).trim(), "2", "{}", stderr(&o));
}

#[test]
fn api_lists_every_function_with_a_description() {
    let o = samhost().args(["api"]).output().unwrap();
    assert!(o.status.success());
    let text = stdout(&o);
    for name in ["tensor(", "sam_step(", "train_step(", "config(", "load_tensors(", "mlp(", "evaluate(", "log("] {
        assert!(text.contains(name), "api lacks {name}");
    }
    let json = samhost().args(["api", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    let fns = v["functions"].as_array().unwrap();
    assert!(fns.len() > 50);
    for f in fns {
        let docs = f["docComments"].as_array().map(|d| d.len()).unwrap_or(0);
        assert!(docs > 0, "no doc comment for {}", f["signature"]);
    }
    let dir = tempfile::tempdir().unwrap();
    let o = samhost().args(["api", "--definitions"]).arg(dir.path()).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read_dir(dir.path()).unwrap().count() > 0);
}

/// Every example script runs in smoke mode, so no example can rot.
#[test]
fn every_example_script_runs_in_smoke_mode() {
    let runs = tempfile::tempdir().unwrap();
    let mut ran = 0;
    for entry in std::fs::read_dir(repo().join("scripts")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "rhai") {
            let c = samhost().arg("check").arg(&p).output().unwrap();
            assert!(c.status.success(), "check {}: {}", p.display(), stderr(&c));
            let o = samhost()
                .arg("run")
                .arg(&p)
                .args(["--quiet", "--set", "smoke=true", "--runs-dir"])
                .arg(runs.path())
                .output()
                .unwrap();
            assert!(o.status.success(), "{}: {}", p.display(), stderr(&o));
            ran += 1;
        }
    }
    assert!(ran >= 1);
}

/// `--quiet` silences the host's messages, not the script's own `print`.
#[test]
fn quiet_keeps_the_scripts_own_print() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "p.rhai", "print(\"from the script\");\n");
    let o = run_in(dir.path(), &["run", "p.rhai", "--quiet", "--runs-dir", "runs"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "from the script");
    assert!(stderr(&o).trim().is_empty(), "the host says nothing: {}", stderr(&o));
}

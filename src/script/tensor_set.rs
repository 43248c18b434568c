//! The `TensorSet` script type: named tensors over a model's parameters (gradients,
//! perturbations, optimizer directions), with arithmetic, norms and dot products, each one host
//! call over all tensors.

use super::convert::{err, op, Res};
use crate::train::{Elementwise, TensorSet};
use candle_core::Tensor;
use rhai::{Array, Dynamic, Engine, FnPtr, NativeCallContext, FLOAT, INT};

fn element_op(name: &str) -> Elementwise {
    match name {
        "+" => Elementwise::Add,
        "-" => Elementwise::Sub,
        "*" => Elementwise::Mul,
        _ => Elementwise::Div,
    }
}

/// Calls a script closure, naming the method in its error.
fn call(ctx: &NativeCallContext, f: &FnPtr, what: &str, args: impl rhai::FuncArgs) -> Res<Dynamic> {
    f.call_within_context(ctx, args).map_err(|e| err(format!("{what}: in the closure: {e}")))
}

/// Registers the `TensorSet` API.
pub fn register(engine: &mut Engine) {
    engine.register_type_with_name::<TensorSet>("TensorSet");

    for name in ["+", "-", "*", "/"] {
        let o = element_op(name);
        api!(
            engine,
            name,
            "a: TensorSet, b: TensorSet -> TensorSet",
            "Element-wise arithmetic of two sets over the same names and shapes (one pass per tensor).",
            move |a: TensorSet, b: TensorSet| op(&format!("TensorSet {name} TensorSet"), a.zip(&b, o))
        );
        api!(
            engine,
            name,
            "a: TensorSet, b: float -> TensorSet",
            "Element-wise arithmetic with a number.",
            move |a: TensorSet, b: FLOAT| op(&format!("TensorSet {name} number"), a.scalar(o, b, false))
        );
        api!(
            engine,
            name,
            "a: TensorSet, b: int -> TensorSet",
            "Element-wise arithmetic with a number.",
            move |a: TensorSet, b: INT| op(&format!("TensorSet {name} number"), a.scalar(o, b as f64, false))
        );
        api!(
            engine,
            name,
            "a: float, b: TensorSet -> TensorSet",
            "Element-wise arithmetic with a number.",
            move |a: FLOAT, b: TensorSet| op(&format!("number {name} TensorSet"), b.scalar(o, a, true))
        );
        api!(
            engine,
            name,
            "a: int, b: TensorSet -> TensorSet",
            "Element-wise arithmetic with a number.",
            move |a: INT, b: TensorSet| op(&format!("number {name} TensorSet"), b.scalar(o, a as f64, true))
        );
    }
    api!(engine, "-", "a: TensorSet -> TensorSet", "Negation.", |a: TensorSet| op("neg", a.scale(-1.0)));
    api!(
        engine,
        "axpy",
        "s: TensorSet, a: float, t: TensorSet -> TensorSet",
        "`s + a·t` in one pass per tensor (the same names and shapes).",
        |s: &mut TensorSet, a: FLOAT, t: TensorSet| op("axpy", s.axpy(a, &t))
    );
    api!(
        engine,
        "norm",
        "s: TensorSet -> float",
        "The global L2 norm over every element of every tensor, summed in f64 (SAM's ‖g‖).",
        |s: &mut TensorSet| op("norm", s.norm())
    );
    api!(
        engine,
        "dot",
        "s: TensorSet, t: TensorSet -> float",
        "`Σ s·t` over every element (the same names and shapes), summed in f64.",
        |s: &mut TensorSet, t: TensorSet| op("dot", s.dot(&t))
    );
    api!(engine, "abs", "s: TensorSet -> TensorSet", "`|x|` element-wise.", |s: &mut TensorSet| op("abs", s.abs()));
    api!(engine, "sqr", "s: TensorSet -> TensorSet", "`x²` element-wise.", |s: &mut TensorSet| op("sqr", s.sqr()));
    api!(engine, "sqrt", "s: TensorSet -> TensorSet", "`√x` element-wise.", |s: &mut TensorSet| op("sqrt", s.sqrt()));
    api!(engine, "sign", "s: TensorSet -> TensorSet", "The sign of every element: -1, 0 or 1.", |s: &mut TensorSet| {
        op("sign", s.sign())
    });
    api!(engine, "zeros_like", "s: TensorSet -> TensorSet", "Zeros of the same names and shapes.", |s: TensorSet| op(
        "zeros_like",
        s.zeros_like()
    ));
    api!(engine, "names", "s: TensorSet -> Array", "The tensors' names, sorted.", |s: &mut TensorSet| -> Array {
        s.names().into_iter().map(Dynamic::from).collect()
    });
    api!(engine, "len", "s: TensorSet -> int", "How many tensors the set holds.", |s: &mut TensorSet| s.len() as INT);
    api!(
        engine,
        "numel",
        "s: TensorSet -> int",
        "How many scalars the set holds over all tensors.",
        |s: &mut TensorSet| { s.elem_count() as INT }
    );
    api!(
        engine,
        "contains",
        "s: TensorSet, name: String -> bool",
        "Whether the set holds a tensor `name`.",
        |s: &mut TensorSet, name: &str| s.get(name).is_some()
    );
    api!(
        engine,
        "index$get$",
        "s: TensorSet, name: String -> Tensor",
        "`s[name]`: the tensor called `name` (an error names the set's tensors when there is none).",
        |s: &mut TensorSet, name: &str| -> Res<Tensor> {
            s.get(name).cloned().ok_or_else(|| {
                let names = s.names();
                let shown: Vec<&str> = names.iter().take(8).map(String::as_str).collect();
                let more = if names.len() > 8 { ", ..." } else { "" };
                err(format!("TensorSet has no tensor `{name}` (it has {}{more})", shown.join(", ")))
            })
        }
    );
    api!(
        engine,
        "index$set$",
        "s: TensorSet, name: String, t: Tensor",
        "`s[name] = t`: sets a tensor (replacing one needs the same shape).",
        |s: &mut TensorSet, name: &str, t: Tensor| op("TensorSet[name] =", s.set(name, t))
    );
    api!(
        engine,
        "filter",
        "s: TensorSet, keep: FnPtr -> TensorSet",
        "The tensors whose name the closure `|name| ...` accepts (returns true for).",
        |ctx: NativeCallContext, s: &mut TensorSet, f: FnPtr| -> Res<TensorSet> {
            let mut kept = Vec::new();
            for name in s.names() {
                let v = call(&ctx, &f, "filter", (name.clone(),))?;
                let keep =
                    v.as_bool().map_err(|t| err(format!("filter: the closure must return a bool, it returned {t}")))?;
                if keep {
                    kept.push(name);
                }
            }
            Ok(s.filter(|n| kept.iter().any(|k| k == n)))
        }
    );
    api!(
        engine,
        "map",
        "s: TensorSet, f: FnPtr -> TensorSet",
        "A new set from the closure `|name, t| ...` applied to every tensor (it returns a Tensor).",
        |ctx: NativeCallContext, s: &mut TensorSet, f: FnPtr| -> Res<TensorSet> {
            let mut out = TensorSet::new();
            for (name, t) in s.iter() {
                let v = call(&ctx, &f, "map", (name.clone(), t.clone()))?;
                let type_name = v.type_name();
                let t = v.try_cast::<Tensor>().ok_or_else(|| {
                    err(format!("map: the closure must return a Tensor, it returned {type_name} for `{name}`"))
                })?;
                op("map", out.set(name, t))?;
            }
            Ok(out)
        }
    );
    api!(
        engine,
        "to_string",
        "s: TensorSet -> String",
        "A short display: the number of tensors and scalars.",
        |s: &mut TensorSet| { format!("TensorSet({} tensors, {} values)", s.len(), s.elem_count()) }
    );
    api!(engine, "tensor_set", "-> TensorSet", "An empty TensorSet (fill it with `s[name] = t`).", TensorSet::new);
}

//! `model(#{ layers, forward })`: a model whose forward pass is a script closure over its
//! layers (`this.conv1.forward(x)`, tensor ops, `relu(...)`); candle's autograd runs through
//! the closure's tensor ops to every layer's tensors.
//!
//! The closure is kept on the script's thread (Rhai values are not `Send`): the network holds
//! an id into a per-thread table of closures, each with an engine of its own built over the same
//! session, so every step function can run the model wherever it calls `forward`.

use super::convert::{err, op, Res};
use super::layers::{copy_nested, spec_of, ModeGuard, Nested, ScriptLayer};
use crate::models::compose::Layer;
use crate::models::init::seeded_var_builder;
use crate::models::registry::SCRIPTED;
use crate::models::{Model, Network, Params};
use crate::rng::HostRng;
use crate::session::Session;
use candle_core::Tensor;
use candle_nn::{VarBuilder, VarMap};
use rhai::{Array, Dynamic, Engine, FnPtr, ImmutableString, Map, Module, NativeCallContext, Position};

/// A shared Rhai module (`Rc` without the `sync` feature).
type SharedModule = Rc<Module>;
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What a forward closure needs to run: its engine, the script's function library and imported
/// modules (as where the model was made), the closure and the `this` it sees.
struct Forward {
    engine: Engine,
    lib: SharedModule,
    imports: Vec<(ImmutableString, SharedModule)>,
    closure: FnPtr,
    this: Dynamic,
}

impl Forward {
    /// Calls the closure on `x` with `this` bound to the model's layers.
    fn call(&self, x: &Tensor) -> Result<Dynamic, Box<rhai::EvalAltResult>> {
        let mut global = self.engine.new_global_runtime_state();
        global.lib.push(self.lib.clone());
        for (name, module) in &self.imports {
            global.push_import(name.clone(), module.clone());
        }
        let ctx =
            NativeCallContext::new_with_all_fields(&self.engine, self.closure.fn_name(), None, &global, Position::NONE);
        let mut this = self.this.clone();
        self.closure.call_raw(&ctx, Some(&mut this), [Dynamic::from(x.clone())])
    }
}

thread_local! {
    static FORWARDS: RefCell<HashMap<u64, Rc<Forward>>> = RefCell::new(HashMap::new());
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A network whose forward pass is a script closure.
struct ClosureNet {
    id: u64,
    config: serde_json::Value,
    drop_rng: Option<HostRng>,
}

impl Network for ClosureNet {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let msg = candle_core::Error::Msg;
        let f = FORWARDS
            .try_with(|t| t.borrow().get(&self.id).cloned())
            .ok()
            .flatten()
            .ok_or_else(|| msg("a model with a forward closure runs on its script's thread only".into()))?;
        let _mode = ModeGuard::set(train);
        let y = f.call(x).map_err(|e| msg(format!("in the forward closure: {e}")))?;
        let type_name = y.type_name();
        y.try_cast::<Tensor>()
            .ok_or_else(|| msg(format!("the forward closure must return a Tensor, it returned {type_name}")))
    }

    fn config(&self) -> serde_json::Value {
        self.config.clone()
    }

    fn dropout_rng(&self) -> Option<HostRng> {
        self.drop_rng.clone()
    }
}

impl Drop for ClosureNet {
    fn drop(&mut self) {
        // The entry is dropped after the table is released: dropping it may drop other models.
        let removed = FORWARDS.try_with(|t| t.try_borrow_mut().ok().and_then(|mut t| t.remove(&self.id)));
        drop(removed);
    }
}

/// The layers of `layers: #{...}` built under `vb`: a layer, a sequential model or a list
/// (`name.0`, ...) or map (`name.key`) of them. Returns what `this` shows and the descriptions.
fn build_tree(
    what: &str,
    v: &Dynamic,
    (vb, path): (VarBuilder, &str),
    rng: &HostRng,
    nested: &mut Nested,
) -> Res<(Dynamic, serde_json::Value)> {
    if v.is_map() {
        let mut this = Map::new();
        let mut specs = serde_json::Map::new();
        for (k, item) in v.clone().cast::<Map>() {
            let sub = (vb.pp(k.as_str()), &*format!("{path}{k}."));
            let (d, s) = build_tree(&format!("{what}.{k}"), &item, sub, rng, nested)?;
            this.insert(k.clone(), d);
            specs.insert(k.to_string(), s);
        }
        return Ok((Dynamic::from_map(this), serde_json::Value::Object(specs)));
    }
    if v.is_array() && !v.clone().cast::<Array>().is_empty() {
        let mut this = Array::new();
        let mut specs = Vec::new();
        for (i, item) in v.clone().cast::<Array>().iter().enumerate() {
            let sub = (vb.pp(i.to_string()), &*format!("{path}{i}."));
            let (d, s) = build_tree(&format!("{what}.{i}"), item, sub, rng, nested)?;
            this.push(d);
            specs.push(s);
        }
        return Ok((Dynamic::from_array(this), serde_json::Value::Array(specs)));
    }
    let spec = spec_of(what, v, path, Some(nested))?;
    let layer = op(what, Layer::build(&spec, vb, rng))?;
    let json = op(what, serde_json::to_value(&spec))?;
    Ok((Dynamic::from(ScriptLayer::Bound(Arc::new(layer))), json))
}

fn has_dropout(v: &Dynamic) -> bool {
    if v.is_map() {
        return v.clone().cast::<Map>().values().any(has_dropout);
    }
    if v.is_array() {
        return v.clone().cast::<Array>().iter().any(has_dropout);
    }
    spec_of("", v, "", Some(&mut Nested::new())).is_ok_and(|s| s.has_dropout())
}

/// Builds `model(#{ layers: #{...}, forward: |x| ... })`.
fn closure_model(ctx: &NativeCallContext, session: &Rc<Session>, mut o: Map) -> Res<Model> {
    let layers =
        o.remove("layers").ok_or_else(|| err("model: give layers: #{ name: layer, ... } and forward: |x| ..."))?;
    let forward =
        o.remove("forward").ok_or_else(|| err("model: give forward: |x| ... (a closure over this.NAME layers)"))?;
    if let Some(k) = o.keys().next() {
        return Err(err(format!("model: unknown field `{k}` (expected layers, forward)")));
    }
    if !layers.is_map() {
        return Err(err(format!("model: layers must be a map of name: layer, got {}", layers.type_name())));
    }
    let type_name = forward.type_name();
    let closure = forward
        .try_cast::<FnPtr>()
        .ok_or_else(|| err(format!("model: forward must be a closure |x| ..., got {type_name}")))?;
    if !closure.is_anonymous() {
        return Err(err(format!(
            "model: forward must be a closure |x| ... (Fn(\"{}\") names a function the model cannot keep; write |x| {}(x))",
            closure.fn_name(),
            closure.fn_name()
        )));
    }
    let varmap = VarMap::new();
    let dropout = has_dropout(&layers);
    let drop_rng = if dropout { HostRng::new(session.rng.next_seed()) } else { session.rng.clone() };
    let vb = seeded_var_builder(&varmap, &session.rng, session.device());
    let mut nested = Nested::new();
    let (this, specs) = build_tree("model layers", &layers, (vb, ""), &drop_rng, &mut nested)?;
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    // The closure's definition lives in the script's function library, and it may call the
    // script's imported modules: the model keeps both.
    let global = ctx.global_runtime_state();
    let lib: SharedModule = match global.lib.as_slice() {
        [one] => one.clone(),
        many => {
            let mut merged = Module::new();
            for m in many {
                merged.merge(m);
            }
            merged.into()
        }
    };
    let mut imports: Vec<(ImmutableString, SharedModule)> =
        global.iter_imports_raw().map(|(n, m)| (n.clone(), m.clone())).collect();
    imports.reverse();
    let entry = Forward { engine: super::build_engine(session), lib, imports, closure, this };
    FORWARDS.with(|t| t.borrow_mut().insert(id, Rc::new(entry)));
    let config = serde_json::json!({ "model_type": SCRIPTED, "layers": specs });
    let net = ClosureNet { id, config, drop_rng: dropout.then_some(drop_rng) };
    let model = Model::new(Arc::new(net), Params::new(varmap));
    model.set_precision(session.precision);
    op("model", copy_nested(&model, &nested))?;
    Ok(model)
}

/// Registers `model(#{ layers, forward })`.
pub fn register(engine: &mut Engine, session: &Rc<Session>) {
    let s = session.clone();
    api!(engine, "model", "definition: Map -> Model",
        "A model with a forward closure: model(#{ layers: #{ conv1: conv2d(3, 16, 3), fc: linear(16, 10) }, forward: |x| { let h = relu(this.conv1.forward(x)); this.fc.forward(flatten(h, 1)) } }). Tensors are named by the layer's key (conv1.weight; a list gives name.0, a map name.key); `this` holds the model's layers, and gradients flow through the closure's tensor ops to all of them; train and eval mode reach dropout and BatchNorm. Every step function, freeze, save/load and checkpoints work on it; from_pretrained cannot rebuild it (the closure is code): build it with the script and m.load(path).",
        move |ctx: NativeCallContext, o: Map| closure_model(&ctx, &s, o));
}

//! `build_engine`: the one place a Rhai engine is configured, used by `run`, `check`, `api` and
//! the tests.

use crate::session::Session;
use rhai::module_resolvers::FileModuleResolver;
use rhai::{Dynamic, Engine};
use std::rc::Rc;

/// An engine with the whole samhost API registered over `session`. Modules are imported
/// relative to the script's folder (`import "lib/common" as common;`).
pub fn build_engine(session: &Rc<Session>) -> Engine {
    let mut engine = Engine::new();
    let base = session.script.as_ref().and_then(|p| p.parent().map(|d| d.to_path_buf())).unwrap_or_else(|| ".".into());
    engine.set_module_resolver(FileModuleResolver::new_with_path(base));
    engine.set_max_call_levels(256);

    super::tensor::register(&mut engine, session);
    super::tensor_set::register(&mut engine);
    super::tensor_select::register(&mut engine);
    super::config::register(&mut engine, session);
    super::model::register(&mut engine, session);
    super::layers::register(&mut engine, session);
    super::forward_model::register(&mut engine, session);
    super::hub::register(&mut engine, session);
    super::optim::register(&mut engine);
    super::dist::register(&mut engine);
    super::train::register(&mut engine, session);
    super::data::register(&mut engine, session);
    crate::script::runlog::register(&mut engine, session);
    super::run::register(&mut engine, session);
    super::diagnostics::register(&mut engine, session);

    let s = session.clone();
    // The script's own output: --quiet silences the host's messages, not this.
    // With several ranks, rank 0 prints for all.
    let leader = crate::dist::is_leader();
    engine.on_print(move |text| match s.run.try_borrow() {
        _ if !leader => {}
        Ok(r) => r.progress.suspend(|| println!("{text}")),
        Err(_) => println!("{text}"),
    });
    let quiet = session.quiet;
    engine.on_debug(move |text, source, pos| {
        if !quiet {
            let src = source.unwrap_or("script");
            eprintln!("[debug] {src}:{pos}: {text}");
        }
    });
    let s = session.clone();
    engine.on_progress(move |_| if s.stop_requested() { Some(Dynamic::from("interrupted")) } else { None });
    engine
}

//! `samhost run` and `samhost check`: read a script, build the engine over the run's session
//! ([`crate::run::Run`] owns the lifecycle), run or check it, and turn every failure into a
//! located report.

use super::report::Sources;
use crate::run::{Run, RunStatus};
use crate::session::{Session, SessionOptions};
use std::path::Path;
use std::rc::Rc;

/// How a command ended: the exit code and the report to print (if any).
pub struct Outcome {
    /// 0 ok, 1 script failed, 2 usage error, 101 crashed (a samhost bug), 130 / 143 / 129
    /// stopped by SIGINT / SIGTERM / SIGHUP.
    pub code: i32,
    /// Error reports, already formatted (`error: …`).
    pub reports: Vec<String>,
}

impl Outcome {
    fn ok() -> Self {
        Self { code: 0, reports: Vec::new() }
    }

    fn fail(code: i32, report: String) -> Self {
        Self { code, reports: vec![report] }
    }
}

/// Reads a script, naming the file when it cannot.
pub fn read_script(path: &Path) -> Result<String, String> {
    if path.is_dir() {
        return Err(format!("error: {}: is a folder, not a script", path.display()));
    }
    std::fs::read_to_string(path).map_err(|e| format!("error: {}: cannot read the script: {e}", path.display()))
}

/// Whether a script error is the stop requested by Ctrl-C (possibly inside script functions).
fn is_interrupt(e: &rhai::EvalAltResult) -> bool {
    match e {
        rhai::EvalAltResult::ErrorTerminated(..) => true,
        rhai::EvalAltResult::ErrorInFunctionCall(_, _, inner, _) | rhai::EvalAltResult::ErrorInModule(_, inner, _) => {
            is_interrupt(inner)
        }
        _ => false,
    }
}

/// Runs `opts.script` to the end, recording the run in a run folder when `opts.runs_dir` or
/// `opts.resume` is given (the lifecycle is [`Run`]'s; this compiles, evaluates and reports).
pub fn run(opts: SessionOptions) -> Outcome {
    let Some(path) = opts.script.clone() else {
        return Outcome::fail(2, "error: no script given".into());
    };
    let text = match read_script(&path) {
        Ok(t) => t,
        Err(r) => return Outcome::fail(2, r),
    };
    let mut run = match Run::start(opts) {
        Ok(r) => r,
        Err(e) => return Outcome::fail(2, format!("error: {e:#}")),
    };
    let session = run.session().clone();
    session.say(&run.banner());
    let engine = super::build_engine(&session);
    let sources = Sources { main: path.clone(), text: text.clone() };
    let mut ast = match engine.compile(&text) {
        Ok(a) => a,
        Err(e) => return Outcome::fail(1, sources.parse_error(&path, &e)),
    };
    ast.set_source(path.display().to_string());
    if !session.overrides.is_empty() && !calls_config(&engine, &ast, &path) {
        let keys: Vec<&str> = session.overrides.iter().map(|(k, _)| k.as_str()).collect();
        return Outcome::fail(
            2,
            format!(
                "error: --set {}: {} never calls config(#{{...}}), so it takes no settings",
                keys.join(", "),
                path.display()
            ),
        );
    }
    if let Err(e) = run.open(&text, &super::check::imported_files(&engine, &path)) {
        return Outcome::fail(2, format!("error: {e:#}"));
    }

    // A panic is a bug in samhost; it still ends the run with its records written.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| engine.run_ast(&ast)));
    let (status, mut outcome) = match result {
        Ok(Ok(())) => (RunStatus::Finished, Outcome::ok()),
        Ok(Err(e)) if is_interrupt(&e) => {
            (RunStatus::Interrupted, Outcome { code: crate::run::signals::exit_code(), reports: Vec::new() })
        }
        Ok(Err(e)) => {
            let report = sources.runtime_error(&e);
            (RunStatus::Failed(report.clone()), Outcome::fail(1, report))
        }
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic without a message".into());
            let report = format!("error: samhost crashed (a bug; please report it): {msg}");
            (RunStatus::Crashed(msg), Outcome::fail(101, report))
        }
    };
    if let Err(e) = run.end(&status) {
        outcome.code = outcome.code.max(1);
        outcome.reports.push(format!("error: writing the run record: {e:#}"));
    }
    outcome
}

/// Whether the script or a module it imports calls `config`.
fn calls_config(engine: &rhai::Engine, ast: &rhai::AST, path: &Path) -> bool {
    let has = |ast: &rhai::AST| {
        let mut found = false;
        ast.walk(&mut |nodes: &[rhai::ASTNode]| {
            match nodes.last() {
                Some(rhai::ASTNode::Expr(rhai::Expr::FnCall(x, _)))
                | Some(rhai::ASTNode::Stmt(rhai::Stmt::FnCall(x, _))) => {
                    found |= x.name == "config";
                }
                _ => {}
            }
            !found
        });
        found
    };
    has(ast)
        || super::check::imported_files(engine, path)
            .iter()
            .any(|f| std::fs::read_to_string(f).ok().and_then(|t| engine.compile(&t).ok()).is_some_and(|a| has(&a)))
}

/// Checks a script without running it.
pub fn check(path: &Path) -> Outcome {
    let text = match read_script(path) {
        Ok(t) => t,
        Err(r) => return Outcome::fail(2, r),
    };
    let session = Rc::new(Session::cpu_for(path));
    let engine = super::build_engine(&session);
    let reports = super::check::check(&engine, path, &text);
    Outcome { code: if reports.is_empty() { 0 } else { 1 }, reports }
}

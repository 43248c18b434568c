//! `samhost run` and `samhost check`: read a script, build the engine, run or check it, and
//! turn every failure into a located report.

use super::report::Sources;
use crate::run::progress::ProgressMode;
use crate::run::record::RunInfo;
use crate::run::{RunDir, RunRecord, RunStatus};
use crate::session::{Session, SessionOptions, DEFAULT_SEED};
use std::path::Path;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

/// How a command ended: the exit code and the report to print (if any).
pub struct Outcome {
    /// 0 ok, 1 script failed, 2 usage error, 130 interrupted.
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

/// The `--set` overrides of a resumed run: those recorded in its config.json, then the ones
/// given now (which win).
fn merged_overrides(recorded: &serde_json::Value, given: &[(String, String)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = recorded
        .get("overrides")
        .and_then(serde_json::Value::as_object)
        .map(|o| {
            o.iter()
                .filter(|(k, _)| !given.iter().any(|(g, _)| g == *k))
                .map(|(k, v)| (k.clone(), v.as_str().map(String::from).unwrap_or_else(|| v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    out.extend(given.iter().cloned());
    out
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

/// Ctrl-C: the first press asks the script to stop after the current step (the session says so
/// when the script notices); the second exits at once.
fn install_ctrl_c(flag: Arc<AtomicBool>) {
    static PRESSES: AtomicUsize = AtomicUsize::new(0);
    // Only one handler per process: a second session in the same process keeps the first one.
    let _ = ctrlc::set_handler(move || {
        if PRESSES.fetch_add(1, Ordering::SeqCst) == 0 {
            flag.store(true, Ordering::SeqCst);
        } else {
            std::process::exit(130);
        }
    });
}

/// Runs `opts.script` to the end, recording the run in a run folder when `opts.runs_dir` or
/// `opts.resume` is given.
pub fn run(opts: SessionOptions) -> Outcome {
    let mut opts = opts;
    let Some(path) = opts.script.clone() else {
        return Outcome::fail(2, "error: no script given".into());
    };
    let text = match read_script(&path) {
        Ok(t) => t,
        Err(r) => return Outcome::fail(2, r),
    };
    let resume_dir = match &opts.resume {
        Some(d) => match RunDir::open(d) {
            Ok(r) => Some(r),
            Err(e) => return Outcome::fail(2, format!("error: {e:#}")),
        },
        None => None,
    };
    let mut seed_note = if opts.seed == DEFAULT_SEED { " (the default; --seed N to change)" } else { "" };
    if let Some(prev) = resume_dir.as_ref().and_then(|d| d.read_json("config.json").ok()) {
        if !opts.seed_given {
            if let Some(seed) = prev.get("seed").and_then(serde_json::Value::as_u64) {
                opts.seed = seed;
                seed_note = " (recorded by the run)";
            }
        }
        if !opts.precision_given {
            if let Some(p) = prev.get("dtype").and_then(serde_json::Value::as_str).and_then(|p| p.parse().ok()) {
                opts.precision = p;
            }
        }
        opts.overrides = merged_overrides(&prev, &opts.overrides);
    }
    let runs_dir = opts.runs_dir.clone();
    let (quiet, every) = (opts.quiet, opts.progress_every);
    let mut info = RunInfo {
        script: path.clone(),
        seed: opts.seed,
        device: String::new(),
        device_requested: opts.device.clone(),
        precision: opts.precision.name().into(),
        overrides: opts.overrides.clone(),
        command_line: opts.command_line.clone(),
    };
    let session = match Session::new(opts) {
        Ok(s) => Rc::new(s),
        Err(e) => return Outcome::fail(2, format!("error: {e:#}")),
    };
    info.device = crate::device::device_name(session.device());
    session.say(&format!(
        "samhost {}: {} on {}, {}, seed {}{seed_note}",
        env!("CARGO_PKG_VERSION"),
        path.display(),
        session.device_choice.describe(),
        session.precision,
        session.seed
    ));
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
    if let Err(r) = open_record(&session, &engine, &path, &text, resume_dir, runs_dir, info, quiet, every) {
        return Outcome::fail(2, r);
    }
    install_ctrl_c(session.interrupted.clone());

    let result = engine.run_ast(&ast);
    let (status, mut outcome) = match result {
        Ok(()) => (RunStatus::Finished, Outcome::ok()),
        Err(e) if is_interrupt(&e) => (RunStatus::Interrupted, Outcome { code: 130, reports: Vec::new() }),
        Err(e) => {
            let report = sources.runtime_error(&e);
            (RunStatus::Failed(report.clone()), Outcome::fail(1, report))
        }
    };
    if let Err(e) = close_record(&session, &path, &status) {
        outcome.code = outcome.code.max(1);
        outcome.reports.push(format!("error: writing the run record: {e:#}"));
    }
    outcome
}

/// Opens the run folder (new or resumed), copies the sources, and puts the record in the session.
#[allow(clippy::too_many_arguments)]
fn open_record(
    session: &Session,
    engine: &rhai::Engine,
    path: &Path,
    text: &str,
    resume_dir: Option<RunDir>,
    runs_dir: Option<std::path::PathBuf>,
    info: RunInfo,
    quiet: bool,
    every: u64,
) -> Result<(), String> {
    let mode = ProgressMode::detect(quiet, every);
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    let fail = |e: anyhow::Error| format!("error: {e:#}");
    let record = match (resume_dir, runs_dir) {
        (Some(dir), _) => {
            let copy = dir.script_dir().join(path.file_name().unwrap_or_default());
            if std::fs::read_to_string(&copy).is_ok_and(|t| t != text) {
                session.say(&format!("note: {} differs from the run's copy {}", path.display(), copy.display()));
            }
            let record = RunRecord::reopen(dir, info, mode).map_err(fail)?;
            match record.newest_checkpoint().map_err(fail)? {
                Some(c) => session.say(&format!(
                    "resuming {}: newest checkpoint {} ({} epochs done, step {})",
                    record.dir().map(|d| d.path().display().to_string()).unwrap_or_default(),
                    c.dir.display(),
                    c.state.epoch,
                    c.state.step
                )),
                None => session.say("note: the run folder has no checkpoint yet: starting from the beginning"),
            }
            record
        }
        (None, Some(runs)) => {
            let dir = RunDir::create(&runs, &stem, SystemTime::now()).map_err(fail)?;
            dir.copy_sources(path, &super::check::imported_files(engine, path)).map_err(fail)?;
            session.say(&format!("run folder: {}", dir.path().display()));
            RunRecord::create(dir, info, mode).map_err(fail)?
        }
        (None, None) => return Ok(()),
    };
    *session.run.borrow_mut() = record;
    Ok(())
}

/// Ends the run: the Ctrl-C checkpoint, summary.json, the plots, and the closing lines.
fn close_record(session: &Session, path: &Path, status: &RunStatus) -> anyhow::Result<()> {
    let mut run = session.run.borrow_mut();
    let interrupt_ck =
        if *status == RunStatus::Interrupted { run.write_interrupt_checkpoint(&session.rng)? } else { None };
    let plots = run.finish(status)?;
    let resume_unused = run.resume_unused();
    let steps = run.steps();
    let Some(dir) = run.dir().map(|d| d.path().to_path_buf()) else { return Ok(()) };
    drop(run);
    if resume_unused {
        session.say(
            "note: --resume was given but the script never called resume(model, opt, ...), so it ran from the beginning",
        );
    }
    if *status == RunStatus::Interrupted {
        let resume_cmd = format!("samhost run {} --resume {}", path.display(), dir.display());
        let msg = match interrupt_ck {
            Some(ck) => {
                format!("interrupted at step {steps}: checkpoint {}\ncontinue with: {resume_cmd}", ck.display())
            }
            None => format!(
                "interrupted at step {steps}; no checkpoint (the script had not called resume() or save_checkpoint())"
            ),
        };
        // Shown even with --quiet: it is the reason for exit code 130.
        eprintln!("{msg}");
    }
    session.say(&format!(
        "{}: {} (summary.json, metrics.jsonl, {} plot{} in plots/)",
        status.name(),
        dir.display(),
        plots.len(),
        if plots.len() == 1 { "" } else { "s" }
    ));
    Ok(())
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

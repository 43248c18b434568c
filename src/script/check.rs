//! `samhost check`: compile a script and the modules it imports without running anything, and
//! report syntax errors and calls of functions that do not exist.

use super::report::Sources;
use rhai::{ASTNode, Engine, Expr, Position, Stmt, AST};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Names callable like functions without being registered functions.
const KEYWORD_FUNCTIONS: [&str; 11] =
    ["print", "debug", "type_of", "Fn", "call", "curry", "is_def_var", "is_def_fn", "is_shared", "eval", "exit"];

/// Every function name the engine knows (registered, packages, operators).
pub fn known_functions(engine: &Engine) -> BTreeSet<String> {
    let mut names: BTreeSet<String> = engine
        .gen_fn_signatures(true)
        .into_iter()
        .filter_map(|sig| sig.split('(').next().map(|n| n.trim().trim_start_matches("fn ").to_string()))
        .collect();
    names.extend(KEYWORD_FUNCTIONS.iter().map(|s| s.to_string()));
    names
}

/// A problem found by `check`.
pub struct Problem {
    /// The file at fault.
    pub file: PathBuf,
    /// Where in it.
    pub pos: Position,
    /// What is wrong.
    pub message: String,
}

/// The modules a script imports with a constant path: (path as written, position).
pub fn imports(ast: &AST) -> Vec<(String, Position)> {
    let mut out = Vec::new();
    ast.walk(&mut |nodes: &[ASTNode]| {
        if let Some(ASTNode::Stmt(Stmt::Import(x, pos))) = nodes.last() {
            if let Expr::StringConstant(s, _) = &x.0 {
                out.push((s.to_string(), *pos));
            }
        }
        true
    });
    out
}

/// The file an import path refers to, relative to the importing script's folder.
pub fn module_file(importer: &Path, path: &str) -> PathBuf {
    let base = importer.parent().unwrap_or(Path::new("."));
    let p = Path::new(path);
    let p = if p.extension().is_some() { p.to_path_buf() } else { p.with_extension("rhai") };
    if p.is_absolute() {
        p
    } else {
        base.join(p)
    }
}

struct Checked {
    ast: AST,
}

/// Compiles `file` and everything it imports; returns the problems found, or the parse error
/// report. `files` caches compiled modules by path.
fn check_file(
    engine: &Engine,
    known: &BTreeSet<String>,
    file: &Path,
    files: &mut HashMap<PathBuf, Option<Checked>>,
    problems: &mut Vec<Problem>,
    sources: &Sources,
    reports: &mut Vec<String>,
) {
    if files.contains_key(file) {
        return;
    }
    files.insert(file.to_path_buf(), None);
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            reports.push(format!("error: {}: cannot read: {e}", file.display()));
            return;
        }
    };
    let ast = match engine.compile(&text) {
        Ok(a) => a,
        Err(e) => {
            reports.push(sources.parse_error(file, &e));
            return;
        }
    };
    // Modules first, so namespaced calls can be checked against their functions.
    let mut aliases: HashMap<String, PathBuf> = HashMap::new();
    for (path, _) in imports(&ast) {
        let mf = module_file(file, &path);
        check_file(engine, known, &mf, files, problems, sources, reports);
        let alias = ast_import_alias(&ast, &path);
        if let Some(a) = alias {
            aliases.insert(a, mf);
        }
    }
    let script_fns: BTreeSet<String> = ast.iter_functions().map(|f| f.name.to_string()).collect();
    let mut variables: BTreeSet<String> = BTreeSet::new();
    ast.walk(&mut |nodes: &[ASTNode]| {
        if let Some(ASTNode::Stmt(Stmt::Var(x, ..))) = nodes.last() {
            variables.insert(x.0.name.to_string());
        }
        true
    });
    for f in ast.iter_functions() {
        variables.extend(f.params.iter().map(|p| p.to_string()));
    }
    let mut calls: Vec<(String, String, Position)> = Vec::new();
    ast.walk(&mut |nodes: &[ASTNode]| {
        match nodes.last() {
            // Operators (`+`, `..`, ...) always exist; their argument types are checked at run time.
            Some(ASTNode::Expr(Expr::FnCall(x, pos))) | Some(ASTNode::Stmt(Stmt::FnCall(x, pos)))
                if x.op_token.is_none() =>
            {
                calls.push((x.namespace.to_string(), x.name.to_string(), *pos));
            }
            Some(ASTNode::Expr(Expr::MethodCall(x, pos))) => {
                calls.push((String::new(), x.name.to_string(), *pos));
            }
            _ => {}
        }
        true
    });
    for (ns, name, pos) in calls {
        if name.starts_with("anon$") || name.contains('$') {
            continue;
        }
        if !ns.is_empty() {
            let alias = ns.trim_end_matches("::").to_string();
            let found = aliases.get(&alias).and_then(|mf| files.get(mf)).and_then(|c| c.as_ref());
            match found {
                Some(c) if c.ast.iter_functions().any(|f| f.name == name) => {}
                Some(_) => problems.push(Problem {
                    file: file.to_path_buf(),
                    pos,
                    message: format!("module `{alias}` has no function `{name}`"),
                }),
                None => {}
            }
            continue;
        }
        if known.contains(&name) || script_fns.contains(&name) || variables.contains(&name) {
            continue;
        }
        problems.push(Problem { file: file.to_path_buf(), pos, message: format!("unknown function `{name}`") });
    }
    files.insert(file.to_path_buf(), Some(Checked { ast }));
}

fn ast_import_alias(ast: &AST, path: &str) -> Option<String> {
    let mut alias = None;
    ast.walk(&mut |nodes: &[ASTNode]| {
        if let Some(ASTNode::Stmt(Stmt::Import(x, _))) = nodes.last() {
            if let Expr::StringConstant(s, _) = &x.0 {
                if s.as_str() == path && !x.1.name.is_empty() {
                    alias = Some(x.1.name.to_string());
                }
            }
        }
        true
    });
    alias
}

/// Checks `script`; returns the error reports (empty when the script is fine).
pub fn check(engine: &Engine, script: &Path, text: &str) -> Vec<String> {
    let sources = Sources { main: script.to_path_buf(), text: text.to_string() };
    let known = known_functions(engine);
    let mut files = HashMap::new();
    let mut problems = Vec::new();
    let mut reports = Vec::new();
    check_file(engine, &known, script, &mut files, &mut problems, &sources, &mut reports);
    for p in problems {
        reports.push(sources.located("error", &p.file, p.pos, &p.message));
    }
    reports
}

/// The files of every module `script` imports, transitively (for copying into the run folder).
pub fn imported_files(engine: &Engine, script: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    let mut stack = vec![script.to_path_buf()];
    while let Some(f) = stack.pop() {
        let Ok(text) = std::fs::read_to_string(&f) else { continue };
        let Ok(ast) = engine.compile(&text) else { continue };
        for (path, _) in imports(&ast) {
            let mf = module_file(&f, &path);
            if !out.contains(&mf) && mf.is_file() {
                out.push(mf.clone());
                stack.push(mf);
            }
        }
    }
    out
}

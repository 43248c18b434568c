//! Error reports for scripts: `error: FILE:LINE:COL: message`, the source line and a caret,
//! then where the failing call was made from.

use rhai::{EvalAltResult, ParseError, Position};
use std::path::{Path, PathBuf};

/// Where script sources live, to show the offending line.
pub struct Sources {
    /// The main script's path as the user gave it.
    pub main: PathBuf,
    /// The main script's text.
    pub text: String,
}

impl Sources {
    /// The file an `import` path or a function's source name refers to.
    fn resolve(&self, name: &str) -> PathBuf {
        let p = Path::new(name);
        if p.is_file() || p.is_absolute() {
            return p.to_path_buf();
        }
        let base = self.main.parent().unwrap_or(Path::new("."));
        let with_ext = if p.extension().is_some() { p.to_path_buf() } else { p.with_extension("rhai") };
        base.join(with_ext)
    }

    fn text_of(&self, file: &Path) -> Option<String> {
        if file == self.main {
            Some(self.text.clone())
        } else {
            std::fs::read_to_string(file).ok()
        }
    }

    /// One located message with its source line and a caret.
    pub fn located(&self, kind: &str, file: &Path, pos: Position, message: &str) -> String {
        let (Some(line), Some(col)) = (pos.line(), pos.position()) else {
            return format!("{kind}: {}: {message}", file.display());
        };
        let mut out = format!("{kind}: {}:{line}:{col}: {message}", file.display());
        if let Some(text) = self.text_of(file) {
            if let Some(src) = text.lines().nth(line - 1) {
                let num = line.to_string();
                let pad = " ".repeat(num.len());
                let caret = " ".repeat(col.saturating_sub(1));
                out.push_str(&format!("\n{pad} |\n{num} | {src}\n{pad} | {caret}^"));
            }
        }
        out
    }

    /// The report of a parse error in `file`.
    pub fn parse_error(&self, file: &Path, e: &ParseError) -> String {
        self.located("error", file, e.position(), &e.err_type().to_string())
    }

    /// The report of a runtime (or parse) error of the main script.
    pub fn runtime_error(&self, e: &EvalAltResult) -> String {
        let mut file = self.main.clone();
        let mut notes = Vec::new();
        let mut cur = e;
        loop {
            match cur {
                EvalAltResult::ErrorInFunctionCall(name, source, inner, pos) => {
                    notes.push(self.located("note", &file, *pos, &format!("in the call to `{name}`")));
                    if !source.is_empty() {
                        file = self.resolve(source);
                    }
                    cur = inner;
                }
                EvalAltResult::ErrorInModule(path, inner, pos) => {
                    notes.push(self.located("note", &file, *pos, &format!("while loading module `{path}`")));
                    file = self.resolve(path);
                    cur = inner;
                }
                _ => break,
            }
        }
        let pos = cur.position();
        let message = match cur {
            EvalAltResult::ErrorRuntime(v, _) => v.to_string(),
            EvalAltResult::ErrorParsing(t, _) => t.to_string(),
            EvalAltResult::ErrorTerminated(..) => "interrupted".to_string(),
            other => {
                let text = other.to_string();
                match text.rfind(" (line ") {
                    Some(i) if text.ends_with(')') => text[..i].to_string(),
                    _ => text,
                }
            }
        };
        let mut out = self.located("error", &file, pos, &message);
        for n in notes.iter().rev() {
            out.push('\n');
            out.push_str(n);
        }
        out
    }
}

//! The run folder: `<runs-dir>/<script>-<YYYYMMDD-HHMMSS>` (UTC), holding a copy of the script and
//! of the modules it imports (`script/`), `config.json`, `metrics.jsonl`, `summary.json`,
//! `checkpoints/` and `plots/`.

use crate::fsutil::write_bytes_atomic;
use anyhow::{bail, Context, Result};
use std::path::{Component, Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// A run folder on disk.
#[derive(Clone, Debug)]
pub struct RunDir {
    path: PathBuf,
}

/// A time as `(YYYYMMDD-HHMMSS, YYYY-MM-DDTHH:MM:SSZ)`, both in UTC.
pub fn utc_stamp(t: SystemTime) -> (String, String) {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (proleptic Gregorian), in 400-year eras.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        format!("{year:04}{month:02}{day:02}-{h:02}{m:02}{s:02}"),
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z"),
    )
}

/// The current time as an ISO 8601 UTC string.
pub fn now_iso() -> String {
    utc_stamp(SystemTime::now()).1
}

/// A file-name-safe version of a script's stem.
fn safe_stem(stem: &str) -> String {
    let s: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' { c } else { '_' })
        .collect();
    if s.is_empty() {
        "run".into()
    } else {
        s
    }
}

impl RunDir {
    /// Creates a new run folder under `runs_dir` for the script called `stem`, named after the
    /// time `when`; `-2`, `-3`, … is appended when that name is taken.
    pub fn create(runs_dir: &Path, stem: &str, when: SystemTime) -> Result<Self> {
        std::fs::create_dir_all(runs_dir)
            .with_context(|| format!("--runs-dir {}: cannot create the folder", runs_dir.display()))?;
        let base = format!("{}-{}", safe_stem(stem), utc_stamp(when).0);
        for n in 1..10_000 {
            let name = if n == 1 { base.clone() } else { format!("{base}-{n}") };
            let path = runs_dir.join(name);
            match std::fs::create_dir(&path) {
                Ok(()) => {
                    let dir = Self { path };
                    dir.make_subfolders()?;
                    return Ok(dir);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).with_context(|| format!("{}: cannot create the run folder", path.display())),
            }
        }
        bail!("{}: no free run folder name for {base}", runs_dir.display())
    }

    /// Opens an existing run folder (to resume it): it must hold a `config.json`.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_dir() {
            bail!("--resume {}: no such run folder", path.display());
        }
        if !path.join("config.json").is_file() {
            bail!("--resume {}: not a run folder (it has no config.json)", path.display());
        }
        let dir = Self { path: path.to_path_buf() };
        dir.make_subfolders()?;
        Ok(dir)
    }

    fn make_subfolders(&self) -> Result<()> {
        for sub in [self.checkpoints(), self.plots()] {
            std::fs::create_dir_all(&sub).with_context(|| format!("{}: cannot create the folder", sub.display()))?;
        }
        Ok(())
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The folder's name (e.g. `quickstart-20250101-120000`).
    pub fn name(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// `config.json`.
    pub fn config_file(&self) -> PathBuf {
        self.path.join("config.json")
    }

    /// `metrics.jsonl`.
    pub fn metrics_file(&self) -> PathBuf {
        self.path.join("metrics.jsonl")
    }

    /// `summary.json`.
    pub fn summary_file(&self) -> PathBuf {
        self.path.join("summary.json")
    }

    /// `checkpoints/`.
    pub fn checkpoints(&self) -> PathBuf {
        self.path.join("checkpoints")
    }

    /// `plots/`.
    pub fn plots(&self) -> PathBuf {
        self.path.join("plots")
    }

    /// `script/`: the copies of the script and its modules.
    pub fn script_dir(&self) -> PathBuf {
        self.path.join("script")
    }

    /// Writes `value` as pretty JSON to `name` in the folder, atomically.
    pub fn write_json(&self, name: &str, value: &serde_json::Value) -> Result<()> {
        let mut text = serde_json::to_string_pretty(value)?;
        text.push('\n');
        write_bytes_atomic(&self.path.join(name), text.as_bytes())
    }

    /// Reads a JSON file of the folder.
    pub fn read_json(&self, name: &str) -> Result<serde_json::Value> {
        let p = self.path.join(name);
        let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", p.display()))
    }

    /// Copies the script and the modules it imports into `script/`, keeping the modules' paths
    /// relative to the script (so the copy runs as it is); a module outside the script's folder
    /// goes to `script/external/`.
    pub fn copy_sources(&self, script: &Path, modules: &[PathBuf]) -> Result<()> {
        let dest = self.script_dir();
        let base = script.parent().unwrap_or(Path::new("."));
        let mut files = vec![(script.to_path_buf(), PathBuf::from(script.file_name().unwrap_or_default()))];
        for m in modules {
            let rel = match m.strip_prefix(base) {
                Ok(r) if r.components().all(|c| matches!(c, Component::Normal(_))) => r.to_path_buf(),
                _ => Path::new("external").join(m.file_name().unwrap_or_default()),
            };
            files.push((m.clone(), rel));
        }
        for (src, rel) in files {
            let to = dest.join(rel);
            if let Some(parent) = to.parent() {
                std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
            }
            let bytes = std::fs::read(&src).with_context(|| format!("{}: cannot read", src.display()))?;
            write_bytes_atomic(&to, &bytes)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stamps_are_utc_calendar_dates() {
        let t = UNIX_EPOCH + Duration::from_secs(951_782_400 + 3661); // 2000-02-29 01:01:01
        assert_eq!(utc_stamp(t), ("20000229-010101".into(), "2000-02-29T01:01:01Z".into()));
        let t = UNIX_EPOCH + Duration::from_secs(1_735_689_599); // 2024-12-31 23:59:59
        assert_eq!(utc_stamp(t).0, "20241231-235959");
    }

    #[test]
    fn taken_names_get_a_suffix() {
        let tmp = tempfile::tempdir().unwrap();
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let a = RunDir::create(tmp.path(), "my script", t).unwrap();
        let b = RunDir::create(tmp.path(), "my script", t).unwrap();
        assert_eq!(a.name(), "my_script-20231114-221320");
        assert_eq!(b.name(), "my_script-20231114-221320-2");
        assert!(a.checkpoints().is_dir() && a.plots().is_dir());
        assert!(RunDir::open(a.path()).is_err(), "no config.json yet");
    }
}

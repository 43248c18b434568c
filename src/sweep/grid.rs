//! The sweep's definition: `--grid KEY=V1,V2,...` options expanded (with `--seeds N`) into
//! points, saved as `sweep.json` so a Slurm task or `--collect` finds the same points.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One point of the grid: its settings and seed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    /// Its index (the Slurm array task id), from 0.
    pub index: usize,
    /// `--set KEY=VALUE` for each grid key, in grid order.
    pub settings: Vec<(String, String)>,
    /// `--seed`, when the sweep gives seeds.
    pub seed: Option<u64>,
}

impl SweepPoint {
    /// `rho=0.05 noise=0.2 seed=1`.
    pub fn label(&self) -> String {
        let mut parts: Vec<String> = self.settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if let Some(s) = self.seed {
            parts.push(format!("seed={s}"));
        }
        parts.join(" ")
    }
}

/// A sweep: the script, the grid, what every point also gets, and the points.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sweep {
    /// The script (an absolute path).
    pub script: PathBuf,
    /// The grid keys and their values, in the order given.
    pub grid: Vec<(String, Vec<String>)>,
    /// `--set` options every point gets.
    pub fixed: Vec<(String, String)>,
    /// Further `samhost run` options every point gets (`--device`, `--dtype`, `--offline`).
    pub run_args: Vec<String>,
    /// Seeds 1..=N, or none (the script's default seed).
    pub seeds: Option<u64>,
    /// The points: every combination of the grid values, then of the seeds.
    pub points: Vec<SweepPoint>,
}

/// Parses one `--grid` value, `KEY=V1,V2,...`.
pub fn parse_grid(s: &str) -> Result<(String, Vec<String>)> {
    let Some((k, vs)) = s.split_once('=') else {
        bail!("--grid {s}: expected KEY=V1,V2,... (e.g. --grid rho=0,0.05,0.1)");
    };
    let k = k.trim();
    if k.is_empty() {
        bail!("--grid {s}: the key is empty");
    }
    let values: Vec<String> = vs.split(',').map(|v| v.trim().to_string()).collect();
    if values.iter().any(String::is_empty) {
        bail!("--grid {s}: an empty value (values are separated by commas)");
    }
    Ok((k.to_string(), values))
}

impl Sweep {
    /// The sweep of `script` over `grid` (each key once, and not also in `fixed`), with `seeds`.
    pub fn new(
        script: &Path,
        grid: Vec<(String, Vec<String>)>,
        fixed: Vec<(String, String)>,
        run_args: Vec<String>,
        seeds: Option<u64>,
    ) -> Result<Self> {
        let script = script.canonicalize().with_context(|| format!("{}: no such script", script.display()))?;
        for (i, (k, _)) in grid.iter().enumerate() {
            if grid[..i].iter().any(|(other, _)| other == k) {
                bail!("--grid {k}: given twice (list all its values in one --grid)");
            }
            if fixed.iter().any(|(f, _)| f == k) {
                bail!("{k}: both a --grid key and a --set; give one");
            }
            if k == "seed" {
                bail!("--grid seed: use --seeds N (seeds 1..N) for the run's seed");
            }
        }
        if seeds == Some(0) {
            bail!("--seeds must be at least 1");
        }
        let mut combos: Vec<Vec<(String, String)>> = vec![Vec::new()];
        for (k, values) in &grid {
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.push((k.clone(), v.clone()));
                        c
                    })
                })
                .collect();
        }
        let seed_list: Vec<Option<u64>> = match seeds {
            Some(n) => (1..=n).map(Some).collect(),
            None => vec![None],
        };
        let mut points = Vec::new();
        for c in &combos {
            for s in &seed_list {
                points.push(SweepPoint { index: points.len(), settings: c.clone(), seed: *s });
            }
        }
        Ok(Self { script, grid, fixed, run_args, seeds, points })
    }

    /// Reads `DIR/sweep.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("sweep.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read (is {} a sweep folder?)", path.display(), dir.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a sweep definition", path.display()))
    }

    /// Writes `DIR/sweep.json` (atomically).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        crate::fsutil::write_bytes_atomic(&dir.join("sweep.json"), text.as_bytes())
    }

    /// The folder of point `index` (`points/007`).
    pub fn point_dir(dir: &Path, index: usize) -> PathBuf {
        dir.join("points").join(format!("{index:03}"))
    }

    /// The `samhost run` arguments of point `p`, its runs going under `runs_dir`.
    pub fn run_command(&self, p: &SweepPoint, runs_dir: &Path) -> Vec<String> {
        let mut args = vec!["run".to_string(), self.script.display().to_string(), "--quiet".into()];
        for (k, v) in self.fixed.iter().chain(&p.settings) {
            args.push("--set".into());
            args.push(format!("{k}={v}"));
        }
        if let Some(s) = p.seed {
            args.push("--seed".into());
            args.push(s.to_string());
        }
        args.extend(self.run_args.iter().cloned());
        args.push("--runs-dir".into());
        args.push(runs_dir.display().to_string());
        args
    }

    /// A new sweep folder under `runs_dir`, named after the script and the time.
    pub fn create_dir(&self, runs_dir: &Path) -> Result<PathBuf> {
        let stem = self.script.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "sweep".into());
        let dir = crate::run::rundir::RunDir::create(runs_dir, &format!("sweep-{stem}"), std::time::SystemTime::now())?;
        let path = dir.path().to_path_buf();
        // RunDir makes a run's subfolders; a sweep folder has its own layout.
        for sub in ["checkpoints", "plots", "script"] {
            let _ = std::fs::remove_dir(path.join(sub));
        }
        std::fs::create_dir_all(path.join("points")).with_context(|| format!("{}: cannot create", path.display()))?;
        path.canonicalize().with_context(|| format!("{}: cannot resolve", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_expands_in_order_with_seeds_last() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("s.rhai");
        std::fs::write(&script, "").unwrap();
        let grid = vec![parse_grid("rho=0,0.05").unwrap(), parse_grid("noise = 0.2, 0.4").unwrap()];
        let s = Sweep::new(&script, grid, vec![], vec![], Some(2)).unwrap();
        assert_eq!(s.points.len(), 8);
        assert_eq!(s.points[0].label(), "rho=0 noise=0.2 seed=1");
        assert_eq!(s.points[1].label(), "rho=0 noise=0.2 seed=2");
        assert_eq!(s.points[7].label(), "rho=0.05 noise=0.4 seed=2");
        assert!(parse_grid("rho").is_err() && parse_grid("rho=0,,1").is_err() && parse_grid("=1").is_err());
        let twice = vec![parse_grid("rho=0").unwrap(), parse_grid("rho=1").unwrap()];
        assert!(Sweep::new(&script, twice, vec![], vec![], None).is_err());
        let clash =
            Sweep::new(&script, vec![parse_grid("rho=0").unwrap()], vec![("rho".into(), "1".into())], vec![], None);
        assert!(clash.is_err());
    }
}

//! The files of a Hub dataset split: found in the cache by the naming rules the `datasets`
//! library uses (`{config}/{split}-*.parquet`, `data/{split}-*.parquet`,
//! `{config}/{split}/*.parquet`, ...), or downloaded into it. A download resolves the revision to
//! a commit, reads the Hub's file list at that commit (its `tree` API), picks the parquet files of
//! the split by the same rules, and fetches each through [`HubRepo`] (timeouts, token, CDN
//! redirects, progress), so they land in the standard layout; `refs/<revision>` is written once
//! every file is there.

use super::cache::RepoKind;
use super::repo::{HubOptions, HubRepo, Lookup};
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))? {
        let p = e.with_context(|| format!("{}: cannot list", dir.display()))?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "parquet") {
            out.push(p);
        }
    }
    Ok(())
}

/// Whether a file (path relative to the snapshot) belongs to `split`.
pub fn in_split(rel: &Path, split: &str) -> bool {
    let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let dirs = rel.parent().map(|p| p.iter().any(|c| c == split)).unwrap_or(false);
    dirs || name.starts_with(&format!("{split}-")) || name.starts_with(&format!("{split}."))
}

/// The split a parquet file (path relative to the snapshot) holds, by the naming rules of
/// [`in_split`]: the name up to its first `-` or `.` (`train-00000-of-00001.parquet`), or the
/// folder when the name is a number (`plain_text/train/0000.parquet`).
pub fn split_of(rel: &Path) -> String {
    let name = rel.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let head = name.split(['-', '.']).next().unwrap_or_default();
    if head.is_empty() || head.bytes().all(|b| b.is_ascii_digit()) {
        if let Some(dir) = rel.parent().and_then(|p| p.file_name()) {
            return dir.to_string_lossy().into_owned();
        }
    }
    head.to_string()
}

/// The configuration of a file in a snapshot: the first folder under
/// `.../snapshots/<commit>/`, or "" for a file at the top.
fn config_of(p: &Path) -> String {
    let parts: Vec<String> = p.iter().map(|c| c.to_string_lossy().into_owned()).collect();
    let at = parts.iter().rposition(|c| c == "snapshots").map(|i| i + 2).unwrap_or(0);
    if at + 1 < parts.len() {
        parts[at].clone()
    } else {
        String::new()
    }
}

/// Of the files of `split` (paths under `.../snapshots/<commit>/`), those of `config`; with no
/// config, all of them when they are of one configuration, else an error naming the
/// configurations. `what` names the dataset in errors.
pub fn select_config(what: &str, split: &str, mut files: Vec<PathBuf>, config: Option<&str>) -> Result<Vec<PathBuf>> {
    let mut configs: Vec<String> = files.iter().map(|f| config_of(f)).collect();
    configs.sort();
    configs.dedup();
    match config {
        Some(c) => {
            files.retain(|f| config_of(f) == c);
            if files.is_empty() {
                bail!(
                    "{what}: no `{split}` files under config `{c}` (configs with that split: {})",
                    configs.join(", ")
                );
            }
        }
        None if configs.len() > 1 => {
            bail!("{what}: split `{split}` exists in several configs ({}); give config", configs.join(", "))
        }
        None => {}
    }
    Ok(files)
}

/// The parquet files of `split` of dataset `repo` at `revision` in the cache folder `cache`.
pub fn resolve_dataset_files_in(cache: &Path, repo: &str, revision: &str, split: &str) -> Result<Vec<PathBuf>> {
    let root = cache.join(format!("datasets--{}", repo.replace('/', "--")));
    if !root.is_dir() {
        bail!("dataset {repo} is not in the cache ({})", root.display());
    }
    let is_commit = revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit());
    let commit = if is_commit && root.join("snapshots").join(revision).is_dir() {
        revision.to_string()
    } else {
        let r = root.join("refs").join(revision);
        std::fs::read_to_string(&r)
            .with_context(|| format!("dataset {repo}: revision `{revision}` is not in the cache ({})", r.display()))?
            .trim()
            .to_string()
    };
    let snap = root.join("snapshots").join(&commit);
    if !snap.is_dir() {
        bail!("dataset {repo}: the cache names commit {commit} for `{revision}` but {} is missing", snap.display());
    }
    let mut all = Vec::new();
    walk(&snap, &mut all)?;
    let mut files: Vec<PathBuf> =
        all.iter().filter(|p| p.strip_prefix(&snap).map(|r| in_split(r, split)).unwrap_or(false)).cloned().collect();
    files.sort();
    if files.is_empty() {
        let names: Vec<String> =
            all.iter().filter_map(|p| p.strip_prefix(&snap).ok()).map(|p| p.display().to_string()).collect();
        bail!(
            "dataset {repo}@{revision}: no parquet file for split `{split}` in the cache (parquet files: {})",
            if names.is_empty() { "none".into() } else { names.join(", ") }
        );
    }
    Ok(files)
}

/// The parquet files of `split` of dataset `repo` at `revision`, from the local Hugging Face
/// cache only (no network).
pub fn resolve_dataset_files(repo: &str, revision: &str, split: &str) -> Result<Vec<PathBuf>> {
    resolve_dataset_files_in(&super::cache::hub_cache_dir(), repo, revision, split)
}

/// The parquet files of a Hub dataset split (of `config`, when given): from the cache
/// `hub.cache_dir`, else downloaded into it (unless `hub.offline`).
pub fn hub_dataset_files(
    hub: &HubOptions,
    repo: &str,
    revision: &str,
    split: &str,
    config: Option<&str>,
) -> Result<Vec<PathBuf>> {
    let offline_note = "offline (HF_HUB_OFFLINE or --offline): the Hugging Face cache only";
    let cached = match resolve_dataset_files_in(&hub.cache_dir, repo, revision, split) {
        // The split is cached: the config rules decide, except that a config missing from the
        // cache may be on the Hub.
        Ok(found) => match select_config(&format!("dataset {repo}@{revision}"), split, found, config) {
            Ok(f) => return Ok(f),
            Err(e) if config.is_none() => return Err(e),
            Err(e) => e,
        },
        Err(e) => e,
    };
    if hub.offline {
        return Err(cached.context(offline_note));
    }
    download_dataset_files(hub, repo, revision, split, config)
}

/// How many file names an error lists at most.
const SHOWN: usize = 12;

fn shown(names: &[String]) -> String {
    let mut s = names.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(", ... ({} in all)", names.len()));
    }
    s
}

/// Whether a path listed by the Hub can name a file in a snapshot (relative, no `..`).
fn is_plain_path(rel: &str) -> bool {
    !rel.contains('\\') && rel.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

/// The splits the parquet files `rels` (paths in the repository) hold, with their
/// configurations: `train (plain_text), test (plain_text)`.
fn splits_found(rels: &[String]) -> String {
    let found: BTreeSet<(String, String)> = rels
        .iter()
        .map(|r| {
            let p = Path::new(r);
            let config = if p.components().count() > 1 {
                p.iter().next().map(|c| c.to_string_lossy().into_owned()).unwrap_or_default()
            } else {
                String::new()
            };
            (split_of(p), config)
        })
        .collect();
    found
        .iter()
        .map(|(s, c)| if c.is_empty() { s.clone() } else { format!("{s} ({c})") })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Fetches the parquet files of `split` (of `config`, when given) of dataset `repo` at
/// `revision` into the cache `hub.cache_dir` and returns their paths there (files already
/// cached are not fetched again). Errors name the dataset, revision and split, and what is
/// wrong: no such repository or revision, no parquet file for the split (with the splits
/// found), a timeout.
pub fn download_dataset_files(
    hub: &HubOptions,
    repo: &str,
    revision: &str,
    split: &str,
    config: Option<&str>,
) -> Result<Vec<PathBuf>> {
    let what = format!("dataset {repo}@{revision} (split `{split}`)");
    if hub.offline {
        bail!("{what}: offline (HF_HUB_OFFLINE or --offline), so nothing can be downloaded");
    }
    let mut r = HubRepo::of_kind(hub, RepoKind::Dataset, repo, Some(revision)).with_context(|| what.clone())?;
    let commit = r.resolve_online().with_context(|| what.clone())?;
    let entries = r.list_files().with_context(|| what.clone())?;
    let parquet: Vec<String> =
        entries.iter().filter(|e| e.is_file() && e.path.ends_with(".parquet")).map(|e| e.path.clone()).collect();
    if parquet.is_empty() {
        let files: Vec<String> = entries.iter().filter(|e| e.is_file()).map(|e| e.path.clone()).collect();
        bail!(
            "{what}: the repository has no parquet files (files: {}); datasets stored in another format have a \
             parquet copy on the Hub: give revision: \"refs/convert/parquet\"",
            if files.is_empty() { "none".to_string() } else { shown(&files) }
        );
    }
    let in_this: Vec<&String> = parquet.iter().filter(|p| in_split(Path::new(p.as_str()), split)).collect();
    if let Some(bad) = in_this.iter().find(|p| !is_plain_path(p)) {
        bail!("{what}: the Hub listed the unusable path `{bad}`");
    }
    if in_this.is_empty() {
        bail!("{what}: no parquet file for split `{split}`; splits found: {}", splits_found(&parquet));
    }
    // The paths the files will have in the snapshot, so the configuration rules of the cache apply.
    let snap = r.cache_dir().join("snapshots").join(&commit);
    let wanted: Vec<PathBuf> = in_this.iter().map(|p| snap.join(p.as_str())).collect();
    let wanted = select_config(&format!("dataset {repo}@{revision}"), split, wanted, config)?;
    let mut files = Vec::with_capacity(wanted.len());
    for path in &wanted {
        let rel = path.strip_prefix(&snap).unwrap_or(path).to_string_lossy().replace('\\', "/");
        match r.file(&rel).with_context(|| format!("{what}: {rel}"))? {
            Lookup::Found(p) => files.push(p),
            Lookup::Missing => bail!("{what}: the Hub lists {rel} but does not serve it"),
            Lookup::NotCached => bail!("{what}: {rel} is not in the cache and the session is offline"),
        }
    }
    r.write_ref().with_context(|| what.clone())?;
    files.sort();
    Ok(files)
}

//! Downloading one split of a Hub dataset into the Hugging Face cache: the revision is resolved
//! to a commit, the Hub's file list at that commit is read (its `tree` API), the parquet files
//! of the split are picked by the naming rules the cache lookup uses (`{config}/{split}-*.parquet`,
//! `data/{split}-*.parquet`, `{config}/{split}/*.parquet`, ...), and each is fetched through the
//! model side's [`HubRepo`] (timeouts, token, CDN redirects, progress), so they land in the
//! standard layout. `refs/<revision>` is written once every file is there.

use super::hub::{in_split, select_config, split_of};
use crate::models::hub::{HubOptions, HubRepo, Lookup};
use crate::models::hub_cache::RepoKind;
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

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

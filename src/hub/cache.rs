//! The Hugging Face cache on disk, in the layout Python's `huggingface_hub` uses, so both share
//! it:
//!
//! ```text
//! <cache>/models--ORG--NAME/refs/<revision>            the commit the revision pointed to
//! <cache>/models--ORG--NAME/blobs/<etag>               file contents
//! <cache>/models--ORG--NAME/snapshots/<commit>/<file>  links to ../../blobs/<etag> (or plain files)
//! <cache>/models--ORG--NAME/.no_exist/<commit>/<file>  empty: the file is known not to exist
//! ```

//!
//! Folder names and `refs/` files come from `hf-hub` (`Repo::folder_name`, `CacheRepo::create_ref`),
//! so samhost names things exactly as the Hugging Face client library does; the reads add what
//! hf-hub 0.4's `CacheRepo::get` lacks (`HF_HUB_CACHE`, commit-hash revisions, trimmed refs,
//! `.no_exist` markers). Downloads are in `http.rs`: hf-hub sets no network timeouts.

use anyhow::{bail, Context, Result};
use hf_hub::{Repo, RepoType};
use std::path::{Path, PathBuf};

/// Whether an environment value means "on" the way `huggingface_hub` reads booleans.
pub fn env_flag(value: &str) -> bool {
    matches!(value.trim().to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE")
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    if let Some(p) = env_path("HF_HOME") {
        return p;
    }
    let cache = env_path("XDG_CACHE_HOME")
        .or_else(|| env_path("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("huggingface")
}

/// The hub cache folder: `HF_HUB_CACHE` (or the older `HUGGINGFACE_HUB_CACHE`), else
/// `<HF_HOME>/hub`.
pub fn hub_cache_dir() -> PathBuf {
    env_path("HF_HUB_CACHE").or_else(|| env_path("HUGGINGFACE_HUB_CACHE")).unwrap_or_else(|| hf_home().join("hub"))
}

/// The access token: `HF_TOKEN` (or `HUGGING_FACE_HUB_TOKEN`), else the file at `HF_TOKEN_PATH`
/// or `<HF_HOME>/token` that `huggingface-cli login` writes.
pub fn hf_token() -> Option<String> {
    for var in ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"] {
        if let Ok(t) = std::env::var(var) {
            if !t.trim().is_empty() {
                return Some(t.trim().to_string());
            }
        }
    }
    let path = env_path("HF_TOKEN_PATH").unwrap_or_else(|| hf_home().join("token"));
    std::fs::read_to_string(path).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
}

/// Whether `s` is a full commit hash (40 hexadecimal digits).
pub fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Checks a repository id (`name` or `org/name`) so that it can name a folder and a URL.
pub fn check_repo_id(id: &str) -> Result<()> {
    let ok_part = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && !p.contains("..")
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() > 2 || !parts.iter().all(|p| ok_part(p)) {
        bail!("`{id}` is neither an existing folder nor a Hub repository id (`name` or `org/name`)");
    }
    Ok(())
}

/// Checks a revision (branch, tag or commit) for use in paths.
pub fn check_revision(rev: &str) -> Result<()> {
    if rev.is_empty() || rev.split('/').any(|p| p.is_empty() || p == "." || p == "..") || rev.contains('\\') {
        bail!("`{rev}` is not a valid revision (a branch, tag or commit hash)");
    }
    Ok(())
}

/// The kind of a Hub repository: it decides the cache folder prefix and the URL path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RepoKind {
    /// A model (`models--ORG--NAME`, `{endpoint}/ORG/NAME/...`).
    Model,
    /// A dataset (`datasets--ORG--NAME`, `{endpoint}/datasets/ORG/NAME/...`).
    Dataset,
}

impl RepoKind {
    /// `models` or `datasets`.
    pub fn plural(self) -> &'static str {
        match self {
            Self::Model => "models",
            Self::Dataset => "datasets",
        }
    }

    /// The hf-hub description of repository `repo_id` at `revision`.
    pub fn repo(self, repo_id: &str, revision: &str) -> Repo {
        let t = match self {
            Self::Model => RepoType::Model,
            Self::Dataset => RepoType::Dataset,
        };
        Repo::with_revision(repo_id.to_string(), t, revision.to_string())
    }

    /// What precedes the repository id in a URL path: nothing for models, `datasets/` otherwise.
    pub fn url_prefix(self) -> &'static str {
        match self {
            Self::Model => "",
            Self::Dataset => "datasets/",
        }
    }
}

/// One repository's part of the cache.
#[derive(Clone, Debug)]
pub struct RepoCache {
    root: PathBuf,
    kind: RepoKind,
    repo_id: String,
    dir: PathBuf,
}

impl RepoCache {
    /// The cache of model repository `repo_id` under the hub cache `root`.
    pub fn new(root: &Path, repo_id: &str) -> Self {
        Self::of_kind(root, RepoKind::Model, repo_id)
    }

    /// The cache of a repository of any kind.
    pub fn of_kind(root: &Path, kind: RepoKind, repo_id: &str) -> Self {
        Self {
            root: root.to_path_buf(),
            kind,
            repo_id: repo_id.to_string(),
            dir: root.join(kind.repo(repo_id, "main").folder_name()),
        }
    }

    /// The repository's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The commit a revision resolves to in the cache: the revision itself when it is a commit
    /// hash, else the content of `refs/<revision>` (trimmed).
    pub fn commit_for(&self, revision: &str) -> Option<String> {
        if is_commit_hash(revision) {
            return Some(revision.to_ascii_lowercase());
        }
        let text = std::fs::read_to_string(self.dir.join("refs").join(revision)).ok()?;
        let commit = text.trim();
        (!commit.is_empty()).then(|| commit.to_string())
    }

    /// `snapshots/<commit>/<file>` when it exists (a dangling link does not count).
    pub fn snapshot_file(&self, commit: &str, file: &str) -> Option<PathBuf> {
        let p = self.dir.join("snapshots").join(commit).join(file);
        p.is_file().then_some(p)
    }

    /// Whether the cache records that `file` does not exist at `commit`.
    pub fn known_missing(&self, commit: &str, file: &str) -> bool {
        self.dir.join(".no_exist").join(commit).join(file).exists()
    }

    /// Records that `file` does not exist at `commit`.
    pub fn mark_missing(&self, commit: &str, file: &str) -> Result<()> {
        let p = self.dir.join(".no_exist").join(commit).join(file);
        create_parent(&p)?;
        std::fs::write(&p, b"").with_context(|| format!("{}: cannot write", p.display()))
    }

    /// Writes `refs/<revision>` = `commit` (nothing for a commit-hash revision).
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if revision == commit {
            return Ok(());
        }
        let repo = self.kind.repo(&self.repo_id, revision);
        hf_hub::Cache::new(self.root.clone())
            .repo(repo)
            .create_ref(commit)
            .with_context(|| format!("{}: cannot write refs/{revision}", self.dir.display()))
    }

    /// `blobs/<etag>`.
    pub fn blob_path(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    /// Makes `snapshots/<commit>/<file>` point at `blobs/<etag>` (a relative symbolic link as
    /// `huggingface_hub` makes; a copy where links are not possible) and returns its path.
    pub fn link_snapshot(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let dst = self.dir.join("snapshots").join(commit).join(file);
        create_parent(&dst)?;
        if dst.is_file() {
            return Ok(dst);
        }
        let _ = std::fs::remove_file(&dst);
        let blob = self.blob_path(etag);
        let depth = file.split('/').count() + 1;
        let rel: PathBuf = std::iter::repeat_n("..", depth).collect::<PathBuf>().join("blobs").join(etag);
        #[cfg(unix)]
        let linked = std::os::unix::fs::symlink(&rel, &dst).is_ok();
        #[cfg(not(unix))]
        let linked = {
            let _ = &rel;
            false
        };
        if !linked {
            std::fs::copy(&blob, &dst)
                .with_context(|| format!("{}: cannot copy {} into the snapshot", dst.display(), blob.display()))?;
        }
        Ok(dst)
    }
}

fn create_parent(p: &Path) -> Result<()> {
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create the folder", parent.display()))?;
    }
    Ok(())
}

//! Files of a Hugging Face Hub repository (a model or a dataset), through the cache first.
//!
//! A file is looked up in the local cache (shared with Python's `huggingface_hub`, see
//! [`super::cache`]); only when it is not there, and the session is not offline, is the Hub
//! asked (see [`super::http`]: every call has connect and read timeouts). Downloads land in
//! the cache in the standard layout.

use super::cache::{self as hub_cache, check_repo_id, check_revision, RepoCache, RepoKind};
use super::http::{HttpClient, HttpError, Timeouts};
use anyhow::{bail, Context, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The default endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Where and how to reach the Hub.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// The Hub's base URL (`HF_ENDPOINT`).
    pub endpoint: String,
    /// The hub cache folder (`HF_HUB_CACHE`, `HF_HOME/hub`).
    pub cache_dir: PathBuf,
    /// Bearer token for gated or private repositories (`HF_TOKEN`).
    pub token: Option<String>,
    /// Read the cache only; never touch the network (`HF_HUB_OFFLINE=1`, `--offline`).
    pub offline: bool,
    /// Connect and read timeouts of every request.
    pub timeouts: Timeouts,
    /// Show download progress on stderr.
    pub progress: bool,
}

impl HubOptions {
    /// Options from the environment (`HF_ENDPOINT`, `HF_HUB_CACHE`, `HF_HOME`, `HF_TOKEN`,
    /// `HF_HUB_OFFLINE`, `SAMHOST_HTTP_TIMEOUT_SECS`); `offline` forces offline mode.
    pub fn from_env(offline: bool, progress: bool) -> Result<Self> {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let env_offline = std::env::var("HF_HUB_OFFLINE").map(|v| hub_cache::env_flag(&v)).unwrap_or(false);
        Ok(Self {
            endpoint,
            cache_dir: hub_cache::hub_cache_dir(),
            token: hub_cache::hf_token(),
            offline: offline || env_offline,
            timeouts: Timeouts::from_env()?,
            progress,
        })
    }

    /// Options for a given cache folder and endpoint, online, default timeouts, no token, no
    /// progress (tests).
    pub fn new(cache_dir: &Path, endpoint: &str) -> Self {
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            cache_dir: cache_dir.to_path_buf(),
            token: None,
            offline: false,
            timeouts: Timeouts::default(),
            progress: false,
        }
    }
}

/// Where a file stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The file, on disk.
    Found(PathBuf),
    /// The repository has no such file (said by the Hub, or recorded in the cache).
    Missing,
    /// Offline, and the cache does not have it.
    NotCached,
}

/// Percent-encodes a revision for a URL path segment (`refs/pr/1` -> `refs%2Fpr%2F1`).
fn encode_revision(rev: &str) -> String {
    rev.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One entry of a repository's file listing (the Hub's `tree` API).
#[derive(Clone, Debug, Deserialize)]
pub struct TreeEntry {
    /// `file` or `directory`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The path in the repository (`plain_text/train-00000-of-00001.parquet`).
    pub path: String,
    /// Size in bytes (0 for a folder).
    #[serde(default)]
    pub size: u64,
}

impl TreeEntry {
    /// Whether the entry is a file.
    pub fn is_file(&self) -> bool {
        self.kind == "file"
    }
}

/// The part of the Hub's revision answer that is read.
#[derive(Deserialize)]
struct RevisionInfo {
    sha: Option<String>,
}

/// How many pages of a listing are followed at most (a guard against a server that loops).
const MAX_PAGES: usize = 10_000;

/// One repository at one revision.
pub struct HubRepo {
    opts: HubOptions,
    kind: RepoKind,
    repo_id: String,
    revision: String,
    cache: RepoCache,
    commit: Option<String>,
    client: Option<HttpClient>,
    /// Files fetched from the network by this handle.
    pub downloaded: Vec<String>,
}

impl HubRepo {
    /// A handle on `repo_id` (`org/name`) at `revision` (a branch, tag or commit; `main` when
    /// `None`).
    pub fn new(opts: &HubOptions, repo_id: &str, revision: Option<&str>) -> Result<Self> {
        Self::of_kind(opts, RepoKind::Model, repo_id, revision)
    }

    /// A handle on a repository of any kind (a dataset: `RepoKind::Dataset`).
    pub fn of_kind(opts: &HubOptions, kind: RepoKind, repo_id: &str, revision: Option<&str>) -> Result<Self> {
        check_repo_id(repo_id)?;
        let revision = revision.unwrap_or("main").to_string();
        check_revision(&revision)?;
        let cache = RepoCache::of_kind(&opts.cache_dir, kind, repo_id);
        let commit = cache.commit_for(&revision);
        Ok(Self {
            opts: opts.clone(),
            kind,
            repo_id: repo_id.to_string(),
            revision,
            cache,
            commit,
            client: None,
            downloaded: Vec::new(),
        })
    }

    /// `org/name@revision`, for messages.
    pub fn label(&self) -> String {
        format!("{}@{}", self.repo_id, self.revision)
    }

    /// The commit the revision resolved to, once known.
    pub fn commit(&self) -> Option<&str> {
        self.commit.as_deref()
    }

    /// The repository's folder in the cache.
    pub fn cache_dir(&self) -> &Path {
        self.cache.dir()
    }

    fn client(&mut self) -> &HttpClient {
        let (t, tok, p) = (self.opts.timeouts, self.opts.token.clone(), self.opts.progress);
        let origin = self.opts.endpoint.clone();
        self.client.get_or_insert_with(|| HttpClient::new(t, tok, &origin, p))
    }

    fn url(&self, file: &str) -> String {
        let rev = self.commit.as_deref().unwrap_or(&self.revision);
        let (endpoint, kind) = (&self.opts.endpoint, self.kind.url_prefix());
        format!("{endpoint}/{kind}{}/resolve/{}/{file}", self.repo_id, encode_revision(rev))
    }

    fn cached(&self, file: &str) -> Option<Lookup> {
        let commit = self.commit.as_deref()?;
        if let Some(p) = self.cache.snapshot_file(commit, file) {
            return Some(Lookup::Found(p));
        }
        self.cache.known_missing(commit, file).then_some(Lookup::Missing)
    }

    /// The error for a request on a file that failed, worded for the user.
    fn explain(&self, file: &str, e: HttpError) -> anyhow::Error {
        self.explain_at(&self.url(file), file, e)
    }

    /// The error for a request on `url` (about `what`: a file, the file list) that failed.
    fn explain_at(&self, url: &str, what: &str, e: HttpError) -> anyhow::Error {
        let cache_note =
            format!("there is no cached copy of {what} for {} in {}", self.label(), self.opts.cache_dir.display());
        match e {
            HttpError::Status { code: Some(c), .. } if c == "RepoNotFound" => anyhow::anyhow!(
                "repository `{}` does not exist on {} (or it is private or gated and needs a token: set HF_TOKEN)",
                self.repo_id,
                self.opts.endpoint
            ),
            HttpError::Status { code: Some(c), .. } if c == "RevisionNotFound" => anyhow::anyhow!(
                "revision `{}` does not exist in repository `{}` (check the branch, tag or commit)",
                self.revision,
                self.repo_id
            ),
            HttpError::Status { code: Some(c), .. } if c == "GatedRepo" => anyhow::anyhow!(
                "repository `{}` is gated: accept its terms on the Hub and set HF_TOKEN to a token that has access",
                self.repo_id
            ),
            HttpError::Status { status: 401 | 403, .. } => anyhow::anyhow!(
                "access to `{}` was refused by {} (a private or gated repository, or one that does not exist): \
                 set HF_TOKEN to a token with access",
                self.repo_id,
                self.opts.endpoint
            ),
            HttpError::Status { status: 404, .. } => {
                anyhow::anyhow!("{url} not found at {} (the repository or revision does not exist)", self.opts.endpoint)
            }
            e @ HttpError::Status { .. } => anyhow::anyhow!("{url}: {e}"),
            HttpError::Timeout(m) => anyhow::anyhow!("timeout: {m}; {cache_note}"),
            HttpError::Unreachable(m) => anyhow::anyhow!(
                "cannot reach the Hub ({m}) and {cache_note}; connect to the network, or download it first \
                 (e.g. `huggingface-cli download {}{}`)",
                match self.kind {
                    RepoKind::Model => "",
                    RepoKind::Dataset => "--repo-type dataset ",
                },
                self.repo_id
            ),
        }
    }

    /// The file `file` of the repository: from the cache if it is there, else downloaded into
    /// the cache (unless offline).
    pub fn file(&mut self, file: &str) -> Result<Lookup> {
        if let Some(l) = self.cached(file) {
            return Ok(l);
        }
        if self.opts.offline {
            return Ok(Lookup::NotCached);
        }
        let url = self.url(file);
        let meta = match self.client().head(&url) {
            Ok(m) => m,
            Err(HttpError::Status { status: 404, code: Some(c), commit, .. }) if c == "EntryNotFound" => {
                if let Some(commit) = commit.or_else(|| self.commit.clone()) {
                    let _ = self.cache.mark_missing(&commit, file);
                }
                return Ok(Lookup::Missing);
            }
            Err(e) => return Err(self.explain(file, e)),
        };
        let commit = match (meta.commit.clone(), self.commit.clone()) {
            (Some(c), _) | (None, Some(c)) => c,
            (None, None) => bail!("{url}: the Hub did not say which commit {} is (no X-Repo-Commit)", self.revision),
        };
        if !hub_cache::is_commit_hash(&commit) && commit.contains(['/', '\\', '.']) {
            bail!("{url}: unexpected commit `{commit}` in the answer");
        }
        if self.commit.is_none() {
            self.cache.write_ref(&self.revision, &commit)?;
            self.commit = Some(commit.clone());
        }
        if let Some(p) = self.cache.snapshot_file(&commit, file) {
            return Ok(Lookup::Found(p));
        }
        let etag = match meta.etag {
            Some(e) if !e.is_empty() && !e.contains(['/', '\\']) && e != "." && e != ".." => e,
            _ => bail!("{url}: the Hub gave no usable ETag for {file}"),
        };
        let blob = self.cache.blob_path(&etag);
        if !blob.is_file() {
            let label = format!("{}/{file}", self.repo_id);
            let dl = meta.download_url.clone();
            self.client().download(&dl, &blob, meta.size, &label).map_err(|e| match e.downcast::<HttpError>() {
                Ok(h) => self.explain(file, h),
                Err(e) => e,
            })?;
            self.downloaded.push(file.to_string());
        }
        Ok(Lookup::Found(self.cache.link_snapshot(&commit, file, &etag)?))
    }

    /// Whether the repository has `file`, without downloading it: `Found` holds the cached
    /// path, or the URL when only the Hub has it.
    pub fn exists(&mut self, file: &str) -> Result<Lookup> {
        if let Some(l) = self.cached(file) {
            return Ok(l);
        }
        if self.opts.offline {
            return Ok(Lookup::NotCached);
        }
        let url = self.url(file);
        match self.client().head(&url) {
            Ok(_) => Ok(Lookup::Found(PathBuf::from(url))),
            Err(HttpError::Status { status: 404, .. }) => Ok(Lookup::Missing),
            Err(e) => Err(self.explain(file, e)),
        }
    }

    /// `{endpoint}/api/{models|datasets}/{repo}/{what}`.
    fn api_url(&self, what: &str) -> String {
        format!("{}/api/{}/{}/{what}", self.opts.endpoint, self.kind.plural(), self.repo_id)
    }

    /// GETs an API URL and parses its JSON answer; `what` names it in errors.
    fn get_json<T: serde::de::DeserializeOwned>(&mut self, url: &str, what: &str) -> Result<(T, Option<String>)> {
        let page = match self.client().get_text(url) {
            Ok(p) => p,
            Err(e) => return Err(self.explain_at(url, what, e)),
        };
        let value = serde_json::from_str(&page.body)
            .with_context(|| format!("{url}: the Hub's answer is not the expected JSON ({what})"))?;
        Ok((value, page.next))
    }

    /// Asks the Hub which commit the revision points to now, and uses that commit from here on
    /// (the cache's `refs/` is written by [`Self::write_ref`]). A commit hash is taken as it is.
    /// Fails when offline.
    pub fn resolve_online(&mut self) -> Result<String> {
        if self.opts.offline {
            bail!("{}: offline, so the revision cannot be asked of the Hub", self.label());
        }
        let commit = if hub_cache::is_commit_hash(&self.revision) {
            self.revision.to_ascii_lowercase()
        } else {
            let url = self.api_url(&format!("revision/{}", encode_revision(&self.revision)));
            let (info, _): (RevisionInfo, _) = self.get_json(&url, "the revision's commit")?;
            match info.sha {
                Some(c) if hub_cache::is_commit_hash(&c) => c.to_ascii_lowercase(),
                other => bail!("{url}: the Hub gave no commit for `{}` (sha: {other:?})", self.revision),
            }
        };
        self.commit = Some(commit.clone());
        Ok(commit)
    }

    /// Every file and folder of the repository at the revision's commit (resolved online
    /// first when it is not yet), through all pages of the Hub's recursive `tree` listing.
    pub fn list_files(&mut self) -> Result<Vec<TreeEntry>> {
        let commit = match &self.commit {
            Some(c) => c.clone(),
            None => self.resolve_online()?,
        };
        let mut url = Some(self.api_url(&format!("tree/{commit}?recursive=true")));
        let mut entries = Vec::new();
        let mut pages = 0;
        while let Some(u) = url.take() {
            pages += 1;
            if pages > MAX_PAGES {
                bail!("{}: the file list has more than {MAX_PAGES} pages", self.label());
            }
            let (page, next): (Vec<TreeEntry>, _) = self.get_json(&u, "the file list")?;
            entries.extend(page);
            url = next.filter(|n| *n != u);
        }
        Ok(entries)
    }

    /// Records in the cache that the revision points at the resolved commit (`refs/<revision>`;
    /// nothing for a commit-hash revision, or before the commit is known).
    pub fn write_ref(&self) -> Result<()> {
        match &self.commit {
            Some(c) => self.cache.write_ref(&self.revision, c),
            None => Ok(()),
        }
    }
}

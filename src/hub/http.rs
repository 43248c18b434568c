//! The HTTP side of the Hub: `HEAD` for a file's metadata and `GET` for its content, with
//! connect and read timeouts on every call (hf-hub sets none: a server that accepts and never
//! answers would hang it), a bearer token for gated repositories, and a progress bar.

use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// The environment variable that sets both timeouts, in seconds.
pub const TIMEOUT_ENV: &str = "SAMHOST_HTTP_TIMEOUT_SECS";

/// Connect and read timeouts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timeouts {
    /// Time to open a connection.
    pub connect: Duration,
    /// Time any single read may wait for bytes.
    pub read: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self { connect: Duration::from_secs(10), read: Duration::from_secs(30) }
    }
}

impl Timeouts {
    /// Both timeouts equal to `secs`.
    pub fn uniform(secs: f64) -> Self {
        let d = Duration::from_secs_f64(secs);
        Self { connect: d, read: d }
    }

    /// The defaults, or both set from [`TIMEOUT_ENV`] when it holds a positive number.
    pub fn from_env() -> Result<Self> {
        match std::env::var(TIMEOUT_ENV) {
            Err(_) => Ok(Self::default()),
            Ok(v) => match v.trim().parse::<f64>() {
                Ok(s) if s > 0.0 && s.is_finite() => Ok(Self::uniform(s)),
                _ => anyhow::bail!("{TIMEOUT_ENV}={v}: expected a number of seconds > 0"),
            },
        }
    }
}

/// What went wrong with a request, sorted so the caller can word the error.
#[derive(Debug)]
pub enum HttpError {
    /// The server answered with an error status; `code` is its `X-Error-Code` header
    /// (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`, `GatedRepo`, ...).
    Status {
        /// The HTTP status.
        status: u16,
        /// `X-Error-Code`, if any.
        code: Option<String>,
        /// `X-Error-Message`, if any.
        message: Option<String>,
        /// `X-Repo-Commit`, if any (sent with `EntryNotFound`).
        commit: Option<String>,
    },
    /// No answer within the read timeout, or no connection within the connect timeout.
    Timeout(String),
    /// The server could not be reached (DNS, refused connection, TLS, ...).
    Unreachable(String),
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status { status, code, message, .. } => {
                write!(f, "HTTP {status}")?;
                if let Some(c) = code {
                    write!(f, " {c}")?;
                }
                if let Some(m) = message {
                    write!(f, ": {m}")?;
                }
                Ok(())
            }
            Self::Timeout(m) | Self::Unreachable(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for HttpError {}

/// A file's metadata from a `HEAD` request on its `resolve` URL.
#[derive(Clone, Debug)]
pub struct FileMeta {
    /// The commit the revision resolved to (`X-Repo-Commit`).
    pub commit: Option<String>,
    /// The blob name (`X-Linked-Etag` or `ETag`, without quotes and `W/`).
    pub etag: Option<String>,
    /// Size in bytes (`X-Linked-Size` or `Content-Length`).
    pub size: Option<u64>,
    /// Where the content is (a CDN address after a redirect, else the URL itself).
    pub download_url: String,
}

fn header(r: &ureq::Response, name: &str) -> Option<String> {
    r.header(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
}

fn normalize_etag(e: &str) -> String {
    e.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

fn is_timeout(t: &ureq::Transport) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(t);
    while let Some(e) = src {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(io.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) {
                return true;
            }
        }
        src = e.source();
    }
    t.to_string().contains("timed out")
}

/// The most text [`HttpClient::get_text`] reads (one page of a listing is far smaller).
const MAX_TEXT_BYTES: u64 = 256 << 20;

/// One answer of [`HttpClient::get_text`].
#[derive(Clone, Debug)]
pub struct Page {
    /// The body.
    pub body: String,
    /// The next page of a paginated listing (`Link: <url>; rel="next"`), if any.
    pub next: Option<String>,
}

/// The `rel="next"` target of a `Link` header (`<url>; rel="next", <url>; rel="last"`).
fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (target, params) = part.trim().split_once(';')?;
        let is_next = params.split(';').any(|p| {
            let p = p.trim();
            p.eq_ignore_ascii_case("rel=\"next\"") || p.eq_ignore_ascii_case("rel=next")
        });
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        (is_next && !target.is_empty()).then(|| target.to_string())
    })
}

/// `target` made absolute against the origin of `base` when it is a path (`/api/...`).
fn absolute(base: &str, target: &str) -> String {
    if !target.starts_with('/') {
        return target.to_string();
    }
    match base.find("://").and_then(|i| base[i + 3..].find('/').map(|j| i + 3 + j)) {
        Some(end) => format!("{}{target}", &base[..end]),
        None => format!("{}{target}", base.trim_end_matches('/')),
    }
}

/// An HTTP client for one Hub endpoint.
pub struct HttpClient {
    follow: ureq::Agent,
    no_follow: ureq::Agent,
    token: Option<String>,
    token_origin: String,
    timeouts: Timeouts,
    progress: bool,
}

impl HttpClient {
    /// A client with `timeouts`, sending `token` to URLs under `token_origin` (the Hub
    /// endpoint) only, never to a CDN it redirects to; `progress` shows download progress on
    /// stderr.
    pub fn new(timeouts: Timeouts, token: Option<String>, token_origin: &str, progress: bool) -> Self {
        let base = || {
            ureq::AgentBuilder::new()
                .timeout_connect(timeouts.connect)
                .timeout_read(timeouts.read)
                .timeout_write(timeouts.read)
                .try_proxy_from_env(true)
                .user_agent(concat!("samhost/", env!("CARGO_PKG_VERSION")))
        };
        let token_origin = format!("{}/", token_origin.trim_end_matches('/'));
        Self { follow: base().build(), no_follow: base().redirects(0).build(), token, token_origin, timeouts, progress }
    }

    fn classify(&self, url: &str, e: ureq::Error) -> HttpError {
        match e {
            ureq::Error::Status(status, r) => HttpError::Status {
                status,
                code: header(&r, "x-error-code"),
                message: header(&r, "x-error-message"),
                commit: header(&r, "x-repo-commit"),
            },
            ureq::Error::Transport(t) if is_timeout(&t) => HttpError::Timeout(format!(
                "{url}: no answer within {:.0} s (connect timeout {:.0} s, read timeout {:.0} s; \
                 set {TIMEOUT_ENV} to change both): {t}",
                self.timeouts.read.as_secs_f64(),
                self.timeouts.connect.as_secs_f64(),
                self.timeouts.read.as_secs_f64()
            )),
            ureq::Error::Transport(t) => HttpError::Unreachable(format!("{url}: {t}")),
        }
    }

    fn request(&self, agent: &ureq::Agent, method: &str, url: &str) -> ureq::Request {
        let r = agent.request(method, url).set("Accept-Encoding", "identity");
        match &self.token {
            Some(t) if url.starts_with(&self.token_origin) => r.set("Authorization", &format!("Bearer {t}")),
            _ => r,
        }
    }

    /// The metadata of the file at `url` (a `resolve` URL). Relative redirects (a renamed
    /// repository) are followed; an absolute one is where the content lives.
    pub fn head(&self, url: &str) -> Result<FileMeta, HttpError> {
        let mut current = url.to_string();
        for _ in 0..5 {
            let r = self.request(&self.no_follow, "HEAD", &current).call().map_err(|e| self.classify(&current, e))?;
            let commit = header(&r, "x-repo-commit");
            let etag = header(&r, "x-linked-etag").or_else(|| header(&r, "etag")).map(|e| normalize_etag(&e));
            let size = header(&r, "x-linked-size")
                .or_else(|| header(&r, "content-length"))
                .and_then(|s| s.parse::<u64>().ok());
            if (300..400).contains(&r.status()) {
                let location = header(&r, "location").ok_or_else(|| HttpError::Status {
                    status: r.status(),
                    code: None,
                    message: Some("a redirect without a Location".into()),
                    commit: None,
                })?;
                if location.starts_with('/') {
                    current = absolute(&current, &location);
                    continue;
                }
                return Ok(FileMeta { commit, etag, size, download_url: location });
            }
            return Ok(FileMeta { commit, etag, size, download_url: current });
        }
        Err(HttpError::Unreachable(format!("{url}: too many redirects")))
    }

    /// The body of a `GET` on `url` as text (an API answer: JSON), with the `rel="next"` link
    /// of a paginated listing (the `Link` header), made absolute.
    pub fn get_text(&self, url: &str) -> Result<Page, HttpError> {
        let r = self.request(&self.follow, "GET", url).call().map_err(|e| self.classify(url, e))?;
        let next = header(&r, "link").and_then(|l| next_link(&l)).map(|n| absolute(url, &n));
        let mut body = String::new();
        match r.into_reader().take(MAX_TEXT_BYTES).read_to_string(&mut body) {
            Ok(_) => Ok(Page { body, next }),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => {
                Err(HttpError::Timeout(format!(
                    "{url}: the answer stalled for {:.0} s (set {TIMEOUT_ENV} to wait longer)",
                    self.timeouts.read.as_secs_f64()
                )))
            }
            Err(e) => Err(HttpError::Unreachable(format!("{url}: the answer was cut off: {e}"))),
        }
    }

    /// Downloads `url` into `dest` (through `dest.incomplete`, renamed when complete); checks
    /// the size when it is known. `label` names the file on the progress bar.
    pub fn download(&self, url: &str, dest: &Path, size: Option<u64>, label: &str) -> Result<()> {
        let r = self.request(&self.follow, "GET", url).call().map_err(|e| self.classify(url, e))?;
        let total = size.or_else(|| header(&r, "content-length").and_then(|s| s.parse().ok()));
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("{}: cannot create", parent.display()))?;
        }
        let part = dest.with_extension(format!("incomplete-{}", std::process::id()));
        let bar = self.progress_bar(label, total);
        let result = (|| -> Result<u64> {
            let mut file =
                std::fs::File::create(&part).with_context(|| format!("{}: cannot create", part.display()))?;
            let mut reader = r.into_reader();
            let mut buf = vec![0u8; 1 << 16];
            let mut done = 0u64;
            loop {
                let n = match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => {
                        anyhow::bail!(HttpError::Timeout(format!(
                            "{url}: the download stalled for {:.0} s (set {TIMEOUT_ENV} to wait longer)",
                            self.timeouts.read.as_secs_f64()
                        )))
                    }
                    Err(e) => return Err(e).with_context(|| format!("{url}: download interrupted")),
                };
                file.write_all(&buf[..n]).with_context(|| format!("{}: cannot write", part.display()))?;
                done += n as u64;
                bar.set_position(done);
            }
            file.sync_all().ok();
            Ok(done)
        })();
        bar.finish_and_clear();
        let done = match result {
            Ok(d) => d,
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                return Err(e);
            }
        };
        if let Some(t) = total {
            if t != done {
                let _ = std::fs::remove_file(&part);
                anyhow::bail!("{url}: the download ended after {done} of {t} bytes");
            }
        }
        std::fs::rename(&part, dest).with_context(|| format!("{}: cannot move the download into place", dest.display()))
    }

    fn progress_bar(&self, label: &str, total: Option<u64>) -> indicatif::ProgressBar {
        if !self.progress {
            return indicatif::ProgressBar::hidden();
        }
        eprintln!("downloading {label}{}", total.map(|t| format!(" ({:.1} MB)", t as f64 / 1e6)).unwrap_or_default());
        let bar = indicatif::ProgressBar::with_draw_target(total, indicatif::ProgressDrawTarget::stderr());
        let style =
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .map(|s| s.progress_chars("=> "));
        if let Ok(style) = style {
            bar.set_style(style);
        }
        bar.set_message(label.to_string());
        bar
    }
}

#[cfg(test)]
mod tests {
    use super::{absolute, next_link};

    #[test]
    fn link_headers_and_relative_targets() {
        let l = r#"<https://hf.co/api/x/tree/main?cursor=abc>; rel="next", <https://hf.co/api/x?p=9>; rel="last""#;
        assert_eq!(next_link(l).as_deref(), Some("https://hf.co/api/x/tree/main?cursor=abc"));
        assert_eq!(next_link(r#"<https://hf.co/a>; rel="last""#), None);
        assert_eq!(next_link("garbage"), None);
        assert_eq!(absolute("http://127.0.0.1:8/api/a?b", "/api/c?d"), "http://127.0.0.1:8/api/c?d");
        assert_eq!(absolute("http://h:1/a", "https://cdn/x"), "https://cdn/x");
    }
}

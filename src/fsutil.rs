//! File-system helpers shared by everything that writes results to disk.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

/// Flushes a file's contents to the disk.
pub fn sync_file(path: &Path) -> Result<()> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("{}: cannot flush to disk", path.display()))
}

/// Flushes a folder's entries (a rename or a new file in it) to the disk. Folders that cannot be
/// opened for it (some file systems) are skipped.
pub fn sync_dir(dir: &Path) -> Result<()> {
    match std::fs::File::open(dir) {
        Ok(f) => match f.sync_all() {
            Ok(()) => Ok(()),
            // EINVAL/EBADF: the file system does not sync folders.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EBADF)) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("{}: cannot flush the folder to disk", dir.display())),
        },
        Err(_) => Ok(()),
    }
}

/// Puts the complete folder `tmp` at `dest` in one step: with `dest` present the two are swapped
/// atomically (Linux `renameat2(RENAME_EXCHANGE)`, so a complete `dest` is visible at every
/// moment) and the old contents, now at `tmp`, removed; otherwise `tmp` is renamed. Both parents
/// are flushed.
pub fn replace_dir(tmp: &Path, dest: &Path) -> Result<()> {
    sync_dir(tmp)?;
    if dest.exists() {
        if exchange(tmp, dest)? {
            let _ = std::fs::remove_dir_all(tmp);
        } else {
            // No atomic exchange here: move the old one aside first (a short window).
            let aside = tmp.with_extension("old");
            std::fs::rename(dest, &aside).with_context(|| format!("{}: cannot replace", dest.display()))?;
            std::fs::rename(tmp, dest).with_context(|| format!("{}: cannot move into place", dest.display()))?;
            let _ = std::fs::remove_dir_all(&aside);
        }
    } else {
        std::fs::rename(tmp, dest).with_context(|| format!("{}: cannot move into place", dest.display()))?;
    }
    if let Some(parent) = dest.parent() {
        sync_dir(if parent.as_os_str().is_empty() { Path::new(".") } else { parent })?;
    }
    Ok(())
}

/// Swaps two paths atomically; `false` when the system cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> Result<bool> {
    use std::os::unix::ffi::OsStrExt;
    let ca = std::ffi::CString::new(a.as_os_str().as_bytes()).context("a path with a NUL byte")?;
    let cb = std::ffi::CString::new(b.as_os_str().as_bytes()).context("a path with a NUL byte")?;
    // SAFETY: both are valid NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENOTSUP) => Ok(false),
        _ => Err(e).with_context(|| format!("{}: cannot replace", b.display())),
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> Result<bool> {
    Ok(false)
}

/// Writes a file atomically: `write` fills a temporary file beside `path`, which is flushed to
/// the disk and then renamed over `path`, and the folder flushed. A failure or a crash leaves
/// whatever was at `path` before, or the complete new file.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        anyhow::bail!("{}: the folder {} does not exist", path.display(), dir.display());
    }
    let name = path.file_name().with_context(|| format!("{}: not a file name", path.display()))?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = write(&tmp).and_then(|()| {
        sync_file(&tmp)?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("{}: cannot rename the temporary file into place", path.display()))?;
        sync_dir(&dir)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes bytes to `path` atomically (see [`write_atomic`]).
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |tmp| std::fs::write(tmp, bytes).with_context(|| format!("{}: cannot write", path.display())))
}

//! Crash-safe file writing and checksums.
//!
//! Every file a store lists is written under a temporary name (`*.tmp`), flushed with fsync, renamed
//! into place and its directory fsynced; only then may the manifest name it. A crash therefore
//! leaves either the old state or the new one, plus at worst an unlisted `*.tmp` file that readers
//! ignore and the next writer removes.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use xxhash_rust::xxh3::Xxh3;

/// Suffix of files being written; never listed by a manifest.
pub const TMP_SUFFIX: &str = ".tmp";

/// The temporary name used while `path` is being written.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().expect("path has a file name").to_os_string();
    name.push(TMP_SUFFIX);
    path.with_file_name(name)
}

/// fsync a directory so that renames inside it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot fsync directory {}", dir.display()))
}

/// Move a fully written and fsynced temporary file to its final name, durably.
pub fn commit_tmp(tmp: &Path, path: &Path) -> Result<()> {
    std::fs::rename(tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Write `bytes` to `path` atomically (temp file, fsync, rename, fsync dir).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crash_point();
    let tmp = tmp_path(path);
    let result = (|| -> Result<()> {
        let mut file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
        file.sync_all().with_context(|| format!("cannot fsync {}", tmp.display()))?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    commit_tmp(&tmp, path)
}

/// xxh3-128 of `bytes` as 32 lowercase hex digits (the manifest's `xxh3` field).
pub fn hex128(hash: u128) -> String {
    format!("{hash:032x}")
}

/// Stream a file through xxh3-128.
pub fn file_xxh3(path: &Path) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Xxh3::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex128(hasher.digest128()))
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Xxh3,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Xxh3::new(), bytes: 0 }
    }
    /// The wrapped writer, the byte count and the xxh3-128 hex digest.
    pub fn finish(self) -> (W, u64, String) {
        (self.inner, self.bytes, hex128(self.hasher.digest128()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The crash-test hook: with `LOUPE_CRASH_AFTER_WRITES=N` in the environment, the process
/// aborts (as if killed) at the start of its atomic write number N + 1, so that a test can stop
/// a writer at every step of its write phase and check that the store survives. Unset: nothing.
pub(crate) fn crash_point() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LIMIT: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let limit = LIMIT.get_or_init(|| std::env::var("LOUPE_CRASH_AFTER_WRITES").ok()?.parse().ok());
    if let Some(limit) = *limit
        && WRITES.fetch_add(1, Ordering::SeqCst) >= limit
    {
        std::process::abort();
    }
}

/// A fresh stamp for one rewrite of a listed set of files (nanoseconds since the epoch, hex):
/// a writer puts its new files under names that carry it, so that they never replace a listed
/// file before the manifest commit.
pub fn generation() -> String {
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("g{nanos:x}")
}

/// Remove the files `files` (paths relative to `root`) that exist, then each of their folders
/// that is left empty, up to (not including) `root`. Only named files go; a folder that still
/// holds something else stays.
pub fn remove_files(root: &Path, files: &[&str]) -> Result<()> {
    let mut dirs = Vec::new();
    for file in files {
        let path = root.join(file);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove {}", path.display())),
        }
        let mut dir = path.parent();
        while let Some(d) = dir
            && d != root
            && d.starts_with(root)
        {
            dirs.push(d.to_path_buf());
            dir = d.parent();
        }
    }
    // Deepest first; `remove_dir` refuses a folder that is not empty.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
    dirs.dedup();
    for dir in dirs {
        let _ = std::fs::remove_dir(&dir);
    }
    Ok(())
}

/// Every file under `dir` (recursively), relative to it, in sorted order; none when `dir` does
/// not exist. Links are reported as files and never followed.
pub fn files_under(dir: &Path) -> Result<Vec<String>> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                walk(root, &path, out)?;
            } else {
                let rel = path.strip_prefix(root).unwrap_or(&path);
                out.push(rel.to_string_lossy().into_owned());
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Clear the unlisted leftovers of an interrupted writer in `dir`: when every file there is one
/// `ours` recognises as that writer's, remove them (and the emptied folders); otherwise refuse,
/// naming the first file that is not, and remove nothing.
pub fn clear_leftovers(dir: &Path, ours: impl Fn(&str) -> bool) -> Result<()> {
    let files = files_under(dir)?;
    if let Some(other) = files.iter().find(|f| !ours(f)) {
        anyhow::bail!(
            "{} holds {other}, which no listed entry of the store owns and Loupe did not write; \
             move it away or choose another name",
            dir.display()
        );
    }
    let refs: Vec<&str> = files.iter().map(String::as_str).collect();
    remove_files(dir, &refs)?;
    let _ = std::fs::remove_dir(dir);
    Ok(())
}

/// Files this process has already checked against their listing: (path, size, checksum).
type Checked = std::collections::HashSet<(PathBuf, u64, String)>;
static CHECKED: std::sync::LazyLock<std::sync::Mutex<Checked>> = std::sync::LazyLock::new(Default::default);

/// Check the bytes of a listed file (typically its memory mapping) against the size and xxh3
/// its listing records, the first time this process reads it; later calls for the same file and
/// listing return at once. A mismatch names the file: it changed after it was listed.
pub fn check_listed(path: &Path, bytes: &[u8], listed_bytes: u64, listed_xxh3: &str) -> Result<()> {
    check_listed_then(path, bytes, listed_bytes, listed_xxh3, || Ok(()))
}

/// [`check_listed`], with `then` (a further check of the content) run once after the checksum
/// matched; the file counts as checked only if both pass.
pub fn check_listed_then(
    path: &Path,
    bytes: &[u8],
    listed_bytes: u64,
    listed_xxh3: &str,
    then: impl FnOnce() -> Result<()>,
) -> Result<()> {
    if already_checked(path, listed_bytes, listed_xxh3) {
        return Ok(());
    }
    check_bytes(path, bytes, listed_bytes, listed_xxh3)?;
    then()?;
    mark_checked(path, listed_bytes, listed_xxh3);
    Ok(())
}

/// Whether this process has already checked the file at `path` against this listing.
pub fn already_checked(path: &Path, listed_bytes: u64, listed_xxh3: &str) -> bool {
    let key = (path.to_path_buf(), listed_bytes, listed_xxh3.to_string());
    CHECKED.lock().unwrap_or_else(|p| p.into_inner()).contains(&key)
}

/// Record that the file at `path` passed its checks against this listing.
pub fn mark_checked(path: &Path, listed_bytes: u64, listed_xxh3: &str) {
    let key = (path.to_path_buf(), listed_bytes, listed_xxh3.to_string());
    CHECKED.lock().unwrap_or_else(|p| p.into_inner()).insert(key);
}

/// The size and checksum of `bytes` (the content of `path`) against its listing, every time.
pub fn check_bytes(path: &Path, bytes: &[u8], listed_bytes: u64, listed_xxh3: &str) -> Result<()> {
    if bytes.len() as u64 != listed_bytes {
        anyhow::bail!(
            "{} is {} bytes but the manifest says {listed_bytes} (truncated or replaced)",
            path.display(),
            bytes.len()
        );
    }
    let actual = hex128(xxhash_rust::xxh3::xxh3_128(bytes));
    if actual != listed_xxh3 {
        anyhow::bail!(
            "{} does not match its checksum in the manifest (xxh3 {actual}, listed {listed_xxh3}): \
             the file changed after it was written; `loupe store verify` lists every such file",
            path.display()
        );
    }
    Ok(())
}

/// [`check_listed`] for a file read from disk (e.g. before a library opens it by path).
pub fn check_listed_file(path: &Path, listed_bytes: u64, listed_xxh3: &str) -> Result<()> {
    let file =
        File::open(path).with_context(|| format!("{} is listed but cannot be opened", path.display()))?;
    // SAFETY: listed files are immutable (written under a temporary name, then renamed).
    let map =
        unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
    check_listed(path, &map, listed_bytes, listed_xxh3)
}

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

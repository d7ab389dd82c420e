//! [`Store`]: one project folder on disk, opened read-only or for writing.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use anyhow::{Context, Result, bail};

use crate::fsutil::{self, TMP_SUFFIX};
use crate::manifest::{Manifest, ModelInfo, TokenizerInfo};

pub const MANIFEST_FILE: &str = "manifest.json";
const LOCK_FILE: &str = ".lock";

/// A store folder and its manifest.
///
/// Opened with [`Store::open`] it is read-only and never writes a byte. Opened with
/// [`Store::open_rw`] or [`Store::create`] it holds an exclusive lock on `<store>/.lock`, so one
/// process writes at a time; several writers in that process may share it (`&Store`).
pub struct Store {
    root: PathBuf,
    manifest: Mutex<Manifest>,
    _lock: Option<File>,
}

impl Store {
    /// Open an existing store read-only.
    pub fn open(root: impl AsRef<Path>) -> Result<Store> {
        let root = root.as_ref().to_path_buf();
        let manifest = read_manifest(&root)?;
        Ok(Store { root, manifest: Mutex::new(manifest), _lock: None })
    }

    /// Open an existing store for writing: take the writer lock and remove leftovers of
    /// interrupted writes (`*.tmp`, which no manifest lists).
    pub fn open_rw(root: impl AsRef<Path>) -> Result<Store> {
        let root = root.as_ref().to_path_buf();
        read_manifest(&root)?; // fail on a bad store before taking the lock
        let lock = take_lock(&root)?;
        // Re-read under the lock: another writer may have committed in between.
        let manifest = read_manifest(&root)?;
        remove_tmp_files(&root)?;
        Ok(Store { root, manifest: Mutex::new(manifest), _lock: Some(lock) })
    }

    /// Create a store (the folder may exist but must not hold a manifest yet), or open it for
    /// writing if it already is a store.
    pub fn create(root: impl AsRef<Path>) -> Result<Store> {
        let root = root.as_ref().to_path_buf();
        if root.join(MANIFEST_FILE).exists() {
            return Store::open_rw(&root);
        }
        if root.exists() && !root.is_dir() {
            bail!("cannot create a store at {}: it exists and is not a directory", root.display());
        }
        if root.is_dir() && std::fs::read_dir(&root)?.next().is_some() {
            bail!(
                "cannot create a store in {}: the folder is not empty and holds no {MANIFEST_FILE}",
                root.display()
            );
        }
        std::fs::create_dir_all(&root)
            .with_context(|| format!("cannot create store directory {}", root.display()))?;
        let lock = take_lock(&root)?;
        let manifest = Manifest::default();
        fsutil::write_atomic(&root.join(MANIFEST_FILE), manifest.to_json().as_bytes())?;
        Ok(Store { root, manifest: Mutex::new(manifest), _lock: Some(lock) })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn is_writable(&self) -> bool {
        self._lock.is_some()
    }

    /// A snapshot of the manifest.
    pub fn manifest(&self) -> Manifest {
        self.lock_manifest().clone()
    }

    /// Record the model identity (refuses to change it once activations exist).
    pub fn set_model(&self, model: ModelInfo, tokenizer: Option<TokenizerInfo>) -> Result<()> {
        self.commit(|m| {
            if let Some(old) = &m.model
                && old.sha256 != model.sha256
                && !m.hooks.is_empty()
            {
                bail!(
                    "store {} holds activations of model {} ({}), not of {} ({})",
                    self.root.display(),
                    old.name,
                    short(&old.sha256),
                    model.name,
                    short(&model.sha256)
                );
            }
            m.model = Some(model);
            m.tokenizer = tokenizer;
            Ok(())
        })
    }

    /// Apply `change` to a copy of the manifest and write it atomically; the in-memory manifest
    /// changes only if the write succeeded.
    pub fn commit<T>(&self, change: impl FnOnce(&mut Manifest) -> Result<T>) -> Result<T> {
        if !self.is_writable() {
            bail!("store {} is open read-only", self.root.display());
        }
        let mut guard = self.lock_manifest();
        let mut next = guard.clone();
        let out = change(&mut next)?;
        fsutil::write_atomic(&self.root.join(MANIFEST_FILE), next.to_json().as_bytes())
            .with_context(|| format!("cannot update the manifest of {}", self.root.display()))?;
        *guard = next;
        Ok(out)
    }

    fn lock_manifest(&self) -> MutexGuard<'_, Manifest> {
        self.manifest.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

fn read_manifest(root: &Path) -> Result<Manifest> {
    if !root.exists() {
        bail!("no store at {}: directory does not exist", root.display());
    }
    if !root.is_dir() {
        bail!("no store at {}: not a directory", root.display());
    }
    let path = root.join(MANIFEST_FILE);
    if !path.exists() {
        bail!("{} is not a Loupe store: {MANIFEST_FILE} is missing", root.display());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    Manifest::parse(&text, &path)
}

fn take_lock(root: &Path) -> Result<File> {
    let path = root.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            bail!("store {} is being written by another process", root.display())
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

/// Remove `*.tmp` files anywhere in the store (only ever left by interrupted writes).
fn remove_tmp_files(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            remove_tmp_files(&path)?;
        } else if path.to_string_lossy().ends_with(TMP_SUFFIX) {
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

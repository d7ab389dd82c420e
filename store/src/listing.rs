//! Writing the files of one manifest entry and listing them in one commit: the discipline every
//! writer of store tables shares (analyses, explanations, heads, circuits).
//!
//! 1. [`Store::start_listing`] checks the entry's name, removes what an interrupted writer left
//!    in the entry's folders (files that no manifest entry lists), and picks a fresh generation;
//! 2. the files go, each atomically, into `<folder>/<name>/<generation>/` for each of the entry's
//!    [`Listed::FOLDERS`] ([`Listing::write_table`], [`Listing::write`]), or are written there by
//!    someone else and named with [`Listing::add`]; a listed file is never overwritten;
//! 3. [`Store::commit_listing`] hashes them into the entry and commits the manifest once;
//! 4. then the files the previous entry listed and the new one does not are removed: unlisted
//!    now, no reader trusts them, so failing to remove them only wastes space.
//!
//! A kill or a full disk at any point therefore leaves the previous listing intact.

use std::collections::{BTreeMap, HashSet};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;

use crate::dictionaries::{FileEntry, check_dictionary_name, hash_files};
use crate::fsutil;
use crate::manifest::Manifest;
use crate::store::Store;

/// A kind of manifest entry that lists files written with a [`Listing`].
pub trait Listed: Sized {
    /// What the entry holds, for messages: "the {WHAT} of {name}".
    const WHAT: &'static str;
    /// The folders its files go into, each as `<folder>/<name>/<generation>/`.
    const FOLDERS: &'static [&'static str];
    /// The manifest's entries of this kind, by name.
    fn entries(manifest: &mut Manifest) -> &mut BTreeMap<String, Self>;
    fn files(&self) -> &[FileEntry];
    fn files_mut(&mut self) -> &mut Vec<FileEntry>;
}

/// Every file that a [`Listed`] entry of `manifest` lists (relative to the store root): what no
/// sweep may remove. A new kind of [`Listed`] entry adds its map here.
fn listed_files(manifest: &Manifest) -> HashSet<&str> {
    let features = manifest.features.values().flat_map(|e| e.files());
    let explanations = manifest.explanations.values().flat_map(|e| e.files());
    let heads = manifest.heads.values().flat_map(|e| e.files());
    let circuits = manifest.circuits.values().flat_map(|e| e.files());
    let evals = manifest.circuit_evals.values().flat_map(|e| e.files());
    let graphs = manifest.graphs.values().flat_map(|e| e.files());
    let supernodes = manifest.graph_supernodes.values().flat_map(|e| e.files());
    features
        .chain(explanations)
        .chain(heads)
        .chain(circuits)
        .chain(evals)
        .chain(graphs)
        .chain(supernodes)
        .map(|f| f.file.as_str())
        .collect()
}

/// Endings of the files a [`Listing`] writer makes (tables, settings, hnsw dumps, and the
/// temporary names of atomic writes): the only unlisted files [`Store::start_listing`] removes.
const WRITER_FILE_ENDINGS: [&str; 5] = [".arrow", ".json", ".hnsw.graph", ".hnsw.data", fsutil::TMP_SUFFIX];

/// The files being written for one entry of kind `E` named `name`; see the module doc.
pub struct Listing<E: Listed> {
    name: String,
    generation: String,
    /// `(folder, <root>/<folder>/<name>/<generation>)` for each of `E::FOLDERS`.
    dirs: Vec<(&'static str, PathBuf)>,
    /// Paths relative to the store root, in writing order.
    files: Vec<String>,
    kind: PhantomData<E>,
}

impl<E: Listed> Listing<E> {
    /// The entry's name (a dictionary's, for analyses and explanations).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `<root>/<folder>/<name>/<generation>/`, created by [`Store::start_listing`].
    pub fn dir(&self, folder: &str) -> &Path {
        match self.dirs.iter().find(|(f, _)| *f == folder) {
            Some((_, dir)) => dir,
            None => panic!("{folder} is not one of the folders of {} ({:?})", E::WHAT, E::FOLDERS),
        }
    }

    /// The path of `file` in the generation folder of `folder`, relative to the store root.
    pub fn path_in(&self, folder: &str, file: &str) -> String {
        format!("{folder}/{}/{}/{file}", self.name, self.generation)
    }

    /// Write `bytes` as `file` into the generation folder of `folder`, atomically.
    pub fn write(&mut self, folder: &str, file: &str, bytes: &[u8]) -> Result<()> {
        fsutil::write_atomic(&self.dir(folder).join(file), bytes)
            .with_context(|| format!("cannot write {file} of the {} of {}", E::WHAT, self.name))?;
        let path = self.path_in(folder, file);
        self.files.push(path);
        Ok(())
    }

    /// Write `batch` as the Arrow IPC file `file` into the generation folder of `folder`.
    pub fn write_table(&mut self, folder: &str, file: &str, batch: &RecordBatch) -> Result<()> {
        self.write(folder, file, &crate::table::ipc_bytes(batch)?)
    }

    /// List `file` (relative to the store root) too: a file someone else wrote, atomically and
    /// under a name no listing uses, inside `<folder>/<name>/` of one of the entry's folders or
    /// of `index/`.
    pub fn add(&mut self, file: String) {
        self.files.push(file);
    }
}

impl Store {
    /// Start writing the files of the `E` entry `name` (see the module doc); the listed entry,
    /// if any, stays valid and untouched until [`Store::commit_listing`].
    pub fn start_listing<E: Listed>(&self, name: &str) -> Result<Listing<E>> {
        check_dictionary_name(name)?;
        if !self.is_writable() {
            bail!("store {} is open read-only", self.root().display());
        }
        self.remove_unlisted(name, E::FOLDERS)?;
        let generation = fsutil::generation();
        let mut dirs = Vec::new();
        for folder in E::FOLDERS {
            let dir = self.root().join(folder).join(name).join(&generation);
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            dirs.push((*folder, dir));
        }
        Ok(Listing { name: name.to_string(), generation, dirs, files: Vec::new(), kind: PhantomData })
    }

    /// List the files `listing` wrote (hashing them now) in `entry`, and make it the `E` entry
    /// of the listing's name in one atomic manifest update; then remove the files the previous
    /// entry listed that the new one does not.
    pub fn commit_listing<E: Listed>(&self, listing: Listing<E>, mut entry: E) -> Result<()> {
        let files: Vec<&str> = listing.files.iter().map(String::as_str).collect();
        *entry.files_mut() = hash_files(self.root(), &files)?;
        let name = listing.name.clone();
        let previous = self.commit(|m| Ok(E::entries(m).insert(name, entry)))?;
        let old: Vec<&str> = previous
            .iter()
            .flat_map(|e| e.files())
            .map(|f| f.file.as_str())
            .filter(|f| !files.contains(f))
            .collect();
        let _ = fsutil::remove_files(self.root(), &old);
        // A generation folder nothing was written into, and the entry's folders once empty.
        for (_, dir) in &listing.dirs {
            let _ = std::fs::remove_dir(dir);
            let _ = dir.parent().map(std::fs::remove_dir);
        }
        Ok(())
    }

    /// Remove the files under `<folder>/<name>/` for each of `folders` that a listing writer
    /// makes ([`WRITER_FILE_ENDINGS`]) but that no manifest entry lists.
    fn remove_unlisted(&self, name: &str, folders: &[&str]) -> Result<()> {
        let manifest = self.manifest();
        let listed = listed_files(&manifest);
        for folder in folders {
            let base = format!("{folder}/{name}");
            let stale: Vec<String> = fsutil::files_under(&self.root().join(&base))?
                .into_iter()
                .map(|f| format!("{base}/{f}"))
                .filter(|f| !listed.contains(f.as_str()))
                .filter(|f| WRITER_FILE_ENDINGS.iter().any(|ending| f.ends_with(ending)))
                .collect();
            let refs: Vec<&str> = stale.iter().map(String::as_str).collect();
            fsutil::remove_files(self.root(), &refs)?;
        }
        Ok(())
    }
}

impl Store {
    /// Map the listed Arrow table `file` (the last path component of one of `files`, the listing
    /// of "the {what}") read-only, checked against its listing (size and checksum, the first time
    /// this process reads it) and against `schema`.
    pub fn read_listed_table(
        &self,
        files: &[FileEntry],
        what: &str,
        file: &str,
        schema: &SchemaRef,
    ) -> Result<RecordBatch> {
        let mut batches = self.read_listed_batches(files, what, file, schema)?;
        if batches.len() != 1 {
            bail!("{what}: {file} holds {} record batches, expected one", batches.len());
        }
        Ok(batches.remove(0))
    }

    /// [`Store::read_listed_table`] for a table written a batch at a time: its record batches.
    pub fn read_listed_batches(
        &self,
        files: &[FileEntry],
        what: &str,
        file: &str,
        schema: &SchemaRef,
    ) -> Result<Vec<RecordBatch>> {
        let listed =
            crate::features::find_listed(files, file).ok_or_else(|| anyhow!("{what} lists no {file}"))?;
        let path = self.root().join(&listed.file);
        let handle = std::fs::File::open(&path)
            .with_context(|| format!("{} is listed but cannot be opened", path.display()))?;
        // SAFETY: listed files are immutable (written under a temporary name, then renamed).
        let map = Arc::new(unsafe { memmap2::Mmap::map(&handle) }?);
        fsutil::check_listed(&path, &map, listed.bytes, &listed.xxh3)?;
        let batches = crate::reader::decode_batches(&map)
            .map_err(|e| anyhow!("{} is not a valid table: {e}", path.display()))?;
        if batches.iter().any(|b| b.schema().fields() != schema.fields()) {
            bail!("{} does not have the {file} schema", path.display());
        }
        Ok(batches)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ExplanationsEntry;
    use crate::explanations::EXPLANATIONS_DIR;

    fn entry() -> ExplanationsEntry {
        ExplanationsEntry {
            n_explanations: 0,
            n_scores: 0,
            index_model: None,
            analysis: None,
            files: Vec::new(),
        }
    }

    fn files(store: &Store) -> Vec<String> {
        fsutil::files_under(&store.root().join(EXPLANATIONS_DIR).join("d")).unwrap()
    }

    #[test]
    fn a_listing_replaces_the_previous_one_and_clears_only_unlisted_writer_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path()).unwrap();
        let mut first = store.start_listing::<ExplanationsEntry>("d").unwrap();
        first.write(EXPLANATIONS_DIR, "a.arrow", b"one").unwrap();
        store.commit_listing(first, entry()).unwrap();
        let listed = store.explanations_entry("d").unwrap().files;
        assert_eq!(listed.len(), 1);

        // A writer killed before its commit leaves its files; a journal is not a writer file.
        let mut killed = store.start_listing::<ExplanationsEntry>("d").unwrap();
        killed.write(EXPLANATIONS_DIR, "a.arrow", b"half").unwrap();
        let journal = store.explanations_dir("d").join("explain-x.journal.jsonl");
        std::fs::write(&journal, "{}\n").unwrap();
        drop(killed);
        assert_eq!(files(&store).len(), 3);

        let mut next = store.start_listing::<ExplanationsEntry>("d").unwrap();
        let survivors = files(&store);
        assert_eq!(survivors.len(), 2, "{survivors:?}");
        assert!(journal.exists() && store.root().join(&listed[0].file).exists());
        next.write(EXPLANATIONS_DIR, "a.arrow", b"two").unwrap();
        store.commit_listing(next, entry()).unwrap();
        let now = store.explanations_entry("d").unwrap().files;
        assert_ne!(now[0].file, listed[0].file);
        assert_eq!(std::fs::read(store.root().join(&now[0].file)).unwrap(), b"two");
        assert!(!store.root().join(&listed[0].file).exists(), "the previous listing's file is removed");
        assert_eq!(files(&store).len(), 2, "the new table and the journal");
    }

    #[test]
    fn a_listing_refuses_names_that_are_paths() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path()).unwrap();
        for name in ["..", "a/b", ""] {
            assert!(store.start_listing::<ExplanationsEntry>(name).is_err(), "{name:?}");
        }
    }
}

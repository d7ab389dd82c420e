//! Dictionaries in a store: `dictionaries/<name>/`, listed in the manifest with their files'
//! sizes and checksums, plus the training log table.
//!
//! The trainer writes a dictionary's files (each atomically) and then calls
//! [`Store::commit_dictionary`], which hashes them and lists them in the manifest in one atomic
//! update; files a manifest does not list are not part of the store. While training, the listed
//! files are the latest checkpoint (`checkpoints/step-NNNNNNNN/…`, status `training`); when
//! training ends they are the final SAELens-layout files at the top of the folder (status `done`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::manifest::check_hook_name;
use crate::store::Store;
use crate::table::{self, table};

/// Folder of all dictionaries, inside the store.
pub const DICTIONARIES_DIR: &str = "dictionaries";

/// One file of a dictionary, relative to `dictionaries/<name>/`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub file: String,
    pub bytes: u64,
    /// xxh3-128, 32 lowercase hex digits.
    pub xxh3: String,
}

/// A dictionary's manifest entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DictEntry {
    /// The hook it reads (for a transcoder: its input hook).
    pub hook: String,
    /// A transcoder's output hook (where it is spliced); absent for dictionaries that
    /// reconstruct `hook` itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_hook: Option<String>,
    /// `sae` or `monet`.
    pub kind: String,
    /// e.g. `topk`, `mutual_choice`, `feature_choice`, `gsae`.
    pub variant: String,
    pub d_in: u32,
    pub n_features: u32,
    /// `training` (the files are the latest checkpoint) or `done`.
    pub status: String,
    pub step: u64,
    pub tokens: u64,
    pub files: Vec<FileEntry>,
}

impl DictEntry {
    pub fn is_done(&self) -> bool {
        self.status == "done"
    }
}

/// Dictionary names become folder names: TransformerLens-style characters plus `-`.
pub fn check_dictionary_name(name: &str) -> Result<()> {
    let plain = name.replace('-', "_");
    check_hook_name(&plain).map_err(|_| {
        anyhow::anyhow!("invalid dictionary name {name:?} (use letters, digits, '_', '-' and '.')")
    })
}

impl Store {
    /// `dictionaries/<name>/` (whether or not it exists).
    pub fn dictionary_dir(&self, name: &str) -> PathBuf {
        self.root().join(DICTIONARIES_DIR).join(name)
    }

    /// The manifest entry of dictionary `name`, if it is listed.
    pub fn dictionary(&self, name: &str) -> Option<DictEntry> {
        self.manifest().dictionaries.get(name).cloned()
    }

    /// List dictionary `name` with `files` (paths relative to its folder, already written and
    /// fsynced), hashing them now. `entry.files` is replaced. The manifest update is atomic.
    pub fn commit_dictionary(&self, name: &str, mut entry: DictEntry, files: &[&str]) -> Result<()> {
        check_dictionary_name(name)?;
        entry.files = hash_files(&self.dictionary_dir(name), files)?;
        self.commit(|m| {
            m.dictionaries.insert(name.to_string(), entry);
            Ok(())
        })
    }

    /// Remove dictionary `name` from the manifest together with everything made from it (its
    /// analysis, explanations and expert tables, which would otherwise be served for a later dictionary of the
    /// same name), in one commit; then delete the files those entries listed (and only those).
    pub fn remove_dictionary(&self, name: &str) -> Result<()> {
        check_dictionary_name(name)?;
        let (dict, features, explanations, experts) = self.commit(|m| {
            let Some(dict) = m.dictionaries.remove(name) else {
                bail!("no dictionary named {name} in {}", self.root().display());
            };
            // Expert tables made from it, whatever their entry's name.
            let made: Vec<String> = m
                .experts
                .iter()
                .filter(|(_, e)| {
                    matches!(&e.source, crate::experts::ExpertsSource::Dictionary { name: d, .. } if d == name)
                })
                .map(|(k, _)| k.clone())
                .collect();
            let experts: Vec<_> = made.iter().filter_map(|k| m.experts.remove(k)).collect();
            Ok((dict, m.features.remove(name), m.explanations.remove(name), experts))
        })?;
        let files: Vec<&str> = dict.files.iter().map(|f| f.file.as_str()).collect();
        // Unlisted now, so no reader trusts them: what cannot be deleted is only wasted space.
        fsutil::remove_files(&self.dictionary_dir(name), &files)?;
        let _ = std::fs::remove_dir(self.dictionary_dir(name));
        let made_from: Vec<&str> = features
            .iter()
            .flat_map(|e| &e.files)
            .chain(explanations.iter().flat_map(|e| &e.files))
            .chain(experts.iter().flat_map(|e| &e.files))
            .map(|f| f.file.as_str())
            .collect();
        fsutil::remove_files(self.root(), &made_from)
    }
}

impl Store {
    /// Check listed files (paths relative to `dir`) against their size and checksum, the first
    /// time this process reads each (see [`fsutil::check_listed`]): for files a library opens
    /// by path, such as hnsw_rs's index dumps or safetensors weights.
    pub fn check_listed_files(&self, dir: &Path, files: &[&FileEntry]) -> Result<()> {
        for f in files {
            fsutil::check_listed_file(&dir.join(&f.file), f.bytes, &f.xxh3)?;
        }
        Ok(())
    }
}

/// Hash `files` (paths relative to `dir`, already written and fsynced) for a manifest listing,
/// and fsync the folders holding them so that the listing never names a file a crash could lose.
pub(crate) fn hash_files(dir: &Path, files: &[&str]) -> Result<Vec<FileEntry>> {
    let entries = files
        .iter()
        .map(|file| {
            let path = dir.join(file);
            let bytes =
                std::fs::metadata(&path).with_context(|| format!("cannot stat {}", path.display()))?.len();
            Ok(FileEntry { file: file.to_string(), bytes, xxh3: fsutil::file_xxh3(&path)? })
        })
        .collect::<Result<_>>()?;
    let mut parents: Vec<PathBuf> =
        files.iter().filter_map(|f| dir.join(f).parent().map(Path::to_path_buf)).collect();
    parents.sort();
    parents.dedup();
    for parent in parents {
        fsutil::sync_dir(&parent)?;
    }
    fsutil::sync_dir(dir)?;
    Ok(entries)
}

table! {
    /// One row of a training log (`train_log.arrow`): what a step measured.
    #[derive(Clone, Copy, Debug, Default, PartialEq)]
    pub struct TrainLogRow, view TrainLogColumns {
        pub step: u64,
        pub tokens: u64,
        pub fvu: f32,
        pub l0: f32,
        pub aux_loss: f32,
        pub dead_fraction: f32,
    }
}

/// Write a training log as an Arrow IPC file, atomically.
pub fn write_train_log(path: &Path, rows: &[TrainLogRow]) -> Result<()> {
    fsutil::write_atomic(path, &table::ipc_bytes(&table::batch(rows)?)?)
}

/// Read a training log written by [`write_train_log`].
pub fn read_train_log(path: &Path) -> Result<Vec<TrainLogRow>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader = arrow_ipc::reader::FileReader::try_new(file, None)
        .with_context(|| format!("{} is not an Arrow IPC file", path.display()))?;
    if reader.schema() != table::schema::<TrainLogRow>() {
        bail!("{} does not have the training log's schema", path.display());
    }
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("cannot read {}", path.display()))?;
        let columns = table::view::<TrainLogRow>(&batch)?;
        rows.extend((0..batch.num_rows()).map(|i| columns.row(i)));
    }
    Ok(rows)
}

//! Writing an analysis: each table atomically into `features/<dict>/`, then one manifest commit.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use arrow_array::builder::{Float32Builder, ListBuilder, UInt32Builder};
use arrow_array::{
    ArrayRef, BooleanArray, Float32Array, Int8Array, RecordBatch, StringArray, UInt8Array, UInt16Array,
    UInt32Array, UInt64Array,
};

use super::*;
use crate::dictionaries::{check_dictionary_name, hash_files};
use crate::fsutil;
use crate::store::Store;

fn u32s<T>(rows: &[T], f: impl Fn(&T) -> u32) -> ArrayRef {
    Arc::new(UInt32Array::from_iter_values(rows.iter().map(f)))
}
fn u64s<T>(rows: &[T], f: impl Fn(&T) -> u64) -> ArrayRef {
    Arc::new(UInt64Array::from_iter_values(rows.iter().map(f)))
}
fn f32s<T>(rows: &[T], f: impl Fn(&T) -> f32) -> ArrayRef {
    Arc::new(Float32Array::from_iter_values(rows.iter().map(f)))
}
fn u32_lists<'a, T: 'a>(rows: &'a [T], f: impl Fn(&'a T) -> &'a [u32]) -> ArrayRef {
    let mut b = ListBuilder::new(UInt32Builder::new());
    for r in rows {
        b.values().append_slice(f(r));
        b.append(true);
    }
    Arc::new(b.finish())
}
fn f32_lists<'a, T: 'a>(rows: &'a [T], f: impl Fn(&'a T) -> &'a [f32]) -> ArrayRef {
    let mut b = ListBuilder::new(Float32Builder::new());
    for r in rows {
        b.values().append_slice(f(r));
        b.append(true);
    }
    Arc::new(b.finish())
}

fn sorted_by_feature<T>(rows: &[T], id: impl Fn(&T) -> u32, table: &str) -> Result<()> {
    if rows.windows(2).any(|w| id(&w[0]) > id(&w[1])) {
        bail!("{table}: rows must be sorted by feature_id");
    }
    Ok(())
}

/// Write `batch` as an Arrow IPC file at `path`, atomically.
fn write_table(path: &Path, batch: &RecordBatch) -> Result<()> {
    let mut bytes = Vec::new();
    {
        let mut writer = arrow_ipc::writer::FileWriter::try_new(&mut bytes, &batch.schema())?;
        writer.write(batch)?;
        writer.finish()?;
    }
    fsutil::write_atomic(path, &bytes)
}

/// Writes the tables of one analysis into a folder of its own, `features/<dict>/<generation>/`
/// (each table atomically), and its index files into `index/<dict>/<generation>/`; nothing is
/// part of the store until [`Store::commit_features`] lists the files, and the listed analysis is
/// never touched before that commit.
pub struct FeaturesWriter {
    dir: PathBuf,
    index_dir: PathBuf,
    generation: String,
    written: Vec<String>,
    dict: String,
}

impl FeaturesWriter {
    /// Where the tables go.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where index files go (see [`FeaturesWriter::add_index_file`]).
    pub fn index_dir(&self) -> &Path {
        &self.index_dir
    }

    fn write(&mut self, file: &str, batch: RecordBatch) -> Result<()> {
        write_table(&self.dir.join(file), &batch)
            .with_context(|| format!("cannot write {file} of the analysis of {}", self.dict))?;
        self.written.push(format!("{FEATURES_DIR}/{}/{}/{file}", self.dict, self.generation));
        Ok(())
    }

    pub fn features(&mut self, rows: &[FeatureRow]) -> Result<()> {
        if rows.iter().enumerate().any(|(i, r)| r.feature_id as usize != i) {
            bail!("features table: row i must be feature i");
        }
        let hist: ArrayRef = {
            let mut b = ListBuilder::new(UInt32Builder::new());
            for r in rows {
                b.values().append_slice(&r.hist);
                b.append(true);
            }
            Arc::new(b.finish())
        };
        let batch = RecordBatch::try_new(
            features_schema(),
            vec![
                u32s(rows, |r| r.feature_id),
                u64s(rows, |r| r.count),
                f32s(rows, |r| r.density),
                f32s(rows, |r| r.mean_activation),
                f32s(rows, |r| r.max_activation),
                Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.dead)))),
                Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.dense)))),
                Arc::new(UInt16Array::from_iter_values(rows.iter().map(|r| r.hist_first_bin))),
                hist,
            ],
        )?;
        self.write(FEATURES_TABLE, batch)
    }

    /// Top examples (`quantile` false) or quantile examples (every row has a bucket).
    pub fn examples(&mut self, rows: &[Example], quantile: bool) -> Result<()> {
        let table = if quantile { QUANTILE_EXAMPLES_TABLE } else { TOP_EXAMPLES_TABLE };
        sorted_by_feature(rows, |r| r.feature_id, table)?;
        if rows.iter().any(|r| r.bucket.is_some() != quantile) {
            bail!("{table}: quantile examples need a bucket, top examples none");
        }
        if rows.iter().any(|r| r.tokens.len() != r.activations.len() || r.center as usize >= r.tokens.len()) {
            bail!("{table}: an example's tokens, activations and center disagree");
        }
        let mut columns = vec![
            u32s(rows, |r| r.feature_id),
            Arc::new(UInt16Array::from_iter_values(rows.iter().map(|r| r.rank))) as ArrayRef,
            f32s(rows, |r| r.activation),
            u64s(rows, |r| r.row),
            u32s(rows, |r| r.doc),
            u32s(rows, |r| r.pos),
            Arc::new(UInt16Array::from_iter_values(rows.iter().map(|r| r.center))),
            u32_lists(rows, |r| &r.tokens),
            f32_lists(rows, |r| &r.activations),
        ];
        if quantile {
            let b = |r: &Example| r.bucket.expect("checked");
            columns.extend([
                Arc::new(UInt8Array::from_iter_values(rows.iter().map(|r| b(r).index))) as ArrayRef,
                f32s(rows, |r| b(r).lo),
                f32s(rows, |r| b(r).hi),
                u64s(rows, |r| b(r).tokens),
            ]);
        }
        self.write(table, RecordBatch::try_new(examples_schema(quantile), columns)?)
    }

    pub fn logits(&mut self, rows: &[LogitEffect]) -> Result<()> {
        sorted_by_feature(rows, |r| r.feature_id, LOGITS_TABLE)?;
        let batch = RecordBatch::try_new(
            logits_schema(),
            vec![
                u32s(rows, |r| r.feature_id),
                Arc::new(Int8Array::from_iter_values(rows.iter().map(|r| r.rank))),
                u32s(rows, |r| r.token),
                f32s(rows, |r| r.value),
            ],
        )?;
        self.write(LOGITS_TABLE, batch)
    }

    pub fn neighbours(&mut self, rows: &[Neighbour]) -> Result<()> {
        sorted_by_feature(rows, |r| r.feature_id, NEIGHBOURS_TABLE)?;
        let batch = RecordBatch::try_new(
            neighbours_schema(),
            vec![
                u32s(rows, |r| r.feature_id),
                Arc::new(UInt8Array::from_iter_values(rows.iter().map(|r| r.rank))),
                u32s(rows, |r| r.neighbour),
                f32s(rows, |r| r.cosine),
            ],
        )?;
        self.write(NEIGHBOURS_TABLE, batch)
    }

    pub fn cooccurrence(&mut self, rows: &[Cooccurrence]) -> Result<()> {
        sorted_by_feature(rows, |r| r.feature_id, COOCCURRENCE_TABLE)?;
        let batch = RecordBatch::try_new(
            cooccurrence_schema(),
            vec![
                u32s(rows, |r| r.feature_id),
                Arc::new(UInt8Array::from_iter_values(rows.iter().map(|r| r.rank))),
                u32s(rows, |r| r.other),
                u64s(rows, |r| r.shared),
                f32s(rows, |r| r.jaccard),
            ],
        )?;
        self.write(COOCCURRENCE_TABLE, batch)
    }

    /// The token strings, row i = token i.
    pub fn vocab(&mut self, strings: &[String]) -> Result<()> {
        let batch = RecordBatch::try_new(
            vocab_schema(),
            vec![
                Arc::new(UInt32Array::from_iter_values(0..strings.len() as u32)),
                Arc::new(StringArray::from_iter_values(strings)),
            ],
        )?;
        self.write(VOCAB_TABLE, batch)
    }

    /// A small text file (e.g. the run's settings as JSON) in `features/<dict>/`.
    pub fn json(&mut self, file: &str, text: &str) -> Result<()> {
        fsutil::write_atomic(&self.dir.join(file), text.as_bytes())?;
        self.written.push(format!("{FEATURES_DIR}/{}/{}/{file}", self.dict, self.generation));
        Ok(())
    }

    /// A file written by someone else into [`FeaturesWriter::index_dir`] (already fsynced), to
    /// be listed too.
    pub fn add_index_file(&mut self, file: &str) {
        self.written.push(format!("{INDEX_DIR}/{}/{}/{file}", self.dict, self.generation));
    }
}

impl Store {
    /// `features/<dict>/` (whether or not it exists).
    pub fn features_dir(&self, dict: &str) -> PathBuf {
        self.root().join(FEATURES_DIR).join(dict)
    }

    /// `index/<dict>/` (whether or not it exists).
    pub fn index_dir(&self, dict: &str) -> PathBuf {
        self.root().join(INDEX_DIR).join(dict)
    }

    /// The manifest entry of the analysis of `dict`, if there is one.
    pub fn features(&self, dict: &str) -> Option<FeaturesEntry> {
        self.manifest().features.get(dict).cloned()
    }

    /// Start writing the analysis of `dict` into new folders; the listed analysis, if any, stays
    /// valid and untouched until the commit. Tables and index files that no entry lists (left
    /// by a killed run) are removed first.
    pub fn features_writer(&self, dict: &str) -> Result<FeaturesWriter> {
        check_dictionary_name(dict)?;
        if !self.is_writable() {
            bail!("store {} is open read-only", self.root().display());
        }
        self.remove_unlisted_analysis_files(dict)?;
        let generation = fsutil::generation();
        let dir = self.features_dir(dict).join(&generation);
        let index_dir = self.index_dir(dict).join(&generation);
        for dir in [&dir, &index_dir] {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        Ok(FeaturesWriter { dir, index_dir, generation, written: Vec::new(), dict: dict.to_string() })
    }

    /// List the files `writer` wrote (hashing them now) as the analysis of `dict`, in one
    /// atomic manifest update; then delete the files the previous analysis listed.
    pub fn commit_features(&self, writer: FeaturesWriter, mut entry: FeaturesEntry) -> Result<()> {
        let files: Vec<&str> = writer.written.iter().map(String::as_str).collect();
        entry.files = hash_files(self.root(), &files)?;
        let dict = writer.dict;
        let previous = self.features(&dict).map(|e| e.files).unwrap_or_default();
        self.commit(|m| {
            m.features.insert(dict.clone(), entry);
            Ok(())
        })?;
        // Unlisted now, so no reader trusts them: failing to delete them only wastes space.
        let old: Vec<&str> =
            previous.iter().map(|f| f.file.as_str()).filter(|f| !files.contains(f)).collect();
        let _ = fsutil::remove_files(self.root(), &old);
        for dir in [self.features_dir(&dict), self.index_dir(&dict)] {
            let _ = std::fs::remove_dir(dir);
        }
        Ok(())
    }

    /// Remove the files in `features/<dict>/` and `index/<dict>/` that a writer of analyses or
    /// explanations makes (Arrow tables, `analysis.json`, hnsw dumps) but that no manifest entry
    /// lists.
    fn remove_unlisted_analysis_files(&self, dict: &str) -> Result<()> {
        let manifest = self.manifest();
        let listed: std::collections::HashSet<&str> = manifest
            .features
            .get(dict)
            .into_iter()
            .flat_map(|e| &e.files)
            .chain(manifest.explanations.get(dict).into_iter().flat_map(|e| &e.files))
            .map(|f| f.file.as_str())
            .collect();
        for top in [FEATURES_DIR, INDEX_DIR] {
            let base = format!("{top}/{dict}");
            let stale: Vec<String> = fsutil::files_under(&self.root().join(&base))?
                .into_iter()
                .map(|f| format!("{base}/{f}"))
                .filter(|f| !listed.contains(f.as_str()))
                .filter(|f| {
                    [".arrow", ".json", ".hnsw.graph", ".hnsw.data"].iter().any(|ending| f.ends_with(ending))
                })
                .collect();
            let refs: Vec<&str> = stale.iter().map(String::as_str).collect();
            fsutil::remove_files(self.root(), &refs)?;
        }
        Ok(())
    }
}

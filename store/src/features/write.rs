//! Writing an analysis: each table atomically into `features/<dict>/<generation>/`, then one
//! manifest commit (a [`Listing`]).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use arrow_array::RecordBatch;

use super::*;
use crate::listing::Listing;
use crate::store::Store;
use crate::table::Columns;

fn sorted_by_feature<T>(rows: &[T], id: impl Fn(&T) -> u32, table: &str) -> Result<()> {
    if rows.windows(2).any(|w| id(&w[0]) > id(&w[1])) {
        bail!("{table}: rows must be sorted by feature_id");
    }
    Ok(())
}

/// Writes the tables of one analysis into a folder of its own, `features/<dict>/<generation>/`
/// (each table atomically), and its index files into `index/<dict>/<generation>/`; nothing is
/// part of the store until [`Store::commit_features`] lists the files, and the listed analysis is
/// never touched before that commit.
pub struct FeaturesWriter {
    listing: Listing<FeaturesEntry>,
}

impl FeaturesWriter {
    /// Where the tables go.
    pub fn dir(&self) -> &Path {
        self.listing.dir(FEATURES_DIR)
    }

    /// Where index files go (see [`FeaturesWriter::add_index_file`]).
    pub fn index_dir(&self) -> &Path {
        self.listing.dir(INDEX_DIR)
    }

    fn write<T: Columns>(&mut self, file: &str, rows: &[T]) -> Result<()> {
        self.listing.write_table(FEATURES_DIR, file, &table::batch(rows)?)
    }

    pub fn features(&mut self, rows: &[FeatureRow]) -> Result<()> {
        if rows.iter().enumerate().any(|(i, r)| r.feature_id as usize != i) {
            bail!("features table: row i must be feature i");
        }
        self.write(FEATURES_TABLE, rows)
    }

    /// Top examples (`quantile` false) or quantile examples (every row has a bucket).
    pub fn examples(&mut self, rows: &[Example], quantile: bool) -> Result<()> {
        let file = if quantile { QUANTILE_EXAMPLES_TABLE } else { TOP_EXAMPLES_TABLE };
        sorted_by_feature(rows, |r| r.feature_id, file)?;
        if rows.iter().any(|r| r.bucket.is_some() != quantile) {
            bail!("{file}: quantile examples need a bucket, top examples none");
        }
        if rows.iter().any(|r| r.tokens.len() != r.activations.len() || r.center as usize >= r.tokens.len()) {
            bail!("{file}: an example's tokens, activations and center disagree");
        }
        if !quantile {
            return self.write(file, rows);
        }
        let mut columns = table::arrays(rows);
        Bucket::arrays(rows.iter().filter_map(|r| r.bucket.as_ref()), &mut columns);
        let batch = RecordBatch::try_new(quantile_examples_schema(), columns)?;
        self.listing.write_table(FEATURES_DIR, file, &batch)
    }

    pub fn logits(&mut self, rows: &[LogitEffect]) -> Result<()> {
        sorted_by_feature(rows, |r| r.feature_id, LOGITS_TABLE)?;
        self.write(LOGITS_TABLE, rows)
    }

    pub fn neighbours(&mut self, rows: &[Neighbour]) -> Result<()> {
        sorted_by_feature(rows, |r| r.feature_id, NEIGHBOURS_TABLE)?;
        self.write(NEIGHBOURS_TABLE, rows)
    }

    pub fn cooccurrence(&mut self, rows: &[Cooccurrence]) -> Result<()> {
        sorted_by_feature(rows, |r| r.feature_id, COOCCURRENCE_TABLE)?;
        self.write(COOCCURRENCE_TABLE, rows)
    }

    /// Head attribution of an attention-output dictionary: one row per feature, in order, each
    /// with one weight per head.
    pub fn head_attribution(&mut self, rows: &[HeadAttribution]) -> Result<()> {
        if rows.iter().enumerate().any(|(i, r)| r.feature_id as usize != i) {
            bail!("{HEAD_ATTRIBUTION_TABLE}: row i must be feature i");
        }
        if rows.windows(2).any(|w| w[0].weights.len() != w[1].weights.len()) {
            bail!("{HEAD_ATTRIBUTION_TABLE}: every feature needs one weight per head");
        }
        self.write(HEAD_ATTRIBUTION_TABLE, rows)
    }

    /// The token strings, row i = token i.
    pub fn vocab(&mut self, strings: &[String]) -> Result<()> {
        let rows: Vec<VocabRow> =
            strings.iter().zip(0..).map(|(s, token)| VocabRow { token, string: s.clone() }).collect();
        self.write(VOCAB_TABLE, &rows)
    }

    /// A small text file (e.g. the run's settings as JSON) in `features/<dict>/`.
    pub fn json(&mut self, file: &str, text: &str) -> Result<()> {
        self.listing.write(FEATURES_DIR, file, text.as_bytes())
    }

    /// A file written by someone else into [`FeaturesWriter::index_dir`] (already fsynced), to
    /// be listed too.
    pub fn add_index_file(&mut self, file: &str) {
        let path = self.listing.path_in(INDEX_DIR, file);
        self.listing.add(path);
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
        Ok(FeaturesWriter { listing: self.start_listing(dict)? })
    }

    /// List the files `writer` wrote (hashing them now) as the analysis of `dict`, in one
    /// atomic manifest update; then delete the files the previous analysis listed.
    pub fn commit_features(&self, writer: FeaturesWriter, entry: FeaturesEntry) -> Result<()> {
        self.commit_listing(writer.listing, entry)
    }
}

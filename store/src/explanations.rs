//! Explanations and their scores: `explanations/<dict>/{explanations,scores}.arrow`, written by
//! `loupe explain` / `loupe score`, listed in the manifest's `explanations` map (with the
//! semantic-search index `index/<dict>/explanations.hnsw.*` when one was built).
//!
//! Every row carries its provenance: which explainer or scorer made it, the LLM (or `offline`),
//! the SHA-256 of the exact request bodies (`prompt_hash`), the sampling parameters, the store
//! rows of the examples used, and the tokens spent. A feature whose explanation or score failed
//! has a row too, with `failure` saying why, so no feature silently drops out. Both row types
//! end with the same [`Provenance`] columns.
//!
//! The tables are small (one row per feature and explainer or scorer), so they are read whole.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Result;
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use serde::{Deserialize, Serialize};

use crate::dictionaries::FileEntry;
use crate::features::INDEX_DIR;
use crate::listing::Listed;
use crate::manifest::Manifest;
use crate::store::Store;
use crate::table::{self, Columns, table};

/// Folder of all explanations, inside the store.
pub const EXPLANATIONS_DIR: &str = "explanations";
pub const EXPLANATIONS_TABLE: &str = "explanations.arrow";
pub const SCORES_TABLE: &str = "scores.arrow";
/// Basename of the hnsw dump of the explanation embeddings in `index/<dict>/`.
pub const EXPLANATIONS_INDEX: &str = "explanations";

/// The manifest entry of a dictionary's explanations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplanationsEntry {
    pub n_explanations: u32,
    pub n_scores: u32,
    /// The embedding model of the search index, when `files` lists one.
    #[serde(default)]
    pub index_model: Option<String>,
    /// [`crate::features::analysis_id`] of the analysis the explanations were made from (None in
    /// stores older than this field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<String>,
    /// Files relative to the store root.
    pub files: Vec<FileEntry>,
}

impl Listed for ExplanationsEntry {
    const WHAT: &'static str = "explanations";
    const FOLDERS: &'static [&'static str] = &[EXPLANATIONS_DIR];
    fn entries(manifest: &mut Manifest) -> &mut BTreeMap<String, Self> {
        &mut manifest.explanations
    }
    fn files(&self) -> &[FileEntry] {
        &self.files
    }
    fn files_mut(&mut self) -> &mut Vec<FileEntry> {
        &mut self.files
    }
}

table! {
    /// Who or what made an explanation or a score, from what, and at what cost: the columns
    /// both tables end with (after `failure`).
    #[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
    pub struct Provenance, view ProvenanceColumns {
        /// The LLM that answered (or the embedding model), or `offline`.
        pub model: String,
        /// SHA-256 (hex) of the request bodies sent, or of the offline method's inputs.
        pub prompt_hash: String,
        pub temperature: f32,
        pub max_tokens: u32,
        /// Store rows (the examples' `row`) of the examples used.
        pub example_rows: Vec<u64>,
        pub prompt_tokens: u64,
        pub completion_tokens: u64,
    }
}

table! {
    /// One explanation of one feature by one explainer: a row of `explanations.arrow`.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct Explanation, view ExplanationColumns {
        pub feature_id: u32,
        /// `delphi` (an LLM with the delphi-style prompt) or `offline` (token and logit statistics).
        pub explainer: String,
        /// None when it failed.
        pub explanation: Option<String>,
        /// Why it failed (None when it did not).
        pub failure: Option<String>,
        #[serde(flatten)]
        pub provenance: Provenance,
    }
}

table! {
    /// One score of one explanation by one scorer: a row of `scores.arrow`.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
    pub struct Score, view ScoreColumns {
        pub feature_id: u32,
        /// The explainer whose explanation was scored.
        pub explainer: String,
        /// `detection`, `fuzzing`, `simulation`, `embedding` or `intervention`.
        pub scorer: String,
        /// The headline: balanced accuracy (detection, fuzzing), Pearson r (simulation), AUROC
        /// (embedding, intervention). None when it failed.
        pub score: Option<f32>,
        pub balanced_accuracy: Option<f32>,
        pub f1: Option<f32>,
        /// From log-probabilities or similarities, when available.
        pub auroc: Option<f32>,
        pub pearson: Option<f32>,
        /// Examples (or tokens, for simulation) scored.
        pub n_examples: u32,
        /// Why it failed (None when it did not).
        pub failure: Option<String>,
        #[serde(flatten)]
        pub provenance: Provenance,
    }
}

/// Everything stored for one dictionary.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Explanations {
    pub explanations: Vec<Explanation>,
    pub scores: Vec<Score>,
}

/// The schema of `explanations.arrow` (and of the exported `explanations.parquet`).
pub fn explanations_schema() -> SchemaRef {
    table::schema::<Explanation>()
}

/// The schema of `scores.arrow` (and of the exported `scores.parquet`).
pub fn scores_schema() -> SchemaRef {
    table::schema::<Score>()
}

/// All rows of a table whose schema was checked.
fn read_all<T: Columns>(batch: &RecordBatch) -> Vec<T> {
    let view = T::view(&mut batch.columns().iter());
    (0..batch.num_rows()).map(|i| T::get(&view, i)).collect()
}

impl Store {
    /// `explanations/<dict>/` (whether or not it exists).
    pub fn explanations_dir(&self, dict: &str) -> PathBuf {
        self.root().join(EXPLANATIONS_DIR).join(dict)
    }

    /// The manifest entry of the explanations of `dict`, if any.
    pub fn explanations_entry(&self, dict: &str) -> Option<ExplanationsEntry> {
        self.manifest().explanations.get(dict).cloned()
    }

    /// Record that every explanation of `dict` was made from the current analysis (an explain
    /// run that remade them all calls this after its commit).
    pub fn mark_explanations_current(&self, dict: &str) -> Result<()> {
        let Some(id) = self.features(dict).as_ref().map(crate::features::analysis_id) else { return Ok(()) };
        self.commit(|m| {
            if let Some(e) = m.explanations.get_mut(dict) {
                e.analysis = Some(id);
            }
            Ok(())
        })
    }

    /// Whether the explanations of `dict` were made from an analysis that `loupe analyze` has
    /// since replaced (their examples and `example_rows` then refer to rows the current analysis
    /// may not show). False when unknown.
    pub fn explanations_stale(&self, dict: &str) -> bool {
        let manifest = self.manifest();
        match (manifest.explanations.get(dict).and_then(|e| e.analysis.as_ref()), manifest.features.get(dict))
        {
            (Some(made_from), Some(now)) => *made_from != crate::features::analysis_id(now),
            _ => false,
        }
    }

    /// The explanations and scores of `dict` (empty when there are none yet).
    pub fn explanations(&self, dict: &str) -> Result<Explanations> {
        let Some(entry) = self.explanations_entry(dict) else {
            return Ok(Explanations::default());
        };
        let what = format!("the explanations of {dict}");
        let read = |file: &str, schema: SchemaRef| self.read_listed_table(&entry.files, &what, file, &schema);
        Ok(Explanations {
            explanations: read_all(&read(EXPLANATIONS_TABLE, explanations_schema())?),
            scores: read_all(&read(SCORES_TABLE, scores_schema())?),
        })
    }

    /// Replace the explanations of `dict` with `all`, in one manifest update. `index` names the
    /// files of a search index already written (atomically) into `index/<dict>/`, with the model
    /// that embedded it; without one, the entry lists no index.
    pub fn commit_explanations(
        &self,
        dict: &str,
        all: &Explanations,
        index: Option<(&str, &[String])>,
    ) -> Result<()> {
        // New tables go into a folder of their own: the listed ones stay untouched until the
        // manifest names the new ones, and are removed after.
        let mut listing = self.start_listing::<ExplanationsEntry>(dict)?;
        listing.write_table(EXPLANATIONS_DIR, EXPLANATIONS_TABLE, &table::batch(&all.explanations)?)?;
        listing.write_table(EXPLANATIONS_DIR, SCORES_TABLE, &table::batch(&all.scores)?)?;
        for file in index.map(|(_, f)| f).unwrap_or_default() {
            listing.add(format!("{INDEX_DIR}/{dict}/{file}"));
        }
        let entry = ExplanationsEntry {
            n_explanations: all.explanations.len() as u32,
            n_scores: all.scores.len() as u32,
            index_model: index.map(|(model, _)| model.to_string()),
            // Rewriting the tables (a score run, a partial explain run) does not make older
            // explanations current: keep what the previous entry recorded.
            analysis: match self.explanations_entry(dict) {
                Some(previous) => previous.analysis,
                None => self.features(dict).as_ref().map(crate::features::analysis_id),
            },
            files: Vec::new(),
        };
        self.commit_listing(listing, entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn explanation(f: u32, text: Option<&str>) -> Explanation {
        Explanation {
            feature_id: f,
            explainer: if f.is_multiple_of(2) { "delphi".into() } else { "offline".into() },
            explanation: text.map(Into::into),
            failure: text.is_none().then(|| "timed out".into()),
            provenance: Provenance {
                model: format!("model-{f}"),
                prompt_hash: format!("{f:064x}"),
                temperature: 0.5 * f as f32,
                max_tokens: 100 + f,
                example_rows: (0..f as u64).collect(),
                prompt_tokens: 7 * f as u64,
                completion_tokens: 3 * f as u64,
            },
        }
    }

    fn score(f: u32, value: Option<f32>) -> Score {
        Score {
            feature_id: f,
            explainer: "delphi".into(),
            scorer: "detection".into(),
            score: value,
            balanced_accuracy: value,
            f1: None,
            auroc: value.map(|v| v / 2.0),
            pearson: None,
            n_examples: 10 + f,
            failure: value.is_none().then(|| "bad answer".into()),
            provenance: Provenance {
                model: "m".into(),
                prompt_hash: format!("{f:064x}"),
                temperature: 0.0,
                max_tokens: 1,
                example_rows: vec![f as u64, 2],
                prompt_tokens: 1,
                completion_tokens: 2,
            },
        }
    }

    #[test]
    fn explanations_and_scores_read_back_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path()).unwrap();
        let all = Explanations {
            explanations: vec![explanation(0, Some("cats")), explanation(1, None), explanation(2, Some(""))],
            scores: vec![score(0, Some(0.75)), score(2, None)],
        };
        store.commit_explanations("d", &all, None).unwrap();
        assert_eq!(Store::open(dir.path()).unwrap().explanations("d").unwrap(), all);
        assert_eq!(store.explanations("none").unwrap(), Explanations::default());
    }
}

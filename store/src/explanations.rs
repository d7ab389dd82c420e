//! Explanations and their scores: `explanations/<dict>/{explanations,scores}.arrow`, written by
//! `loupe explain` / `loupe score`, listed in the manifest's `explanations` map (with the
//! semantic-search index `index/<dict>/explanations.hnsw.*` when one was built).
//!
//! Every row carries its provenance: which explainer or scorer made it, the LLM (or `offline`),
//! the SHA-256 of the exact request bodies (`prompt_hash`), the sampling parameters, the store
//! rows of the examples used, and the tokens spent. A feature whose explanation or score failed
//! has a row too, with `failure` saying why, so no feature silently drops out.
//!
//! The tables are small (one row per feature and explainer or scorer), so they are read whole.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use arrow_array::builder::{ListBuilder, UInt64Builder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt32Type, UInt64Type};
use arrow_array::{Array, ArrayRef, Float32Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::dictionaries::{FileEntry, check_dictionary_name, hash_files};
use crate::features::INDEX_DIR;
use crate::fsutil;
use crate::store::Store;

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

/// One explanation of one feature by one explainer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    pub feature_id: u32,
    /// `delphi` (an LLM with the delphi-style prompt) or `offline` (token and logit statistics).
    pub explainer: String,
    /// None when it failed.
    pub explanation: Option<String>,
    /// Why it failed (None when it did not).
    pub failure: Option<String>,
    /// The LLM that answered, or `offline`.
    pub model: String,
    /// SHA-256 (hex) of the request bodies sent, or of the offline explainer's inputs.
    pub prompt_hash: String,
    pub temperature: f32,
    pub max_tokens: u32,
    /// Store rows (the examples' `row`) of the examples shown.
    pub example_rows: Vec<u64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// One score of one explanation by one scorer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Score {
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
    pub failure: Option<String>,
    pub model: String,
    pub prompt_hash: String,
    pub temperature: f32,
    pub max_tokens: u32,
    pub example_rows: Vec<u64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// Everything stored for one dictionary.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Explanations {
    pub explanations: Vec<Explanation>,
    pub scores: Vec<Score>,
}

fn field(name: &str, dt: DataType, nullable: bool) -> Field {
    Field::new(name, dt, nullable)
}

fn rows_field() -> Field {
    field("example_rows", DataType::List(Arc::new(field("item", DataType::UInt64, true))), false)
}

/// The provenance columns shared by both tables, after their own columns.
fn provenance() -> Vec<Field> {
    vec![
        field("failure", DataType::Utf8, true),
        field("model", DataType::Utf8, false),
        field("prompt_hash", DataType::Utf8, false),
        field("temperature", DataType::Float32, false),
        field("max_tokens", DataType::UInt32, false),
        rows_field(),
        field("prompt_tokens", DataType::UInt64, false),
        field("completion_tokens", DataType::UInt64, false),
    ]
}

pub fn explanations_schema() -> SchemaRef {
    let mut fields = vec![
        field("feature_id", DataType::UInt32, false),
        field("explainer", DataType::Utf8, false),
        field("explanation", DataType::Utf8, true),
    ];
    fields.extend(provenance());
    Arc::new(Schema::new(fields))
}

pub fn scores_schema() -> SchemaRef {
    let mut fields = vec![
        field("feature_id", DataType::UInt32, false),
        field("explainer", DataType::Utf8, false),
        field("scorer", DataType::Utf8, false),
        field("score", DataType::Float32, true),
        field("balanced_accuracy", DataType::Float32, true),
        field("f1", DataType::Float32, true),
        field("auroc", DataType::Float32, true),
        field("pearson", DataType::Float32, true),
        field("n_examples", DataType::UInt32, false),
    ];
    fields.extend(provenance());
    Arc::new(Schema::new(fields))
}

/// The provenance columns of rows, in [`provenance`] order.
struct Provenance<'a> {
    failure: Option<&'a str>,
    model: &'a str,
    prompt_hash: &'a str,
    temperature: f32,
    max_tokens: u32,
    example_rows: &'a [u64],
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// The [`Provenance`] of an [`Explanation`] or a [`Score`] (they share the fields).
macro_rules! provenance_of {
    ($r:expr) => {
        Provenance {
            failure: $r.failure.as_deref(),
            model: &$r.model,
            prompt_hash: &$r.prompt_hash,
            temperature: $r.temperature,
            max_tokens: $r.max_tokens,
            example_rows: &$r.example_rows,
            prompt_tokens: $r.prompt_tokens,
            completion_tokens: $r.completion_tokens,
        }
    };
}

fn provenance_columns(rows: &[Provenance]) -> Vec<ArrayRef> {
    let mut lists = ListBuilder::new(UInt64Builder::new());
    for r in rows {
        lists.values().append_slice(r.example_rows);
        lists.append(true);
    }
    vec![
        Arc::new(StringArray::from_iter(rows.iter().map(|r| r.failure))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.model))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.prompt_hash))),
        Arc::new(Float32Array::from_iter_values(rows.iter().map(|r| r.temperature))),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.max_tokens))),
        Arc::new(lists.finish()),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.prompt_tokens))),
        Arc::new(UInt64Array::from_iter_values(rows.iter().map(|r| r.completion_tokens))),
    ]
}

/// The explanations as one record batch (the table's and the export's layout).
pub fn explanations_batch(rows: &[Explanation]) -> Result<RecordBatch> {
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.feature_id))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.explainer.as_str()))),
        Arc::new(StringArray::from_iter(rows.iter().map(|r| r.explanation.as_deref()))),
    ];
    columns.extend(provenance_columns(&rows.iter().map(|r| provenance_of!(r)).collect::<Vec<_>>()));
    Ok(RecordBatch::try_new(explanations_schema(), columns)?)
}

/// The scores as one record batch.
pub fn scores_batch(rows: &[Score]) -> Result<RecordBatch> {
    let f32s =
        |f: fn(&Score) -> Option<f32>| -> ArrayRef { Arc::new(Float32Array::from_iter(rows.iter().map(f))) };
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.feature_id))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.explainer.as_str()))),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.scorer.as_str()))),
        f32s(|r| r.score),
        f32s(|r| r.balanced_accuracy),
        f32s(|r| r.f1),
        f32s(|r| r.auroc),
        f32s(|r| r.pearson),
        Arc::new(UInt32Array::from_iter_values(rows.iter().map(|r| r.n_examples))),
    ];
    columns.extend(provenance_columns(&rows.iter().map(|r| provenance_of!(r)).collect::<Vec<_>>()));
    Ok(RecordBatch::try_new(scores_schema(), columns)?)
}

/// A table's columns by name, read row by row: rows are built straight from the mapped columns,
/// with no intermediate vector per column (a million explanations allocate only what they own).
struct Columns<'a>(&'a RecordBatch);

impl<'a> Columns<'a> {
    fn col(&self, name: &str) -> &'a ArrayRef {
        self.0.column_by_name(name).expect("schema checked")
    }
    /// Strings (null → None).
    fn text(&self, name: &str) -> impl Fn(usize) -> Option<String> + 'a {
        let col = self.col(name).as_string::<i32>();
        move |i| col.is_valid(i).then(|| col.value(i).to_string())
    }
    /// Strings (null → "").
    fn required(&self, name: &str) -> impl Fn(usize) -> String + 'a {
        let text = self.text(name);
        move |i| text(i).unwrap_or_default()
    }
    fn float(&self, name: &str) -> impl Fn(usize) -> Option<f32> + 'a {
        let col = self.col(name).as_primitive::<Float32Type>();
        move |i| col.is_valid(i).then(|| col.value(i))
    }
    fn u32s(&self, name: &str) -> &'a [u32] {
        self.col(name).as_primitive::<UInt32Type>().values()
    }
    fn u64s(&self, name: &str) -> &'a [u64] {
        self.col(name).as_primitive::<UInt64Type>().values()
    }
    fn example_rows(&self) -> impl Fn(usize) -> Vec<u64> + 'a {
        let list = self.col("example_rows").as_list::<i32>();
        let (offsets, values) = (list.value_offsets(), list.values().as_primitive::<UInt64Type>().values());
        move |i| values[offsets[i] as usize..offsets[i + 1] as usize].to_vec()
    }
}

fn read_explanations(batch: &RecordBatch) -> Vec<Explanation> {
    let c = Columns(batch);
    let (ids, explainer, explanation) =
        (c.u32s("feature_id"), c.required("explainer"), c.text("explanation"));
    let (failure, model, hash) = (c.text("failure"), c.required("model"), c.required("prompt_hash"));
    let (temp, max_tokens, rows) = (c.float("temperature"), c.u32s("max_tokens"), c.example_rows());
    let (pt, ct) = (c.u64s("prompt_tokens"), c.u64s("completion_tokens"));
    (0..ids.len())
        .map(|i| Explanation {
            feature_id: ids[i],
            explainer: explainer(i),
            explanation: explanation(i),
            failure: failure(i),
            model: model(i),
            prompt_hash: hash(i),
            temperature: temp(i).unwrap_or_default(),
            max_tokens: max_tokens[i],
            example_rows: rows(i),
            prompt_tokens: pt[i],
            completion_tokens: ct[i],
        })
        .collect()
}

fn read_scores(batch: &RecordBatch) -> Vec<Score> {
    let c = Columns(batch);
    let (ids, explainer, scorer, failure) =
        (c.u32s("feature_id"), c.required("explainer"), c.required("scorer"), c.text("failure"));
    let (score, bacc, f1) = (c.float("score"), c.float("balanced_accuracy"), c.float("f1"));
    let (auroc, pearson, n) = (c.float("auroc"), c.float("pearson"), c.u32s("n_examples"));
    let (model, hash) = (c.required("model"), c.required("prompt_hash"));
    let (temp, max_tokens, rows) = (c.float("temperature"), c.u32s("max_tokens"), c.example_rows());
    let (pt, ct) = (c.u64s("prompt_tokens"), c.u64s("completion_tokens"));
    (0..ids.len())
        .map(|i| Score {
            feature_id: ids[i],
            explainer: explainer(i),
            scorer: scorer(i),
            score: score(i),
            balanced_accuracy: bacc(i),
            f1: f1(i),
            auroc: auroc(i),
            pearson: pearson(i),
            n_examples: n[i],
            failure: failure(i),
            model: model(i),
            prompt_hash: hash(i),
            temperature: temp(i).unwrap_or_default(),
            max_tokens: max_tokens[i],
            example_rows: rows(i),
            prompt_tokens: pt[i],
            completion_tokens: ct[i],
        })
        .collect()
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
        let read = |file: &str, schema: SchemaRef| -> Result<RecordBatch> {
            let listed = crate::features::find_listed(&entry.files, file)
                .ok_or_else(|| anyhow!("the explanations of {dict} list no {file}"))?;
            let path = self.root().join(&listed.file);
            let handle = std::fs::File::open(&path)
                .with_context(|| format!("{} is listed but missing", path.display()))?;
            // SAFETY: listed files are immutable (written under a temporary name, then renamed).
            let map = Arc::new(unsafe { memmap2::Mmap::map(&handle) }?);
            crate::fsutil::check_listed(&path, &map, listed.bytes, &listed.xxh3)?;
            let batch = crate::reader::decode_single_batch(&map)
                .map_err(|e| anyhow!("{} is not a valid table: {e}", path.display()))?;
            if batch.schema().fields() != schema.fields() {
                bail!("{} does not have the {file} schema", path.display());
            }
            Ok(batch)
        };
        Ok(Explanations {
            explanations: read_explanations(&read(EXPLANATIONS_TABLE, explanations_schema())?),
            scores: read_scores(&read(SCORES_TABLE, scores_schema())?),
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
        check_dictionary_name(dict)?;
        if !self.is_writable() {
            bail!("store {} is open read-only", self.root().display());
        }
        // New tables go into a folder of their own: the listed ones stay untouched until the
        // manifest names the new ones, and are removed after.
        let generation = fsutil::generation();
        let dir = self.explanations_dir(dict).join(&generation);
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let mut files = Vec::new();
        for (file, batch) in [
            (EXPLANATIONS_TABLE, explanations_batch(&all.explanations)?),
            (SCORES_TABLE, scores_batch(&all.scores)?),
        ] {
            let mut bytes = Vec::new();
            {
                let mut writer = arrow_ipc::writer::FileWriter::try_new(&mut bytes, &batch.schema())?;
                writer.write(&batch)?;
                writer.finish()?;
            }
            fsutil::write_atomic(&dir.join(file), &bytes)
                .with_context(|| format!("cannot write {file} of the explanations of {dict}"))?;
            files.push(format!("{EXPLANATIONS_DIR}/{dict}/{generation}/{file}"));
        }
        let index_model = index.map(|(model, _)| model.to_string());
        for file in index.map(|(_, f)| f).unwrap_or_default() {
            files.push(format!("{INDEX_DIR}/{dict}/{file}"));
        }
        let refs: Vec<&str> = files.iter().map(String::as_str).collect();
        let entry = ExplanationsEntry {
            n_explanations: all.explanations.len() as u32,
            n_scores: all.scores.len() as u32,
            index_model,
            // Rewriting the tables (a score run, a partial explain run) does not make older
            // explanations current: keep what the previous entry recorded.
            analysis: match self.explanations_entry(dict) {
                Some(previous) => previous.analysis,
                None => self.features(dict).as_ref().map(crate::features::analysis_id),
            },
            files: hash_files(self.root(), &refs)?,
        };
        let previous = self.explanations_entry(dict).map(|e| e.files).unwrap_or_default();
        self.commit(|m| {
            m.explanations.insert(dict.to_string(), entry);
            Ok(())
        })?;
        // Unlisted now, so no reader trusts them: failing to delete them only wastes space.
        let old: Vec<&str> = previous.iter().map(|f| f.file.as_str()).filter(|f| !refs.contains(f)).collect();
        let _ = fsutil::remove_files(self.root(), &old);
        Ok(())
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
            model: format!("model-{f}"),
            prompt_hash: format!("{f:064x}"),
            temperature: 0.5 * f as f32,
            max_tokens: 100 + f,
            example_rows: (0..f as u64).collect(),
            prompt_tokens: 7 * f as u64,
            completion_tokens: 3 * f as u64,
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
            model: "m".into(),
            prompt_hash: format!("{f:064x}"),
            temperature: 0.0,
            max_tokens: 1,
            example_rows: vec![f as u64, 2],
            prompt_tokens: 1,
            completion_tokens: 2,
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

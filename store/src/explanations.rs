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

/// Column `name` of `batch` as strings (null → None).
fn strings(batch: &RecordBatch, name: &str) -> Vec<Option<String>> {
    let col = batch.column_by_name(name).expect("schema checked").as_string::<i32>();
    (0..col.len()).map(|i| col.is_valid(i).then(|| col.value(i).to_string())).collect()
}
fn floats(batch: &RecordBatch, name: &str) -> Vec<Option<f32>> {
    let col = batch.column_by_name(name).expect("schema checked").as_primitive::<Float32Type>();
    (0..col.len()).map(|i| col.is_valid(i).then(|| col.value(i))).collect()
}
fn u32s(batch: &RecordBatch, name: &str) -> Vec<u32> {
    batch.column_by_name(name).expect("schema checked").as_primitive::<UInt32Type>().values().to_vec()
}
fn u64s(batch: &RecordBatch, name: &str) -> Vec<u64> {
    batch.column_by_name(name).expect("schema checked").as_primitive::<UInt64Type>().values().to_vec()
}
fn row_lists(batch: &RecordBatch) -> Vec<Vec<u64>> {
    let col = batch.column_by_name("example_rows").expect("schema checked").as_list::<i32>();
    (0..col.len()).map(|i| col.value(i).as_primitive::<UInt64Type>().values().to_vec()).collect()
}
fn required(v: Vec<Option<String>>) -> Vec<String> {
    v.into_iter().map(Option::unwrap_or_default).collect()
}

fn read_explanations(batch: &RecordBatch) -> Vec<Explanation> {
    let ids = u32s(batch, "feature_id");
    let (explainer, explanation, failure) =
        (required(strings(batch, "explainer")), strings(batch, "explanation"), strings(batch, "failure"));
    let (model, hash) = (required(strings(batch, "model")), required(strings(batch, "prompt_hash")));
    let (temp, max_tokens) = (floats(batch, "temperature"), u32s(batch, "max_tokens"));
    let (rows, pt, ct) = (row_lists(batch), u64s(batch, "prompt_tokens"), u64s(batch, "completion_tokens"));
    (0..ids.len())
        .map(|i| Explanation {
            feature_id: ids[i],
            explainer: explainer[i].clone(),
            explanation: explanation[i].clone(),
            failure: failure[i].clone(),
            model: model[i].clone(),
            prompt_hash: hash[i].clone(),
            temperature: temp[i].unwrap_or_default(),
            max_tokens: max_tokens[i],
            example_rows: rows[i].clone(),
            prompt_tokens: pt[i],
            completion_tokens: ct[i],
        })
        .collect()
}

fn read_scores(batch: &RecordBatch) -> Vec<Score> {
    let ids = u32s(batch, "feature_id");
    let (explainer, scorer, failure) = (
        required(strings(batch, "explainer")),
        required(strings(batch, "scorer")),
        strings(batch, "failure"),
    );
    let (score, bacc, f1, auroc, pearson) = (
        floats(batch, "score"),
        floats(batch, "balanced_accuracy"),
        floats(batch, "f1"),
        floats(batch, "auroc"),
        floats(batch, "pearson"),
    );
    let n = u32s(batch, "n_examples");
    let (model, hash) = (required(strings(batch, "model")), required(strings(batch, "prompt_hash")));
    let (temp, max_tokens) = (floats(batch, "temperature"), u32s(batch, "max_tokens"));
    let (rows, pt, ct) = (row_lists(batch), u64s(batch, "prompt_tokens"), u64s(batch, "completion_tokens"));
    (0..ids.len())
        .map(|i| Score {
            feature_id: ids[i],
            explainer: explainer[i].clone(),
            scorer: scorer[i].clone(),
            score: score[i],
            balanced_accuracy: bacc[i],
            f1: f1[i],
            auroc: auroc[i],
            pearson: pearson[i],
            n_examples: n[i],
            failure: failure[i].clone(),
            model: model[i].clone(),
            prompt_hash: hash[i].clone(),
            temperature: temp[i].unwrap_or_default(),
            max_tokens: max_tokens[i],
            example_rows: rows[i].clone(),
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

    /// The explanations and scores of `dict` (empty when there are none yet).
    pub fn explanations(&self, dict: &str) -> Result<Explanations> {
        let Some(entry) = self.explanations_entry(dict) else {
            return Ok(Explanations::default());
        };
        let read = |file: &str, schema: SchemaRef| -> Result<RecordBatch> {
            let rel = format!("{EXPLANATIONS_DIR}/{dict}/{file}");
            if !entry.files.iter().any(|f| f.file == rel) {
                bail!("the explanations of {dict} list no {file}");
            }
            let path = self.root().join(&rel);
            let handle = std::fs::File::open(&path)
                .with_context(|| format!("{} is listed but missing", path.display()))?;
            // SAFETY: listed files are immutable (written under a temporary name, then renamed).
            let map = Arc::new(unsafe { memmap2::Mmap::map(&handle) }?);
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
        let dir = self.explanations_dir(dict);
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
            files.push(format!("{EXPLANATIONS_DIR}/{dict}/{file}"));
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
            files: hash_files(self.root(), &refs)?,
        };
        self.commit(|m| {
            m.explanations.insert(dict.to_string(), entry);
            Ok(())
        })
    }
}

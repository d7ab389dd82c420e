//! Export of a dictionary's explanations and scores for other tools (`loupe export`): the store
//! tables as Parquet, and the explanations in Neuronpedia's explanation-export style as gzipped
//! JSON Lines batches, with an `export.json` saying what was exported from where.
//!
//! ```text
//! <out>/explanations.parquet               every explanation row, failed ones included (store columns)
//! <out>/scores.parquet                     every score row, failed ones included (store columns)
//! <out>/neuronpedia/batch-NNNNN.jsonl.gz   one JSON object per successful explanation, with its
//!                                          successful scores; `batch_size` objects per file
//! <out>/export.json                        [`ExportSummary`]: dictionary, store, counts, files
//! ```
//!
//! Rows are ordered by feature, then explainer (then scorer). Every file is written atomically
//! (temporary name, fsync, rename) and `export.json` last, so a folder whose `export.json` exists
//! holds a complete export; an overwrite removes the old `export.json` first and the old batches
//! this export did not rewrite.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use arrow_array::RecordBatch;
use flate2::Compression as Gzip;
use flate2::write::GzEncoder;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::dictionaries::FileEntry;
use crate::explanations::{EXPLANATIONS_DIR, Explanation, Score};
use crate::fsutil;
use crate::store::Store;
use crate::table;

pub const EXPLANATIONS_PARQUET: &str = "explanations.parquet";
pub const SCORES_PARQUET: &str = "scores.parquet";
/// Folder of the Neuronpedia-style batches, inside the export folder.
pub const NEURONPEDIA_DIR: &str = "neuronpedia";
pub const EXPORT_JSON: &str = "export.json";
pub const DEFAULT_BATCH_SIZE: usize = 1024;

/// What to export and how.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Neuronpedia records per `batch-NNNNN.jsonl.gz` file.
    pub batch_size: usize,
    /// The records' `modelId` (default: the store's model name).
    pub model_id: Option<String>,
    /// The records' `layer` (default: the dictionary's name).
    pub layer: Option<String>,
    /// Replace an earlier export in the same folder.
    pub overwrite: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions { batch_size: DEFAULT_BATCH_SIZE, model_id: None, layer: None, overwrite: false }
    }
}

/// What an export wrote; saved as `export.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExportSummary {
    pub dictionary: String,
    /// The store exported from (absolute when it could be resolved).
    pub store: String,
    /// The store tables exported, as the manifest lists them (with their checksums).
    pub source: Vec<FileEntry>,
    pub loupe_version: String,
    pub model_id: String,
    pub layer: String,
    /// Explanation rows (in `explanations.parquet`), of which `failed` have no explanation.
    pub explanations: usize,
    pub failed: usize,
    /// Score rows (in `scores.parquet`).
    pub scores: usize,
    /// Neuronpedia records (the successful explanations).
    pub records: usize,
    pub batch_size: usize,
    /// Files written, relative to the export folder, `export.json` last.
    pub files: Vec<String>,
}

/// One successful score of a Neuronpedia record.
#[derive(Serialize)]
struct RecordScore<'a> {
    scorer: &'a str,
    score: Option<f32>,
    balanced_accuracy: Option<f32>,
    f1: Option<f32>,
    auroc: Option<f32>,
    pearson: Option<f32>,
    n_examples: u32,
}

/// One explanation in Neuronpedia's explanation-export style, plus Loupe's provenance.
#[derive(Serialize)]
struct Record<'a> {
    #[serde(rename = "modelId")]
    model_id: &'a str,
    layer: &'a str,
    index: String,
    description: &'a str,
    #[serde(rename = "explanationModelName")]
    explanation_model_name: &'a str,
    #[serde(rename = "typeName")]
    type_name: &'a str,
    scores: Vec<RecordScore<'a>>,
    prompt_hash: &'a str,
    temperature: f32,
    max_tokens: u32,
    example_rows: &'a [u64],
}

/// `batch-NNNNN.jsonl.gz`.
fn batch_name(i: usize) -> String {
    format!("batch-{i:05}.jsonl.gz")
}

fn is_batch_name(name: &str) -> bool {
    name.starts_with("batch-") && name.ends_with(".jsonl.gz")
}

/// The Neuronpedia batch files in `dir` (none when it does not exist).
fn batch_files(dir: &Path) -> Result<Vec<String>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if is_batch_name(&name) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// The files of an earlier export in `out`, relative to it.
fn previous_export(out: &Path) -> Result<Vec<String>> {
    let mut found: Vec<String> = [EXPORT_JSON, EXPLANATIONS_PARQUET, SCORES_PARQUET]
        .into_iter()
        .filter(|f| out.join(f).exists())
        .map(String::from)
        .collect();
    found.extend(
        batch_files(&out.join(NEURONPEDIA_DIR))?.into_iter().map(|b| format!("{NEURONPEDIA_DIR}/{b}")),
    );
    Ok(found)
}

fn parquet_bytes(batch: &RecordBatch) -> Result<Vec<u8>> {
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_created_by(format!("loupe {}", env!("CARGO_PKG_VERSION")))
        .build();
    let mut bytes = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut bytes, batch.schema(), Some(props))?;
    writer.write(batch)?;
    writer.close()?;
    Ok(bytes)
}

/// The gzipped JSON Lines of `records`.
fn jsonl_gz(records: &[Record]) -> Result<Vec<u8>> {
    let mut gz = GzEncoder::new(Vec::new(), Gzip::default());
    for record in records {
        serde_json::to_writer(&mut gz, record)?;
        gz.write_all(b"\n")?;
    }
    Ok(gz.finish()?)
}

/// The Neuronpedia records of the successful explanations, each with its successful scores.
fn neuronpedia_records<'a>(
    explanations: &'a [Explanation],
    scores: &'a [Score],
    model_id: &'a str,
    layer: &'a str,
) -> Vec<Record<'a>> {
    let mut by_explanation: BTreeMap<(u32, &str), Vec<RecordScore>> = BTreeMap::new();
    for s in scores.iter().filter(|s| s.failure.is_none()) {
        by_explanation.entry((s.feature_id, &s.explainer)).or_default().push(RecordScore {
            scorer: &s.scorer,
            score: s.score,
            balanced_accuracy: s.balanced_accuracy,
            f1: s.f1,
            auroc: s.auroc,
            pearson: s.pearson,
            n_examples: s.n_examples,
        });
    }
    explanations
        .iter()
        .filter_map(|e| {
            let description = e.explanation.as_deref()?;
            let scores = by_explanation.remove(&(e.feature_id, e.explainer.as_str())).unwrap_or_default();
            Some(Record {
                model_id,
                layer,
                index: e.feature_id.to_string(),
                description,
                explanation_model_name: &e.provenance.model,
                type_name: &e.explainer,
                scores,
                prompt_hash: &e.provenance.prompt_hash,
                temperature: e.provenance.temperature,
                max_tokens: e.provenance.max_tokens,
                example_rows: &e.provenance.example_rows,
            })
        })
        .collect()
}

/// Export the explanations and scores of `dict` into the folder `out` (see the module doc).
pub fn export(store: &Store, dict: &str, out: &Path, opts: &ExportOptions) -> Result<ExportSummary> {
    let root = store.root().display();
    if opts.batch_size == 0 {
        bail!("the batch size must be at least 1");
    }
    let manifest = store.manifest();
    let Some(entry) = store.explanations_entry(dict) else {
        if manifest.dictionaries.contains_key(dict) {
            bail!("dictionary {dict} in store {root} has no explanations (run `loupe explain` first)");
        }
        bail!("store {root} has no dictionary {dict}");
    };
    let mut all = store.explanations(dict)?;
    if all.explanations.is_empty() {
        bail!("dictionary {dict} in store {root} has no explanations (run `loupe explain` first)");
    }
    let model_id = match (&opts.model_id, &manifest.model) {
        (Some(id), _) => id.clone(),
        (None, Some(model)) => model.name.clone(),
        (None, None) => bail!("store {root} records no model; pass a model id (--model-id)"),
    };
    let layer = opts.layer.clone().unwrap_or_else(|| dict.to_string());

    let previous = previous_export(out)?;
    if !previous.is_empty() && !opts.overwrite {
        bail!(
            "{} already holds an export ({}); pass --overwrite to replace it",
            out.display(),
            previous.join(", ")
        );
    }
    let batches_dir = out.join(NEURONPEDIA_DIR);
    std::fs::create_dir_all(&batches_dir)
        .with_context(|| format!("cannot create {}", batches_dir.display()))?;
    // Until the new export.json is written, the folder must not claim to hold a complete export.
    if out.join(EXPORT_JSON).exists() {
        std::fs::remove_file(out.join(EXPORT_JSON))
            .with_context(|| format!("cannot remove the old {EXPORT_JSON} in {}", out.display()))?;
    }

    all.explanations.sort_by(|a, b| (a.feature_id, &a.explainer).cmp(&(b.feature_id, &b.explainer)));
    all.scores.sort_by(|a, b| {
        (a.feature_id, &a.explainer, &a.scorer).cmp(&(b.feature_id, &b.explainer, &b.scorer))
    });
    let mut files = Vec::new();
    let mut write = |rel: String, bytes: &[u8]| -> Result<()> {
        fsutil::write_atomic(&out.join(&rel), bytes)
            .with_context(|| format!("cannot write {rel} of the export"))?;
        files.push(rel);
        Ok(())
    };
    write(EXPLANATIONS_PARQUET.to_string(), &parquet_bytes(&table::batch(&all.explanations)?)?)?;
    write(SCORES_PARQUET.to_string(), &parquet_bytes(&table::batch(&all.scores)?)?)?;
    let records = neuronpedia_records(&all.explanations, &all.scores, &model_id, &layer);
    let mut written = Vec::new();
    for (i, chunk) in records.chunks(opts.batch_size).enumerate() {
        let name = batch_name(i);
        write(format!("{NEURONPEDIA_DIR}/{name}"), &jsonl_gz(chunk)?)?;
        written.push(name);
    }
    for stale in batch_files(&batches_dir)?.into_iter().filter(|b| !written.contains(b)) {
        let path = batches_dir.join(&stale);
        std::fs::remove_file(&path)
            .with_context(|| format!("cannot remove the old batch {}", path.display()))?;
    }

    let n_records = records.len();

    files.push(EXPORT_JSON.to_string());
    let summary = ExportSummary {
        dictionary: dict.to_string(),
        store: std::path::absolute(store.root())
            .unwrap_or_else(|_| PathBuf::from(store.root()))
            .display()
            .to_string(),
        source: entry.files.into_iter().filter(|f| f.file.starts_with(EXPLANATIONS_DIR)).collect(),
        loupe_version: env!("CARGO_PKG_VERSION").to_string(),
        model_id,
        layer,
        explanations: all.explanations.len(),
        failed: all.explanations.iter().filter(|e| e.explanation.is_none()).count(),
        scores: all.scores.len(),
        records: n_records,
        batch_size: opts.batch_size,
        files,
    };
    let json = serde_json::to_string_pretty(&summary)? + "\n";
    fsutil::write_atomic(&out.join(EXPORT_JSON), json.as_bytes())
        .with_context(|| format!("cannot write {EXPORT_JSON} of the export"))?;
    Ok(summary)
}

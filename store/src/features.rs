//! Feature analysis tables: `features/<dict>/*.arrow`, written by `loupe analyze` and read by
//! auto-interp and the app, listed in the manifest's `features` map with sizes and checksums.
//!
//! Tables (each an Arrow IPC file holding one record batch, rows sorted by `feature_id`):
//! - `features.arrow`: one row per feature — `count` (tokens it fired on), `density`,
//!   `mean_activation` (over those tokens), `max_activation`, `dead`, `dense`, and a log-spaced
//!   histogram stored sparsely as `hist_first_bin` + `hist` (see [`hist_bin`]);
//! - `top_examples.arrow`, `quantile_examples.arrow`: token windows ([`Example`]) around the
//!   feature's largest activations, and around a uniform sample of the tokens of each activation
//!   quantile bucket ([`Bucket`]);
//! - `logits.arrow`: the output tokens the feature's direction promotes (`rank` 1..) and
//!   suppresses (`rank` -1..) through the unembedding;
//! - `neighbours.arrow`: the most similar features by decoder-direction cosine (from the hnsw
//!   index in `index/<dict>/`); `cooccurrence.arrow`: the features that fire on the same tokens;
//! - `vocab.arrow`: the token strings (row i is token i), shared by the example and logit tables.
//!
//! Files are written atomically one by one, then listed in one manifest update
//! ([`Store::commit_features`]): a reader never sees a half-written analysis.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use arrow_array::builder::{Float32Builder, ListBuilder, UInt32Builder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Int8Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Float32Array, Int8Array, RecordBatch, StringArray, UInt8Array,
    UInt16Array, UInt32Array, UInt64Array,
};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

use crate::dictionaries::{FileEntry, check_dictionary_name, hash_files};
use crate::fsutil;
use crate::store::Store;

/// Folder of all analyses, inside the store.
pub const FEATURES_DIR: &str = "features";
/// Folder of the ANN indexes, inside the store.
pub const INDEX_DIR: &str = "index";

/// Histogram bins per octave of activation.
pub const HIST_BINS_PER_OCTAVE: usize = 8;
/// log2 of the lower edge of bin 0; values below it count in bin 0.
pub const HIST_MIN_LOG2: f32 = -16.0;
/// Number of bins (up to 2^16; larger values count in the last bin).
pub const HIST_BINS: usize = 32 * HIST_BINS_PER_OCTAVE;

/// The histogram bin of a positive activation.
pub fn hist_bin(value: f32) -> usize {
    let b = ((value.log2() - HIST_MIN_LOG2) * HIST_BINS_PER_OCTAVE as f32).floor();
    if b.is_nan() { 0 } else { b.clamp(0.0, (HIST_BINS - 1) as f32) as usize }
}

/// The lower edge of bin `b` (`hist_bin_edge(b + 1)` is its upper edge).
pub fn hist_bin_edge(b: usize) -> f32 {
    (b as f32 / HIST_BINS_PER_OCTAVE as f32 + HIST_MIN_LOG2).exp2()
}

/// An analysis' manifest entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeaturesEntry {
    /// The hook whose activations were analysed.
    pub hook: String,
    pub n_features: u32,
    /// Tokens the pass saw.
    pub tokens: u64,
    /// Files relative to the store root (`features/<dict>/…`, `index/<dict>/…`).
    pub files: Vec<FileEntry>,
}

/// One row of `features.arrow`.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureRow {
    pub feature_id: u32,
    pub count: u64,
    pub density: f32,
    pub mean_activation: f32,
    pub max_activation: f32,
    pub dead: bool,
    pub dense: bool,
    /// The histogram's first non-empty bin; `hist[i]` counts bin `hist_first_bin + i`.
    pub hist_first_bin: u16,
    pub hist: Vec<u32>,
}

/// An activation quantile bucket of a feature: the tokens with `lo <= activation < hi`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bucket {
    /// 0 = lowest activations.
    pub index: u8,
    pub lo: f32,
    pub hi: f32,
    /// Tokens of the pass in the bucket (the examples are a uniform sample of them).
    pub tokens: u64,
}

/// A token window around one activation of a feature.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub feature_id: u32,
    /// Order within the feature (top examples: 0 = largest activation) or within the bucket.
    pub rank: u16,
    /// The feature's activation at the example token.
    pub activation: f32,
    /// The token's row in the analysed stream (storage order of the hook's shards).
    pub row: u64,
    pub doc: u32,
    pub pos: u32,
    /// Index of the example token in `tokens`.
    pub center: u16,
    /// The window's token ids (contiguous positions of one document).
    pub tokens: Vec<u32>,
    /// The feature's activation at each token of the window.
    pub activations: Vec<f32>,
    /// The quantile bucket (quantile examples only).
    pub bucket: Option<Bucket>,
}

/// One row of `logits.arrow`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogitEffect {
    pub feature_id: u32,
    /// 1 = most promoted token, -1 = most suppressed.
    pub rank: i8,
    pub token: u32,
    pub value: f32,
}

/// One row of `neighbours.arrow`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Neighbour {
    pub feature_id: u32,
    /// 0 = most similar.
    pub rank: u8,
    pub neighbour: u32,
    pub cosine: f32,
}

/// One row of `cooccurrence.arrow`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cooccurrence {
    pub feature_id: u32,
    /// 0 = highest Jaccard index.
    pub rank: u8,
    pub other: u32,
    /// Tokens on which both fired.
    pub shared: u64,
    /// shared / (tokens either fired on).
    pub jaccard: f32,
}

/// Table file names.
pub const FEATURES_TABLE: &str = "features.arrow";
pub const TOP_EXAMPLES_TABLE: &str = "top_examples.arrow";
pub const QUANTILE_EXAMPLES_TABLE: &str = "quantile_examples.arrow";
pub const LOGITS_TABLE: &str = "logits.arrow";
pub const NEIGHBOURS_TABLE: &str = "neighbours.arrow";
pub const COOCCURRENCE_TABLE: &str = "cooccurrence.arrow";
pub const VOCAB_TABLE: &str = "vocab.arrow";

fn list_of(item: DataType) -> DataType {
    DataType::List(Arc::new(Field::new("item", item, true)))
}

fn schema(fields: Vec<(&str, DataType)>) -> SchemaRef {
    Arc::new(Schema::new(fields.into_iter().map(|(n, t)| Field::new(n, t, false)).collect::<Vec<_>>()))
}

fn features_schema() -> SchemaRef {
    schema(vec![
        ("feature_id", DataType::UInt32),
        ("count", DataType::UInt64),
        ("density", DataType::Float32),
        ("mean_activation", DataType::Float32),
        ("max_activation", DataType::Float32),
        ("dead", DataType::Boolean),
        ("dense", DataType::Boolean),
        ("hist_first_bin", DataType::UInt16),
        ("hist", list_of(DataType::UInt32)),
    ])
}

fn examples_schema(quantile: bool) -> SchemaRef {
    let mut fields = vec![
        ("feature_id", DataType::UInt32),
        ("rank", DataType::UInt16),
        ("activation", DataType::Float32),
        ("row", DataType::UInt64),
        ("doc", DataType::UInt32),
        ("pos", DataType::UInt32),
        ("center", DataType::UInt16),
        ("tokens", list_of(DataType::UInt32)),
        ("activations", list_of(DataType::Float32)),
    ];
    if quantile {
        fields.extend([
            ("bucket", DataType::UInt8),
            ("bucket_lo", DataType::Float32),
            ("bucket_hi", DataType::Float32),
            ("bucket_tokens", DataType::UInt64),
        ]);
    }
    schema(fields)
}

fn logits_schema() -> SchemaRef {
    schema(vec![
        ("feature_id", DataType::UInt32),
        ("rank", DataType::Int8),
        ("token", DataType::UInt32),
        ("value", DataType::Float32),
    ])
}

fn neighbours_schema() -> SchemaRef {
    schema(vec![
        ("feature_id", DataType::UInt32),
        ("rank", DataType::UInt8),
        ("neighbour", DataType::UInt32),
        ("cosine", DataType::Float32),
    ])
}

fn cooccurrence_schema() -> SchemaRef {
    schema(vec![
        ("feature_id", DataType::UInt32),
        ("rank", DataType::UInt8),
        ("other", DataType::UInt32),
        ("shared", DataType::UInt64),
        ("jaccard", DataType::Float32),
    ])
}

fn vocab_schema() -> SchemaRef {
    schema(vec![("token", DataType::UInt32), ("string", DataType::Utf8)])
}

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

/// Writes the tables of one analysis into `features/<dict>/` (each atomically); nothing is
/// part of the store until [`Store::commit_features`] lists the files.
pub struct FeaturesWriter {
    dir: PathBuf,
    written: Vec<String>,
    dict: String,
}

impl FeaturesWriter {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn write(&mut self, file: &str, batch: RecordBatch) -> Result<()> {
        write_table(&self.dir.join(file), &batch)
            .with_context(|| format!("cannot write {file} of the analysis of {}", self.dict))?;
        self.written.push(format!("{FEATURES_DIR}/{}/{file}", self.dict));
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
        self.written.push(format!("{FEATURES_DIR}/{}/{file}", self.dict));
        Ok(())
    }

    /// A file written by someone else into `index/<dict>/` (already fsynced), to be listed too.
    pub fn add_index_file(&mut self, file: &str) {
        self.written.push(format!("{INDEX_DIR}/{}/{file}", self.dict));
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

    /// Start writing the analysis of `dict` (the folders are created; the listed analysis, if
    /// any, stays valid until the commit).
    pub fn features_writer(&self, dict: &str) -> Result<FeaturesWriter> {
        check_dictionary_name(dict)?;
        if !self.is_writable() {
            bail!("store {} is open read-only", self.root().display());
        }
        for dir in [self.features_dir(dict), self.index_dir(dict)] {
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        Ok(FeaturesWriter { dir: self.features_dir(dict), written: Vec::new(), dict: dict.to_string() })
    }

    /// List the files `writer` wrote (hashing them now) as the analysis of `dict`, in one
    /// atomic manifest update.
    pub fn commit_features(&self, writer: FeaturesWriter, mut entry: FeaturesEntry) -> Result<()> {
        let files: Vec<&str> = writer.written.iter().map(String::as_str).collect();
        entry.files = hash_files(self.root(), &files)?;
        let dict = writer.dict;
        self.commit(|m| {
            m.features.insert(dict, entry);
            Ok(())
        })
    }
}

/// A table mapped read-only, with each feature's row range.
struct Table {
    batch: RecordBatch,
    /// Rows of feature f: `starts[f]..starts[f + 1]`.
    starts: Vec<u32>,
}

impl Table {
    /// Map `file` and index its rows by `feature_id` (the first column), unless `indexed` is false.
    fn open(
        store: &Store,
        entry: &FeaturesEntry,
        dict: &str,
        file: &str,
        schema: SchemaRef,
        indexed: bool,
    ) -> Result<Table> {
        let rel = format!("{FEATURES_DIR}/{dict}/{file}");
        let listed = entry
            .files
            .iter()
            .find(|f| f.file == rel)
            .ok_or_else(|| anyhow!("the analysis of {dict} lists no {file}"))?;
        let path = store.root().join(&rel);
        let meta =
            std::fs::metadata(&path).with_context(|| format!("{} is listed but missing", path.display()))?;
        if meta.len() != listed.bytes {
            bail!("{} is {} bytes but the manifest says {}", path.display(), meta.len(), listed.bytes);
        }
        let file_handle =
            std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: listed files are immutable (written under a temporary name, then renamed).
        let map = Arc::new(unsafe { Mmap::map(&file_handle) }?);
        let batch = crate::reader::decode_single_batch(&map)
            .map_err(|e| anyhow!("{} is not a valid table: {e}", path.display()))?;
        if batch.schema().fields() != schema.fields() {
            bail!("{} does not have the {file} schema", path.display());
        }
        if !indexed {
            return Ok(Table { batch, starts: Vec::new() });
        }
        let ids = batch.column(0).as_primitive::<UInt32Type>().values();
        let n = entry.n_features as usize;
        let mut starts = vec![0u32; n + 1];
        for (i, &f) in ids.iter().enumerate() {
            if f as usize >= n || (i > 0 && f < ids[i - 1]) {
                bail!("{}: feature_id column is out of range or unsorted at row {i}", path.display());
            }
            starts[f as usize + 1] = i as u32 + 1;
        }
        for f in 1..=n {
            starts[f] = starts[f].max(starts[f - 1]);
        }
        Ok(Table { batch, starts })
    }

    fn rows(&self, f: usize) -> std::ops::Range<usize> {
        self.starts[f] as usize..self.starts[f + 1] as usize
    }

    fn col<T: arrow_array::types::ArrowPrimitiveType>(&self, name: &str) -> &[T::Native] {
        self.batch.column_by_name(name).expect("schema checked").as_primitive::<T>().values()
    }

    fn list<T: arrow_array::types::ArrowPrimitiveType>(&self, name: &str, row: usize) -> Vec<T::Native> {
        let list = self.batch.column_by_name(name).expect("schema checked").as_list::<i32>();
        list.value(row).as_primitive::<T>().values().to_vec()
    }
}

/// An analysis opened read-only: per-feature lookups over the mapped tables.
pub struct FeatureTables {
    dict: String,
    entry: FeaturesEntry,
    features: Table,
    top: Table,
    quantile: Table,
    logits: Option<Table>,
    neighbours: Option<Table>,
    cooccurrence: Table,
    vocab: StringArray,
    vocab_index: std::sync::OnceLock<HashMap<String, u32>>,
}

impl FeatureTables {
    /// Open the analysis of dictionary `dict`.
    pub fn open(store: &Store, dict: &str) -> Result<FeatureTables> {
        let entry = store.features(dict).ok_or_else(|| {
            anyhow!("store {} has no analysis of {dict:?}; run `loupe analyze` first", store.root().display())
        })?;
        let has = |file: &str| entry.files.iter().any(|f| f.file == format!("{FEATURES_DIR}/{dict}/{file}"));
        let open = |file: &str, schema| Table::open(store, &entry, dict, file, schema, true);
        let vocab = Table::open(store, &entry, dict, VOCAB_TABLE, vocab_schema(), false)?;
        let vocab = vocab.batch.column(1).as_string::<i32>().clone();
        Ok(FeatureTables {
            features: open(FEATURES_TABLE, features_schema())?,
            top: open(TOP_EXAMPLES_TABLE, examples_schema(false))?,
            quantile: open(QUANTILE_EXAMPLES_TABLE, examples_schema(true))?,
            logits: if has(LOGITS_TABLE) { Some(open(LOGITS_TABLE, logits_schema())?) } else { None },
            neighbours: if has(NEIGHBOURS_TABLE) {
                Some(open(NEIGHBOURS_TABLE, neighbours_schema())?)
            } else {
                None
            },
            cooccurrence: open(COOCCURRENCE_TABLE, cooccurrence_schema())?,
            vocab,
            vocab_index: std::sync::OnceLock::new(),
            dict: dict.to_string(),
            entry,
        })
    }

    pub fn entry(&self) -> &FeaturesEntry {
        &self.entry
    }

    pub fn n_features(&self) -> usize {
        self.entry.n_features as usize
    }

    fn check(&self, f: u32) -> Result<usize> {
        if f as usize >= self.n_features() {
            bail!("feature {f} does not exist ({} has {} features)", self.dict, self.n_features());
        }
        Ok(f as usize)
    }

    /// Feature `f`'s statistics.
    pub fn stats(&self, f: u32) -> Result<FeatureRow> {
        let i = self.check(f)?;
        let t = &self.features;
        let bool_col = |name: &str| t.batch.column_by_name(name).expect("checked").as_boolean().value(i);
        Ok(FeatureRow {
            feature_id: f,
            count: t.col::<UInt64Type>("count")[i],
            density: t.col::<Float32Type>("density")[i],
            mean_activation: t.col::<Float32Type>("mean_activation")[i],
            max_activation: t.col::<Float32Type>("max_activation")[i],
            dead: bool_col("dead"),
            dense: bool_col("dense"),
            hist_first_bin: t.col::<UInt16Type>("hist_first_bin")[i],
            hist: t.list::<UInt32Type>("hist", i),
        })
    }

    /// Column views over all features (for sorting and filtering lists).
    pub fn densities(&self) -> &[f32] {
        self.features.col::<Float32Type>("density")
    }
    pub fn max_activations(&self) -> &[f32] {
        self.features.col::<Float32Type>("max_activation")
    }

    fn examples(t: &Table, f: usize, quantile: bool) -> Vec<Example> {
        t.rows(f)
            .map(|i| Example {
                feature_id: f as u32,
                rank: t.col::<UInt16Type>("rank")[i],
                activation: t.col::<Float32Type>("activation")[i],
                row: t.col::<UInt64Type>("row")[i],
                doc: t.col::<UInt32Type>("doc")[i],
                pos: t.col::<UInt32Type>("pos")[i],
                center: t.col::<UInt16Type>("center")[i],
                tokens: t.list::<UInt32Type>("tokens", i),
                activations: t.list::<Float32Type>("activations", i),
                bucket: quantile.then(|| Bucket {
                    index: t.col::<UInt8Type>("bucket")[i],
                    lo: t.col::<Float32Type>("bucket_lo")[i],
                    hi: t.col::<Float32Type>("bucket_hi")[i],
                    tokens: t.col::<UInt64Type>("bucket_tokens")[i],
                }),
            })
            .collect()
    }

    /// Feature `f`'s top-activating examples, largest first.
    pub fn top_examples(&self, f: u32) -> Result<Vec<Example>> {
        Ok(Self::examples(&self.top, self.check(f)?, false))
    }

    /// Feature `f`'s quantile examples, lowest bucket first.
    pub fn quantile_examples(&self, f: u32) -> Result<Vec<Example>> {
        Ok(Self::examples(&self.quantile, self.check(f)?, true))
    }

    /// Feature `f`'s logit effects (most promoted first, then most suppressed), or none when the
    /// analysis had no unembedding for the dictionary's output space.
    pub fn logits(&self, f: u32) -> Result<Vec<LogitEffect>> {
        let i = self.check(f)?;
        let Some(t) = &self.logits else { return Ok(Vec::new()) };
        Ok(t.rows(i)
            .map(|r| LogitEffect {
                feature_id: f,
                rank: t.col::<Int8Type>("rank")[r],
                token: t.col::<UInt32Type>("token")[r],
                value: t.col::<Float32Type>("value")[r],
            })
            .collect())
    }

    /// Feature `f`'s most similar features by decoder direction.
    pub fn neighbours(&self, f: u32) -> Result<Vec<Neighbour>> {
        let i = self.check(f)?;
        let Some(t) = &self.neighbours else { return Ok(Vec::new()) };
        Ok(t.rows(i)
            .map(|r| Neighbour {
                feature_id: f,
                rank: t.col::<UInt8Type>("rank")[r],
                neighbour: t.col::<UInt32Type>("neighbour")[r],
                cosine: t.col::<Float32Type>("cosine")[r],
            })
            .collect())
    }

    /// The features that fire most often together with `f` (by Jaccard index).
    pub fn cooccurrence(&self, f: u32) -> Result<Vec<Cooccurrence>> {
        let i = self.check(f)?;
        let t = &self.cooccurrence;
        Ok(t.rows(i)
            .map(|r| Cooccurrence {
                feature_id: f,
                rank: t.col::<UInt8Type>("rank")[r],
                other: t.col::<UInt32Type>("other")[r],
                shared: t.col::<UInt64Type>("shared")[r],
                jaccard: t.col::<Float32Type>("jaccard")[r],
            })
            .collect())
    }

    /// The string of token `id` (`"<unk:id>"` outside the vocabulary).
    pub fn token_string(&self, id: u32) -> String {
        if (id as usize) < self.vocab.len() {
            self.vocab.value(id as usize).to_string()
        } else {
            format!("<unk:{id}>")
        }
    }

    /// The token id of `string`, if it is in the vocabulary.
    pub fn token_id(&self, string: &str) -> Option<u32> {
        let index = self.vocab_index.get_or_init(|| {
            (0..self.vocab.len()).map(|i| (self.vocab.value(i).to_string(), i as u32)).collect()
        });
        index.get(string).copied()
    }
}

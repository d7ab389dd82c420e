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
//! - `neighbours.arrow`: the most similar features by direction cosine (exact; the hnsw index over
//!   the same directions is dumped in `index/<dict>/`); `cooccurrence.arrow`: the features that
//!   fire on the same tokens;
//! - `vocab.arrow`: the token strings (row i is token i), shared by the example and logit tables.
//!
//! Files are written atomically one by one, then listed in one manifest update
//! ([`Store::commit_features`]): a reader never sees a half-written analysis. [`write`] holds
//! the writer, [`read`] the reader ([`FeatureTables`]).

pub mod read;
pub mod write;

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::dictionaries::FileEntry;

pub use read::FeatureTables;
pub use write::FeaturesWriter;

/// Folder of all analyses, inside the store.
pub const FEATURES_DIR: &str = "features";
/// Folder of the ANN indexes, inside the store.
pub const INDEX_DIR: &str = "index";

/// Histogram bins per octave of activation.
pub const HIST_BINS_PER_OCTAVE: usize = 8;
/// log2 of the lower edge of bin 0; values below it count in bin 0.
/// (2^-24: Monet gates, shared by hundreds of experts per token, go down to ~1e-6.)
pub const HIST_MIN_LOG2: f32 = -24.0;
/// Number of bins (up to 2^24; larger values count in the last bin).
pub const HIST_BINS: usize = 48 * HIST_BINS_PER_OCTAVE;

/// The histogram bin of a positive activation.
pub fn hist_bin(value: f32) -> usize {
    let b = ((value.log2() - HIST_MIN_LOG2) * HIST_BINS_PER_OCTAVE as f32).floor();
    if b.is_nan() { 0 } else { b.clamp(0.0, (HIST_BINS - 1) as f32) as usize }
}

/// The lower edge of bin `b` (`hist_bin_edge(b + 1)` is its upper edge).
pub fn hist_bin_edge(b: usize) -> f32 {
    (b as f32 / HIST_BINS_PER_OCTAVE as f32 + HIST_MIN_LOG2).exp2()
}

/// What identifies one analysis: a hash over its files' names and checksums. Explanations record
/// the analysis they were made from, so that a later `loupe analyze` shows them to be stale.
pub fn analysis_id(entry: &FeaturesEntry) -> String {
    let listing: String = entry.files.iter().map(|f| format!("{} {}\n", f.file, f.xxh3)).collect();
    crate::fsutil::hex128(xxhash_rust::xxh3::xxh3_128(listing.as_bytes()))
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

impl FeaturesEntry {
    /// The listed file named `name` (its last path component: each analysis writes its files
    /// into a folder of its own, `features/<dict>/<generation>/`; stores written before that
    /// have them directly in `features/<dict>/`).
    pub fn find(&self, name: &str) -> Option<&FileEntry> {
        find_listed(&self.files, name)
    }
}

/// The entry of `files` whose last path component is `name`.
pub(crate) fn find_listed<'a>(files: &'a [FileEntry], name: &str) -> Option<&'a FileEntry> {
    files.iter().find(|f| f.file.rsplit('/').next() == Some(name))
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

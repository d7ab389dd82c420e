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
//! - `head_attribution.arrow` (attention-output dictionaries at `blocks.L.attn.hook_z` only): each
//!   feature's weight-based head attribution w_f(h) = ‖W_dec[f, block h]‖ / Σ_h′ ‖W_dec[f, block h′]‖,
//!   one weight per head ([`HeadAttribution`]);
//! - `vocab.arrow`: the token strings (row i is token i), shared by the example and logit tables.
//!
//! Each table's row type is declared once with `table!` (schema, writer and zero-copy column
//! views follow from it, see [`crate::table`]). Files are written atomically one by one, then
//! listed in one manifest update ([`Store::commit_features`], a [`crate::listing::Listing`]): a
//! reader never sees a half-written analysis. [`write`] holds the writer, [`read`] the reader
//! ([`FeatureTables`]).

pub mod read;
pub mod write;

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_schema::{Schema, SchemaRef};
use serde::{Deserialize, Serialize};

use crate::dictionaries::FileEntry;
use crate::listing::Listed;
use crate::manifest::Manifest;
use crate::table::{self, table};

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

impl Listed for FeaturesEntry {
    const WHAT: &'static str = "analysis";
    const FOLDERS: &'static [&'static str] = &[FEATURES_DIR, INDEX_DIR];
    fn entries(manifest: &mut Manifest) -> &mut BTreeMap<String, Self> {
        &mut manifest.features
    }
    fn files(&self) -> &[FileEntry] {
        &self.files
    }
    fn files_mut(&mut self) -> &mut Vec<FileEntry> {
        &mut self.files
    }
}

/// The entry of `files` whose last path component is `name`.
pub(crate) fn find_listed<'a>(files: &'a [FileEntry], name: &str) -> Option<&'a FileEntry> {
    files.iter().find(|f| f.file.rsplit('/').next() == Some(name))
}

table! {
    /// One row of `features.arrow`.
    #[derive(Clone, Debug, PartialEq)]
    pub struct FeatureRow, view FeatureColumns {
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
}

table! {
    /// An activation quantile bucket of a feature: the tokens with `lo <= activation < hi`
    /// (stored after the [`Example`] columns in `quantile_examples.arrow`).
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub struct Bucket, view BucketColumns {
        /// 0 = lowest activations.
        pub index: u8 as "bucket",
        pub lo: f32 as "bucket_lo",
        pub hi: f32 as "bucket_hi",
        /// Tokens of the pass in the bucket (the examples are a uniform sample of them).
        pub tokens: u64 as "bucket_tokens",
    }
}

table! {
    /// A token window around one activation of a feature: a row of `top_examples.arrow`, and
    /// of `quantile_examples.arrow` followed by its [`Bucket`].
    #[derive(Clone, Debug, PartialEq)]
    pub struct Example, view ExampleColumns {
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
    }
    not stored {
        /// The quantile bucket (quantile examples only; stored in the [`Bucket`] columns).
        pub bucket: Option<Bucket>,
    }
}

table! {
    /// One row of `logits.arrow`.
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub struct LogitEffect, view LogitColumns {
        pub feature_id: u32,
        /// 1 = most promoted token, -1 = most suppressed.
        pub rank: i8,
        pub token: u32,
        pub value: f32,
    }
}

table! {
    /// One row of `neighbours.arrow`.
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub struct Neighbour, view NeighbourColumns {
        pub feature_id: u32,
        /// 0 = most similar.
        pub rank: u8,
        pub neighbour: u32,
        pub cosine: f32,
    }
}

table! {
    /// One row of `cooccurrence.arrow`.
    #[derive(Clone, Copy, Debug, PartialEq)]
    pub struct Cooccurrence, view CooccurrenceColumns {
        pub feature_id: u32,
        /// 0 = highest Jaccard index.
        pub rank: u8,
        pub other: u32,
        /// Tokens on which both fired.
        pub shared: u64,
        /// shared / (tokens either fired on).
        pub jaccard: f32,
    }
}

table! {
    /// One row of `head_attribution.arrow`: a feature of an attention-output dictionary and its
    /// weight per head (summing to 1; all 0 for a zero direction).
    #[derive(Clone, Debug, PartialEq)]
    pub struct HeadAttribution, view HeadAttributionColumns {
        pub feature_id: u32,
        pub weights: Vec<f32>,
    }
}

table! {
    /// One row of `vocab.arrow`: row i is token i.
    #[derive(Clone, Debug, PartialEq)]
    pub struct VocabRow, view VocabColumns {
        pub token: u32,
        pub string: String,
    }
}

/// Table file names.
pub const FEATURES_TABLE: &str = "features.arrow";
pub const TOP_EXAMPLES_TABLE: &str = "top_examples.arrow";
pub const QUANTILE_EXAMPLES_TABLE: &str = "quantile_examples.arrow";
pub const LOGITS_TABLE: &str = "logits.arrow";
pub const NEIGHBOURS_TABLE: &str = "neighbours.arrow";
pub const COOCCURRENCE_TABLE: &str = "cooccurrence.arrow";
pub const VOCAB_TABLE: &str = "vocab.arrow";
pub const HEAD_ATTRIBUTION_TABLE: &str = "head_attribution.arrow";

/// The schema of `quantile_examples.arrow`: the [`Example`] columns, then the [`Bucket`] ones.
pub fn quantile_examples_schema() -> SchemaRef {
    let mut fields = table::fields::<Example>();
    fields.extend(table::fields::<Bucket>());
    Arc::new(Schema::new(fields))
}

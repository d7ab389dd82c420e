//! loupe-store: the on-disk project store every Loupe stage reads and writes.
//!
//! A store is one folder with a `manifest.json` ([`manifest`]) that lists everything in it. This
//! crate owns its layout and formats:
//! - [`store`]: opening a store read-only or for writing (one writer process at a time);
//! - [`writer`] / [`reader`]: activation shards `activations/<hook>/NNNNN.arrow` (Arrow IPC, one
//!   record batch each: `doc`, `pos`, `token`, `act` and optional `grad`), written crash-safely and
//!   read through zero-copy memory maps;
//! - [`sampler`]: shuffled batches across shards for training, without loading the store;
//! - [`verify`]: checksums, schemas and row counts against the manifest;
//! - [`dictionaries`]: trained dictionaries (`dictionaries/<name>/`) and their training logs;
//! - [`features`]: feature analyses (`features/<dict>/` tables, `index/<dict>/` ANN dumps);
//! - [`heads`]: attention-head scores (`heads/<name>/`);
//! - [`circuits`]: task circuits and their evaluations (`circuits/<name>/`, `circuits/evals/<name>/`);
//! - [`experts`]: expert usage, co-activation and specialization (`experts/<name>/`);
//! - [`graphs`]: attribution graphs (`circuits/graphs/<name>/`) and their supernodes;
//! - [`explanations`]: explanations and scores (`explanations/<dict>/`);
//! - [`index`]: the ANN index files in `index/<dict>/` (hnsw_rs dumps, kept embeddings);
//! - [`capture`]: the manifest's record of the capture that filled the hooks (typed settings);
//! - [`export`]: explanations and scores as Parquet and Neuronpedia-style JSONL batches;
//! - [`table`]: how a table is declared once (row struct, schema, writer, zero-copy reader);
//! - [`listing`]: writing the files of one manifest entry, then listing them in one commit;
//! - [`fsutil`]: the temp-file/fsync/rename discipline behind every write;
//! - [`progress`]: the [`Progress`] trait every long job reports through.
//!
//! Invariant: a reader trusts only what the manifest lists, and the manifest is updated last.

pub mod capture;
pub mod circuits;
pub mod dictionaries;
pub mod experts;
pub mod explanations;
pub mod export;
pub mod features;
pub mod fsutil;
pub mod graphs;
pub mod heads;
pub mod index;
pub mod listing;
pub mod manifest;
pub mod progress;
pub mod reader;
pub mod sampler;
pub mod schema;
pub mod store;
pub mod table;
pub mod values;
pub mod verify;
pub mod writer;

pub use capture::{CaptureSettings, CaptureState};
pub use circuits::{
    CircuitEntry, CircuitEvalEntry, CircuitEvalTable, CircuitTable, EdgeRow, EvalRow, FaithfulnessRow,
    NodeRow, TaskInfo,
};
pub use dictionaries::{DictEntry, FileEntry, TrainLogRow};
pub use experts::{
    CoactivationRow, EntropyBin, ExpertDomainRow, ExpertRow, ExpertTokenRow, ExpertsData, ExpertsEntry,
    ExpertsSettings, ExpertsSource, ExpertsTables,
};
pub use explanations::{Explanation, Explanations, ExplanationsEntry, Provenance, Score};
pub use features::{
    Bucket, Cooccurrence, Example, FeatureRow, FeatureTables, FeaturesEntry, FeaturesWriter, HeadAttribution,
    LogitEffect, Neighbour,
};
pub use graphs::{
    GraphEdgeRow, GraphEntry, GraphNodeRow, GraphSettings, GraphTable, GraphWriter, SupernodeRow,
    SupernodesEntry,
};
pub use heads::{HeadRow, HeadsEntry, HeadsSettings, HeadsTable};
pub use manifest::{DType, HookEntry, HookSpec, Manifest, ModelInfo, ShardEntry, TokenizerInfo};
pub use progress::Progress;
pub use reader::{Activations, Shard};
pub use sampler::{Batch, Epoch, Sampler, SamplerConfig};
pub use store::Store;
pub use values::{Element, Values, ValuesRef};
pub use verify::Report;
pub use writer::{ActivationWriter, PendingShard};

//! Attention-head tables: `heads/<name>/<generation>/heads.arrow`, written by `loupe heads` and
//! read by the app's Heads view, listed in the manifest's `heads` map (a [`Listing`]).
//!
//! One row per head `L.H` of the store's model ([`HeadRow`]): TransformerLens-style detector
//! scores on repeated random sequences and on natural text, and the change of the next-token loss
//! on the repeated half when the head's output is ablated. [`HeadsEntry`] records the settings
//! the scores were computed with, so a table says how it was made.
//!
//! [`Listing`]: crate::listing::Listing

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::dictionaries::FileEntry;
use crate::listing::Listed;
use crate::manifest::Manifest;
use crate::store::Store;
use crate::table::{self, table};

/// Folder of the head tables, inside the store.
pub const HEADS_DIR: &str = "heads";
/// The one table of a heads entry.
pub const HEADS_TABLE: &str = "heads.arrow";
/// The entry name `loupe heads` writes when not given `--name`.
pub const DEFAULT_HEADS_NAME: &str = "default";

table! {
    /// One head's scores (a row of `heads.arrow`; rows ordered by layer, then head).
    ///
    /// Detector scores follow TransformerLens' `detect_head` with its defaults ("mul":
    /// Σ(A⊙P)/ΣA over the whole pattern, BOS and the current token not excluded), averaged over
    /// the sequences. `_text` scores are on natural text, the others on [BOS] + R + R.
    #[derive(Clone, Debug, PartialEq)]
    pub struct HeadRow, view HeadColumns {
        pub layer: u16,
        pub head: u16,
        /// Mean attention along the induction stripe (TransformerLens' induction score: the
        /// diagonal at offset 1 − |R| of the pattern, averaged over its entries and sequences).
        pub induction: f32,
        /// `detect_head` with the induction pattern (each token to the token after its
        /// earlier copies).
        pub induction_mul: f32,
        /// `detect_head` with the previous-token pattern, on [BOS] + R + R.
        pub previous_token: f32,
        /// `detect_head` with the duplicate-token pattern, on [BOS] + R + R.
        pub duplicate_token: f32,
        /// `detect_head` with the previous-token pattern, on natural text.
        pub previous_token_text: f32,
        /// `detect_head` with the duplicate-token pattern, on natural text.
        pub duplicate_token_text: f32,
        /// Next-token loss on the repeated half with the head's `hook_z` zeroed, minus the clean
        /// loss (nats).
        pub ablation_zero: f32,
        /// The same with the head's `hook_z` replaced by its mean over the repeated sequences;
        /// null unless `--mean-ablation` was asked for.
        pub ablation_mean: Option<f32>,
    }
}

/// The scores a Heads view can colour by: (column name, label).
pub const HEAD_SCORES: [(&str, &str); 8] = [
    ("induction", "induction"),
    ("induction_mul", "induction (detect_head)"),
    ("previous_token", "previous-token"),
    ("duplicate_token", "duplicate-token"),
    ("previous_token_text", "previous-token (text)"),
    ("duplicate_token_text", "duplicate-token (text)"),
    ("ablation_zero", "ablation Δloss (zero)"),
    ("ablation_mean", "ablation Δloss (mean)"),
];

impl HeadRow {
    /// The score named in [`HEAD_SCORES`] (NaN where it was not computed).
    pub fn score(&self, column: &str) -> f32 {
        match column {
            "induction" => self.induction,
            "induction_mul" => self.induction_mul,
            "previous_token" => self.previous_token,
            "duplicate_token" => self.duplicate_token,
            "previous_token_text" => self.previous_token_text,
            "duplicate_token_text" => self.duplicate_token_text,
            "ablation_zero" => self.ablation_zero,
            "ablation_mean" => self.ablation_mean.unwrap_or(f32::NAN),
            _ => f32::NAN,
        }
    }
}

/// How the scores of a heads entry were computed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadsSettings {
    /// Seed of the random token ids R.
    pub seed: u64,
    /// Number of [BOS] + R + R sequences.
    pub sequences: u32,
    /// |R|, the length of each repeated half.
    pub repeat_len: u32,
    /// Number of natural-text sequences, and the tokens of each.
    pub text_sequences: u32,
    pub text_len: u32,
    /// Where the natural text came from (e.g. "captured tokens of blocks.6.hook_resid_post").
    pub text_source: String,
    /// Whether mean ablation was computed too.
    pub mean_ablation: bool,
    /// The next-token loss on the repeated half with nothing ablated (nats).
    pub clean_loss: f32,
    /// The model the scores are of (name and sha256 as the manifest recorded them).
    pub model: String,
    pub model_sha256: String,
}

/// A heads entry of the manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HeadsEntry {
    pub n_layers: u32,
    pub n_heads: u32,
    pub settings: HeadsSettings,
    /// Files relative to the store root (`heads/<name>/<generation>/heads.arrow`).
    pub files: Vec<FileEntry>,
}

impl Listed for HeadsEntry {
    const WHAT: &'static str = "head scores";
    const FOLDERS: &'static [&'static str] = &[HEADS_DIR];
    fn entries(manifest: &mut Manifest) -> &mut BTreeMap<String, Self> {
        &mut manifest.heads
    }
    fn files(&self) -> &[FileEntry] {
        &self.files
    }
    fn files_mut(&mut self) -> &mut Vec<FileEntry> {
        &mut self.files
    }
}

/// A listed heads table, read whole (one row per head: small).
#[derive(Clone, Debug)]
pub struct HeadsTable {
    pub name: String,
    pub entry: HeadsEntry,
    pub rows: Vec<HeadRow>,
}

impl HeadsTable {
    /// The row of head `layer.head`.
    pub fn get(&self, layer: usize, head: usize) -> Option<&HeadRow> {
        self.rows.iter().find(|r| usize::from(r.layer) == layer && usize::from(r.head) == head)
    }
}

impl Store {
    /// Write `rows` as the heads entry `name`, replacing the previous one in one manifest commit.
    pub fn write_heads(&self, name: &str, rows: &[HeadRow], entry: HeadsEntry) -> Result<()> {
        let mut listing = self.start_listing::<HeadsEntry>(name)?;
        listing.write_table(HEADS_DIR, HEADS_TABLE, &table::batch(rows)?)?;
        self.commit_listing(listing, entry)
    }

    /// The names of the listed heads entries.
    pub fn heads_names(&self) -> Vec<String> {
        self.manifest().heads.keys().cloned().collect()
    }

    /// The heads entry `name`, read and checked against its listing; `None` when not listed.
    pub fn read_heads(&self, name: &str) -> Result<Option<HeadsTable>> {
        let Some(entry) = self.manifest().heads.get(name).cloned() else {
            return Ok(None);
        };
        let what = format!("the head scores {name}");
        let batch = self.read_listed_table(&entry.files, &what, HEADS_TABLE, &table::schema::<HeadRow>())?;
        let view = table::view::<HeadRow>(&batch).with_context(|| format!("{what}: {HEADS_TABLE}"))?;
        let rows = (0..batch.num_rows()).map(|i| view.row(i)).collect();
        Ok(Some(HeadsTable { name: name.to_string(), entry, rows }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(layer: u16, head: u16) -> HeadRow {
        HeadRow {
            layer,
            head,
            induction: 0.5,
            induction_mul: 0.4,
            previous_token: 0.3,
            duplicate_token: 0.2,
            previous_token_text: 0.1,
            duplicate_token_text: 0.05,
            ablation_zero: 0.01,
            ablation_mean: (head == 0).then_some(0.02),
        }
    }

    fn entry() -> HeadsEntry {
        HeadsEntry {
            n_layers: 2,
            n_heads: 2,
            settings: HeadsSettings {
                seed: 0,
                sequences: 16,
                repeat_len: 50,
                text_sequences: 16,
                text_len: 128,
                text_source: "test".into(),
                mean_ablation: true,
                clean_loss: 1.5,
                model: "m".into(),
                model_sha256: "00".into(),
            },
            files: Vec::new(),
        }
    }

    #[test]
    fn heads_round_trip_and_replace_the_previous_listing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path()).unwrap();
        assert!(store.read_heads("default").unwrap().is_none());
        let rows: Vec<HeadRow> = (0..2).flat_map(|l| (0..2).map(move |h| row(l, h))).collect();
        store.write_heads("default", &rows, entry()).unwrap();
        let first = store.manifest().heads["default"].files.clone();
        let read = store.read_heads("default").unwrap().unwrap();
        assert_eq!(read.rows, rows);
        assert_eq!(read.get(1, 0), Some(&rows[2]));
        assert_eq!(read.get(1, 0).unwrap().score("ablation_mean"), 0.02);
        assert!(read.get(1, 1).unwrap().score("ablation_mean").is_nan());

        store.write_heads("default", &rows[..1], entry()).unwrap();
        assert_eq!(store.read_heads("default").unwrap().unwrap().rows.len(), 1);
        assert!(!store.root().join(&first[0].file).exists(), "the previous table is removed");
        assert_eq!(store.heads_names(), ["default"]);
        assert!(store.verify(&()).problems.is_empty());
    }
}

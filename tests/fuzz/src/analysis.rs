//! A small analysis written by the store's own writer: the baseline the features target fuzzes
//! one table of at a time, and the source of that target's seeds.

use std::path::Path;

use loupe_store::Store;
use loupe_store::features::{
    Bucket, COOCCURRENCE_TABLE, Cooccurrence, Example, FEATURES_TABLE, FeatureRow, FeaturesEntry,
    LOGITS_TABLE, LogitEffect, NEIGHBOURS_TABLE, Neighbour, QUANTILE_EXAMPLES_TABLE, TOP_EXAMPLES_TABLE,
    VOCAB_TABLE,
};

/// The dictionary the analysis belongs to.
pub const DICT: &str = "d";
/// Its features.
pub const N_FEATURES: u32 = 4;
/// The tables, in the order the features target's first byte picks them.
pub const TABLES: [&str; 7] = [
    FEATURES_TABLE,
    TOP_EXAMPLES_TABLE,
    QUANTILE_EXAMPLES_TABLE,
    LOGITS_TABLE,
    NEIGHBOURS_TABLE,
    COOCCURRENCE_TABLE,
    VOCAB_TABLE,
];

fn example(f: u32, rank: u16, bucket: Option<Bucket>) -> Example {
    Example {
        feature_id: f,
        rank,
        activation: 1.5 - f32::from(rank),
        row: u64::from(f * 10 + u32::from(rank)),
        doc: f,
        pos: 2,
        center: 1,
        tokens: vec![f, f + 1, 7],
        activations: vec![0.0, 1.5, 0.25],
        bucket,
    }
}

/// Create a store at `root` holding an analysis of [`N_FEATURES`] features of [`DICT`], every
/// table present (feature 3 has no rows in the per-feature tables).
pub fn write(root: &Path) -> anyhow::Result<Store> {
    let store = Store::create(root)?;
    let mut w = store.features_writer(DICT)?;
    let features: Vec<u32> = (0..N_FEATURES).collect();
    w.features(
        &features
            .iter()
            .map(|&f| FeatureRow {
                feature_id: f,
                count: u64::from(f) * 3,
                density: f as f32 / 10.0,
                mean_activation: 0.5,
                max_activation: 2.0,
                dead: f == 3,
                dense: false,
                hist_first_bin: 190,
                hist: vec![f, 1, 2],
            })
            .collect::<Vec<_>>(),
    )?;
    let live = &features[..3];
    w.examples(
        &live.iter().flat_map(|&f| [example(f, 0, None), example(f, 1, None)]).collect::<Vec<_>>(),
        false,
    )?;
    let bucket = |index| Some(Bucket { index, lo: 0.5, hi: 1.0, tokens: 9 });
    w.examples(
        &live.iter().flat_map(|&f| [example(f, 0, bucket(0)), example(f, 0, bucket(1))]).collect::<Vec<_>>(),
        true,
    )?;
    w.logits(
        &live
            .iter()
            .flat_map(|&f| {
                [
                    LogitEffect { feature_id: f, rank: 1, token: 2, value: 0.5 },
                    LogitEffect { feature_id: f, rank: -1, token: 5, value: -0.5 },
                ]
            })
            .collect::<Vec<_>>(),
    )?;
    w.neighbours(
        &live
            .iter()
            .map(|&f| Neighbour { feature_id: f, rank: 0, neighbour: (f + 1) % 3, cosine: 0.9 })
            .collect::<Vec<_>>(),
    )?;
    w.cooccurrence(
        &live
            .iter()
            .map(|&f| Cooccurrence { feature_id: f, rank: 0, other: (f + 2) % 3, shared: 4, jaccard: 0.25 })
            .collect::<Vec<_>>(),
    )?;
    w.vocab(&["<bos>", "a", "b", " c", "dé", "\n", "ff", "g"].map(String::from))?;
    store.commit_features(
        w,
        FeaturesEntry {
            hook: "blocks.0.hook_resid_post".into(),
            n_features: N_FEATURES,
            tokens: 30,
            files: Vec::new(),
        },
    )?;
    Ok(store)
}

//! A synthetic store for `loupe bench gui`: one analysed dictionary ([`DICT`]) of any number of
//! features, written through the store's public writers exactly as `loupe analyze`, `loupe
//! explain` and `loupe score` write theirs, from deterministic pseudo-random data.
//!
//! Per feature: log-uniform density (about 2% dead, 1% dense), a histogram of a few bins, 2 top
//! and 2 quantile examples (16-token windows over a made-up vocabulary of 2,000 words), 3 promoted
//! and 3 suppressed logit effects, 4 neighbours and 4 co-occurring features, one offline
//! explanation; every 10th feature has an embedding score. The store lists no activations and no
//! dictionary weights (the app does not need them to browse features).
//!
//! Each table is generated, written and dropped before the next one, so memory stays at about
//! one table (~1.5 GB for the examples of 1,000,000 features).

use std::path::Path;
use std::time::Instant;

use anyhow::{Result, bail};
use loupe_store::features::hist_bin;
use loupe_store::{
    Bucket, Cooccurrence, Example, Explanation, Explanations, FeatureRow, FeaturesEntry, LogitEffect,
    Neighbour, Provenance, Score, Store,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The dictionary's name in the store.
pub const DICT: &str = "synthetic";
const HOOK: &str = "blocks.6.hook_resid_post";
const SEED: u64 = 0x10_0be;
const VOCAB: u32 = 2000;
const WINDOW: usize = 16;
/// Tokens the (pretend) analysis saw.
const TOKENS: u64 = 100_000_000;

/// splitmix64: a per-feature hash, so that a feature's class does not depend on generation order.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Whether feature `f` is dead (never fired: no examples).
pub fn is_dead(f: u32) -> bool {
    mix(f as u64 ^ SEED) % 100 < 2
}

fn is_dense(f: u32) -> bool {
    mix(f as u64 ^ SEED) % 100 == 2
}

/// Whether `path` holds a complete synthetic store of `n` features.
pub fn is_complete(path: &Path, n: u32) -> bool {
    let Ok(store) = Store::open(path) else { return false };
    store.features(DICT).is_some_and(|e| e.n_features == n)
        && store.explanations_entry(DICT).is_some_and(|e| e.n_explanations == n)
}

/// Make sure `path` holds a complete synthetic store of `n` features: reuse it, or (re)generate
/// it. A folder that holds anything but an empty folder or an earlier synthetic store is refused.
pub fn ensure(path: &Path, n: u32) -> Result<()> {
    if is_complete(path, n) {
        println!("reusing the synthetic store of {n} features in {}", path.display());
        return Ok(());
    }
    if path.exists() {
        let ours = Store::open(path).is_ok_and(|s| {
            let m = s.manifest();
            m.hooks.is_empty() && m.dictionaries.is_empty() && m.features.keys().all(|k| k == DICT)
        });
        let empty = path.is_dir() && std::fs::read_dir(path)?.next().is_none();
        if ours {
            std::fs::remove_dir_all(path)?;
        } else if !empty {
            bail!("{} exists and is not a synthetic store: pass another --store", path.display());
        }
    }
    println!("generating a synthetic store of {n} features in {} …", path.display());
    let started = Instant::now();
    generate(path, n)?;
    let bytes = folder_bytes(path);
    println!(
        "generated in {:.1} s ({:.0} MiB on disk)",
        started.elapsed().as_secs_f64(),
        bytes as f64 / (1u64 << 20) as f64
    );
    Ok(())
}

fn folder_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => folder_bytes(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

fn generate(path: &Path, n: u32) -> Result<()> {
    let store = Store::create(path)?;
    let mut writer = store.features_writer(DICT)?;
    let words = vocab();
    writer.vocab(&words)?;
    let stats = feature_rows(n);
    let max: Vec<f32> = stats.iter().map(|r| r.max_activation).collect();
    writer.features(&stats)?;
    drop(stats);
    writer.examples(&examples(n, &max, false), false)?;
    writer.examples(&examples(n, &max, true), true)?;
    drop(max);
    writer.logits(&logits(n))?;
    writer.neighbours(&neighbours(n))?;
    writer.cooccurrence(&cooccurrence(n))?;
    writer.json("synthetic.json", &format!("{{\"features\": {n}, \"seed\": {SEED}}}\n"))?;
    store.commit_features(
        writer,
        FeaturesEntry { hook: HOOK.into(), n_features: n, tokens: TOKENS, files: Vec::new() },
    )?;
    store.commit_explanations(DICT, &explanations(n, &words), None)
}

/// 2,000 distinct made-up words (three syllables each; most with a leading space, as in BPE).
fn vocab() -> Vec<String> {
    const SYLLABLES: [&str; 16] =
        ["ka", "lo", "mi", "ne", "ru", "ta", "vi", "so", "pe", "du", "ga", "fo", "zi", "ba", "ye", "hu"];
    (0..VOCAB as usize)
        .map(|i| {
            let word: String = [i / 256, (i / 16) % 16, i % 16].iter().map(|&s| SYLLABLES[s]).collect();
            if i % 5 == 0 { word } else { format!(" {word}") }
        })
        .collect()
}

fn rng(table: u64) -> StdRng {
    StdRng::seed_from_u64(SEED.wrapping_mul(31).wrapping_add(table))
}

fn feature_rows(n: u32) -> Vec<FeatureRow> {
    let mut rng = rng(1);
    (0..n)
        .map(|f| {
            let density = if is_dead(f) {
                0.0
            } else if is_dense(f) {
                rng.random_range(0.1..0.5f32)
            } else {
                10f32.powf(rng.random_range(-6.0..-2.0f32))
            };
            let count = (density as f64 * TOKENS as f64).round() as u64;
            let max_activation = if count == 0 { 0.0 } else { rng.random_range(1.0..20.0f32) };
            let mean_activation = max_activation * rng.random_range(0.2..0.5f32);
            let (hist_first_bin, hist) = if count == 0 {
                (0, Vec::new())
            } else {
                let bins = rng.random_range(3..7usize);
                let mut hist: Vec<u32> = (0..bins).map(|_| rng.random_range(1..100u32)).collect();
                let total: u32 = hist.iter().sum();
                hist.iter_mut().for_each(|h| *h = ((*h as u64 * count) / total as u64).max(1) as u32);
                (hist_bin(mean_activation * 0.25) as u16, hist)
            };
            FeatureRow {
                feature_id: f,
                count,
                density,
                mean_activation,
                max_activation,
                dead: count == 0,
                dense: is_dense(f),
                hist_first_bin,
                hist,
            }
        })
        .collect()
}

/// Two examples per live feature: the top two (`quantile` false), or one in each of two buckets.
fn examples(n: u32, max: &[f32], quantile: bool) -> Vec<Example> {
    let mut rng = rng(if quantile { 3 } else { 2 });
    let mut rows = Vec::with_capacity(2 * n as usize);
    for f in (0..n).filter(|&f| !is_dead(f)) {
        let m = max[f as usize];
        for k in 0..2u8 {
            let (activation, rank, bucket) = if quantile {
                let (lo, hi) = (m * k as f32 / 2.0, m * (k + 1) as f32 / 2.0);
                let bucket = Bucket { index: k, lo, hi, tokens: rng.random_range(1..10_000) };
                (rng.random_range(lo..hi).max(1e-3), 0, Some(bucket))
            } else {
                (m * (1.0 - 0.1 * k as f32), k as u16, None)
            };
            let center = rng.random_range(4..12usize);
            let tokens: Vec<u32> = (0..WINDOW).map(|_| rng.random_range(0..VOCAB)).collect();
            let activations = (0..WINDOW)
                .map(|i| match i.abs_diff(center) {
                    0 => activation,
                    1..=2 if rng.random_bool(0.6) => activation * rng.random_range(0.05..0.9f32),
                    _ => 0.0,
                })
                .collect();
            let row = rng.random_range(0..TOKENS);
            rows.push(Example {
                feature_id: f,
                rank,
                activation,
                row,
                doc: (row / 256) as u32,
                pos: (row % 256) as u32,
                center: center as u16,
                tokens,
                activations,
                bucket,
            });
        }
    }
    rows
}

fn logits(n: u32) -> Vec<LogitEffect> {
    let mut rng = rng(4);
    let mut rows = Vec::with_capacity(6 * n as usize);
    for f in 0..n {
        for rank in [1i8, 2, 3, -1, -2, -3] {
            let value = rank.signum() as f32
                * (1.0 - 0.2 * rank.unsigned_abs() as f32)
                * rng.random_range(0.5..2.0f32);
            rows.push(LogitEffect { feature_id: f, rank, token: rng.random_range(0..VOCAB), value });
        }
    }
    rows
}

/// A feature other than `f`.
fn other(rng: &mut StdRng, f: u32, n: u32) -> u32 {
    if n < 2 {
        return f;
    }
    let o = rng.random_range(0..n - 1);
    if o >= f { o + 1 } else { o }
}

fn neighbours(n: u32) -> Vec<Neighbour> {
    let mut rng = rng(5);
    let mut rows = Vec::with_capacity(4 * n as usize);
    for f in 0..n {
        for rank in 0..4u8 {
            let cosine = 0.9 - 0.15 * rank as f32 - rng.random_range(0.0..0.05f32);
            rows.push(Neighbour { feature_id: f, rank, neighbour: other(&mut rng, f, n), cosine });
        }
    }
    rows
}

fn cooccurrence(n: u32) -> Vec<Cooccurrence> {
    let mut rng = rng(6);
    let mut rows = Vec::with_capacity(4 * n as usize);
    for f in (0..n).filter(|&f| !is_dead(f)) {
        for rank in 0..4u8 {
            let jaccard = 0.5 / (rank as f32 + 1.0) * rng.random_range(0.5..1.0f32);
            let (o, shared) = (other(&mut rng, f, n), rng.random_range(1..100_000u64));
            rows.push(Cooccurrence { feature_id: f, rank, other: o, shared, jaccard });
        }
    }
    rows
}

fn hash_hex(f: u32, salt: u64) -> String {
    (0..4).map(|i| format!("{:016x}", mix(f as u64 ^ (salt << 32) ^ (i << 56)))).collect()
}

fn explanations(n: u32, words: &[String]) -> Explanations {
    let mut rng = rng(7);
    let mut word = || words[rng.random_range(0..words.len())].trim().to_string();
    let explanations = (0..n)
        .map(|f| Explanation {
            feature_id: f,
            explainer: "offline".into(),
            explanation: Some(format!("words about {} and {}", word(), word())),
            failure: None,
            provenance: Provenance {
                model: "offline".into(),
                prompt_hash: hash_hex(f, 1),
                example_rows: vec![mix(f as u64) % TOKENS, mix(f as u64 + 1) % TOKENS],
                ..Provenance::default()
            },
        })
        .collect();
    let mut rng = self::rng(8);
    let scores = (0..n)
        .step_by(10)
        .map(|f| {
            let auroc = rng.random_range(0.4..1.0f32);
            Score {
                feature_id: f,
                explainer: "offline".into(),
                scorer: "embedding".into(),
                score: Some(auroc),
                balanced_accuracy: None,
                f1: None,
                auroc: Some(auroc),
                pearson: None,
                n_examples: 20,
                failure: None,
                provenance: Provenance {
                    model: "all-MiniLM-L6-v2".into(),
                    prompt_hash: hash_hex(f, 2),
                    ..Provenance::default()
                },
            }
        })
        .collect();
    Explanations { explanations, scores }
}

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
//! [`ensure_graph`] writes, in a store of its own, one attribution graph ([`GRAPH`]) of 100,000
//! nodes and 1,000,000 edges over a 512-token prompt and 18 layers, through `Store::start_graph`
//! as `loupe graph` writes its graphs: the Graph view's scale case.
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

/// The synthetic attribution graph's name, its size and shape.
pub const GRAPH: &str = "synthetic-graph";
pub const GRAPH_NODES: u32 = 100_000;
pub const GRAPH_EDGES: u32 = 1_000_000;
const GRAPH_LAYERS: u16 = 18;
const GRAPH_TOKENS: u32 = 512;
const GRAPH_LOGITS: u32 = 10;

/// Whether `path` holds the complete synthetic graph.
pub fn graph_is_complete(path: &Path) -> bool {
    let Ok(store) = Store::open(path) else { return false };
    store
        .manifest()
        .graphs
        .get(GRAPH)
        .is_some_and(|e| e.n_nodes == GRAPH_NODES as u64 && e.n_edges == GRAPH_EDGES as u64)
}

/// Make sure `path` holds the synthetic graph: reuse it, or write it (into an empty or new
/// folder, or over an earlier synthetic graph store).
pub fn ensure_graph(path: &Path) -> Result<()> {
    if graph_is_complete(path) {
        println!("reusing the synthetic graph in {}", path.display());
        return Ok(());
    }
    if path.exists() {
        let ours = Store::open(path).is_ok_and(|s| {
            let m = s.manifest();
            // Only a store holding nothing but (an unfinished) synthetic graph is ours to remove.
            m.model.is_none()
                && m.hooks.is_empty()
                && m.dictionaries.is_empty()
                && m.features.is_empty()
                && m.explanations.is_empty()
                && m.heads.is_empty()
                && m.circuits.is_empty()
                && m.circuit_evals.is_empty()
                && m.graphs.keys().all(|name| name == GRAPH)
        });
        let empty = path.is_dir() && std::fs::read_dir(path)?.next().is_none();
        if ours {
            std::fs::remove_dir_all(path)?;
        } else if !empty {
            bail!("{} exists and is not a synthetic graph store: pass another --graph-store", path.display());
        }
    }
    println!(
        "generating a synthetic graph of {GRAPH_NODES} nodes and {GRAPH_EDGES} edges in {} …",
        path.display()
    );
    let started = Instant::now();
    let store = Store::create(path)?;
    write_graph(&store)?;
    println!("generated in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The graph: an embedding per token, an error per layer and token, 10 logits at the last token,
/// the rest features spread over layers and tokens (more in later tokens); each edge goes from a
/// node of a lower row to one of a higher row at the same or a later token, with a heavy-tailed
/// weight.
fn write_graph(store: &Store) -> Result<()> {
    use loupe_store::graphs::{GraphEdgeRow, GraphEntry, GraphNodeRow, GraphSettings};
    let mut rng = rng(100);
    let (layers, tokens) = (GRAPH_LAYERS as u32, GRAPH_TOKENS);
    let n_features = GRAPH_NODES - tokens - layers * tokens - GRAPH_LOGITS;
    let row = |node: u32, kind: &str, layer: u16, position: u32, feature: u32, influence: f32| GraphNodeRow {
        node,
        node_id: match kind {
            "embedding" => format!("E_{feature}_{position}"),
            "logit" => format!("{layers}_{feature}_{position}"),
            "error" => format!("{layer}_error_{position}"),
            _ => format!("{layer}_{feature}_{position}"),
        },
        kind: kind.into(),
        layer,
        position,
        feature,
        activation: if kind == "feature" { influence * 10.0 } else { 0.0 },
        probability: (kind == "logit").then_some(influence),
        influence,
    };
    // Every node's (row, position): row 0 embeddings, 1..=18 layers, 19 logits; rows kept in the
    // table's order (embeddings, features by layer and position, errors, logits).
    let mut feats: Vec<(u16, u32, u32)> = (0..n_features)
        .map(|_| {
            let layer = rng.random_range(0..GRAPH_LAYERS);
            let position = (tokens as f32 * rng.random::<f32>().sqrt()) as u32;
            (layer, position.min(tokens - 1), rng.random_range(0..16_384))
        })
        .collect();
    feats.sort_unstable();
    feats.dedup();
    let mut nodes: Vec<GraphNodeRow> = Vec::with_capacity(GRAPH_NODES as usize);
    let mut place: Vec<(u32, u32)> = Vec::with_capacity(GRAPH_NODES as usize);
    for p in 0..tokens {
        nodes.push(row(nodes.len() as u32, "embedding", 0, p, 2 + p % VOCAB, 0.01));
        place.push((0, p));
    }
    for &(layer, position, feature) in &feats {
        let influence = 1e-4 / (1e-3 + rng.random::<f32>());
        nodes.push(row(nodes.len() as u32, "feature", layer, position, feature, influence));
        place.push((layer as u32 + 1, position));
    }
    for layer in 0..GRAPH_LAYERS {
        for p in 0..tokens {
            nodes.push(row(nodes.len() as u32, "error", layer, p, 0, 0.02 * rng.random::<f32>()));
            place.push((layer as u32 + 1, p));
        }
    }
    // Fill up to exactly GRAPH_NODES with more features at the last token (the dedup above may
    // have dropped a few) before the logits.
    let mut extra = 0u32;
    while nodes.len() < (GRAPH_NODES - GRAPH_LOGITS) as usize {
        let layer = (extra % layers) as u16;
        nodes.push(row(nodes.len() as u32, "feature", layer, tokens - 1, 20_000 + extra, 0.001));
        place.push((layer as u32 + 1, tokens - 1));
        extra += 1;
    }
    for k in 0..GRAPH_LOGITS {
        let p = 0.5f32.powi(k as i32 + 1);
        nodes.push(row(nodes.len() as u32, "logit", GRAPH_LAYERS, tokens - 1, 100 + k, p));
        place.push((layers + 1, tokens - 1));
    }
    let mut writer = store.start_graph(GRAPH)?;
    for batch in nodes.chunks(10_000) {
        writer.write_nodes(batch)?;
    }
    // Nodes by row, for drawing an edge's target in a higher row.
    let mut by_row: Vec<Vec<u32>> = vec![Vec::new(); layers as usize + 2];
    for (i, &(r, _)) in place.iter().enumerate() {
        by_row[r as usize].push(i as u32);
    }
    let mut batch = Vec::with_capacity(100_000);
    let mut written = 0u32;
    while written < GRAPH_EDGES {
        let source = rng.random_range(0..GRAPH_NODES - GRAPH_LOGITS);
        let (r, p) = place[source as usize];
        let target_row = rng.random_range(r + 1..=layers + 1) as usize;
        let candidates = &by_row[target_row];
        // A target near the source's token (at it or later): pick among a few tries.
        let target = (0..4)
            .map(|_| candidates[rng.random_range(0..candidates.len())])
            .find(|&t| place[t as usize].1 >= p)
            .unwrap_or(candidates[candidates.len() - 1]);
        let magnitude = 1e-3 / (1e-3 + rng.random::<f32>()).powi(2);
        let weight = if rng.random::<f32>() < 0.3 { -magnitude } else { magnitude };
        batch.push(GraphEdgeRow { source, target, weight });
        written += 1;
        if batch.len() == batch.capacity() {
            writer.write_edges(&batch)?;
            batch.clear();
        }
    }
    writer.write_edges(&batch)?;
    let words = vocab();
    let token_strs = (0..tokens).map(|p| words[(p % VOCAB) as usize].clone()).collect();
    writer.commit(GraphEntry {
        prompt: "a synthetic prompt of 512 tokens".into(),
        tokens: (0..tokens).map(|p| 2 + p % VOCAB).collect(),
        token_strs,
        transcoders: (0..layers).map(|l| format!("synthetic-tc-{l}")).collect(),
        transcoder_kind: "plt".into(),
        n_layers: layers,
        settings: GraphSettings::default(),
        active_features: n_features as u64,
        n_nodes: GRAPH_NODES as u64,
        n_edges: GRAPH_EDGES as u64,
        replacement_score: 0.5,
        completeness_score: 0.8,
        replacement_score_unpruned: 0.5,
        completeness_score_unpruned: 0.8,
        wall_s: 0.0,
        model: "synthetic".into(),
        model_sha256: "0".repeat(64),
        files: Vec::new(),
    })
}

//! Attribution graphs against circuit-tracer 0.5.0 (tests/fixtures/graph_ref.py: the real
//! `circuit_tracer.attribute`, TransformerLens backend, CPU, f32) on the tiny GPT-2 with the
//! fixture's seeded JumpReLU per-layer transcoders: the same active features (and activations),
//! logits (and probabilities), and edges — the 50 strongest by |weight| are the same set with
//! weights within 1e-3 relative, and every edge agrees within 1e-3 relative plus 1e-5 of the
//! largest |weight| (the printed max relative error is over every edge whose reference weight is
//! not zero).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use loupe_analysis::graphs::attribute::attribute;
use loupe_analysis::graphs::{NodeKind, RawGraph};
use loupe_dict::transcoder::{Activation, TranscoderLayer, TranscoderSet};
use loupe_model as model;
use loupe_store::GraphSettings;
use loupe_tests::fixture;

type Reference = HashMap<String, Tensor>;

fn reference() -> Reference {
    candle_core::safetensors::load(fixture("gpt2-tiny/graph_reference.safetensors"), &Device::Cpu).unwrap()
}

fn floats(r: &Reference, key: &str) -> Vec<f32> {
    r[key].flatten_all().unwrap().to_vec1().unwrap()
}

fn ints(r: &Reference, key: &str) -> Vec<i64> {
    r[key].flatten_all().unwrap().to_dtype(DType::I64).unwrap().to_vec1().unwrap()
}

/// The fixture's per-layer transcoders as Loupe's set.
fn transcoders(r: &Reference, n_layers: usize) -> TranscoderSet {
    let d_model = r["tc.0.w_enc"].dims()[1];
    let layers = (0..n_layers)
        .map(|layer| {
            let get = |k: &str| floats(r, &format!("tc.{layer}.{k}"));
            TranscoderLayer {
                layer,
                n_features: r[&format!("tc.{layer}.w_enc")].dims()[0],
                w_enc: get("w_enc"),
                b_enc: get("b_enc"),
                activation: Activation::JumpRelu { threshold: get("threshold") },
                w_dec: vec![get("w_dec")],
                b_dec: get("b_dec"),
                w_skip: None,
            }
        })
        .collect();
    TranscoderSet {
        kind: "plt".into(),
        names: (0..n_layers).map(|l| format!("ref-{l}")).collect(),
        d_model,
        layers,
    }
}

/// A node as both sides can name it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Key {
    Feature { layer: usize, position: usize, feature: u32 },
    Error { layer: usize, position: usize },
    Embedding { position: usize },
    Logit { token: u32 },
}

/// circuit-tracer's node order: the selected features, errors (layer-major), embeddings, logits.
fn reference_nodes(r: &Reference, n_layers: usize, n_pos: usize) -> Vec<Key> {
    let active = ints(r, "active_features");
    let mut keys: Vec<Key> = ints(r, "selected_features")
        .iter()
        .map(|&i| {
            let a = &active[3 * i as usize..3 * i as usize + 3];
            Key::Feature { layer: a[0] as usize, position: a[1] as usize, feature: a[2] as u32 }
        })
        .collect();
    for layer in 0..n_layers {
        keys.extend((0..n_pos).map(|position| Key::Error { layer, position }));
    }
    keys.extend((0..n_pos).map(|position| Key::Embedding { position }));
    keys.extend(ints(r, "logit_tokens").iter().map(|&t| Key::Logit { token: t as u32 }));
    keys
}

fn key_of(node: &loupe_analysis::graphs::Node) -> Key {
    match node.kind {
        NodeKind::Feature => {
            Key::Feature { layer: node.layer, position: node.position, feature: node.feature }
        }
        NodeKind::Error => Key::Error { layer: node.layer, position: node.position },
        NodeKind::Embedding => Key::Embedding { position: node.position },
        NodeKind::Logit => Key::Logit { token: node.feature },
    }
}

/// Every edge of Loupe's graph, (target, source) → weight.
fn our_edges(graph: &RawGraph) -> HashMap<(Key, Key), f32> {
    let keys: Vec<Key> = graph.nodes.iter().map(key_of).collect();
    let mut edges = HashMap::new();
    for (t, &target) in graph.targets.iter().enumerate() {
        for (s, &w) in graph.row(t).iter().enumerate() {
            edges.insert((keys[target as usize].clone(), keys[s].clone()), w);
        }
    }
    edges
}

/// The `n` strongest edges by |weight| (ties broken by the keys).
fn strongest(edges: &[((Key, Key), f32)], n: usize) -> Vec<(Key, Key)> {
    let mut sorted: Vec<&((Key, Key), f32)> = edges.iter().collect();
    sorted.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()).then_with(|| a.0.cmp(&b.0)));
    sorted.iter().take(n).map(|(k, _)| k.clone()).collect()
}

#[test]
fn gpt2_tiny_graph_matches_circuit_tracer() {
    let r = reference();
    let model = model::load(&fixture("gpt2-tiny")).unwrap();
    let n_layers = model.config().n_layers;
    let tokens: Vec<u32> = ints(&r, "tokens").iter().map(|&t| t as u32).collect();
    let n_pos = tokens.len();
    let set = transcoders(&r, n_layers);
    // circuit-tracer's settings of the fixture: 10 logits up to p 0.95, batches of 32, and every
    // active feature a target.
    let settings = GraphSettings {
        max_logits: 10,
        logit_probability: 0.95,
        max_feature_nodes: 100_000,
        batch: 32,
        ..GraphSettings::default()
    };
    let graph = attribute(model.as_ref(), &set, &tokens, &settings, &()).unwrap();

    // Nodes: the same active features with the same activations, and the same logits.
    let active = ints(&r, "active_features");
    let values = floats(&r, "activation_values");
    let theirs: HashMap<Key, f32> = (0..values.len())
        .map(|i| {
            let a = &active[3 * i..3 * i + 3];
            (Key::Feature { layer: a[0] as usize, position: a[1] as usize, feature: a[2] as u32 }, values[i])
        })
        .collect();
    let ours: HashMap<Key, f32> = graph
        .nodes
        .iter()
        .filter(|n| n.kind == NodeKind::Feature)
        .map(|n| (key_of(n), n.activation))
        .collect();
    let mut missing: Vec<&Key> = theirs.keys().filter(|k| !ours.contains_key(k)).collect();
    let mut extra: Vec<&Key> = ours.keys().filter(|k| !theirs.contains_key(k)).collect();
    missing.sort();
    extra.sort();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "active features differ: missing {missing:?}, extra {extra:?}"
    );
    assert_eq!(graph.active_features, values.len() as u64, "active feature count");
    for (k, v) in &theirs {
        assert!(
            (ours[k] - v).abs() <= 1e-4 * v.abs().max(1.0),
            "activation of {k:?}: ours {} vs {v}",
            ours[k]
        );
    }
    let logits: Vec<(u32, f32)> = graph
        .nodes
        .iter()
        .filter(|n| n.kind == NodeKind::Logit)
        .map(|n| (n.feature, n.probability.unwrap_or(f32::NAN)))
        .collect();
    let their_tokens: Vec<u32> = ints(&r, "logit_tokens").iter().map(|&t| t as u32).collect();
    let their_probs = floats(&r, "logit_probabilities");
    assert_eq!(logits.iter().map(|l| l.0).collect::<Vec<_>>(), their_tokens, "logit tokens");
    for ((t, p), q) in logits.iter().zip(&their_probs) {
        assert!((p - q).abs() <= 1e-5, "probability of logit {t}: ours {p} vs {q}");
    }

    // Edges: every (target, source) pair of the reference's target rows.
    let keys = reference_nodes(&r, n_layers, n_pos);
    let m = keys.len();
    let adjacency = floats(&r, "adjacency");
    assert_eq!(adjacency.len(), m * m, "reference adjacency is {m} x {m}");
    let ours = our_edges(&graph);
    let target_rows =
        keys.iter().enumerate().filter(|(_, k)| matches!(k, Key::Feature { .. } | Key::Logit { .. }));
    let mut pairs: Vec<((Key, Key), f32, f32)> = Vec::new();
    for (t, target) in target_rows {
        for (s, source) in keys.iter().enumerate() {
            let key = (target.clone(), source.clone());
            let Some(&w) = ours.get(&key) else {
                panic!(
                    "Loupe's graph has no edge {source:?} -> {target:?} (reference {})",
                    adjacency[t * m + s]
                )
            };
            pairs.push((key, w, adjacency[t * m + s]));
        }
    }
    assert_eq!(pairs.len(), ours.len(), "Loupe's graph has edges the reference does not");

    let their_edges: Vec<((Key, Key), f32)> = pairs.iter().map(|(k, _, b)| (k.clone(), *b)).collect();
    let our_edges: Vec<((Key, Key), f32)> = pairs.iter().map(|(k, a, _)| (k.clone(), *a)).collect();
    let (top_theirs, top_ours) = (strongest(&their_edges, 50), strongest(&our_edges, 50));
    let mut only_theirs: Vec<&(Key, Key)> = top_theirs.iter().filter(|k| !top_ours.contains(k)).collect();
    only_theirs.sort();
    assert!(
        only_theirs.is_empty(),
        "top-50 edges differ: the reference's {only_theirs:?} are not in Loupe's top 50"
    );

    let largest = their_edges.iter().map(|e| e.1.abs()).fold(0f32, f32::max);
    let rel = |a: f32, b: f32| (a - b).abs() / b.abs();
    let mut worst_top = 0f32;
    for key in &top_theirs {
        let (_, a, b) = pairs.iter().find(|p| &p.0 == key).unwrap();
        worst_top = worst_top.max(rel(*a, *b));
        assert!(rel(*a, *b) <= 1e-3, "edge {key:?}: ours {a} vs reference {b}");
    }
    let (mut worst_all, mut worst_edge) = (0f32, None);
    for (key, a, b) in &pairs {
        assert!(
            (a - b).abs() <= 1e-3 * b.abs() + 1e-5 * largest,
            "edge {key:?}: ours {a} vs reference {b} (largest |weight| {largest})"
        );
        if *b != 0.0 && rel(*a, *b) > worst_all {
            (worst_all, worst_edge) = (rel(*a, *b), Some(key));
        }
    }
    let nonzero = pairs.iter().filter(|p| p.2 != 0.0).count();
    println!(
        "graph parity: {} nodes, {} edges ({nonzero} non-zero), largest |weight| {largest:e}; top 50 max relative \
         error {worst_top:e}; all edges max relative error {worst_all:e} at {worst_edge:?}",
        keys.len(),
        pairs.len()
    );
}

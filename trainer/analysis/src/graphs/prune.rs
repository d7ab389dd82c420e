//! Pruning an attribution graph by influence on the logits, as circuit-tracer 0.5 does
//! (`graph.py`: `prune_graph`, `compute_influence`, `compute_graph_scores`), and its replacement
//! and completeness scores.
//!
//! circuit-tracer works on an n×n adjacency; only the targets' rows (features and logits) are
//! ever non-zero (embeddings and errors have no incoming edges), so everything here works on the
//! `[targets, nodes]` rows of a [`RawGraph`] and never builds the n×n matrix (n ≈ 46,000 at
//! 2,048 tokens). Sums are in f64. Influence is Σ_k wᵀ Aᵏ over the row-normalised |adjacency|,
//! w = the logits' probabilities, iterated until it vanishes (the graph is acyclic).

use anyhow::{Result, bail, ensure};
use loupe_store::GraphSettings;

use super::{NodeKind, RawGraph};

/// A pruned graph: indices refer to the [`RawGraph`]'s nodes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Pruned {
    /// The nodes kept, in the raw graph's order.
    pub nodes: Vec<u32>,
    /// Every raw node's influence on the logits (a logit's: its probability).
    pub influence: Vec<f32>,
    /// Every raw node's cumulative share of the influence, most influential first
    /// (circuit-tracer's pruning score, the `influence` of its JSON).
    pub cumulative: Vec<f32>,
    /// The edges kept: (source, target, weight), grouped by target.
    pub edges: Vec<(u32, u32, f32)>,
    pub replacement_score: f32,
    pub completeness_score: f32,
    pub replacement_score_unpruned: f32,
    pub completeness_score_unpruned: f32,
}

/// circuit-tracer's `compute_influence` gives up after this many powers of the adjacency.
const MAX_ITER: usize = 1000;

/// The rows of an adjacency restricted to some nodes: the raw graph's dense rows with a node
/// mask (the unpruned graph: all true), or sparse rows (the pruned graph's kept edges).
enum Rows<'a> {
    Dense { raw: &'a RawGraph, keep: &'a [bool] },
    Sparse { n_nodes: usize, targets: &'a [u32], rows: &'a [Vec<(u32, f32)>] },
}

impl Rows<'_> {
    fn n_nodes(&self) -> usize {
        match self {
            Rows::Dense { raw, .. } => raw.nodes.len(),
            Rows::Sparse { n_nodes, .. } => *n_nodes,
        }
    }

    fn targets(&self) -> &[u32] {
        match self {
            Rows::Dense { raw, .. } => &raw.targets,
            Rows::Sparse { targets, .. } => targets,
        }
    }

    /// Call `f(source, weight)` for each (non-masked) entry of row `t`.
    fn for_each(&self, t: usize, mut f: impl FnMut(usize, f32)) {
        match self {
            Rows::Dense { raw, keep } => {
                if !keep[raw.targets[t] as usize] {
                    return;
                }
                for (s, &w) in raw.row(t).iter().enumerate() {
                    if keep[s] {
                        f(s, w);
                    }
                }
            }
            Rows::Sparse { rows, .. } => rows[t].iter().for_each(|&(s, w)| f(s as usize, w)),
        }
    }

    /// Each row's Σ|w|, clamped as circuit-tracer's `normalize_matrix` does.
    fn norms(&self) -> Vec<f64> {
        (0..self.targets().len())
            .map(|t| {
                let mut sum = 0.0f64;
                self.for_each(t, |_, w| sum += f64::from(w.abs()));
                sum.max(1e-10)
            })
            .collect()
    }

    /// Σ_{k≥1} wᵀ Âᵏ with Â the row-normalised |A| and `weights` indexed by target.
    fn influence(&self, norms: &[f64], weights: &[f64]) -> Result<Vec<f64>> {
        let targets = self.targets();
        let mut total = vec![0.0f64; self.n_nodes()];
        let mut row_weights = weights.to_vec();
        for _ in 0..=MAX_ITER {
            let mut current = vec![0.0f64; self.n_nodes()];
            for (t, &c) in row_weights.iter().enumerate() {
                if c != 0.0 {
                    let c = c / norms[t];
                    self.for_each(t, |s, w| current[s] += c * f64::from(w.abs()));
                }
            }
            if current.iter().all(|&x| x == 0.0) {
                return Ok(total);
            }
            total.iter_mut().zip(&current).for_each(|(a, b)| *a += b);
            row_weights = targets.iter().map(|&i| current[i as usize]).collect();
        }
        bail!("influence did not converge after {MAX_ITER} iterations: the graph has a cycle")
    }
}

/// The score at which `scores` (plus `zeros` more zero scores) reach `threshold` of their sum,
/// as circuit-tracer's `find_threshold`: sort descending, cumulative share, first index at or
/// above the threshold (clamped to the last).
fn find_threshold(scores: &[f64], zeros: usize, threshold: f64) -> f64 {
    let mut sorted: Vec<f64> = scores.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let sum: f64 = sorted.iter().sum();
    let mut cumulative = 0.0;
    for &s in &sorted {
        cumulative += s;
        if cumulative / sum >= threshold {
            return s;
        }
    }
    if zeros > 0 { 0.0 } else { sorted.last().copied().unwrap_or(0.0) }
}

/// Each node's cumulative share of the influence, most influential first.
fn cumulative_shares(influence: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..influence.len()).collect();
    order.sort_by(|&a, &b| influence[b].total_cmp(&influence[a]));
    let sum: f64 = influence.iter().sum();
    let mut out = vec![0.0; influence.len()];
    let mut cumulative = 0.0;
    for i in order {
        cumulative += influence[i];
        out[i] = cumulative / sum;
    }
    out
}

/// circuit-tracer's `compute_graph_scores`: (replacement, completeness) of the graph `rows`.
fn scores(raw: &RawGraph, rows: &Rows, logit_weights: &[f64]) -> Result<(f64, f64)> {
    let norms = rows.norms();
    let influence = rows.influence(&norms, logit_weights)?;
    let of_kind = |kind: NodeKind| -> f64 {
        raw.nodes.iter().zip(&influence).filter(|(n, _)| n.kind == kind).map(|(_, &x)| x).sum()
    };
    let (tokens, errors) = (of_kind(NodeKind::Embedding), of_kind(NodeKind::Error));
    let replacement = tokens / (tokens + errors);

    // Every node: (1 − its inputs' error share) · (its influence + its logit weight); rows
    // without inputs (embeddings, errors) have no error share.
    let mut output: Vec<f64> = influence.clone();
    let mut error_share = vec![0.0f64; raw.nodes.len()];
    for (t, &i) in raw.targets.iter().enumerate() {
        output[i as usize] += logit_weights[t];
        let mut sum = 0.0;
        rows.for_each(t, |s, w| {
            if raw.nodes[s].kind == NodeKind::Error {
                sum += f64::from(w.abs());
            }
        });
        error_share[i as usize] = sum / norms[t];
    }
    let weighted: f64 = output.iter().zip(&error_share).map(|(o, e)| (1.0 - e) * o).sum();
    let completeness = weighted / output.iter().sum::<f64>();
    Ok((replacement, completeness))
}

/// Prune `raw` to `settings.node_threshold` of the node influence and `settings.edge_threshold`
/// of the edge influence, as circuit-tracer's `prune_graph`: nodes above the node threshold plus
/// every embedding and logit; edges of those nodes above the edge threshold; then, until nothing
/// changes, features and errors without a kept outgoing edge and features without a kept
/// incoming edge are dropped. Scores are those of the unpruned graph and of the kept edges.
pub fn prune(raw: &RawGraph, settings: &GraphSettings) -> Result<Pruned> {
    let node_threshold = f64::from(settings.node_threshold);
    let edge_threshold = f64::from(settings.edge_threshold);
    ensure!((0.0..=1.0).contains(&node_threshold), "node_threshold must be between 0 and 1");
    ensure!((0.0..=1.0).contains(&edge_threshold), "edge_threshold must be between 0 and 1");
    let n = raw.nodes.len();
    ensure!(
        raw.adjacency.len() == raw.targets.len() * n,
        "adjacency of {} values for {} targets and {n} nodes",
        raw.adjacency.len(),
        raw.targets.len()
    );
    let kind = |i: usize| raw.nodes[i].kind;
    // circuit-tracer's logit weights: a logit's probability, 0 for the other targets.
    let logit_weights: Vec<f64> = (raw.targets.iter())
        .map(|&i| &raw.nodes[i as usize])
        .map(|node| match node.kind {
            NodeKind::Logit => node.probability.map_or(0.0, f64::from),
            _ => 0.0,
        })
        .collect();

    // Node influence and the node threshold.
    let all = vec![true; n];
    let unpruned = Rows::Dense { raw, keep: &all };
    let influence = unpruned.influence(&unpruned.norms(), &logit_weights)?;
    let cutoff = find_threshold(&influence, 0, node_threshold);
    let always = |i: usize| matches!(kind(i), NodeKind::Embedding | NodeKind::Logit);
    let mut keep: Vec<bool> = (0..n).map(|i| always(i) || influence[i] >= cutoff).collect();

    // Edge influence on the node-pruned graph: |Â_ts| · (influence of t + its logit weight).
    let node_pruned = Rows::Dense { raw, keep: &keep };
    let norms = node_pruned.norms();
    let pruned_influence = node_pruned.influence(&norms, &logit_weights)?;
    let mut candidates: Vec<(u32, u32, f32, f64)> = Vec::new();
    for (t, &i) in raw.targets.iter().enumerate() {
        let weight = (pruned_influence[i as usize] + logit_weights[t]) / norms[t];
        node_pruned.for_each(t, |s, w| {
            let score = f64::from(w.abs()) * weight;
            if score != 0.0 {
                candidates.push((s as u32, i, w, score));
            }
        });
    }
    // circuit-tracer thresholds all n² entries; the others are zeros. A threshold of zero
    // (reached only at edge_threshold ≈ 1) would keep every entry, zero ones too: here it keeps
    // every non-zero edge.
    let scores_only: Vec<f64> = candidates.iter().map(|c| c.3).collect();
    let cutoff = find_threshold(&scores_only, n * n - candidates.len(), edge_threshold);
    candidates.retain(|c| c.3 >= cutoff);

    // Drop features and errors without outgoing edges, features without incoming ones, until
    // nothing changes.
    loop {
        let mut has_out = vec![false; n];
        let mut has_in = vec![false; n];
        for &(s, t, _, _) in &candidates {
            if keep[s as usize] && keep[t as usize] {
                has_out[s as usize] = true;
                has_in[t as usize] = true;
            }
        }
        let mut changed = false;
        for i in 0..n {
            let drop = match kind(i) {
                NodeKind::Feature => !has_out[i] || !has_in[i],
                NodeKind::Error => !has_out[i],
                NodeKind::Embedding | NodeKind::Logit => false,
            };
            if keep[i] && drop {
                keep[i] = false;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    let edges: Vec<(u32, u32, f32)> = (candidates.iter())
        .filter(|c| keep[c.0 as usize] && keep[c.1 as usize])
        .map(|c| (c.0, c.1, c.2))
        .collect();

    // Scores of the unpruned graph and of the kept edges.
    let (replacement_unpruned, completeness_unpruned) = scores(raw, &unpruned, &logit_weights)?;
    let row_of: std::collections::HashMap<u32, usize> =
        raw.targets.iter().enumerate().map(|(t, &i)| (i, t)).collect();
    let mut sparse = vec![Vec::new(); raw.targets.len()];
    for &(s, t, w) in &edges {
        sparse[row_of[&t]].push((s, w));
    }
    let pruned = Rows::Sparse { n_nodes: n, targets: &raw.targets, rows: &sparse };
    let (replacement, completeness) = scores(raw, &pruned, &logit_weights)?;

    let cumulative = cumulative_shares(&influence);
    let influence = (raw.nodes.iter().zip(&influence))
        .map(|(node, &x)| match node.kind {
            NodeKind::Logit => node.probability.unwrap_or(0.0),
            _ => x as f32,
        })
        .collect();
    Ok(Pruned {
        nodes: (0..n as u32).filter(|&i| keep[i as usize]).collect(),
        influence,
        cumulative: cumulative.into_iter().map(|x| x as f32).collect(),
        edges,
        replacement_score: replacement as f32,
        completeness_score: completeness as f32,
        replacement_score_unpruned: replacement_unpruned as f32,
        completeness_score_unpruned: completeness_unpruned as f32,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::{BTreeSet, HashMap};

    use candle_core::{Device, Tensor};

    use super::*;
    use crate::graphs::Node;

    fn close(a: f64, b: f64, what: &str) {
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1e-6), "{what}: {a} vs circuit-tracer's {b}");
    }

    /// One case of the fixture as a raw graph, and circuit-tracer's results on it.
    pub(crate) struct Case {
        pub(crate) raw: RawGraph,
        pub(crate) settings: GraphSettings,
        kept: Vec<u32>,
        edges: BTreeSet<(u32, u32)>,
        influence: Vec<f64>,
        cumulative: Vec<f64>,
        scores: Vec<f64>,
    }

    pub(crate) fn cases() -> Vec<Case> {
        let path =
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/graph_prune_reference.safetensors");
        let t: HashMap<String, Tensor> = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
        let ints = |k: &str| -> Vec<i64> { t[k].flatten_all().unwrap().to_vec1().unwrap() };
        let reals = |k: &str| -> Vec<f64> { t[k].flatten_all().unwrap().to_vec1().unwrap() };
        (0..)
            .map_while(|c| {
                let key = |name: &str| format!("c{c}.{name}");
                t.contains_key(&key("kinds")).then(|| {
                    let probabilities = reals(&key("probabilities"));
                    let mut logit = 0;
                    let kinds = ints(&key("kinds"));
                    let nodes = (0..kinds.len())
                        .map(|i| {
                            let kind =
                                [NodeKind::Embedding, NodeKind::Feature, NodeKind::Error, NodeKind::Logit]
                                    [kinds[i] as usize];
                            let probability = (kind == NodeKind::Logit).then(|| {
                                logit += 1;
                                probabilities[logit - 1] as f32
                            });
                            Node {
                                kind,
                                layer: ints(&key("layers"))[i] as usize,
                                position: ints(&key("positions"))[i] as usize,
                                feature: ints(&key("features"))[i] as u32,
                                activation: reals(&key("activations"))[i] as f32,
                                probability,
                            }
                        })
                        .collect();
                    let raw = RawGraph {
                        nodes,
                        targets: ints(&key("targets")).iter().map(|&i| i as u32).collect(),
                        adjacency: reals(&key("adjacency")).iter().map(|&x| x as f32).collect(),
                        ..RawGraph::default()
                    };
                    let thresholds = reals(&key("settings"));
                    let edges = ints(&key("edges"));
                    Case {
                        raw,
                        settings: GraphSettings {
                            node_threshold: thresholds[0] as f32,
                            edge_threshold: thresholds[1] as f32,
                            ..GraphSettings::default()
                        },
                        kept: ints(&key("kept")).iter().map(|&i| i as u32).collect(),
                        edges: edges.chunks(2).map(|e| (e[0] as u32, e[1] as u32)).collect(),
                        influence: reals(&key("influence")),
                        cumulative: reals(&key("cumulative")),
                        scores: reals(&key("scores")),
                    }
                })
            })
            .collect()
    }

    /// Random graphs pruned and scored by circuit-tracer's own functions
    /// (`tests/fixtures/graph_prune_ref.py`): the same nodes and edges kept, the same influence
    /// and scores.
    #[test]
    fn prune_matches_circuit_tracer() {
        let cases = cases();
        assert_eq!(cases.len(), 4);
        for (c, case) in cases.iter().enumerate() {
            let pruned = prune(&case.raw, &case.settings).unwrap();
            assert_eq!(pruned.nodes, case.kept, "case {c}: kept nodes");
            let edges: BTreeSet<(u32, u32)> = pruned.edges.iter().map(|e| (e.0, e.1)).collect();
            assert_eq!(edges, case.edges, "case {c}: kept edges");
            assert_eq!(edges.len(), pruned.edges.len());
            for (i, node) in case.raw.nodes.iter().enumerate() {
                if node.kind != NodeKind::Logit {
                    close(pruned.influence[i].into(), case.influence[i], &format!("{c}: influence {i}"));
                } else {
                    assert_eq!(pruned.influence[i], node.probability.unwrap());
                }
                close(pruned.cumulative[i].into(), case.cumulative[i], &format!("{c}: cumulative {i}"));
            }
            let scores = [
                pruned.replacement_score_unpruned,
                pruned.completeness_score_unpruned,
                pruned.replacement_score,
                pruned.completeness_score,
            ];
            for (k, (&ours, &theirs)) in scores.iter().zip(&case.scores).enumerate() {
                close(ours.into(), theirs, &format!("case {c}: score {k}"));
            }
            // Edges keep their weights and are grouped by target.
            for &(s, t, w) in &pruned.edges {
                let row = case.raw.targets.iter().position(|&x| x == t).unwrap();
                assert_eq!(case.raw.row(row)[s as usize], w);
            }
            assert!(pruned.edges.windows(2).all(|p| {
                let row = |t| case.raw.targets.iter().position(|&x| x == t).unwrap();
                row(p[0].1) <= row(p[1].1)
            }));
        }
    }

    /// A cycle is an error, not a hang.
    #[test]
    fn cycle_is_an_error() {
        let node =
            |kind| Node { kind, layer: 0, position: 0, feature: 0, activation: 1.0, probability: None };
        let mut logit = node(NodeKind::Logit);
        logit.probability = Some(1.0);
        let raw = RawGraph {
            nodes: vec![node(NodeKind::Feature), node(NodeKind::Feature), logit],
            targets: vec![0, 1, 2],
            adjacency: vec![0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0],
            ..RawGraph::default()
        };
        let err = prune(&raw, &GraphSettings::default()).unwrap_err();
        assert!(err.to_string().contains("cycle"), "{err}");
    }
}

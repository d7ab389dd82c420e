//! Exactness and selection tests of [`super::attribute`] on tiny GPT-2 (and Gemma 3 270M,
//! ignored unless asked for) with random transcoders.

use std::path::Path;

use loupe_dict::transcoder::{Activation, TranscoderLayer, TranscoderSet};
use loupe_model::HookedModel;
use loupe_store::GraphSettings;

use super::super::replacement::{Replacement, Sources};
use super::super::{NodeKind, RawGraph};
use super::*;

/// xorshift64*: deterministic numbers without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D);
        (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn unit(&mut self, d: usize) -> Vec<f32> {
        let v: Vec<f32> = (0..d).map(|_| self.next()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / norm).collect()
    }
}

/// Random transcoders: `n` unit features per layer, TopK `k`, decoders scaled by `scale`;
/// `clt` decodes into every later layer, `skip` adds a skip connection.
pub fn random_set(
    n_layers: usize,
    d: usize,
    n: usize,
    k: usize,
    scale: f32,
    clt: bool,
    skip: bool,
) -> TranscoderSet {
    let mut rng = Rng::new(7);
    let layers = (0..n_layers)
        .map(|layer| {
            let w_enc: Vec<f32> = (0..n).flat_map(|_| rng.unit(d)).collect();
            let b_enc = (0..n).map(|_| rng.next() * 0.1).collect();
            let n_dec = if clt { n_layers - layer } else { 1 };
            let w_dec =
                (0..n_dec).map(|_| (0..n).flat_map(|_| rng.unit(d)).map(|x| x * scale).collect()).collect();
            let b_dec = (0..d).map(|_| rng.next() * 0.1).collect();
            let w_skip = skip.then(|| (0..d * d).map(|_| rng.next() * 0.05).collect());
            TranscoderLayer {
                layer,
                n_features: n,
                w_enc,
                b_enc,
                activation: Activation::TopK { k },
                w_dec,
                b_dec,
                w_skip,
            }
        })
        .collect();
    TranscoderSet {
        kind: if clt { "clt" } else { "plt" }.into(),
        names: vec!["random".into()],
        d_model: d,
        layers,
    }
}

fn tiny() -> Box<dyn HookedModel> {
    loupe_model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gpt2-tiny")).unwrap()
}

const TOKENS: [u32; 9] = [511, 17, 230, 45, 17, 230, 99, 3, 45];

fn settings(max_feature_nodes: u32, batch: u32) -> GraphSettings {
    GraphSettings {
        max_feature_nodes,
        batch,
        max_logits: 4,
        logit_probability: 0.99,
        ..GraphSettings::default()
    }
}

/// The largest relative gap between each row's sum plus its constant and its pre-activation.
fn completeness_gap(g: &RawGraph) -> f32 {
    let mut worst = 0f32;
    for t in 0..g.targets.len() {
        let row = g.row(t);
        let sum: f32 = row.iter().sum::<f32>() + g.bias[t];
        let scale = row.iter().map(|v| v.abs()).sum::<f32>() + g.bias[t].abs() + g.pre_activation[t].abs();
        worst = worst.max((sum - g.pre_activation[t]).abs() / scale.max(1e-6));
    }
    worst
}

/// Each edge against the frozen replacement model run with that one source removed: the model
/// is affine in its sources, so removing a source changes each target by exactly its edge.
/// Returns the largest gap relative to the target's row scale.
fn ablation_gap(rep: &Replacement, transcoders: &TranscoderSet, g: &RawGraph, sources: &[usize]) -> f32 {
    let targets: Vec<Target> = g
        .targets
        .iter()
        .map(|&t| {
            let node = &g.nodes[t as usize];
            match node.kind {
                NodeKind::Logit => {
                    rep.logit_targets(16, 1.0).unwrap().into_iter().find(|l| l.0 == node.feature).unwrap().3
                }
                _ => {
                    let i = rep
                        .active
                        .iter()
                        .position(|a| {
                            a.layer == node.layer && a.pos == node.position && a.feature == node.feature
                        })
                        .unwrap();
                    rep.feature_target(i, transcoders).unwrap()
                }
            }
        })
        .collect();
    let real = rep.real_sources();
    let full = rep.run(&real).unwrap();
    let base: Vec<f32> = targets.iter().map(|t| rep.target_value(&full, t).unwrap()).collect();
    for (t, b) in base.iter().enumerate() {
        assert!(
            (b - g.pre_activation[t]).abs() <= 1e-4 * (1.0 + b.abs()),
            "frozen forward {b} vs real {}",
            g.pre_activation[t]
        );
    }
    let mut worst = 0f32;
    for &s in sources {
        let node = &g.nodes[s];
        let mut src: Sources = real.clone();
        let zero_row = |t: &Tensor, p: usize| -> Tensor {
            let mut v = t.to_vec2::<f32>().unwrap();
            v[p].iter_mut().for_each(|x| *x = 0.0);
            Tensor::new(v, &Device::Cpu).unwrap()
        };
        match node.kind {
            NodeKind::Embedding => src.embed = zero_row(&src.embed, node.position),
            NodeKind::Error => src.errors[node.layer] = zero_row(&src.errors[node.layer], node.position),
            NodeKind::Feature => {
                let i = rep
                    .active
                    .iter()
                    .position(|a| {
                        a.layer == node.layer && a.pos == node.position && a.feature == node.feature
                    })
                    .unwrap();
                src.activations[i] = 0.0;
            }
            NodeKind::Logit => continue,
        }
        let run = rep.run(&src).unwrap();
        for (t, target) in targets.iter().enumerate() {
            let effect = base[t] - rep.target_value(&run, target).unwrap();
            let scale = g.row(t).iter().map(|v| v.abs()).fold(0f32, f32::max).max(1e-6);
            worst = worst.max((effect - g.row(t)[s]).abs() / scale);
        }
    }
    worst
}

fn check_exact(model: &dyn HookedModel, transcoders: &TranscoderSet, tokens: &[u32], every_source: bool) {
    let rep = Replacement::new(model.freeze(tokens).unwrap(), transcoders).unwrap();
    assert!(!rep.active.is_empty());
    let g =
        attribute_with(&rep, transcoders, tokens, &settings(u32::MAX, 5), INFLUENCE_ENTRIES, &()).unwrap();
    assert_eq!(g.nodes.iter().filter(|n| n.kind == NodeKind::Feature).count(), rep.active.len());
    assert_eq!(
        g.targets.len(),
        rep.active.len() + g.nodes.iter().filter(|n| n.kind == NodeKind::Logit).count()
    );
    let gap = completeness_gap(&g);
    assert!(gap <= 1e-4, "row sums + constants vs pre-activations: relative gap {gap}");
    let sources: Vec<usize> = if every_source {
        (0..g.nodes.len()).collect()
    } else {
        // Every embedding, a spread of features and errors.
        (0..g.nodes.len()).filter(|&s| g.nodes[s].kind == NodeKind::Embedding || s % 37 == 0).collect()
    };
    let gap = ablation_gap(&rep, transcoders, &g, &sources);
    assert!(gap <= 1e-4, "edges vs ablations in the frozen model: relative gap {gap}");
    // Causality: no edge from a later position or a layer at or after the target's.
    for (t, &target) in g.targets.iter().enumerate() {
        let tn = &g.nodes[target as usize];
        for (s, w) in g.row(t).iter().enumerate() {
            let sn = &g.nodes[s];
            let later = sn.position > tn.position
                || (sn.kind != NodeKind::Embedding && sn.layer >= tn.layer)
                || sn.kind == NodeKind::Logit;
            assert!(!later || *w == 0.0, "edge {sn:?} -> {tn:?} = {w}");
        }
    }
}

#[test]
fn tiny_gpt2_edges_are_exact() {
    let model = tiny();
    let c = model.config().clone();
    for (clt, skip) in [(false, false), (false, true), (true, true)] {
        let set = random_set(c.n_layers, c.d_model, 128, 6, 0.5, clt, skip);
        check_exact(model.as_ref(), &set, &TOKENS, true);
    }
}

/// circuit-tracer's selection written densely over full rows: logits first, then features by
/// partial influence, re-ranked every `UPDATE_INTERVAL` batches.
fn reference_selection(full: &RawGraph, seq: usize, n_active: usize, max: usize, batch: usize) -> Vec<usize> {
    let n = full.nodes.len();
    let n_logits = full.targets.len() - n_active;
    let probs: Vec<f64> = full.nodes[n - n_logits..].iter().map(|l| l.probability.unwrap() as f64).collect();
    // Row of feature i is row i; logit j's is n_active + j. Node of feature i is seq + i.
    let mut rows: Vec<usize> = (n_active..n_active + n_logits).collect();
    let mut visited = vec![false; n_active];
    let mut count = 0;
    while count < max {
        let mut prod = vec![0f64; n];
        for (j, p) in probs.iter().enumerate() {
            prod[n - n_logits + j] = *p;
        }
        let mut influence = vec![0f64; n];
        for _ in 0..128 {
            let mut next = vec![0f64; n];
            for &r in &rows {
                let row = full.row(r);
                let node = full.targets[r] as usize;
                let total: f64 = row.iter().map(|v| v.abs() as f64).sum::<f64>().max(1e-8);
                for (c, v) in row.iter().enumerate() {
                    next[c] += prod[node] * v.abs() as f64 / total;
                }
            }
            if next.iter().all(|v| *v == 0.0) {
                break;
            }
            influence.iter_mut().zip(&next).for_each(|(a, b)| *a += b);
            prod = next;
        }
        let mut rank: Vec<usize> = (0..n_active).filter(|&i| !visited[i]).collect();
        rank.sort_by(|a, b| influence[seq + *b].total_cmp(&influence[seq + *a]).then(a.cmp(b)));
        rank.truncate((UPDATE_INTERVAL * batch).min(max - count));
        for &i in &rank {
            visited[i] = true;
            rows.push(i);
        }
        count += rank.len();
    }
    (0..n_active).filter(|&i| visited[i]).collect()
}

#[test]
fn selection_follows_circuit_tracer() {
    let model = tiny();
    let c = model.config().clone();
    let set = random_set(c.n_layers, c.d_model, 128, 6, 0.5, false, true);
    let rep = Replacement::new(model.freeze(&TOKENS).unwrap(), &set).unwrap();
    let n_active = rep.active.len();
    let full =
        attribute_with(&rep, &set, &TOKENS, &settings(n_active as u32, 4), INFLUENCE_ENTRIES, &()).unwrap();
    // Every active feature is selected when they all fit.
    assert_eq!(full.nodes.iter().filter(|n| n.kind == NodeKind::Feature).count(), n_active);
    for max in [5, 20, n_active - 1] {
        let g =
            attribute_with(&rep, &set, &TOKENS, &settings(max as u32, 4), INFLUENCE_ENTRIES, &()).unwrap();
        let chosen: Vec<usize> = g
            .nodes
            .iter()
            .filter(|n| n.kind == NodeKind::Feature)
            .map(|n| {
                rep.active
                    .iter()
                    .position(|a| (a.layer, a.pos, a.feature) == (n.layer, n.position, n.feature))
                    .unwrap()
            })
            .collect();
        assert_eq!(chosen, reference_selection(&full, rep.seq, n_active, max, 4), "max {max}");
        assert_eq!(g.active_features, n_active as u64);
        // The selected rows equal the full graph's rows restricted to the kept columns.
        let keep: Vec<usize> = (0..full.nodes.len())
            .filter(|&s| full.nodes[s].kind != NodeKind::Feature || chosen.contains(&(s - rep.seq)))
            .collect();
        for (t, &target) in g.targets.iter().enumerate() {
            let node = &g.nodes[target as usize];
            let ft = full.targets.iter().position(|&x| &full.nodes[x as usize] == node).unwrap();
            for (j, &s) in keep.iter().enumerate() {
                assert!((g.row(t)[j] - full.row(ft)[s]).abs() <= 1e-5 * (1.0 + full.row(ft)[s].abs()));
            }
        }
    }
    // With rows truncated for the ranking, it still selects `max` distinct features.
    let g = attribute_with(&rep, &set, &TOKENS, &settings(20, 4), 3, &()).unwrap();
    assert_eq!(g.nodes.iter().filter(|n| n.kind == NodeKind::Feature).count(), 20);
}

#[test]
#[ignore = "needs ~/.cache/loupe/models/gemma-3-270m-q4_k_m.gguf"]
fn gemma_edges_are_exact() {
    let home = std::env::var("HOME").unwrap();
    let model =
        loupe_model::load(&Path::new(&home).join(".cache/loupe/models/gemma-3-270m-q4_k_m.gguf")).unwrap();
    let c = model.config().clone();
    let set = random_set(c.n_layers, c.d_model, 256, 4, 2.0, false, false);
    // "<bos>The cat sat on the mat because"
    let tokens = [2, 818, 5866, 3497, 580, 506, 2883, 1547];
    check_exact(model.as_ref(), &set, &tokens, false);
    let clt = random_set(c.n_layers, c.d_model, 64, 2, 2.0, true, true);
    check_exact(model.as_ref(), &clt, &tokens, false);
}

/// Peak resident memory so far, from `/proc/self/status` (GiB).
fn peak_rss_gib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    kb / (1024.0 * 1024.0)
}

/// Wall time and peak memory of one graph on Gemma 3 270M: `LOUPE_GRAPH_TOKENS` tokens (default
/// 64), `LOUPE_GRAPH_MAX_FEATURES` (default 7500), `LOUPE_GRAPH_BATCH` (256), random TopK-16 transcoders of 2048 unit
/// features per layer. Run one size per process (peak memory is per process).
#[test]
#[ignore = "needs ~/.cache/loupe/models/gemma-3-270m-q4_k_m.gguf; prints wall time and peak RSS"]
fn gemma_graph_cost() {
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let (n_tokens, max) = (env("LOUPE_GRAPH_TOKENS", 64), env("LOUPE_GRAPH_MAX_FEATURES", 7500));
    let batch = env("LOUPE_GRAPH_BATCH", 256) as u32;
    let home = std::env::var("HOME").unwrap();
    let model =
        loupe_model::load(&Path::new(&home).join(".cache/loupe/models/gemma-3-270m-q4_k_m.gguf")).unwrap();
    let c = model.config().clone();
    let set = random_set(c.n_layers, c.d_model, 2048, 16, 1.0, false, false);
    let mut rng = Rng::new(3);
    let tokens: Vec<u32> = std::iter::once(2)
        .chain((1..n_tokens).map(|_| 1000 + ((rng.next() + 1.0) * 20_000.0) as u32))
        .collect();
    let before = peak_rss_gib();
    let start = std::time::Instant::now();
    let settings = GraphSettings { max_feature_nodes: max as u32, batch, ..GraphSettings::default() };
    let g = attribute(model.as_ref(), &set, &tokens, &settings, &()).unwrap();
    let wall = start.elapsed().as_secs_f64();
    println!(
        "gemma graph: {n_tokens} tokens, batch {batch}, {} active features, {} selected, {} targets x {} nodes: {wall:.1} s, peak RSS {:.2} GiB (model loaded: {before:.2} GiB)",
        g.active_features,
        g.nodes.iter().filter(|n| n.kind == NodeKind::Feature).count(),
        g.targets.len(),
        g.nodes.len(),
        peak_rss_gib()
    );
    assert!(completeness_gap(&g) <= 1e-3 || (max as u64) < g.active_features);
}

//! Each fast method against the patching ground truth, as [`loupe_store::circuits::EvalRow`]s
//! and [`FaithfulnessRow`]s.
//!
//! - Node ROC AUC of |score| (ties count a half; NaN where a class is empty), with two
//!   definitions of a positive node: the top 10 % by |ground-truth effect| (⌈n / 10⌉ nodes, ties
//!   by node order), and |effect| ≥ 0.05.
//! - Edge ROC AUC, only for a method with edge scores, over the edges it scores (discrete-SAE:
//!   head → head, as in the paper; attribution: every edge). Patching computes no edge effects, so
//!   an edge is a ground-truth positive when both its endpoints are positive nodes (under the same
//!   definition): that is how the canonical circuits' edges are drawn (IOI, greater-than).
//! - Faithfulness (MIB, Mueller et al. 2025): the top k % of nodes by the method's |score| kept
//!   (⌊k·n / 100⌋ of them, as MIB's `int(pct · n)`; ties by node order), every other node patched
//!   from the corrupt run ([`Runs::patched_metric`]), f = (m(C) − m(∅)) / (m(N) − m(∅)), m(N) with
//!   nothing patched and m(∅) with every node patched, all three from the same kind of pass, so
//!   f(100 %) = 1 exactly.
//! - CPR = the trapezoid area under f against k / 100 over the k of [`K_PERCENT`] (1 % to 100 %:
//!   at most 0.99, no normalisation — MIB's `area_under` on a linear axis); CMD = the same area of
//!   |1 − f| (MIB's `area_from_1`).
//!
//! The ground truth gets a row too (method `patching`, its own effects as scores), so the table
//! shows its faithfulness beside the others'.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use loupe_model::HookedModel;
use loupe_store::Progress;
use loupe_store::circuits::{EvalRow, FaithfulnessRow};

use super::patch::Runs;
use super::{Scores, Task};

/// The k (percent of nodes kept) of the faithfulness curve.
pub const K_PERCENT: [f32; 7] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0];
/// Share of nodes that are positive under the first definition.
pub const TOP_FRACTION: f64 = 0.1;
/// |effect| at which a node is positive under the second definition.
pub const ABS_THRESHOLD: f32 = 0.05;

/// ROC AUC of `scores` for `positive` (ties count a half); `None` when a class is empty.
///
/// The Mann–Whitney statistic from average ranks: the share of (positive, negative) pairs where
/// the positive scores higher, ties a half.
pub fn roc_auc(scores: &[f32], positive: &[bool]) -> Option<f32> {
    let n_pos = positive.iter().filter(|&&p| p).count();
    let n_neg = positive.len() - n_pos;
    if n_pos == 0 || n_neg == 0 || scores.len() != positive.len() {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut rank_sum = 0.0f64; // sum of the positives' (1-based, tie-averaged) ranks
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += rank * order[i..=j].iter().filter(|&&k| positive[k]).count() as f64;
        i = j + 1;
    }
    let (p, n) = (n_pos as f64, n_neg as f64);
    Some(((rank_sum - p * (p + 1.0) / 2.0) / (p * n)) as f32)
}

/// Indices of `scores` by |score|, largest first, ties in index order.
fn by_magnitude(scores: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].abs().total_cmp(&scores[a].abs()));
    order
}

/// Positive nodes, first definition: the ⌈n·[`TOP_FRACTION`]⌉ largest |effect|.
pub fn positives_top(truth: &[f32]) -> Vec<bool> {
    let count = (truth.len() as f64 * TOP_FRACTION).ceil() as usize;
    let mut positive = vec![false; truth.len()];
    for i in by_magnitude(truth).into_iter().take(count) {
        positive[i] = true;
    }
    positive
}

/// Positive nodes, second definition: |effect| ≥ [`ABS_THRESHOLD`].
pub fn positives_abs(truth: &[f32]) -> Vec<bool> {
    truth.iter().map(|t| t.abs() >= ABS_THRESHOLD).collect()
}

/// Positive edges: both endpoints positive nodes.
pub fn edge_positives(edges: &[(usize, usize, f32)], node_positive: &[bool]) -> Vec<bool> {
    edges.iter().map(|&(u, v, _)| node_positive[u] && node_positive[v]).collect()
}

/// How many of `n` nodes the top `k` percent keeps: ⌊k·n / 100⌋.
pub fn kept(k: f32, n: usize) -> usize {
    // The epsilon keeps e.g. 29 % of 100 at 29 despite 0.29 · 100 = 28.999….
    ((f64::from(k) * n as f64 / 100.0) + 1e-9).floor().min(n as f64) as usize
}

/// f(k) for each k of `k_percent`: the top k % of nodes by |`node_scores`| kept.
pub fn faithfulness(
    model: &dyn HookedModel,
    task: &Task,
    runs: &Runs,
    node_scores: &[f32],
    k_percent: &[f32],
) -> Result<Vec<f32>> {
    let all = super::nodes(model.config());
    if node_scores.len() != all.len() {
        bail!("{} node scores for a model of {} nodes", node_scores.len(), all.len());
    }
    let order = by_magnitude(node_scores);
    let mut metric_kept: BTreeMap<usize, f32> = BTreeMap::new();
    let mut metric = |keep: usize| -> Result<f32> {
        if let Some(&m) = metric_kept.get(&keep) {
            return Ok(m);
        }
        let patched: Vec<_> = order[keep..].iter().map(|&i| all[i]).collect();
        let m = runs.patched_metric(model, task, &patched)?;
        metric_kept.insert(keep, m);
        Ok(m)
    };
    let (full, empty) = (metric(all.len())?, metric(0)?);
    if full == empty {
        bail!("the metric is the same with nothing and with everything patched: faithfulness is undefined");
    }
    k_percent
        .iter()
        .map(|&k| {
            let f = (metric(kept(k, all.len()))? - empty) / (full - empty);
            Ok(if f == 0.0 { 0.0 } else { f }) // not −0
        })
        .collect()
}

/// CPR and CMD of a faithfulness curve `f` at `k_percent`: trapezoid areas of f and of |1 − f|
/// against k / 100.
pub fn areas(k_percent: &[f32], f: &[f32]) -> (f32, f32) {
    let (mut cpr, mut cmd) = (0.0f64, 0.0f64);
    for i in 1..k_percent.len().min(f.len()) {
        let dx = f64::from(k_percent[i] - k_percent[i - 1]) / 100.0;
        let (a, b) = (f64::from(f[i - 1]), f64::from(f[i]));
        cpr += dx * (a + b) / 2.0;
        cmd += dx * ((1.0 - a).abs() + (1.0 - b).abs()) / 2.0;
    }
    (cpr as f32, cmd as f32)
}

/// One method to compare: its name, scores and wall time (seconds).
#[derive(Clone, Copy, Debug)]
pub struct Compared<'a> {
    pub method: &'a str,
    pub scores: &'a Scores,
    pub wall_s: f64,
}

/// Each method of `methods` (and the ground truth `truth`, node effects in [`super::nodes`]
/// order, which took `truth_wall_s`) against the ground truth: one [`EvalRow`] each, patching
/// first, and their faithfulness curves at [`K_PERCENT`].
pub fn evaluate(
    model: &dyn HookedModel,
    task: &Task,
    runs: &Runs,
    truth: &[f32],
    truth_wall_s: f64,
    methods: &[Compared],
    progress: &dyn Progress,
) -> Result<(Vec<EvalRow>, Vec<FaithfulnessRow>)> {
    let all = super::nodes(model.config());
    if truth.len() != all.len() {
        bail!("{} ground-truth effects for a model of {} nodes", truth.len(), all.len());
    }
    let truth_scores = Scores { nodes: all.clone(), node_scores: truth.to_vec(), edges: Vec::new() };
    let ground = Compared { method: "patching", scores: &truth_scores, wall_s: truth_wall_s };
    let (top, abs) = (positives_top(truth), positives_abs(truth));
    let (mut rows, mut curves) = (Vec::new(), Vec::new());
    progress.stage("faithfulness");
    let compared: Vec<Compared> = std::iter::once(ground).chain(methods.iter().copied()).collect();
    for (done, m) in compared.iter().enumerate() {
        if m.scores.nodes != all {
            bail!("the {} scores are of other nodes than the model's", m.method);
        }
        let magnitude: Vec<f32> = m.scores.node_scores.iter().map(|s| s.abs()).collect();
        let node_auc = |positive: &[bool]| roc_auc(&magnitude, positive).unwrap_or(f32::NAN);
        let edge_auc = |positive: &[bool]| {
            if m.scores.edges.is_empty() {
                return None;
            }
            let scores: Vec<f32> = m.scores.edges.iter().map(|e| e.2.abs()).collect();
            Some(roc_auc(&scores, &edge_positives(&m.scores.edges, positive)).unwrap_or(f32::NAN))
        };
        let f = faithfulness(model, task, runs, &m.scores.node_scores, &K_PERCENT)?;
        let (cpr, cmd) = areas(&K_PERCENT, &f);
        rows.push(EvalRow {
            method: m.method.to_string(),
            node_auc_top10: node_auc(&top),
            node_auc_abs: node_auc(&abs),
            edge_auc_top10: edge_auc(&top),
            edge_auc_abs: edge_auc(&abs),
            cpr,
            cmd,
            wall_s: m.wall_s as f32,
            speedup: (truth_wall_s / m.wall_s) as f32,
        });
        curves.extend(K_PERCENT.iter().zip(&f).map(|(&k, &f)| FaithfulnessRow {
            method: m.method.to_string(),
            k,
            f,
        }));
        progress.set(done as u64 + 1, compared.len() as u64);
    }
    Ok((rows, curves))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::circuits::{Metric, Pair};

    /// The AUC by definition: every (positive, negative) pair, ties a half.
    fn brute_force(scores: &[f32], positive: &[bool]) -> f32 {
        let (mut won, mut pairs) = (0.0f64, 0.0f64);
        for (i, &p) in positive.iter().enumerate() {
            for (j, &q) in positive.iter().enumerate() {
                if p && !q {
                    pairs += 1.0;
                    won += match scores[i].total_cmp(&scores[j]) {
                        std::cmp::Ordering::Greater => 1.0,
                        std::cmp::Ordering::Equal => 0.5,
                        std::cmp::Ordering::Less => 0.0,
                    };
                }
            }
        }
        (won / pairs) as f32
    }

    #[test]
    fn roc_auc_counts_pairs_with_ties_a_half() {
        assert_eq!(roc_auc(&[0.9, 0.1, 0.5], &[true, false, false]), Some(1.0));
        assert_eq!(roc_auc(&[0.1, 0.9], &[true, false]), Some(0.0));
        assert_eq!(roc_auc(&[0.5, 0.5, 0.5], &[true, false, true]), Some(0.5));
        assert_eq!(roc_auc(&[1.0, 2.0], &[true, true]), None);
        let mut next = crate::heads::detectors::splitmix64(3);
        for trial in 0..50 {
            let n = 2 + trial % 40;
            // Few distinct values, so that ties are common.
            let scores: Vec<f32> = (0..n).map(|_| (next() % 7) as f32 * 0.25).collect();
            let positive: Vec<bool> = (0..n).map(|_| next().is_multiple_of(3)).collect();
            match roc_auc(&scores, &positive) {
                Some(auc) => assert!((auc - brute_force(&scores, &positive)).abs() < 1e-6, "trial {trial}"),
                None => assert!(positive.iter().all(|&p| p) || positive.iter().all(|&p| !p)),
            }
        }
    }

    #[test]
    fn positives_kept_counts_and_areas() {
        let truth = [0.01, -0.5, 0.2, 0.04, 0.06, 0.0, -0.05, 0.3, 0.1, 0.02, 0.5];
        // ⌈11 / 10⌉ = 2: |−0.5| and |0.5| tie, both in.
        let top = positives_top(&truth);
        assert_eq!(top.iter().filter(|&&p| p).count(), 2);
        assert!(top[1] && top[10]);
        let top3 = positives_top(&truth[..10]);
        assert_eq!(top3.iter().enumerate().filter(|&(_, &p)| p).map(|(i, _)| i).collect::<Vec<_>>(), [1]);
        let abs = positives_abs(&truth);
        assert_eq!(abs.iter().filter(|&&p| p).count(), 7);
        assert!(abs[6] && !abs[3]);
        assert_eq!(edge_positives(&[(1, 2, 0.3), (1, 3, 0.9)], &abs), [true, false]);
        assert_eq!([1.0, 2.0, 5.0, 10.0, 29.0, 100.0].map(|k| kept(k, 100)), [1, 2, 5, 10, 29, 100]);
        assert_eq!(K_PERCENT.map(|k| kept(k, 90)), [0, 1, 4, 9, 18, 45, 90]);
        let (cpr, cmd) = areas(&K_PERCENT, &[1.0; 7]);
        assert!((cpr - 0.99).abs() < 1e-6 && cmd.abs() < 1e-9);
        let (cpr, cmd) = areas(&[0.0, 50.0, 100.0], &[0.0, 0.5, 1.0]);
        assert!((cpr - 0.5).abs() < 1e-6 && (cmd - 0.5).abs() < 1e-6);
        let (cpr, cmd) = areas(&[0.0, 100.0], &[2.0, 0.0]);
        assert!((cpr - 1.0).abs() < 1e-6 && (cmd - 1.0).abs() < 1e-6);
    }

    fn tiny() -> Box<dyn HookedModel> {
        loupe_model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gpt2-tiny"))
            .unwrap()
    }

    fn task() -> Task {
        let pair =
            |clean: Vec<u32>, corrupt: Vec<u32>| Pair { clean, corrupt, answers: vec![7], wrongs: vec![9] };
        Task {
            file: "t.jsonl".into(),
            sha256: String::new(),
            metric: Metric::LogitDiff,
            pairs: vec![
                pair(vec![511, 3, 4, 5, 3], vec![511, 3, 6, 5, 3]),
                pair(vec![511, 8, 2], vec![511, 1, 2]),
            ],
        }
    }

    /// On tiny GPT-2 (10 nodes): everything kept is f = 1 exactly, nothing kept f = 0 exactly, one
    /// node kept equals that node alone unpatched by the slow path.
    #[test]
    fn faithfulness_endpoints_on_tiny_gpt2() {
        let (model, task) = (tiny(), task());
        let runs = Runs::new(model.as_ref(), &task).unwrap();
        let all = crate::circuits::nodes(model.config());
        let scores: Vec<f32> = (0..all.len()).map(|i| if i == 3 { -2.0 } else { 0.1 * i as f32 }).collect();
        let f = faithfulness(model.as_ref(), &task, &runs, &scores, &[0.0, 10.0, 50.0, 100.0]).unwrap();
        assert_eq!(f[0], 0.0);
        assert_eq!(f[3], 1.0);
        let m =
            |patched: &[crate::circuits::Node]| runs.patched_metric(model.as_ref(), &task, patched).unwrap();
        let (full, empty) = (m(&[]), m(&all));
        // 10 % of 10 nodes: node 3 (|−2| is the largest) kept.
        let rest: Vec<_> = all.iter().enumerate().filter(|&(i, _)| i != 3).map(|(_, n)| *n).collect();
        assert!((f[1] - (m(&rest) - empty) / (full - empty)).abs() < 1e-6);
        // 50 %: nodes 3, 9, 8, 7, 6 kept (ties by node order would matter only among equals).
        let rest: Vec<_> =
            all.iter().enumerate().filter(|&(i, _)| ![3, 9, 8, 7, 6].contains(&i)).map(|(_, n)| *n).collect();
        assert!((f[2] - (m(&rest) - empty) / (full - empty)).abs() < 1e-6);
        assert!(faithfulness(model.as_ref(), &task, &runs, &scores[1..], &[10.0]).is_err());
    }

    /// `evaluate` on tiny GPT-2 with hand-made scores: patching first with AUC 1 and speed-up 1,
    /// a method equal to the ground truth scores the same, one without edges has no edge AUC.
    #[test]
    fn evaluate_rows_and_curves() {
        let (model, task) = (tiny(), task());
        let runs = Runs::new(model.as_ref(), &task).unwrap();
        let all = crate::circuits::nodes(model.config());
        let truth: Vec<f32> =
            all.iter().map(|n| runs.patched_metric(model.as_ref(), &task, &[*n]).unwrap()).collect();
        let clean = crate::circuits::patch::mean(&runs.metric_clean);
        let corrupt = crate::circuits::patch::mean(&runs.metric_corrupt);
        let truth: Vec<f32> = truth.iter().map(|m| (m - clean) / (corrupt - clean)).collect();
        let copy = Scores {
            nodes: all.clone(),
            node_scores: truth.clone(),
            edges: crate::circuits::edges(&all)
                .into_iter()
                .map(|(u, v)| (u, v, truth[u] * truth[v]))
                .collect(),
        };
        let flat = Scores { nodes: all.clone(), node_scores: vec![1.0; all.len()], edges: Vec::new() };
        let methods = [
            Compared { method: "attribution", scores: &copy, wall_s: 0.5 },
            Compared { method: "discrete-sae", scores: &flat, wall_s: 2.0 },
        ];
        let (rows, curves) = evaluate(model.as_ref(), &task, &runs, &truth, 4.0, &methods, &()).unwrap();
        assert_eq!(
            rows.iter().map(|r| r.method.as_str()).collect::<Vec<_>>(),
            ["patching", "attribution", "discrete-sae"]
        );
        assert_eq!((rows[0].node_auc_top10, rows[0].speedup, rows[0].edge_auc_top10), (1.0, 1.0, None));
        assert_eq!((rows[1].cpr, rows[1].cmd, rows[1].speedup), (rows[0].cpr, rows[0].cmd, 8.0));
        assert_eq!(rows[1].node_auc_top10, 1.0);
        assert!(rows[1].edge_auc_top10.is_some());
        assert_eq!((rows[2].node_auc_top10, rows[2].edge_auc_abs, rows[2].speedup), (0.5, None, 2.0));
        assert_eq!(curves.len(), 3 * K_PERCENT.len());
        assert!(curves.iter().filter(|c| c.k == 100.0).all(|c| c.f == 1.0));
    }
}

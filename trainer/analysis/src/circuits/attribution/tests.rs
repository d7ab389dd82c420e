//! Attribution patching against finite differences on the tiny GPT-2 fixture: a node's score is
//! the derivative of m along the node's output moved towards the corrupt run's, an edge's the
//! derivative along v's private input moved by u's corrupt residual change.

use loupe_model::hooks::{in_block, names};
use loupe_model::{HookedModel, Hooks, Intervention};

use super::*;
use crate::circuits::patch::{mean, metrics};
use crate::circuits::patching::tests::{task, tiny};
use crate::circuits::{Metric, Node};

/// The step of the finite differences: large enough that f32 rounding of the metric stays well
/// below 1e-3 of the derivative, small enough that the O(ε⁴) error does too.
const EPS: f64 = 0.1;

/// The mean metric of a full clean forward with `hooks`.
fn metric_with(model: &dyn HookedModel, task: &Task, runs: &Runs, hooks: Hooks) -> f64 {
    let mut hooks = hooks.skip_unembed();
    let hidden = model.forward(&runs.clean, &mut hooks).unwrap().unwrap();
    f64::from(mean(&metrics(model, task, &hidden, &runs.last).unwrap()))
}

/// d f(e)/de at 0: central differences, Richardson-extrapolated (error O(ε⁴)).
fn derivative(f: impl Fn(f64) -> f64, eps: f64) -> f64 {
    let d = |e: f64| (f(e) - f(-e)) / (2.0 * e);
    (4.0 * d(eps / 2.0) - d(eps)) / 3.0
}

/// Head `h`'s one-hot mask `[1, 1, heads, 1]`.
fn head_mask(heads: usize, h: usize) -> Tensor {
    let m: Vec<f32> = (0..heads).map(|i| f32::from(u8::from(i == h))).collect();
    Tensor::from_vec(m, (1, 1, heads, 1), &Device::Cpu).unwrap()
}

/// m with `node`'s output at clean + e · (corrupt − clean).
fn node_moved(model: &dyn HookedModel, task: &Task, runs: &Runs, node: Node, e: f64) -> f64 {
    let l = node.layer;
    let hooks = match node.head {
        Some(h) => {
            let dz = (&runs.corrupt_z[l] - &runs.clean_z[l]).unwrap();
            let dz = (dz.broadcast_mul(&head_mask(model.config().n_heads, h)).unwrap() * e).unwrap();
            Hooks::new().intervene(in_block(l, names::Z), Intervention::Add(dz))
        }
        None => {
            let dm = ((&runs.corrupt_mlp[l] - &runs.clean_mlp[l]).unwrap() * e).unwrap();
            Hooks::new().intervene(in_block(l, names::MLP_OUT), Intervention::Add(dm))
        }
    };
    metric_with(model, task, runs, hooks)
}

/// m with `v`'s private input moved by `delta` (v alone reads it; the rest of the pass is the
/// clean run's).
fn input_moved(model: &dyn HookedModel, task: &Task, runs: &Runs, v: Node, delta: &Tensor) -> f64 {
    let l = v.layer;
    let (input, output) = match v.head {
        Some(_) => (names::RESID_PRE, names::Z),
        None => (names::RESID_MID, names::MLP_OUT),
    };
    let mut moved = Hooks::new()
        .intervene(in_block(l, input), Intervention::Add(delta.clone()))
        .capture(in_block(l, output))
        .stop_after_layer(l);
    model.forward(&runs.clean, &mut moved).unwrap();
    let out = moved.get(&in_block(l, output)).unwrap().clone();
    let hooks = match v.head {
        Some(h) => {
            let dz = (out - &runs.clean_z[l])
                .unwrap()
                .broadcast_mul(&head_mask(model.config().n_heads, h))
                .unwrap();
            Hooks::new().intervene(in_block(l, names::Z), Intervention::Add(dz))
        }
        None => Hooks::new().intervene(in_block(l, names::MLP_OUT), Intervention::Replace(out)),
    };
    metric_with(model, task, runs, hooks)
}

/// Relative error ≤ 1e-3; scores under 1 % of the largest (`scale`) are held to 1e-3 of that
/// 1 % (f32 rounding of the metric is the floor there).
fn close(what: &str, score: f32, fd: f64, scale: f32) {
    let err = (f64::from(score) - fd).abs();
    let tol = 1e-3 * fd.abs().max(0.01 * f64::from(scale));
    assert!(err <= tol, "{what}: attribution {score}, finite differences {fd} (error {err:.2e})");
}

fn largest(scores: &[f32]) -> f32 {
    scores.iter().fold(0f32, |m, s| m.max(s.abs()))
}

/// Node scores are the first-order term of moving the node's output towards the corrupt run's.
#[test]
fn node_scores_equal_finite_differences() {
    let model = tiny();
    for metric in [Metric::LogitDiff, Metric::ProbDiff] {
        let task = task(metric);
        let runs = Runs::new(model.as_ref(), &task).unwrap();
        let (_, denom) = normaliser(&runs).unwrap();
        let scores = attribution(model.as_ref(), &task, &runs, &()).unwrap();
        for (node, &score) in scores.nodes.iter().zip(&scores.node_scores) {
            let fd =
                derivative(|e| node_moved(model.as_ref(), &task, &runs, *node, e), EPS) / f64::from(denom);
            close(&format!("{metric:?} {node}"), score, fd, largest(&scores.node_scores));
        }
    }
}

/// Edge scores are the first-order term of moving v's private input by u's corrupt change.
#[test]
fn edge_scores_equal_finite_differences() {
    let model = tiny();
    let task = task(Metric::LogitDiff);
    let runs = Runs::new(model.as_ref(), &task).unwrap();
    let (_, denom) = normaliser(&runs).unwrap();
    let scores = attribution(model.as_ref(), &task, &runs, &()).unwrap();
    assert_eq!(scores.edges.len(), crate::circuits::edges(&scores.nodes).len());
    let hook = in_block(model.config().n_layers - 1, names::RESID_POST);
    let clean = model.residual_components(&runs.clean, &hook).unwrap();
    let corrupt = model.residual_components(&runs.corrupt, &hook).unwrap();
    let term = |terms: &[(String, Tensor)], n: &str| terms.iter().find(|(k, _)| k == n).unwrap().1.clone();
    let scale = largest(&scores.edges.iter().map(|e| e.2).collect::<Vec<_>>());
    for &(u, v, score) in &scores.edges {
        let (u, v) = (scores.nodes[u], scores.nodes[v]);
        let delta = (term(&corrupt, &u.to_string()) - term(&clean, &u.to_string())).unwrap();
        let f = |e: f64| input_moved(model.as_ref(), &task, &runs, v, &(&delta * e).unwrap());
        let fd = derivative(f, EPS) / f64::from(denom);
        close(&format!("{u} -> {v}"), score, fd, scale);
    }
}

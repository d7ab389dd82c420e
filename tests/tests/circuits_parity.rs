//! Activation patching of circuit nodes against the PyTorch reference
//! (tests/fixtures/circuits_ref.py, forward hooks on the output projection's input and the MLP's
//! output): every pair's clean and corrupt metric and every node's normalised effect, through
//! `patch::Runs::patched_metric` node by node and through `circuits::patching::patching`, on the
//! tiny GPT-2 within 1e-4 and on Gemma 3 270M (4 IOI pairs) within 1e-3 (absolute).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use loupe_analysis::circuits::patch::{Runs, mean};
use loupe_analysis::circuits::patching::patching;
use loupe_analysis::circuits::{Metric, Node, Pair, Task, nodes};
use loupe_model::{self as model, HookedModel};
use loupe_tests::{fixture, gemma_gguf};

fn reference(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(rel), &Device::Cpu).unwrap()
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::U32).unwrap().to_vec1().unwrap()
}

fn floats(reference: &HashMap<String, Tensor>, key: &str) -> Vec<f32> {
    reference[key].to_vec1().unwrap()
}

/// The reference's pairs as a logit-difference task.
fn task_of(reference: &HashMap<String, Tensor>) -> Task {
    let (answers, wrongs) = (ids(&reference["answers"]), ids(&reference["wrongs"]));
    let pairs = (0..answers.len())
        .map(|i| Pair {
            clean: ids(&reference[&format!("pair.{i}.clean")]),
            corrupt: ids(&reference[&format!("pair.{i}.corrupt")]),
            answers: vec![answers[i]],
            wrongs: vec![wrongs[i]],
        })
        .collect();
    Task { file: "reference".into(), sha256: String::new(), metric: Metric::LogitDiff, pairs }
}

/// Compare two vectors entry by entry, naming the worst one; panic past `tol`.
fn check(what: &str, ours: &[f32], theirs: &[f32], name: impl Fn(usize) -> String, tol: f32) {
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{what}: {} values vs {} in the reference",
        ours.len(),
        theirs.len()
    );
    let (worst, diff) = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold((0, 0.0f32), |best, (i, d)| if d > best.1 || d.is_nan() { (i, d) } else { best });
    println!(
        "{what}: max abs diff {diff:e} at {} (ours {}, reference {})",
        name(worst),
        ours[worst],
        theirs[worst]
    );
    assert!(
        diff <= tol,
        "{what} at {}: {} vs reference {} (diff {diff:e} > {tol:e})",
        name(worst),
        ours[worst],
        theirs[worst]
    );
}

/// The runs' metrics equal the reference's; return the task and runs for the effects.
fn runs_match(model: &dyn HookedModel, reference: &HashMap<String, Tensor>, tol: f32) -> (Task, Runs) {
    let task = task_of(reference);
    let runs = Runs::new(model, &task).unwrap();
    let pair = |i: usize| format!("pair {i}");
    check("clean metric", &runs.metric_clean, &floats(reference, "metric_clean"), pair, tol);
    check("corrupt metric", &runs.metric_corrupt, &floats(reference, "metric_corrupt"), pair, tol);
    (task, runs)
}

/// Each node patched alone with `Runs::patched_metric`: the mean metric and the effect equal the
/// reference's.
fn naive_effects_match(model: &dyn HookedModel, reference: &HashMap<String, Tensor>, tol: f32) {
    let (task, runs) = runs_match(model, reference, tol);
    let all = nodes(model.config());
    let (clean, corrupt) = (mean(&runs.metric_clean), mean(&runs.metric_corrupt));
    let patched: Vec<f32> = all.iter().map(|n| runs.patched_metric(model, &task, &[*n]).unwrap()).collect();
    let effects: Vec<f32> = patched.iter().map(|m| (m - clean) / (corrupt - clean)).collect();
    let name = |i: usize| all[i].to_string();
    check("patched metric", &patched, &floats(reference, "patched_metric"), name, tol);
    check("effect", &effects, &floats(reference, "effects"), name, tol);
}

/// `circuits::patching::patching` (layers before the node not recomputed) equals the reference.
fn patching_matches(model: &dyn HookedModel, reference: &HashMap<String, Tensor>, tol: f32) {
    let (task, runs) = runs_match(model, reference, tol);
    let all: Vec<Node> = nodes(model.config());
    let effects = patching(model, &task, &runs, &()).unwrap();
    check("effect", &effects, &floats(reference, "effects"), |i| all[i].to_string(), tol);
}

fn gpt2() -> (Box<dyn HookedModel>, HashMap<String, Tensor>) {
    (model::load(&fixture("gpt2-tiny")).unwrap(), reference("gpt2-tiny/circuits_reference.safetensors"))
}

fn gemma() -> (Box<dyn HookedModel>, HashMap<String, Tensor>) {
    (model::load(&gemma_gguf()).unwrap(), reference("gemma3/circuits_reference.safetensors"))
}

#[test]
fn gpt2_tiny_node_patching_matches_pytorch() {
    let (model, reference) = gpt2();
    naive_effects_match(model.as_ref(), &reference, 1e-4);
}

#[test]
fn gpt2_tiny_patching_matches_pytorch() {
    let (model, reference) = gpt2();
    patching_matches(model.as_ref(), &reference, 1e-4);
}

#[test]
fn gemma3_node_patching_matches_pytorch() {
    let (model, reference) = gemma();
    naive_effects_match(model.as_ref(), &reference, 1e-3);
}

#[test]
fn gemma3_patching_matches_pytorch() {
    let (model, reference) = gemma();
    patching_matches(model.as_ref(), &reference, 1e-3);
}

/// The fixtures have the documented layout: pairs of equal length starting at BOS, the clean and
/// corrupt metrics apart (so the effects are well defined), one effect per node of the model.
#[test]
fn circuit_fixtures_have_the_documented_layout() {
    for (rel, bos, n_nodes) in [
        ("gpt2-tiny/circuits_reference.safetensors", 511, 2 * 5),
        ("gemma3/circuits_reference.safetensors", 2, 18 * 5),
    ] {
        let reference = reference(rel);
        let task = task_of(&reference);
        assert!(task.pairs.len() >= 3, "{rel}");
        for pair in &task.pairs {
            assert_eq!(pair.clean.len(), pair.corrupt.len(), "{rel}");
            assert_eq!((pair.clean[0], pair.corrupt[0]), (bos, bos), "{rel}");
            assert_ne!(pair.clean, pair.corrupt, "{rel}");
        }
        let (clean, corrupt) = (floats(&reference, "metric_clean"), floats(&reference, "metric_corrupt"));
        assert!((mean(&clean) - mean(&corrupt)).abs() > 1.0, "{rel}: clean and corrupt metrics too close");
        assert_eq!(reference["effects"].dims(), &[n_nodes], "{rel}");
        assert_eq!(reference["patched_metric"].dims(), &[n_nodes], "{rel}");
    }
}

//! Head detector scores and single-head ablations (`loupe_analysis::heads`) against the PyTorch
//! reference that follows TransformerLens' definitions (tests/fixtures/heads_ref.py): every head's
//! six detector scores, the clean loss and the zero and mean ablation deltas, on the tiny GPT-2
//! within 1e-4 and on Gemma 3 270M within 1e-3 (absolute).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use loupe_analysis::heads::ablation::ablations;
use loupe_analysis::heads::detectors::{DetectorScores, detector_scores};
use loupe_model::{self as model, HookedModel};
use loupe_tests::{fixture, gemma_gguf};

/// The reference file's tensors.
fn reference(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(rel), &Device::Cpu).unwrap()
}

fn ids(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::U32).unwrap().to_vec1().unwrap()
}

/// The repeated sequences (rows of `repeated.ids`), |R| and the text sequences `text.{i}.ids`.
fn inputs(reference: &HashMap<String, Tensor>) -> (Vec<Vec<u32>>, usize, Vec<Vec<u32>>) {
    let rows = reference["repeated.ids"].to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap();
    let repeat_len = (rows[0].len() - 1) / 2;
    let text = (0..).map_while(|i| reference.get(&format!("text.{i}.ids")).map(ids)).collect::<Vec<_>>();
    assert!(!rows.is_empty() && !text.is_empty());
    (rows, repeat_len, text)
}

/// A per-head reference tensor [layers, heads], flattened `layer * n_heads + head`.
fn per_head(reference: &HashMap<String, Tensor>, key: &str) -> Vec<f32> {
    reference[key].flatten_all().unwrap().to_vec1().unwrap()
}

/// Compare two per-head vectors; return the worst head and difference, panicking past `tol`.
fn check(what: &str, ours: &[f32], theirs: &[f32], n_heads: usize, tol: f32) {
    assert_eq!(ours.len(), theirs.len(), "{what}: {} heads vs {} in the reference", ours.len(), theirs.len());
    let (worst, diff) = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold((0, 0.0f32), |best, (i, d)| if d > best.1 || d.is_nan() { (i, d) } else { best });
    let head = format!("{}.{}", worst / n_heads, worst % n_heads);
    println!(
        "{what}: max abs diff {diff:e} at head {head} (ours {}, reference {})",
        ours[worst], theirs[worst]
    );
    assert!(
        diff <= tol,
        "{what} of head {head}: {} vs reference {} (diff {diff:e} > {tol:e})",
        ours[worst],
        theirs[worst]
    );
}

/// Every detector score of every head equals the reference's.
fn detectors_match(model: &dyn HookedModel, reference: &HashMap<String, Tensor>, tol: f32) {
    let (repeated, repeat_len, text) = inputs(reference);
    let n_heads = model.config().n_heads;
    let scores = detector_scores(model, &repeated, repeat_len, &text, &()).unwrap();
    for name in DetectorScores::NAMES {
        let ours: Vec<f32> = scores.iter().map(|s| s.get(name)).collect();
        check(name, &ours, &per_head(reference, &format!("scores.{name}")), n_heads, tol);
    }
}

/// The clean loss and every head's zero and mean ablation deltas equal the reference's.
fn ablations_match(model: &dyn HookedModel, reference: &HashMap<String, Tensor>, tol: f32) {
    let (repeated, repeat_len, _) = inputs(reference);
    let n_heads = model.config().n_heads;
    let found = ablations(model, &repeated, repeat_len, true, &()).unwrap();
    let clean = reference["clean_loss"].to_scalar::<f32>().unwrap();
    println!("clean loss {} vs reference {clean}", found.clean_loss);
    assert!((found.clean_loss - clean).abs() <= tol, "clean loss {} vs reference {clean}", found.clean_loss);
    check("zero ablation delta", &found.zero, &per_head(reference, "ablation.zero"), n_heads, tol);
    let mean = found.mean.expect("mean ablation was asked for");
    check("mean ablation delta", &mean, &per_head(reference, "ablation.mean"), n_heads, tol);
}

fn gpt2() -> (Box<dyn HookedModel>, HashMap<String, Tensor>) {
    (model::load(&fixture("gpt2-tiny")).unwrap(), reference("gpt2-tiny/heads_reference.safetensors"))
}

fn gemma() -> (Box<dyn HookedModel>, HashMap<String, Tensor>) {
    (model::load(&gemma_gguf()).unwrap(), reference("gemma3/heads_reference.safetensors"))
}

#[test]
fn gpt2_tiny_detector_scores_match_transformer_lens() {
    let (model, reference) = gpt2();
    detectors_match(model.as_ref(), &reference, 1e-4);
}

#[test]
fn gpt2_tiny_ablations_match_transformer_lens() {
    let (model, reference) = gpt2();
    ablations_match(model.as_ref(), &reference, 1e-4);
}

#[test]
fn gemma3_detector_scores_match_transformer_lens() {
    let (model, reference) = gemma();
    detectors_match(model.as_ref(), &reference, 1e-3);
}

#[test]
fn gemma3_ablations_match_transformer_lens() {
    let (model, reference) = gemma();
    ablations_match(model.as_ref(), &reference, 1e-3);
}

/// The fixtures themselves are what they claim: [BOS] + R + R rows and per-head tensors of the
/// model's shape (so a regenerated fixture with the wrong layout fails here, not as a parity miss).
#[test]
fn fixtures_have_the_documented_layout() {
    for (rel, bos, layers, heads) in [
        ("gpt2-tiny/heads_reference.safetensors", 511, 2, 4),
        ("gemma3/heads_reference.safetensors", 2, 18, 4),
    ] {
        let reference = reference(rel);
        let (repeated, r, _) = inputs(&reference);
        for row in &repeated {
            assert_eq!(row.len(), 2 * r + 1, "{rel}");
            assert_eq!(row[0], bos, "{rel}");
            assert_eq!(row[1..=r], row[r + 1..], "{rel}: the second half repeats the first");
        }
        for key in DetectorScores::NAMES
            .map(|s| format!("scores.{s}"))
            .iter()
            .chain(&["ablation.zero".into(), "ablation.mean".into()])
        {
            assert_eq!(reference[key].dims(), &[layers, heads], "{rel}: {key}");
        }
    }
}

/// `loupe heads --ablate`'s group ablation (heads::group, `ZeroHeads` at several layers in one
/// pass) agrees with the single-head ablations: nothing zeroed is the clean loss, one head is the
/// clean loss plus that head's zero delta, and a group of heads at two layers moves the loss.
#[test]
fn group_ablation_agrees_with_single_head_ablations() {
    use loupe_analysis::heads::group::group_ablation_loss;
    let (model, reference) = gpt2();
    let (repeated, r, _) = inputs(&reference);
    let single = ablations(model.as_ref(), &repeated, r, false, &()).unwrap();
    let clean = group_ablation_loss(model.as_ref(), &repeated, r, &[]).unwrap();
    assert!((clean - single.clean_loss).abs() <= 1e-4, "clean {clean} vs {}", single.clean_loss);
    for (i, &delta) in single.zero.iter().enumerate() {
        let loss = group_ablation_loss(model.as_ref(), &repeated, r, &[(i / 4, i % 4)]).unwrap();
        assert!(
            (loss - clean - delta).abs() <= 1e-4,
            "head {}.{}: {} vs {delta}",
            i / 4,
            i % 4,
            loss - clean
        );
    }
    let both = group_ablation_loss(model.as_ref(), &repeated, r, &[(0, 0), (1, 2)]).unwrap();
    assert!((both - clean).abs() > 1e-3, "zeroing 0.0 and 1.2 changed nothing");
    assert!(group_ablation_loss(model.as_ref(), &repeated, r, &[(2, 0)]).is_err(), "layer 2 does not exist");
}

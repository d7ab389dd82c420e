//! The ground truth: each node's output patched alone from the corrupt run into the clean run at
//! every position; effect = (m_patched − m_clean) / (m_corrupt − m_clean), the metric averaged
//! over the pairs first. Layers before the patched node are not recomputed: a pass starts at the
//! node's block from the clean run's cached `hook_resid_pre` ([`Hooks::start_at`]).
//!
//! One pass per layer: n_heads + 1 copies of the clean batch, copy h with head h's slice of
//! `attn.hook_z` taken from the corrupt run (one [`Intervention::Map`]), the last copy with the
//! layer's `hook_mlp_out` taken from it (another); the metric only at each pair's last position
//! ([`last_metrics`], a copy at a time: a logit difference needs two unembedding rows, not the
//! vocabulary's). The same numbers as [`Runs::patched_metric`] of each node
//! alone, for 1 + n_layers passes that each start at their layer instead of 90 full ones.
//!
//! [`Hooks::start_at`]: loupe_model::Hooks::start_at

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use loupe_model::hooks::{in_block, names};
use loupe_model::{HookedModel, Hooks, Intervention};
use loupe_store::Progress;

use super::patch::{Runs, last_logits, mean};
use super::{Metric, Task};

/// Each node of [`super::nodes`] patched alone: its normalised effect, in that order.
pub fn patching(
    model: &dyn HookedModel,
    task: &Task,
    runs: &Runs,
    progress: &dyn Progress,
) -> Result<Vec<f32>> {
    let c = model.config();
    let (clean, denom) = normaliser(runs)?;
    progress.stage("patching");
    let mut effects = Vec::with_capacity(c.n_layers * (c.n_heads + 1));
    for layer in 0..c.n_layers {
        let metrics = patched_layer(model, task, runs, layer)?;
        effects.extend(metrics.iter().map(|&m| (m - clean) / denom));
        progress.set(layer as u64 + 1, c.n_layers as u64);
    }
    Ok(effects)
}

/// The clean metric (averaged over the pairs) and m_corrupt − m_clean, the divisor of every
/// effect; an error when the two runs score the same (then no effect has a scale).
pub fn normaliser(runs: &Runs) -> Result<(f32, f32)> {
    let (clean, corrupt) = (mean(&runs.metric_clean), mean(&runs.metric_corrupt));
    let denom = corrupt - clean;
    if denom == 0.0 || !denom.is_finite() {
        bail!(
            "the clean and corrupt prompts give the same metric ({clean}): the task has no effect to attribute"
        );
    }
    Ok((clean, denom))
}

/// The metric (averaged over the pairs) with each node of `layer` patched alone: the heads in
/// order, then the MLP.
fn patched_layer(model: &dyn HookedModel, task: &Task, runs: &Runs, layer: usize) -> Result<Vec<f32>> {
    let heads = model.config().n_heads;
    let copies = heads + 1;
    let pairs = runs.last.len();
    let rows = copies * pairs;
    let tokens = Tensor::cat(&vec![&runs.clean; copies], 0)?;
    let resid = Tensor::cat(&vec![&runs.clean_resid_pre[layer]; copies], 0)?;
    let corrupt_z = Tensor::cat(&vec![&runs.corrupt_z[layer]; copies], 0)?;
    let corrupt_mlp = Tensor::cat(&vec![&runs.corrupt_mlp[layer]; copies], 0)?;
    // take_z[copy·pairs + p, 0, h, 0] = 1 where h = copy; take_mlp = 1 on the last copy.
    let take_z: Vec<f32> =
        (0..rows).flat_map(|r| (0..heads).map(move |h| f32::from(u8::from(h == r / pairs)))).collect();
    let take_z = Tensor::from_vec(take_z, (rows, 1, heads, 1), &Device::Cpu)?;
    let take_mlp: Vec<f32> = (0..rows).map(|r| f32::from(u8::from(r / pairs == heads))).collect();
    let take_mlp = Tensor::from_vec(take_mlp, (rows, 1, 1), &Device::Cpu)?;
    let mix = |take: Tensor, corrupt: Tensor| {
        move |x: &Tensor| -> candle_core::Result<Tensor> {
            let take = take.to_dtype(x.dtype())?;
            let keep = (1.0 - &take)?;
            x.broadcast_mul(&keep)?.add(&corrupt.to_dtype(x.dtype())?.broadcast_mul(&take)?)
        }
    };
    let mut hooks = Hooks::new()
        .start_at(layer, resid)
        .intervene(in_block(layer, names::Z), Intervention::Map(Arc::new(mix(take_z, corrupt_z))))
        .intervene(in_block(layer, names::MLP_OUT), Intervention::Map(Arc::new(mix(take_mlp, corrupt_mlp))))
        .skip_unembed();
    let hidden = model.forward(&tokens, &mut hooks)?.context("the forward pass stopped early")?;
    (0..copies)
        .map(|copy| {
            Ok(mean(&last_metrics(model, task, &hidden.narrow(0, copy * pairs, pairs)?, &runs.last)?))
        })
        .collect()
}

/// The metric of each pair from the final hidden state `[pairs, len, d_model]` at its `last`
/// position: a logit difference from the two unembedding rows alone (h · (W[answer] −
/// W[wrong])), a probability difference from the full logits ([`last_logits`]).
pub fn last_metrics(
    model: &dyn HookedModel,
    task: &Task,
    hidden: &Tensor,
    last: &[usize],
) -> Result<Vec<f32>> {
    if task.metric == Metric::ProbDiff {
        let logits = last_logits(model, hidden, last)?;
        return Ok(task.pairs.iter().zip(&logits).map(|(p, l)| task.metric.of(p, l)).collect());
    }
    let w = model.unembedding().context("the model has no unembedding")?;
    let (pairs, len, d) = hidden.dims3()?;
    let rows: Vec<u32> = last.iter().enumerate().map(|(p, &l)| (p * len + l) as u32).collect();
    let h =
        hidden.reshape((pairs * len, d))?.index_select(&Tensor::new(rows.as_slice(), hidden.device())?, 0)?;
    let ids = |pick: fn(&super::Pair) -> u32| -> Result<Tensor> {
        let ids: Vec<u32> = task.pairs.iter().map(pick).collect();
        Ok(w.index_select(&Tensor::new(ids.as_slice(), w.device())?, 0)?)
    };
    let direction = (ids(|p| p.answers[0])? - ids(|p| p.wrongs[0])?)?;
    let m = (h.to_dtype(w.dtype())? * direction)?.sum(1)?.to_dtype(candle_core::DType::F32)?;
    Ok(m.to_vec1()?)
}

#[cfg(test)]
pub(super) mod tests {
    use std::path::Path;

    use super::*;
    use crate::circuits::{Pair, nodes};

    pub(crate) fn tiny() -> Box<dyn HookedModel> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gpt2-tiny");
        loupe_model::load(&dir).unwrap()
    }

    /// Three pairs of different lengths (so the padding is exercised), each with a different
    /// answer.
    pub(crate) fn task(metric: Metric) -> Task {
        let pair = |clean: Vec<u32>, corrupt: Vec<u32>, a: u32| {
            let (answers, wrongs) = match metric {
                Metric::LogitDiff => (vec![a], vec![a + 2]),
                Metric::ProbDiff => (vec![a, a + 1], vec![a + 2, a + 3, a + 4]),
            };
            Pair { clean, corrupt, answers, wrongs }
        };
        Task {
            file: "t.jsonl".into(),
            sha256: String::new(),
            metric,
            pairs: vec![
                pair(vec![511, 30, 41, 52, 30, 41], vec![511, 30, 41, 52, 60, 41], 7),
                pair(vec![511, 80, 20, 80], vec![511, 81, 20, 80], 17),
                pair(vec![511, 5, 6, 7, 8], vec![511, 9, 6, 7, 3], 100),
            ],
        }
    }

    /// The batched, started-at-the-layer passes give the slow full-forward numbers.
    #[test]
    fn patching_equals_each_node_patched_alone_in_a_full_forward() {
        let model = tiny();
        for metric in [Metric::LogitDiff, Metric::ProbDiff] {
            let task = task(metric);
            let runs = Runs::new(model.as_ref(), &task).unwrap();
            let effects = patching(model.as_ref(), &task, &runs, &()).unwrap();
            let (clean, denom) = normaliser(&runs).unwrap();
            let all = nodes(model.config());
            assert_eq!(effects.len(), all.len());
            for (node, effect) in all.iter().zip(&effects) {
                let slow = runs.patched_metric(model.as_ref(), &task, &[*node]).unwrap();
                let fast = clean + effect * denom;
                assert!(
                    (fast - slow).abs() <= 1e-5 * slow.abs().max(1.0),
                    "{metric:?} {node}: {fast} vs {slow}"
                );
            }
            assert!(effects.iter().any(|e| e.abs() > 1e-3), "{effects:?}");
        }
    }
}

//! The clean and corrupt runs of a task, batched, and the metric with nodes patched.
//!
//! All pairs run as one batch, right-padded to the longest (the model is causal, so padding after
//! a pair's last token changes nothing before it); the logits are computed only at each pair's
//! last position (final hidden state · unembeddingᵀ, no `[tokens, vocab]` tensor). [`Runs::new`]
//! caches what every method needs: the clean run's `hook_resid_pre` of every block and both runs'
//! node outputs (`attn.hook_z`, `hook_mlp_out`). [`Runs::patched_metric`] is the metric with any
//! set of nodes' outputs replaced by the corrupt run's at every position, the rest of the pass
//! recomputed: the single-node ground truth and the faithfulness of a circuit are both made of it.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{Device, IndexOp, Tensor};
use loupe_model::hooks::{in_block, names};
use loupe_model::{HookedModel, Hooks, Intervention};

use super::{Node, Task};

/// A task's batched runs and their caches.
pub struct Runs {
    /// Clean and corrupt tokens `[pairs, len]`, right-padded.
    pub clean: Tensor,
    pub corrupt: Tensor,
    /// Each pair's last position.
    pub last: Vec<usize>,
    /// The clean run's `blocks.L.hook_resid_pre` `[pairs, len, d_model]`, per layer.
    pub clean_resid_pre: Vec<Tensor>,
    /// `attn.hook_z` `[pairs, len, head, d_head]` and `hook_mlp_out` `[pairs, len, d_model]` of
    /// each layer, clean and corrupt.
    pub clean_z: Vec<Tensor>,
    pub clean_mlp: Vec<Tensor>,
    pub corrupt_z: Vec<Tensor>,
    pub corrupt_mlp: Vec<Tensor>,
    /// The metric of each pair, clean and corrupt.
    pub metric_clean: Vec<f32>,
    pub metric_corrupt: Vec<f32>,
}

/// The mean of `values` (f64 sum).
pub fn mean(values: &[f32]) -> f32 {
    (values.iter().map(|&v| f64::from(v)).sum::<f64>() / values.len().max(1) as f64) as f32
}

impl Runs {
    /// Run the clean and the corrupt prompts of `task` once each, caching what the methods need.
    pub fn new(model: &dyn HookedModel, task: &Task) -> Result<Runs> {
        let c = model.config();
        if !c.causal || model.unembedding().is_none() {
            bail!("circuits need a causal language model (a next-token prediction to patch)");
        }
        if task.pairs.is_empty() {
            bail!("the task has no pairs");
        }
        if task.max_len() > c.max_context {
            bail!("a pair has {} tokens; the model takes at most {}", task.max_len(), c.max_context);
        }
        if let Some(id) = task
            .pairs
            .iter()
            .flat_map(|p| p.clean.iter().chain(&p.corrupt))
            .find(|&&t| t as usize >= c.vocab_size)
        {
            bail!("token id {id} is outside the model's vocabulary of {}", c.vocab_size);
        }
        let len = task.max_len();
        let pad = |seqs: Vec<&Vec<u32>>| -> Result<Tensor> {
            let flat: Vec<u32> = seqs
                .iter()
                .flat_map(|s| s.iter().copied().chain(std::iter::repeat_n(s[s.len() - 1], len - s.len())))
                .collect();
            Ok(Tensor::from_vec(flat, (seqs.len(), len), &Device::Cpu)?)
        };
        let clean = pad(task.pairs.iter().map(|p| &p.clean).collect())?;
        let corrupt = pad(task.pairs.iter().map(|p| &p.corrupt).collect())?;
        let last: Vec<usize> = task.pairs.iter().map(|p| p.clean.len() - 1).collect();
        let n_layers = c.n_layers;
        let cached = |tokens: &Tensor, resid: bool| -> Result<(Tensor, BTreeMap<String, Tensor>)> {
            let mut hooks = Hooks::new().skip_unembed();
            for l in 0..n_layers {
                hooks = hooks.capture(in_block(l, names::Z)).capture(in_block(l, names::MLP_OUT));
                if resid {
                    hooks = hooks.capture(in_block(l, names::RESID_PRE));
                }
            }
            let hidden = model.forward(tokens, &mut hooks)?.context("the forward pass stopped early")?;
            Ok((hidden, hooks.cache().clone()))
        };
        let per_layer = |cache: &BTreeMap<String, Tensor>, name: &str| -> Result<Vec<Tensor>> {
            (0..n_layers)
                .map(|l| cache.get(&in_block(l, name)).cloned().context("a hook was not captured"))
                .collect()
        };
        let (hidden, cache) = cached(&clean, true)?;
        let metric_clean = metrics(model, task, &hidden, &last)?;
        let (clean_resid_pre, clean_z, clean_mlp) = (
            per_layer(&cache, names::RESID_PRE)?,
            per_layer(&cache, names::Z)?,
            per_layer(&cache, names::MLP_OUT)?,
        );
        let (hidden, cache) = cached(&corrupt, false)?;
        let metric_corrupt = metrics(model, task, &hidden, &last)?;
        Ok(Runs {
            clean,
            corrupt,
            last,
            clean_resid_pre,
            clean_z,
            clean_mlp,
            corrupt_z: per_layer(&cache, names::Z)?,
            corrupt_mlp: per_layer(&cache, names::MLP_OUT)?,
            metric_clean,
            metric_corrupt,
        })
    }

    /// The interventions that replace `patched` nodes' outputs with the corrupt run's, at every
    /// position (for a batch of the clean tokens as [`Runs::new`] made them).
    pub fn patch_hooks(&self, patched: &[Node]) -> Result<Hooks> {
        let mut heads: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        let mut hooks = Hooks::new();
        for node in patched {
            match node.head {
                Some(h) => heads.entry(node.layer).or_default().push(h),
                None => {
                    let t = self.corrupt_mlp.get(node.layer).context("node outside the model")?;
                    hooks = hooks
                        .intervene(in_block(node.layer, names::MLP_OUT), Intervention::Replace(t.clone()));
                }
            }
        }
        for (layer, hs) in heads {
            let corrupt = self.corrupt_z.get(layer).context("node outside the model")?.clone();
            let n = corrupt.dim(2)?;
            let keep: Vec<f32> = (0..n).map(|h| if hs.contains(&h) { 0.0 } else { 1.0 }).collect();
            let keep = Tensor::from_vec(keep, (1, 1, n, 1), &Device::Cpu)?;
            let patch = move |z: &Tensor| -> candle_core::Result<Tensor> {
                let keep = keep.to_dtype(z.dtype())?;
                z.broadcast_mul(&keep)?.add(&corrupt.to_dtype(z.dtype())?.broadcast_mul(&(1.0 - &keep)?)?)
            };
            hooks = hooks.intervene(in_block(layer, names::Z), Intervention::Map(Arc::new(patch)));
        }
        Ok(hooks)
    }

    /// The metric of each pair with the `patched` nodes' outputs taken from the corrupt run (a
    /// full forward of the clean prompts).
    pub fn patched_metrics(
        &self,
        model: &dyn HookedModel,
        task: &Task,
        patched: &[Node],
    ) -> Result<Vec<f32>> {
        let mut hooks = self.patch_hooks(patched)?.skip_unembed();
        let hidden = model.forward(&self.clean, &mut hooks)?.context("the forward pass stopped early")?;
        metrics(model, task, &hidden, &self.last)
    }

    /// [`Runs::patched_metrics`] averaged over the pairs.
    pub fn patched_metric(&self, model: &dyn HookedModel, task: &Task, patched: &[Node]) -> Result<f32> {
        Ok(mean(&self.patched_metrics(model, task, patched)?))
    }
}

/// The metric of each pair from the final hidden state `[pairs, len, d_model]` at its `last`
/// position.
pub fn metrics(model: &dyn HookedModel, task: &Task, hidden: &Tensor, last: &[usize]) -> Result<Vec<f32>> {
    let logits = last_logits(model, hidden, last)?;
    Ok(task.pairs.iter().zip(&logits).map(|(p, l)| task.metric.of(p, l)).collect())
}

/// The logits `[vocab]` at each row's `last` position of the final hidden state `[rows, len,
/// d_model]` (`rows` may be a multiple of `last.len()`: copies of the pairs, in order).
pub fn last_logits(model: &dyn HookedModel, hidden: &Tensor, last: &[usize]) -> Result<Vec<Vec<f32>>> {
    let w = model.unembedding().context("the model has no unembedding")?;
    let rows = hidden.dim(0)?;
    let picked =
        (0..rows).map(|r| hidden.i((r, last[r % last.len()]))).collect::<candle_core::Result<Vec<_>>>()?;
    let h = Tensor::stack(&picked, 0)?.to_dtype(w.dtype())?;
    Ok(h.matmul(&w.t()?)?.to_dtype(candle_core::DType::F32)?.to_vec2()?)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::circuits::{Metric, Pair, nodes};

    fn tiny() -> Box<dyn HookedModel> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gpt2-tiny");
        loupe_model::load(&dir).unwrap()
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

    /// Nothing patched is the clean run, everything patched the corrupt one, and a pair's metric
    /// does not depend on the padding or the other pairs of its batch.
    #[test]
    fn patching_nothing_or_everything_gives_the_clean_or_corrupt_metric() {
        let model = tiny();
        let task = task();
        let runs = Runs::new(model.as_ref(), &task).unwrap();
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-4);
        assert!(close(&runs.patched_metrics(model.as_ref(), &task, &[]).unwrap(), &runs.metric_clean));
        let all = nodes(model.config());
        assert!(close(&runs.patched_metrics(model.as_ref(), &task, &all).unwrap(), &runs.metric_corrupt));
        assert!(runs.metric_clean.iter().zip(&runs.metric_corrupt).any(|(a, b)| (a - b).abs() > 1e-3));
        let alone = Task { pairs: task.pairs[1..].to_vec(), ..task.clone() };
        let alone = Runs::new(model.as_ref(), &alone).unwrap();
        assert!(close(&alone.metric_clean, &runs.metric_clean[1..]));
    }
}

//! Single-head ablations: the next-token loss on the repeated half with one head's output
//! removed, as a delta against the clean loss.
//!
//! The repeated half: the targets at positions |R| + 1 ..= 2|R| of [BOS] + R + R (the second
//! copy), predicted from positions |R| ..= 2|R| − 1. Zero ablation sets the head's slice of
//! `hook_z` to 0 at every position; mean ablation replaces it with its mean over all positions
//! of all the repeated sequences in the clean run.
//!
//! Fast by doing only the work that can change: the sequences run in chunks (all of them at once
//! for the defaults); a chunk's clean pass caches every block's `hook_resid_pre` (and `hook_z`,
//! for the means); an ablation at block L starts there ([`Hooks::start_at`]), the heads of one
//! layer run as one batch (copy a of the sequences has head a ablated, through one
//! [`Intervention::Map`] at `hook_z`), and the logits are computed only for the repeated half's
//! rows ([`token_losses`], no `[tokens, vocab]` tensor). Memory: one chunk's residuals.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use loupe_model::hooks::{in_block, names};
use loupe_model::{HookedModel, Hooks, Intervention, token_losses};
use loupe_store::Progress;

/// The clean loss and each head's ablation deltas, indexed `layer * n_heads + head`.
#[derive(Clone, Debug, PartialEq)]
pub struct Ablations {
    /// Mean next-token loss on the repeated half, nothing ablated (nats).
    pub clean_loss: f32,
    /// Loss with the head zeroed, minus `clean_loss`.
    pub zero: Vec<f32>,
    /// Loss with the head mean-ablated, minus `clean_loss` (when asked for).
    pub mean: Option<Vec<f32>>,
}

/// Tokens per forward pass at most (all heads' copies of a chunk of sequences together).
const MAX_TOKENS: usize = 8192;

/// One chunk of the sequences and what its clean pass left.
struct Chunk {
    tokens: Tensor,
    sequences: usize,
    /// The targets of the repeated half, sequence by sequence.
    targets: Vec<u32>,
    /// `blocks.L.hook_resid_pre` of the clean pass, per layer.
    resid_pre: Vec<Tensor>,
}

/// Ablate every head of `model` in turn on `repeated` (each [BOS] + R + R, |R| = `repeat_len`).
pub fn ablations(
    model: &dyn HookedModel,
    repeated: &[Vec<u32>],
    repeat_len: usize,
    mean: bool,
    progress: &dyn Progress,
) -> Result<Ablations> {
    chunked(model, repeated, repeat_len, mean, progress, MAX_TOKENS)
}

/// [`ablations`] with at most `max_tokens` tokens per pass (at least one sequence's copies).
fn chunked(
    model: &dyn HookedModel,
    repeated: &[Vec<u32>],
    repeat_len: usize,
    mean: bool,
    progress: &dyn Progress,
    max_tokens: usize,
) -> Result<Ablations> {
    let c = model.config();
    let (n_layers, n_heads) = (c.n_layers, c.n_heads);
    let len = 2 * repeat_len + 1;
    if repeat_len == 0 || repeated.is_empty() {
        bail!("ablations need at least one repeated sequence with a repeated half of at least one token");
    }
    if let Some(s) = repeated.iter().find(|s| s.len() != len) {
        bail!("a repeated sequence has {} tokens, not [BOS] + 2 × {repeat_len}", s.len());
    }
    if len > c.max_context {
        bail!("sequences of {len} tokens exceed the model's context of {}", c.max_context);
    }
    model.unembedding().context("head ablations need a causal language model (with an unembedding)")?;

    let per_chunk = (max_tokens / (len * n_heads)).max(1);
    let groups: Vec<&[Vec<u32>]> = repeated.chunks(per_chunk).collect();
    // The means of `hook_z` are over all sequences: with several chunks they take a pass of
    // their own first; one chunk takes them from its clean pass.
    let means_first = mean && groups.len() > 1;
    let runs = 1 + n_layers * (1 + usize::from(mean)) + usize::from(means_first);
    progress.stage("ablations");
    let total = (groups.len() * runs) as u64;
    let mut done = 0u64;
    let mut tick = || {
        done += 1;
        progress.set(done, total);
    };
    let positions = (repeated.len() * len) as f64;
    let mut z_means: Option<Vec<Tensor>> = None;
    if means_first {
        let mut sums: Option<Vec<Tensor>> = None;
        for group in &groups {
            let (_, z) = clean_pass(model, &mut chunk(group, repeat_len)?, true)?;
            sums = Some(add_sums(sums, z.context("hook_z was captured")?)?);
            tick();
        }
        z_means = Some(divide(sums.context("at least one chunk")?, positions)?);
    }

    let mut clean_sum = 0f64;
    let mut zero_sums = vec![0f64; n_layers * n_heads];
    let mut mean_sums = vec![0f64; n_layers * n_heads];
    for group in &groups {
        let mut chunk = chunk(group, repeat_len)?;
        let (hidden, z) = clean_pass(model, &mut chunk, mean && z_means.is_none())?;
        if let Some(z) = z {
            z_means = Some(divide(z, positions)?);
        }
        clean_sum += half_losses(model, &hidden, repeat_len, &chunk.targets)?
            .iter()
            .map(|&l| f64::from(l))
            .sum::<f64>();
        tick();
        for layer in 0..n_layers {
            let mut kinds = vec![(None, &mut zero_sums)];
            if let Some(means) = &z_means {
                kinds.push((Some(&means[layer]), &mut mean_sums));
            }
            for (replacement, sums) in kinds {
                let losses = ablated_losses(model, &chunk, layer, replacement, repeat_len)?;
                let per_head = chunk.sequences * repeat_len;
                for head in 0..n_heads {
                    sums[layer * n_heads + head] += losses[head * per_head..(head + 1) * per_head]
                        .iter()
                        .map(|&l| f64::from(l))
                        .sum::<f64>();
                }
                tick();
            }
        }
    }
    let rows = (repeated.len() * repeat_len) as f64;
    let clean = clean_sum / rows;
    let deltas = |sums: &[f64]| sums.iter().map(|s| (s / rows - clean) as f32).collect::<Vec<f32>>();
    Ok(Ablations {
        clean_loss: clean as f32,
        zero: deltas(&zero_sums),
        mean: mean.then(|| deltas(&mean_sums)),
    })
}

/// The tokens and targets of `group` (its `resid_pre` comes from [`clean_pass`]).
fn chunk(group: &[Vec<u32>], repeat_len: usize) -> Result<Chunk> {
    let flat: Vec<u32> = group.iter().flatten().copied().collect();
    let tokens = Tensor::from_vec(flat, (group.len(), 2 * repeat_len + 1), &Device::Cpu)?;
    let targets = group.iter().flat_map(|s| s[repeat_len + 1..].iter().copied()).collect();
    Ok(Chunk { tokens, sequences: group.len(), targets, resid_pre: Vec::new() })
}

/// The clean pass over `chunk`: fills its `resid_pre` (every block's input) and returns the final
/// hidden state, and with `z_sums` every layer's `hook_z` summed over sequences and positions
/// (`[head, d_head]` each).
fn clean_pass(
    model: &dyn HookedModel,
    chunk: &mut Chunk,
    z_sums: bool,
) -> Result<(Tensor, Option<Vec<Tensor>>)> {
    let n_layers = model.config().n_layers;
    let mut hooks = Hooks::new().skip_unembed();
    for layer in 0..n_layers {
        hooks = hooks.capture(in_block(layer, names::RESID_PRE));
        if z_sums {
            hooks = hooks.capture(in_block(layer, names::Z));
        }
    }
    let hidden = model.forward(&chunk.tokens, &mut hooks)?.context("the forward pass stopped early")?;
    let sums = z_sums
        .then(|| {
            (0..n_layers)
                .map(|l| Ok(hooks.get(&in_block(l, names::Z))?.sum(0)?.sum(0)?))
                .collect::<Result<Vec<_>>>()
        })
        .transpose()?;
    chunk.resid_pre = (0..n_layers)
        .map(|l| hooks.get(&in_block(l, names::RESID_PRE)).cloned())
        .collect::<Result<Vec<_>>>()?;
    Ok((hidden, sums))
}

/// `sums` + `z`, layer by layer (`z` when there are no sums yet).
fn add_sums(sums: Option<Vec<Tensor>>, z: Vec<Tensor>) -> Result<Vec<Tensor>> {
    match sums {
        None => Ok(z),
        Some(sums) => sums.iter().zip(&z).map(|(s, z)| Ok((s + z)?)).collect(),
    }
}

/// Each layer's sum divided by `n`.
fn divide(sums: Vec<Tensor>, n: f64) -> Result<Vec<Tensor>> {
    sums.into_iter().map(|s| Ok((s / n)?)).collect()
}

/// The next-token losses of rows |R| ..= 2|R| − 1 of each sequence of `hidden`, in order.
fn half_losses(
    model: &dyn HookedModel,
    hidden: &Tensor,
    repeat_len: usize,
    targets: &[u32],
) -> Result<Vec<f32>> {
    let (batch, _, d) = hidden.dims3()?;
    let rows = hidden.narrow(1, repeat_len, repeat_len)?.reshape((batch * repeat_len, d))?;
    token_losses(model, &rows, targets)
}

/// The repeated-half losses of `chunk` with each head of `layer` ablated in turn: one pass over
/// `n_heads` copies of the chunk starting at `layer`, copy `a` with head `a`'s `hook_z` zeroed
/// (`replacement` `None`) or replaced by `replacement[a]` (`[head, d_head]`). Losses come
/// copy by copy.
fn ablated_losses(
    model: &dyn HookedModel,
    chunk: &Chunk,
    layer: usize,
    replacement: Option<&Tensor>,
    repeat_len: usize,
) -> Result<Vec<f32>> {
    let c = model.config();
    let (heads, b, d_head) = (c.n_heads, chunk.sequences, c.d_head);
    let copies = heads * b;
    let tokens = Tensor::cat(&vec![&chunk.tokens; heads], 0)?;
    let resid = Tensor::cat(&vec![&chunk.resid_pre[layer]; heads], 0)?;
    // keep[a·b + s, 0, h, 0] = 0 where h = a; add: the replacement there.
    let keep: Vec<f32> =
        (0..copies).flat_map(|i| (0..heads).map(move |h| if h == i / b { 0.0 } else { 1.0 })).collect();
    let keep = Tensor::from_vec(keep, (copies, 1, heads, 1), &Device::Cpu)?;
    let add = match replacement {
        Some(m) => {
            let m: Vec<f32> = m.flatten_all()?.to_vec1()?;
            let add: Vec<f32> = (0..copies)
                .flat_map(|i| {
                    let a = i / b;
                    let m = &m;
                    (0..heads).flat_map(move |h| {
                        (0..d_head).map(move |k| if h == a { m[h * d_head + k] } else { 0.0 })
                    })
                })
                .collect();
            Some(Tensor::from_vec(add, (copies, 1, heads, d_head), &Device::Cpu)?)
        }
        None => None,
    };
    let ablate = move |z: &Tensor| -> candle_core::Result<Tensor> {
        let z = z.broadcast_mul(&keep.to_dtype(z.dtype())?)?;
        match &add {
            Some(add) => z.broadcast_add(&add.to_dtype(z.dtype())?),
            None => Ok(z),
        }
    };
    let mut hooks = Hooks::new()
        .start_at(layer, resid)
        .intervene(in_block(layer, names::Z), Intervention::Map(Arc::new(ablate)))
        .skip_unembed();
    let hidden = model.forward(&tokens, &mut hooks)?.context("the forward pass stopped early")?;
    let targets: Vec<u32> = (0..heads).flat_map(|_| chunk.targets.iter().copied()).collect();
    half_losses(model, &hidden, repeat_len, &targets)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::heads::detectors::repeated_sequences;

    /// Chunks of one sequence (means of `hook_z` in a pass of their own) give what one chunk
    /// gives.
    #[test]
    fn chunking_does_not_change_the_deltas() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gpt2-tiny");
        let model = loupe_model::load(&dir).unwrap();
        let seqs = repeated_sequences(1, 3, 10, 512, 511);
        let one = chunked(model.as_ref(), &seqs, 10, true, &(), MAX_TOKENS).unwrap();
        let three = chunked(model.as_ref(), &seqs, 10, true, &(), 1).unwrap();
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
        assert!((one.clean_loss - three.clean_loss).abs() < 1e-5);
        assert!(close(&one.zero, &three.zero), "{one:?} vs {three:?}");
        assert!(close(one.mean.as_ref().unwrap(), three.mean.as_ref().unwrap()), "{one:?} vs {three:?}");
        assert!(one.mean.unwrap().iter().zip(&one.zero).any(|(m, z)| (m - z).abs() > 1e-4));
    }
}

//! Single-head ablations: the next-token loss on the repeated half with one head's output
//! removed, as a delta against the clean loss.
//!
//! The repeated half: the targets at positions |R| + 1 ..= 2|R| of [BOS] + R + R (the second
//! copy), predicted from positions |R| ..= 2|R| − 1. Zero ablation sets the head's slice of
//! `hook_z` to 0 at every position; mean ablation replaces it with its mean over all positions
//! of all the repeated sequences in the clean run.
//!
//! Fast by doing only the work that can change: one clean pass caches every block's
//! `hook_resid_pre` (and `hook_z`, for the means); an ablation at block L starts there
//! ([`Hooks::start_at`]), the heads of one layer run as one batch (copy a of the sequences has
//! head a ablated, through one [`Intervention::Map`] at `hook_z`), and the logits are computed
//! only for the repeated half's rows ([`token_losses`], no `[tokens, vocab]` tensor).

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

    let per_chunk = (MAX_TOKENS / (len * n_heads)).max(1);
    let n_chunks = repeated.len().div_ceil(per_chunk);
    let runs = 1 + n_layers * (1 + usize::from(mean));
    progress.stage("ablations");
    let total = (n_chunks * runs) as u64;
    let mut done = 0u64;
    let mut tick = || {
        done += 1;
        progress.set(done, total);
    };

    // The clean pass.
    let mut chunks = Vec::with_capacity(n_chunks);
    let mut clean_sum = 0f64;
    let mut z_sums: Vec<Option<Tensor>> = vec![None; n_layers];
    for group in repeated.chunks(per_chunk) {
        let flat: Vec<u32> = group.iter().flatten().copied().collect();
        let tokens = Tensor::from_vec(flat, (group.len(), len), &Device::Cpu)?;
        let targets: Vec<u32> = group.iter().flat_map(|s| s[repeat_len + 1..].iter().copied()).collect();
        let mut hooks = Hooks::new().skip_unembed();
        for layer in 0..n_layers {
            hooks = hooks.capture(in_block(layer, names::RESID_PRE));
            if mean {
                hooks = hooks.capture(in_block(layer, names::Z));
            }
        }
        let hidden = model.forward(&tokens, &mut hooks)?.context("the forward pass stopped early")?;
        clean_sum += loss_sum(model, &hidden, repeat_len, &targets)?;
        if mean {
            for (layer, sum) in z_sums.iter_mut().enumerate() {
                // [batch, pos, head, d_head] summed over batch and positions: [head, d_head].
                let z = hooks.get(&in_block(layer, names::Z))?.sum(0)?.sum(0)?;
                *sum = Some(match sum.take() {
                    Some(s) => (s + z)?,
                    None => z,
                });
            }
        }
        let resid_pre = (0..n_layers)
            .map(|layer| hooks.get(&in_block(layer, names::RESID_PRE)).cloned())
            .collect::<Result<Vec<_>>>()?;
        chunks.push(Chunk { tokens, sequences: group.len(), targets, resid_pre });
        tick();
    }
    let rows = (repeated.len() * repeat_len) as f64;
    let clean = clean_sum / rows;
    let positions = (repeated.len() * len) as f64;
    let z_means: Vec<Option<Tensor>> =
        z_sums.into_iter().map(|s| s.map(|s| s / positions).transpose()).collect::<Result<_, _>>()?;

    let mut zero = vec![0f32; n_layers * n_heads];
    let mut mean_deltas = mean.then(|| vec![0f32; n_layers * n_heads]);
    for layer in 0..n_layers {
        let kinds: Vec<Option<&Tensor>> = match &z_means[layer] {
            Some(m) => vec![None, Some(m)],
            None => vec![None],
        };
        for replacement in kinds {
            let mut sums = vec![0f64; n_heads];
            for chunk in &chunks {
                let losses = ablated_losses(model, chunk, layer, replacement, repeat_len)?;
                let per_head = chunk.sequences * repeat_len;
                for (head, sum) in sums.iter_mut().enumerate() {
                    *sum += losses[head * per_head..(head + 1) * per_head]
                        .iter()
                        .map(|&l| f64::from(l))
                        .sum::<f64>();
                }
                tick();
            }
            let out = match replacement {
                None => &mut zero,
                Some(_) => mean_deltas.as_mut().expect("mean ablation asked for"),
            };
            for (head, sum) in sums.iter().enumerate() {
                out[layer * n_heads + head] = (sum / rows - clean) as f32;
            }
        }
    }
    Ok(Ablations { clean_loss: clean as f32, zero, mean: mean_deltas })
}

/// The summed next-token loss of the repeated half of each sequence of `hidden`
/// `[batch, 2|R| + 1, d_model]` (final normalized hidden states).
fn loss_sum(model: &dyn HookedModel, hidden: &Tensor, repeat_len: usize, targets: &[u32]) -> Result<f64> {
    let losses = half_losses(model, hidden, repeat_len, targets)?;
    Ok(losses.iter().map(|&l| f64::from(l)).sum())
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

//! Single-head ablations: the next-token loss on the repeated half with one head's output
//! removed, as a delta against the clean loss.
//!
//! The repeated half: the targets at positions |R| + 1 ..= 2|R| of [BOS] + R + R (the second
//! copy), predicted from positions |R| ..= 2|R| − 1. Zero ablation sets the head's slice of
//! `hook_z` to 0 at every position; mean ablation replaces it with its mean over all positions
//! of all the repeated sequences in the clean run.

use anyhow::{Result, bail};
use loupe_model::HookedModel;
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

/// Ablate every head of `model` in turn on `repeated` (each [BOS] + R + R, |R| = `repeat_len`).
pub fn ablations(
    model: &dyn HookedModel,
    repeated: &[Vec<u32>],
    repeat_len: usize,
    mean: bool,
    progress: &dyn Progress,
) -> Result<Ablations> {
    let _ = (model, repeated, repeat_len, mean, progress);
    bail!("head ablations are not built yet")
}

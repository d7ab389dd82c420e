//! Head detector scores with TransformerLens' `detect_head` semantics.
//!
//! Patterns (TransformerLens `head_detector.py`): previous-token P[i, i−1] = 1; duplicate-token
//! P[i, j] = 1 for j < i with token j = token i; induction = the duplicate-token pattern shifted
//! one key to the right (P[i, j+1] for each earlier copy j). Score per sequence
//! Σ(A⊙P)/ΣA with the defaults `exclude_bos = false`, `exclude_current_token = false`, then the
//! mean over sequences. The induction score is TransformerLens' stripe: the mean of the diagonal
//! at offset 1 − |R| of the pattern on [BOS] + R + R.

use anyhow::{Result, bail};
use loupe_model::HookedModel;
use loupe_store::Progress;

/// One head's detector scores (see [`loupe_store::HeadRow`] for each).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DetectorScores {
    pub induction: f32,
    pub induction_mul: f32,
    pub previous_token: f32,
    pub duplicate_token: f32,
    pub previous_token_text: f32,
    pub duplicate_token_text: f32,
}

/// `sequences` sequences [BOS] + R + R, R = `repeat_len` token ids drawn uniformly from
/// `0..vocab` (never `bos`) with `seed`.
pub fn repeated_sequences(
    seed: u64,
    sequences: usize,
    repeat_len: usize,
    vocab: usize,
    bos: u32,
) -> Vec<Vec<u32>> {
    let _ = (seed, sequences, repeat_len, vocab, bos);
    Vec::new()
}

/// Every head's scores, indexed `layer * n_heads + head`: the repeated-sequence scores on
/// `repeated` (each [BOS] + R + R with |R| = `repeat_len`), the `_text` scores on `text`.
pub fn detector_scores(
    model: &dyn HookedModel,
    repeated: &[Vec<u32>],
    repeat_len: usize,
    text: &[Vec<u32>],
    progress: &dyn Progress,
) -> Result<Vec<DetectorScores>> {
    let _ = (model, repeated, repeat_len, text, progress);
    bail!("head detectors are not built yet")
}

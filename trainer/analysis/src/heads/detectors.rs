//! Head detector scores with TransformerLens' `detect_head` semantics.
//!
//! Patterns (TransformerLens `head_detector.py`): previous-token P[i, i−1] = 1; duplicate-token
//! P[i, j] = 1 for j < i with token j = token i; induction = the duplicate-token pattern shifted
//! one key to the right (P[i, j+1] for each earlier copy j). Score per sequence
//! Σ(A⊙P)/ΣA with the defaults `exclude_bos = false`, `exclude_current_token = false`, then the
//! mean over sequences. The induction score is TransformerLens' stripe: the mean of the diagonal
//! at offset 1 − |R| of the pattern on [BOS] + R + R.
//!
//! A is `blocks.L.attn.hook_pattern` `[batch, head, query, key]`, captured for every layer in
//! one pass that stops after the last block (no logits). Sequences of one length run together,
//! a bounded number at a time.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use candle_core::{DType, Tensor};
use loupe_model::hooks::{in_block, names};
use loupe_model::{HookedModel, Hooks};
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

impl DetectorScores {
    /// The scores' names, as the heads table's columns and the references name them.
    pub const NAMES: [&'static str; 6] = [
        "induction",
        "induction_mul",
        "previous_token",
        "duplicate_token",
        "previous_token_text",
        "duplicate_token_text",
    ];

    /// The score named `name` (one of [`Self::NAMES`]; NaN for any other name).
    pub fn get(&self, name: &str) -> f32 {
        match name {
            "induction" => self.induction,
            "induction_mul" => self.induction_mul,
            "previous_token" => self.previous_token,
            "duplicate_token" => self.duplicate_token,
            "previous_token_text" => self.previous_token_text,
            "duplicate_token_text" => self.duplicate_token_text,
            _ => f32::NAN,
        }
    }
}

/// splitmix64 from `seed` (the generator behind R and the random head groups; simple enough that
/// a reference in another language repeats it exactly).
pub(crate) fn splitmix64(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Pattern values captured per forward pass at most (all layers together), in f32s: 64 Mi
/// (256 MiB).
const MAX_PATTERN_VALUES: usize = 64 << 20;

/// `sequences` sequences [BOS] + R + R, R = `repeat_len` token ids drawn uniformly from
/// `0..vocab` (never `bos`) with `seed`.
///
/// The draw, so that a reference in another language can repeat it: a splitmix64 stream seeded
/// with `seed` (state += 0x9E3779B97F4A7C15; z = state; z = (z ^ z>>30)·0xBF58476D1CE4E5B9;
/// z = (z ^ z>>27)·0x94D049BB133111EB; z ^ z>>31, all mod 2⁶⁴); each token is
/// t = z mod (vocab − 1), plus one when t ≥ bos; the sequences' R are drawn one after another.
pub fn repeated_sequences(
    seed: u64,
    sequences: usize,
    repeat_len: usize,
    vocab: usize,
    bos: u32,
) -> Vec<Vec<u32>> {
    let mut next = splitmix64(seed);
    let choices = vocab.saturating_sub(1).max(1) as u64;
    (0..sequences)
        .map(|_| {
            let r: Vec<u32> = (0..repeat_len)
                .map(|_| {
                    let t = (next() % choices) as u32;
                    if t >= bos { t + 1 } else { t }
                })
                .collect();
            std::iter::once(bos).chain(r.iter().copied()).chain(r.iter().copied()).collect()
        })
        .collect()
}

/// Every head's scores, indexed `layer * n_heads + head`: the repeated-sequence scores on
/// `repeated` (each [BOS] + R + R with |R| = `repeat_len`), the `_text` scores on `text`
/// (NaN when `text` is empty).
pub fn detector_scores(
    model: &dyn HookedModel,
    repeated: &[Vec<u32>],
    repeat_len: usize,
    text: &[Vec<u32>],
    progress: &dyn Progress,
) -> Result<Vec<DetectorScores>> {
    let c = model.config();
    let n = c.n_layers * c.n_heads;
    if repeat_len == 0 {
        bail!("the repeated half needs at least one token");
    }
    if let Some(s) = repeated.iter().find(|s| s.len() != 2 * repeat_len + 1) {
        bail!("a repeated sequence has {} tokens, not [BOS] + 2 × {repeat_len}", s.len());
    }
    if let Some(i) = text.iter().position(|s| s.len() < 2) {
        bail!("text sequence {i} has fewer than 2 tokens");
    }
    progress.stage("detectors");
    let total = (repeated.len() + text.len()) as u64;
    let mut done = 0u64;
    let mut tick = |k: usize| {
        done += k as u64;
        progress.set(done, total);
    };
    let mut rep = vec![Sums::default(); n];
    for_each_pattern(model, repeated, &mut tick, |tokens, layer, head, a| {
        let s = &mut rep[layer * c.n_heads + head];
        s.count += 1.0;
        let scores = sequence_scores(tokens, a);
        s.previous += scores.previous;
        s.duplicate += scores.duplicate;
        s.induction_mul += scores.induction;
        s.stripe += stripe(a, tokens.len(), repeat_len);
    })?;
    let mut txt = vec![Sums::default(); n];
    for_each_pattern(model, text, &mut tick, |tokens, layer, head, a| {
        let s = &mut txt[layer * c.n_heads + head];
        s.count += 1.0;
        let scores = sequence_scores(tokens, a);
        s.previous += scores.previous;
        s.duplicate += scores.duplicate;
    })?;
    Ok(rep
        .iter()
        .zip(&txt)
        .map(|(r, t)| DetectorScores {
            induction: r.mean(r.stripe),
            induction_mul: r.mean(r.induction_mul),
            previous_token: r.mean(r.previous),
            duplicate_token: r.mean(r.duplicate),
            previous_token_text: t.mean(t.previous),
            duplicate_token_text: t.mean(t.duplicate),
        })
        .collect())
}

/// Per-head sums of per-sequence scores.
#[derive(Clone, Default)]
struct Sums {
    count: f64,
    previous: f64,
    duplicate: f64,
    induction_mul: f64,
    stripe: f64,
}

impl Sums {
    fn mean(&self, sum: f64) -> f32 {
        if self.count == 0.0 { f32::NAN } else { (sum / self.count) as f32 }
    }
}

/// `detect_head` ("mul") scores of one head's pattern `a` (`[query][key]`, `tokens.len()²`
/// row-major) on one sequence.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SequenceScores {
    pub previous: f64,
    pub duplicate: f64,
    pub induction: f64,
}

/// Σ(A⊙P)/ΣA for the previous-token, duplicate-token and induction patterns P of `tokens`.
pub fn sequence_scores(tokens: &[u32], a: &[f32]) -> SequenceScores {
    let n = tokens.len();
    assert_eq!(a.len(), n * n, "pattern of {} values for {n} tokens", a.len());
    let (mut total, mut previous, mut duplicate, mut induction) = (0f64, 0f64, 0f64, 0f64);
    for i in 0..n {
        let row = &a[i * n..(i + 1) * n];
        total += row.iter().map(|&x| f64::from(x)).sum::<f64>();
        if i > 0 {
            previous += f64::from(row[i - 1]);
        }
        for j in 0..i {
            if tokens[j] == tokens[i] {
                duplicate += f64::from(row[j]);
                // j + 1 ≤ i: the shifted pattern stays on or below the diagonal.
                induction += f64::from(row[j + 1]);
            }
        }
    }
    SequenceScores { previous: previous / total, duplicate: duplicate / total, induction: induction / total }
}

/// The mean of the diagonal at offset 1 − `repeat_len` of an `n` × `n` pattern: entries
/// (q, q − (repeat_len − 1)) for every q where that key exists.
pub fn stripe(a: &[f32], n: usize, repeat_len: usize) -> f64 {
    let back = repeat_len - 1;
    let entries: Vec<f64> = (back..n).map(|q| f64::from(a[q * n + q - back])).collect();
    if entries.is_empty() { f64::NAN } else { entries.iter().sum::<f64>() / entries.len() as f64 }
}

/// Run `model` on `sequences` (grouped by length, a bounded batch at a time) with every layer's
/// `hook_pattern` captured, and call `visit(tokens, layer, head, pattern)` for each sequence
/// and head; `tick(k)` after each batch of `k` sequences.
fn for_each_pattern(
    model: &dyn HookedModel,
    sequences: &[Vec<u32>],
    tick: &mut dyn FnMut(usize),
    mut visit: impl FnMut(&[u32], usize, usize, &[f32]),
) -> Result<()> {
    let c = model.config();
    let mut by_len: BTreeMap<usize, Vec<&Vec<u32>>> = BTreeMap::new();
    for s in sequences {
        by_len.entry(s.len()).or_default().push(s);
    }
    for (len, group) in by_len {
        if len > c.max_context {
            bail!("a sequence of {len} tokens exceeds the model's context of {}", c.max_context);
        }
        let per_sequence = c.n_layers * c.n_heads * len * len;
        let batch = (MAX_PATTERN_VALUES / per_sequence).max(1);
        for chunk in group.chunks(batch) {
            let flat: Vec<u32> = chunk.iter().flat_map(|s| s.iter().copied()).collect();
            let tokens = Tensor::from_vec(flat, (chunk.len(), len), &candle_core::Device::Cpu)?;
            let mut hooks = Hooks::new().stop_after_layer(c.n_layers - 1);
            for layer in 0..c.n_layers {
                hooks = hooks.capture(in_block(layer, names::PATTERN));
            }
            model.forward(&tokens, &mut hooks)?;
            for layer in 0..c.n_layers {
                let pattern = hooks.get(&in_block(layer, names::PATTERN))?;
                let values: Vec<f32> = pattern.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                for (b, seq) in chunk.iter().enumerate() {
                    for head in 0..c.n_heads {
                        let at = (b * c.n_heads + head) * len * len;
                        visit(seq, layer, head, &values[at..at + len * len]);
                    }
                }
            }
            tick(chunk.len());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Brute force over every (query, key) with the patterns written out as TransformerLens
    /// builds them (a 0/1 matrix each, the induction one shifted right, all lower-triangular).
    fn brute(tokens: &[u32], a: &[f32]) -> [f64; 3] {
        let n = tokens.len();
        let prev = |i: usize, j: usize| i >= 1 && j == i - 1;
        let dup = |i: usize, j: usize| j < i && tokens[i] == tokens[j];
        let ind = |i: usize, j: usize| j >= 1 && j <= i && dup(i, j - 1);
        let total: f64 = a.iter().map(|&x| f64::from(x)).sum();
        let score = |p: &dyn Fn(usize, usize) -> bool| {
            let mut s = 0f64;
            for i in 0..n {
                for j in 0..n {
                    if p(i, j) {
                        s += f64::from(a[i * n + j]);
                    }
                }
            }
            s / total
        };
        [score(&prev), score(&dup), score(&ind)]
    }

    /// A causal pattern with rows summing to 1, from a cheap deterministic hash.
    fn pattern(n: usize, salt: u64) -> Vec<f32> {
        let mut a = vec![0f32; n * n];
        for i in 0..n {
            let w: Vec<f32> =
                (0..=i).map(|j| ((i * 31 + j * 17 + salt as usize * 7) % 13) as f32 + 0.5).collect();
            let s: f32 = w.iter().sum();
            for j in 0..=i {
                a[i * n + j] = w[j] / s;
            }
        }
        a
    }

    #[test]
    fn scores_match_the_patterns_written_out() {
        let tokens = [9, 3, 4, 3, 5, 4, 3, 9, 1];
        for salt in 0..4 {
            let a = pattern(tokens.len(), salt);
            let s = sequence_scores(&tokens, &a);
            let [p, d, i] = brute(&tokens, &a);
            for (x, y) in [(s.previous, p), (s.duplicate, d), (s.induction, i)] {
                assert!((x - y).abs() < 1e-12, "{x} vs {y}");
            }
        }
    }

    #[test]
    fn planted_heads_score_one() {
        let r = [5u32, 8, 2, 7];
        let tokens: Vec<u32> = std::iter::once(0).chain(r).chain(r).collect();
        let n = tokens.len();
        let (len, rl) = (n, r.len());
        // A previous-token head (position 0 attends to itself).
        let mut prev = vec![0f32; n * n];
        prev[0] = 1.0;
        for i in 1..n {
            prev[i * n + i - 1] = 1.0;
        }
        let s = sequence_scores(&tokens, &prev);
        assert!((s.previous - (n - 1) as f64 / n as f64).abs() < 1e-12);
        // An induction head: each second-copy token attends to the token after its first copy;
        // the others to themselves.
        let mut ind = vec![0f32; n * n];
        for q in 0..n {
            let k = if q > rl { q - (rl - 1) } else { q };
            ind[q * n + k] = 1.0;
        }
        let s = sequence_scores(&tokens, &ind);
        assert!((s.induction - rl as f64 / n as f64).abs() < 1e-12, "{s:?}");
        assert_eq!(s.duplicate, 0.0);
        // The stripe holds q = rl − 1 ..= 2·rl: rl + 2 entries, rl of them the planted ones.
        let st = stripe(&ind, len, rl);
        assert!((st - rl as f64 / (rl + 2) as f64).abs() < 1e-12, "{st}");
    }

    #[test]
    fn repeated_sequences_are_seeded_and_never_bos() {
        let a = repeated_sequences(7, 3, 20, 10, 4);
        assert_eq!(a, repeated_sequences(7, 3, 20, 10, 4));
        assert_ne!(a, repeated_sequences(8, 3, 20, 10, 4));
        assert_eq!(a.len(), 3);
        for s in &a {
            assert_eq!(s.len(), 41);
            assert_eq!(s[0], 4);
            assert_eq!(s[1..21], s[21..]);
            assert!(s[1..].iter().all(|&t| t != 4 && t < 10));
        }
        // Every other id is drawn.
        let all: std::collections::BTreeSet<u32> = a.iter().flat_map(|s| s[1..].iter().copied()).collect();
        assert_eq!(all.len(), 9);
        // The documented stream: splitmix64 of seed 0 starts 0xE220A8397B1DCDAF.
        let first = repeated_sequences(0, 1, 1, 1 << 20, u32::MAX)[0][1];
        assert_eq!(u64::from(first), 0xE220_A839_7B1D_CDAF % ((1 << 20) - 1));
    }
}

//! Logit effects: the output tokens each feature's direction promotes and suppresses most,
//! through the model's final norm and unembedding ([`HookedModel::direction_logits`]).

use anyhow::Result;
use candle_core::{Device, Tensor};
use loupe_store::LogitEffect;
use rayon::prelude::*;

use loupe_model::HookedModel;

/// Directions per unembedding GEMM (bounds the `[chunk, vocab]` logits buffer).
const CHUNK: usize = 128;

/// The `k` most promoted (rank 1..=k) and most suppressed (rank -1..=-k) tokens of every
/// direction in `directions` (`[n, d_model]`), sorted by feature, then rank.
pub fn logit_effects(
    model: &dyn HookedModel,
    directions: &[f32],
    d: usize,
    k: usize,
) -> Result<Vec<LogitEffect>> {
    let n = directions.len() / d;
    let mut out = Vec::with_capacity(n * 2 * k);
    for start in (0..n).step_by(CHUNK) {
        let end = (start + CHUNK).min(n);
        let dirs = Tensor::from_slice(&directions[start * d..end * d], (end - start, d), &Device::Cpu)?;
        let logits: Vec<f32> = model.direction_logits(&dirs)?.flatten_all()?.to_vec1()?;
        let vocab = logits.len() / (end - start);
        let rows: Vec<Vec<LogitEffect>> = logits
            .par_chunks(vocab)
            .enumerate()
            .map(|(i, row)| extremes(row, k, (start + i) as u32))
            .collect();
        out.extend(rows.into_iter().flatten());
    }
    Ok(out)
}

/// The `k` largest and `k` smallest entries of `row` (ties: lower token id first).
fn extremes(row: &[f32], k: usize, feature_id: u32) -> Vec<LogitEffect> {
    let k = k.min(row.len());
    if k == 0 {
        return Vec::new();
    }
    let mut ids: Vec<u32> = (0..row.len() as u32).collect();
    let by_value = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
    ids.select_nth_unstable_by(k - 1, by_value);
    let mut top = ids[..k].to_vec();
    top.sort_unstable_by(by_value);
    let by_value_asc = |a: &u32, b: &u32| row[*a as usize].total_cmp(&row[*b as usize]).then(a.cmp(b));
    ids.select_nth_unstable_by(k - 1, by_value_asc);
    let mut bottom = ids[..k].to_vec();
    bottom.sort_unstable_by(by_value_asc);
    let effect = |rank: i8, token: u32| LogitEffect { feature_id, rank, token, value: row[token as usize] };
    top.iter()
        .enumerate()
        .map(|(i, &t)| effect(i as i8 + 1, t))
        .chain(bottom.iter().enumerate().map(|(i, &t)| effect(-(i as i8) - 1, t)))
        .collect()
}

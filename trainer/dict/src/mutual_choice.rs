//! Mutual Choice / BatchTopK (Ayonrinde; Bussmann et al.): the batch keeps its k·B largest
//! positive pre-activations, so a token may get more or fewer than k features.
//!
//! Scale-free selection (Loupe's default, `scale_free`): pairs are ranked by `pre / ‖x − b_dec‖`
//! rather than by `pre`, so a token's share of the budget does not grow with its norm. Without it,
//! the few tokens whose residual norm is 10–100× the median (Gemma's "massive activations" on
//! tokens like `’`) take the budget of hundreds of ordinary ones (RESULTS.md). The selected codes
//! keep their raw values `pre`; only the ranking is relative.
//!
//! Inference cannot see a batch, so training tracks a threshold θ: an exponential moving average
//! of the smallest key selected in each batch. At inference a feature is active when its
//! pre-activation is positive and its key exceeds θ (stored as a per-feature `threshold`, all
//! equal; relative to ‖x − b_dec‖ when selection is scale-free, see [`super::sae`]).

use rayon::prelude::*;

use super::kernels::{self, Codes};

/// Add `b_enc` to every row of `pre` (`[tokens, n]`) in place, then select the global top
/// `budget` keys into `out`; the key of a pair is `pre · scale[t]` (`scale`: per-token factors,
/// `None` for 1). Returns the smallest selected key (∞ when nothing was selected). Values tied
/// with the budget's last key are all kept (ties of f32 pre-activations are rare).
pub fn select(pre: &mut [f32], b_enc: &[f32], scale: Option<&[f32]>, budget: usize, out: &mut Codes) -> f32 {
    let n = b_enc.len();
    let factor = |t: usize| scale.map_or(1.0, |s| s[t]);
    pre.par_chunks_mut(n).enumerate().for_each(|(t, row)| {
        let s = factor(t);
        row.iter_mut().zip(b_enc).for_each(|(p, b)| *p = (*p + b) * s)
    });
    let theta = kernels::kth_largest(pre, budget);
    let rows: Vec<Vec<(u32, f32)>> = pre
        .par_chunks(n)
        .map(|row| {
            row.iter()
                .enumerate()
                .filter(|(_, v)| **v > 0.0 && **v >= theta)
                .map(|(f, v)| (f as u32, *v))
                .collect()
        })
        .collect();
    out.clear();
    let mut min = f32::INFINITY;
    for row in &rows {
        min = row.iter().fold(min, |m, e| m.min(e.1));
    }
    if scale.is_some() {
        // Back to raw values, for the codes and for the auxiliary loss's selection.
        pre.par_chunks_mut(n).enumerate().for_each(|(t, row)| {
            let s = factor(t);
            row.iter_mut().for_each(|p| *p /= s)
        });
    }
    for (t, row) in rows.iter().enumerate() {
        let raw: Vec<(u32, f32)> = row.iter().map(|&(f, _)| (f, pre[t * n + f as usize])).collect();
        out.push_row(&raw);
    }
    min
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens 0..4 have 50× the norm of tokens 4..8 (same directions): raw ranking gives the
    /// budget to the big ones; scale-free ranking shares it.
    #[test]
    fn scale_free_selection_shares_the_budget_across_norms() {
        let (n, tokens, budget) = (16, 8, 32);
        let base: Vec<f32> = (0..tokens / 2 * n).map(|i| ((i * 7919) % 101) as f32 / 101.0).collect();
        let mut pre: Vec<f32> = base.iter().map(|v| 50.0 * v).chain(base.iter().copied()).collect();
        let norms: Vec<f32> = (0..tokens).map(|t| if t < 4 { 50.0 } else { 1.0 }).collect();
        let scale: Vec<f32> = norms.iter().map(|v| 1.0 / v).collect();
        let per_half = |codes: &Codes| {
            let l0 = |t: usize| codes.row(t).0.len();
            ((0..4).map(l0).sum::<usize>(), (4..8).map(l0).sum::<usize>())
        };
        let (mut raw, mut free) = (Codes::default(), Codes::default());
        select(&mut pre.clone(), &[0.0; 16], None, budget, &mut raw);
        let min = select(&mut pre, &[0.0; 16], Some(&scale), budget, &mut free);
        assert_eq!(per_half(&raw), (32, 0));
        assert_eq!(per_half(&free), (16, 16));
        // Values stay raw: the big tokens' codes are 50× the small ones'.
        let (_, big) = free.row(0);
        let (_, small) = free.row(4);
        assert!((big[0] / small[0] - 50.0).abs() < 1e-3);
        assert!(min > 0.0 && min <= small.iter().cloned().fold(f32::INFINITY, f32::min) + 1e-6);
    }
}

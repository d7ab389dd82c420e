//! Mutual Choice / BatchTopK (Ayonrinde; Bussmann et al.): the batch keeps its k·B largest
//! positive pre-activations, so a token may get more or fewer than k features.
//!
//! Inference cannot see a batch, so training tracks a threshold θ: an exponential moving average
//! of the smallest value selected in each batch. At inference a feature is active when its
//! pre-activation exceeds θ (stored as a per-feature `threshold`, all equal).

use rayon::prelude::*;

use super::kernels::{self, Codes};

/// Add `b_enc` to every row of `pre` (`[tokens, n]`) in place, then select the global top
/// `budget` into `out`. Returns the smallest selected value (∞ when nothing was selected).
/// Values tied with the budget's last one are all kept (ties of f32 pre-activations are rare).
pub fn select(pre: &mut [f32], b_enc: &[f32], budget: usize, out: &mut Codes) -> f32 {
    let n = b_enc.len();
    pre.par_chunks_mut(n).for_each(|row| row.iter_mut().zip(b_enc).for_each(|(p, b)| *p += b));
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
        out.push_row(row);
        min = row.iter().fold(min, |m, e| m.min(e.1));
    }
    min
}

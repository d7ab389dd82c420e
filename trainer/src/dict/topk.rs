//! TopK selection (Gao et al.): each token keeps its k largest positive pre-activations.
//!
//! With Multi-TopK, the same pass keeps the 4k largest: sorted by value, their first k are the
//! TopK codes, so both sets cost one selection.

use rayon::prelude::*;

use super::kernels::{self, Codes};

/// Per-token top-`k` of `pre + b_enc` (`pre` is `[tokens, n]`) appended to `main`; with `multi`,
/// also the top-`multi_k` (≥ k) appended to the second set.
pub fn select(
    pre: &[f32],
    b_enc: &[f32],
    k: usize,
    mut multi: Option<(usize, &mut Codes)>,
    main: &mut Codes,
) {
    let n = b_enc.len();
    let keep = multi.as_ref().map_or(k, |(m, _)| (*m).max(k));
    let rows: Vec<Vec<(u32, f32)>> = pre
        .par_chunks(n)
        .map_init(Vec::new, |scratch, row| {
            let mut sel = Vec::with_capacity(keep);
            kernels::topk_row(row, Some(b_enc), keep, &mut sel, scratch);
            sel
        })
        .collect();
    for row in &rows {
        main.push_row(&row[..k.min(row.len())]);
    }
    if let Some((_, codes)) = multi.as_mut() {
        for row in &rows {
            codes.push_row(row);
        }
    }
}

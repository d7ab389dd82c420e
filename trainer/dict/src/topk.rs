//! TopK selection (Gao et al.): each token keeps its k largest positive pre-activations.
//!
//! With Multi-TopK, the same pass keeps the 4k largest: sorted by value, their first k are the
//! TopK codes, so both sets cost one selection. [`select_among`] is the same per-token selection
//! restricted to a set of features (the auxiliary losses' dead or under-used ones).
//! [`select_amx`] does both from `x` on CPUs with AMX, without the dense pre-activations.

use rayon::prelude::*;

use super::amx;
use super::kernels::{self, Codes};
use super::sae::Sae;

/// Per-token top-`k` of `pre + b_enc` (`pre` is `[tokens, n]`) appended to `main`; with `multi`,
/// also the top-`multi_k` (≥ k) appended to the second set.
pub fn select(pre: &[f32], b_enc: &[f32], k: usize, multi: Option<(usize, &mut Codes)>, main: &mut Codes) {
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
    push_rows(&rows, k, multi.map(|(_, codes)| codes), main);
}

/// Appends per-token selections (descending, at least the top `k` of each) to `main` cut to `k`,
/// and whole to `multi`.
pub fn push_rows(rows: &[Vec<(u32, f32)>], k: usize, multi: Option<&mut Codes>, main: &mut Codes) {
    for row in rows {
        main.push_row(&row[..k.min(row.len())]);
    }
    if let Some(codes) = multi {
        for row in rows {
            codes.push_row(row);
        }
    }
}

/// Buffers of [`select_amx`], kept between steps.
#[derive(Default)]
pub struct AmxScratch {
    packed: amx::PackedEncoder,
    /// The auxiliary set's gathered encoder rows, biases and pre-activations.
    w_aux: Vec<f32>,
    b_aux: Vec<f32>,
    pre_aux: Vec<f32>,
}

/// [`select`] on AMX ([`amx::select_topk`]) from `x` (`[tokens, d]`, already minus b_dec), and
/// with `aux = (set, k_aux, out)` the AuxK selection of [`select_among`] (floor 0, with b_enc)
/// from a GEMM over the set's gathered rows only.
pub fn select_amx(
    sae: &Sae,
    x: &[f32],
    k: usize,
    multi: Option<(usize, &mut Codes)>,
    main: &mut Codes,
    aux: Option<(&[u32], usize, &mut Codes)>,
    s: &mut AmxScratch,
) {
    let (n, d) = (sae.spec.n_features, sae.spec.d_in);
    s.packed.pack(&sae.w_enc, n, d);
    let keep = multi.as_ref().map_or(k, |(m, _)| (*m).max(k));
    let rows = amx::select_topk(x, &sae.w_enc, &s.packed, &sae.b_enc, keep);
    push_rows(&rows, k, multi.map(|(_, codes)| codes), main);
    let Some((set, k_aux, out)) = aux else { return };
    let (m, tokens) = (set.len(), x.len() / d);
    s.w_aux.clear();
    s.b_aux.clear();
    for &f in set {
        s.w_aux.extend_from_slice(&sae.w_enc[f as usize * d..(f as usize + 1) * d]);
        s.b_aux.push(sae.b_enc[f as usize]);
    }
    s.pre_aux.resize(tokens * m, 0.0);
    kernels::matmul_nt(x, &s.w_aux, &mut s.pre_aux, tokens, m, d, false);
    let local: Vec<u32> = (0..m as u32).collect();
    let start = out.feature.len();
    select_among(&s.pre_aux, Some(&s.b_aux), 0.0, m, tokens, false, &local, k_aux, out);
    // `set` is ascending, so the mapped rows stay sorted by feature.
    out.feature[start..].iter_mut().for_each(|f| *f = set[*f as usize]);
}

/// Per token, the `k` largest `pre (+ bias)` above `floor` among the features of `set`, appended
/// to `out`.
#[allow(clippy::too_many_arguments)]
pub(super) fn select_among(
    pre: &[f32],
    bias: Option<&[f32]>,
    floor: f32,
    n: usize,
    tokens: usize,
    feature_major: bool,
    set: &[u32],
    k: usize,
    out: &mut Codes,
) {
    let rows: Vec<Vec<(u32, f32)>> = (0..tokens)
        .into_par_iter()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(gathered, scratch): &mut (Vec<f32>, Vec<f32>), t| {
                gathered.clear();
                gathered.extend(set.iter().map(|&f| {
                    let f = f as usize;
                    let p = if feature_major { pre[f * tokens + t] } else { pre[t * n + f] };
                    p + bias.map_or(0.0, |b| b[f])
                }));
                let mut sel = Vec::new();
                kernels::topk_row_above(gathered, None, floor, k, &mut sel, scratch);
                for e in &mut sel {
                    e.0 = set[e.0 as usize];
                }
                sel.sort_unstable_by_key(|e| e.0);
                sel
            },
        )
        .collect();
    for row in &rows {
        out.push_row(row);
    }
}

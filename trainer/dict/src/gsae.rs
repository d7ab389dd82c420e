//! g-SAE selection (Olmo et al.): TopK over the activation weighted by its downstream effect.
//!
//! With z = ReLU(pre) and g = ∂L/∂x (the store's `grad` column), each token ranks its features by
//! s_f = z_f · (1 + β·|w_dec[f] · g| / mean|w_dec · g|) and keeps the k best, with values z_f (not s).
//! The projection is divided by its mean absolute value over the batch (all tokens and features),
//! so β is free of the gradient's scale (which depends on the loss's reduction and the model);
//! β = 0 is plain TopK. Computing every feature's projection is a second dense GEMM, the price
//! of using the gradient in the selection. At inference there is no gradient: plain TopK.

use rayon::prelude::*;

use super::kernels::{self, Codes};

/// Select into `out`. `proj` receives `g · w_decᵀ` (`[tokens, n]`, overwritten).
#[allow(clippy::too_many_arguments)]
pub fn select(
    pre: &[f32],
    b_enc: &[f32],
    grad: &[f32],
    w_dec: &[f32],
    d: usize,
    k: usize,
    beta: f32,
    proj: &mut Vec<f32>,
    out: &mut Codes,
) {
    let n = b_enc.len();
    let tokens = grad.len() / d;
    proj.resize(tokens * n, 0.0);
    kernels::matmul_nt(grad, w_dec, proj, tokens, n, d, false);
    let part = proj.len().div_ceil(64).max(1);
    let total: f64 = proj
        .par_chunks(part)
        .map(|c| c.iter().map(|v| v.abs() as f64).sum::<f64>())
        .collect::<Vec<_>>()
        .iter()
        .sum();
    let mean = (total / proj.len().max(1) as f64) as f32;
    let scale = if mean > 0.0 { beta / mean } else { 0.0 };
    let rows: Vec<Vec<(u32, f32)>> = proj
        .par_chunks_mut(n)
        .zip(pre.par_chunks(n))
        .map_init(Vec::new, |scratch, (s, p)| {
            for ((s, p), b) in s.iter_mut().zip(p).zip(b_enc) {
                let z = (p + b).max(0.0);
                *s = z * (1.0 + scale * s.abs());
            }
            let mut sel = Vec::with_capacity(k);
            kernels::topk_row(s, None, k, &mut sel, scratch);
            for e in &mut sel {
                e.1 = p[e.0 as usize] + b_enc[e.0 as usize];
            }
            sel
        })
        .collect();
    out.clear();
    for row in &rows {
        out.push_row(row);
    }
}

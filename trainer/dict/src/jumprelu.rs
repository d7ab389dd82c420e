//! JumpReLU (Rajamanoharan et al. 2024) and standard ReLU + L1 SAEs: the threshold family, whose
//! sparsity comes from a penalty instead of a budget.
//!
//! With v = pre + b_enc:
//! - ReLU: z = max(v, 0); loss FVU + λ·Σ z / Σ‖x − x̄‖² (λ = `sparsity_coefficient`; decoder rows
//!   are unit norm, so this is SAELens' `standard` L1 term Σ z·‖W_dec[f]‖ in the same units:
//!   SAELens' per-token loss divided by the per-token variance).
//! - JumpReLU: z = v·H(v − θ_f), θ_f ≥ 0 learned (initialised at `jumprelu_init_threshold`);
//!   loss FVU + λ·Σ_t P(L0_t) / Σ‖x − x̄‖² with L0_t = Σ_f H(v − θ) and the penalty P either
//!   `step`, P(l) = l (Rajamanoharan et al.), or `quadratic`, P(l) = (2/k)·(l − k)² around the
//!   target k (Gemma Scope 2); as SAELens 6. H has no useful derivative, so θ gets the
//!   straight-through pseudo-derivatives
//!   with a rectangle kernel K(u) = 1{|u| < ½} of bandwidth ε (`jumprelu_bandwidth`):
//!   ∂z/∂θ := −(θ/ε)·K((v − θ)/ε) and ∂H/∂θ := −(1/ε)·K((v − θ)/ε); v itself gets H(v − θ) as
//!   usual. So only the *band* pairs, |v − θ_f| < ε/2 (selected or not), move θ:
//!   ∂loss/∂θ_f = Σ_band −(θ_f/ε)·(∂loss/∂z) − λ'/ε, with ∂loss/∂z = W_dec[f]·∂loss/∂x̂ even for a
//!   pair that is not active, and λ' = λ·P'(L0_t) / Σ‖x − x̄‖²; Adam steps θ_f, then θ_f is
//!   clamped at 0. (For `step`, with ε = 2h, −λ'·#band/ε is exactly the central finite difference
//!   of the L0 term at step h; the tests check the band sums against a dense evaluation of these
//!   formulas.)
//!
//! Training starts dense for both (about half the features are positive at initialisation) and
//! the penalty makes it sparse; the codes are sparse CSR all along, so the sparse backward and
//! update of [`super::train`] apply unchanged. There is no AuxK: the penalty, not a budget,
//! decides what fires.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::kernels::Codes;

/// JumpReLU's sparsity penalty on each token's L0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum L0Penalty {
    /// P(l) = l.
    #[default]
    Step,
    /// P(l) = (2/k)·(l − k)²: steers the mean L0 towards k.
    Quadratic,
}

impl std::str::FromStr for L0Penalty {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s {
            "step" => Ok(L0Penalty::Step),
            "quadratic" => Ok(L0Penalty::Quadratic),
            _ => anyhow::bail!("unknown JumpReLU sparsity penalty {s:?} (expected step or quadratic)"),
        }
    }
}

/// Σ_t P(L0_t) over the batch, and P'(L0_t) per token.
pub fn l0_penalty(codes: &Codes, penalty: L0Penalty, k: usize) -> (f64, Vec<f64>) {
    let k = k as f64;
    let l0 = (0..codes.tokens()).map(|t| (codes.offsets[t + 1] - codes.offsets[t]) as f64);
    match penalty {
        L0Penalty::Step => (codes.nnz() as f64, vec![1.0; codes.tokens()]),
        L0Penalty::Quadratic => {
            let l0: Vec<f64> = l0.collect();
            let loss = l0.iter().map(|l| 2.0 / k * (l - k).powi(2)).sum();
            (loss, l0.iter().map(|l| 4.0 / k * (l - k)).collect())
        }
    }
}

/// One token's (feature, value) pairs.
type Row = Vec<(u32, f32)>;

/// Per token, the pairs with `pre + b_enc` above the threshold (0 for ReLU) into `main`, and for
/// JumpReLU the band pairs `|v − θ| < ε/2` into `band`. `pre` is `[tokens, n]`.
pub fn select(
    pre: &[f32],
    b_enc: &[f32],
    threshold: Option<(&[f32], f32)>,
    main: &mut Codes,
    band: &mut Codes,
) {
    let n = b_enc.len();
    let rows: Vec<(Row, Row)> = pre
        .par_chunks(n)
        .map(|row| {
            let (mut sel, mut near) = (Vec::new(), Vec::new());
            match threshold {
                None => {
                    for (f, (p, b)) in row.iter().zip(b_enc).enumerate() {
                        let v = p + b;
                        if v > 0.0 {
                            sel.push((f as u32, v));
                        }
                    }
                }
                Some((theta, eps)) => {
                    for (f, ((p, b), t)) in row.iter().zip(b_enc).zip(theta).enumerate() {
                        let v = p + b;
                        if v > *t {
                            sel.push((f as u32, v));
                        }
                        if (v - t).abs() < 0.5 * eps {
                            near.push((f as u32, v));
                        }
                    }
                }
            }
            (sel, near)
        })
        .collect();
    for (sel, near) in &rows {
        main.push_row(sel);
        band.push_row(near);
    }
}

//! Feature Choice (Ayonrinde 2024): each feature picks its tokens. Feature f keeps its m_f largest
//! positive pre-activations over the batch, with capacities m_f from a Zipf law, so the batch's
//! budget k·B is spread the way real feature densities are (a few common features, a long tail).
//!
//! Capacities: features are ranked by their moving-average firing density (most frequent first,
//! ties by id); rank r (1-based) gets m ∝ r^(−α) (α = `zipf_exponent`, default 0.5), scaled so the
//! capacities sum to about k·B, each at least 1 and at most B. Because the ranking follows the
//! densities, the fit adapts as features specialise.
//!
//! aux_zipf (the auxiliary loss of this variant; the paper does not publish one): AuxK generalised
//! from dead features to *under-used* ones, and from positive to raw pre-activations. A feature is
//! under-used when its density is below a quarter of its Zipf target m_f/B (dead features, which
//! never fire, are the extreme case). Each token reconstructs the main reconstruction's residual
//! e = x − x̂ (detached) with its k_aux largest pre-activations among the under-used features,
//! *whatever their sign*: ê = Σ pre_f · W_dec[f]; the loss is α·‖e − ê‖²/Σ‖x − x̄‖² as in AuxK.
//! Using raw values is the difference that matters: Feature Choice already makes every feature
//! with some positive pre-activation fire (it takes its best tokens), so the features left behind
//! are exactly those whose pre-activation is never positive, which AuxK's ReLU'd values would give
//! no gradient. The raw values do: the loss pulls each such feature's pre-activation towards the
//! coefficient that explains the residual along its decoder direction (and the direction towards
//! the residual), so the feature climbs back above zero and starts winning tokens
//! (`aux_zipf_revives_underused_features` in tests/tests/sae_train.rs).
//!
//! Scale-free selection (default, as in [`super::mutual_choice`]): a feature ranks its tokens by
//! `pre / ‖x − b_dec‖`, so a token with a huge norm does not win every feature's capacity.
//!
//! Inference: each feature keeps a threshold, the moving average of the smallest key it selected
//! in batches where it filled its capacity (0 when it took every positive token it had).

use rayon::prelude::*;

use super::kernels::{self, Codes};

/// Zipf capacities for `density` (see the module docs), summing to about `budget`.
pub fn capacities(density: &[f32], budget: usize, tokens: usize, alpha: f32) -> Vec<u32> {
    let n = density.len();
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.sort_by(|&a, &b| density[b as usize].total_cmp(&density[a as usize]).then(a.cmp(&b)));
    let weights: Vec<f64> = (1..=n).map(|r| (r as f64).powf(-(alpha as f64))).collect();
    let total: f64 = weights.iter().sum();
    let mut caps = vec![0u32; n];
    for (rank, &f) in order.iter().enumerate() {
        let m = (budget as f64 * weights[rank] / total).round();
        caps[f as usize] = m.clamp(1.0, tokens.max(1) as f64) as u32;
    }
    caps
}

/// What each feature selected in one batch.
#[derive(Clone, Copy, Debug)]
pub struct Picked {
    pub count: u32,
    /// Smallest selected value (∞ when none).
    pub min: f32,
}

/// Per-feature selection. `pre_t` is `[n, tokens]` (feature-major), b_enc is added in place.
/// Each feature ranks its tokens by the key `pre · scale[t]` (`scale`: per-token factors, `None`
/// for 1); [`Picked::min`] is the smallest selected key. Writes token-major codes (raw values)
/// into `out`.
pub fn select(
    pre_t: &mut [f32],
    b_enc: &[f32],
    scale: Option<&[f32]>,
    tokens: usize,
    caps: &[u32],
    out: &mut Codes,
) -> Vec<Picked> {
    let per_feature: Vec<Vec<(u32, f32)>> = pre_t
        .par_chunks_mut(tokens)
        .zip(b_enc.par_iter().zip(caps.par_iter()))
        .map_init(Vec::new, |scratch, (row, (b, &cap))| {
            row.iter_mut().for_each(|v| *v += b);
            let mut sel = Vec::with_capacity(cap as usize);
            match scale {
                None => kernels::topk_row(row, None, cap as usize, &mut sel, scratch),
                Some(s) => {
                    let keys: Vec<f32> = row.iter().zip(s).map(|(v, s)| v * s).collect();
                    kernels::topk_row(&keys, None, cap as usize, &mut sel, scratch);
                    for e in &mut sel {
                        e.1 = keys[e.0 as usize];
                    }
                }
            }
            sel
        })
        .collect();
    let picked = per_feature
        .iter()
        .map(|s| Picked { count: s.len() as u32, min: s.iter().fold(f32::INFINITY, |m, e| m.min(e.1)) })
        .collect();
    // Feature-major → token-major (counting sort by token; features stay ascending per token).
    let mut offsets = vec![0u32; tokens + 1];
    for s in &per_feature {
        for &(t, _) in s {
            offsets[t as usize + 1] += 1;
        }
    }
    for t in 0..tokens {
        offsets[t + 1] += offsets[t];
    }
    let nnz = offsets[tokens] as usize;
    let mut fill = offsets.clone();
    out.feature.clear();
    out.feature.resize(nnz, 0);
    out.value.clear();
    out.value.resize(nnz, 0.0);
    for (f, s) in per_feature.iter().enumerate() {
        for &(t, _) in s {
            let slot = &mut fill[t as usize];
            out.feature[*slot as usize] = f as u32;
            out.value[*slot as usize] = pre_t[f * tokens + t as usize];
            *slot += 1;
        }
    }
    out.offsets = offsets;
    picked
}

/// Features whose density is below a quarter of their Zipf target `cap / tokens`.
pub fn underused(density: &[f32], caps: &[u32], tokens: usize) -> Vec<u32> {
    density
        .iter()
        .zip(caps)
        .enumerate()
        .filter(|(_, (d, c))| **d < 0.25 * **c as f32 / tokens.max(1) as f32)
        .map(|(f, _)| f as u32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_follow_the_density_ranking_and_sum_to_the_budget() {
        let density = [0.1, 0.5, 0.0, 0.3];
        let caps = capacities(&density, 40, 100, 1.0);
        // ranks: f1, f3, f0, f2 → weights 1, 1/2, 1/3, 1/4 (sum 25/12) → 19.2, 9.6, 6.4, 4.8
        assert_eq!(caps, vec![6, 19, 5, 10]);
        let capped = capacities(&density, 1000, 100, 1.0);
        assert!(capped.iter().all(|&c| (1..=100).contains(&c)));
    }

    #[test]
    fn each_feature_takes_its_capacity() {
        // 2 features, 4 tokens; feature-major pre-activations.
        let mut pre_t = vec![0.5, -1.0, 0.9, 0.1, /* f1 */ 0.2, 0.3, -0.5, 0.7];
        let mut codes = Codes::default();
        let picked = select(&mut pre_t, &[0.0, 0.0], None, 4, &[2, 4], &mut codes);
        assert_eq!(picked[0].count, 2);
        assert_eq!(picked[1].count, 3); // only 3 positive
        assert_eq!(codes.offsets, vec![0, 2, 3, 4, 5]);
        assert_eq!(codes.feature, vec![0, 1, 1, 0, 1]);
        assert_eq!(codes.value, vec![0.5, 0.2, 0.3, 0.9, 0.7]);
    }
}

//! Co-occurring features: for each feature, the features that fire on the same tokens, ranked by
//! Jaccard index |A ∩ B| / |A ∪ B| over the tokens of the pass.
//!
//! Exact counts, computed from the pass' codes a block of features at a time (a dense
//! `[block, n_features]` counter, so memory stays bounded), blocks in parallel. The work is
//! rows × (active features per row)²; when that exceeds `max_work` (Monet layers activate
//! hundreds of experts per token) only the first rows that fit are used, and the caller records
//! how many.

use loupe_store::Cooccurrence;
use rayon::prelude::*;

use super::codes_file::CodesFile;

/// Counter entries per block (64 MiB of u32).
const BLOCK_ENTRIES: usize = 1 << 24;

/// The rows co-occurrence uses: all, or the first ones within `max_work` pair updates.
pub fn rows_used(codes: &CodesFile, max_work: f64) -> usize {
    let per_row = codes.mean_active().powi(2).max(1.0);
    codes.rows().min((max_work / per_row) as usize)
}

/// The `top` co-occurring features of every feature over the first `rows` rows, sorted by
/// feature, then rank.
pub fn cooccurrence(codes: &CodesFile, n_features: usize, rows: usize, top: usize) -> Vec<Cooccurrence> {
    // Firing counts over the same rows.
    let mut fired = vec![0u64; n_features];
    for r in 0..rows {
        for (f, _) in codes.row(r) {
            fired[f as usize] += 1;
        }
    }
    let block = (BLOCK_ENTRIES / n_features.max(1)).clamp(1, n_features.max(1));
    let starts: Vec<usize> = (0..n_features).step_by(block).collect();
    starts
        .into_par_iter()
        .flat_map_iter(|f0| {
            let f1 = (f0 + block).min(n_features);
            let mut counts = vec![0u32; (f1 - f0) * n_features];
            let mut active: Vec<u32> = Vec::new();
            for r in 0..rows {
                active.clear();
                active.extend(codes.row(r).map(|e| e.0));
                for &f in &active {
                    let f = f as usize;
                    if f < f0 || f >= f1 {
                        continue;
                    }
                    let counter = &mut counts[(f - f0) * n_features..(f - f0 + 1) * n_features];
                    for &g in &active {
                        counter[g as usize] += 1;
                    }
                }
            }
            let fired = &fired;
            (f0..f1)
                .flat_map(move |f| {
                    let counter = &counts[(f - f0) * n_features..(f - f0 + 1) * n_features];
                    let mut best: Vec<(f32, u32, u64)> = counter
                        .iter()
                        .enumerate()
                        .filter(|&(g, &c)| c > 0 && g != f)
                        .map(|(g, &c)| {
                            let c = u64::from(c);
                            let union = fired[f] + fired[g] - c;
                            (c as f32 / union as f32, g as u32, c)
                        })
                        .collect();
                    best.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                    best.truncate(top);
                    best.into_iter()
                        .enumerate()
                        .map(|(rank, (jaccard, other, shared))| Cooccurrence {
                            feature_id: f as u32,
                            rank: rank as u8,
                            other,
                            shared,
                            jaccard,
                        })
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

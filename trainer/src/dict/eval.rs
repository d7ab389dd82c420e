//! Evaluation of a dictionary on held-out activations: reconstruction (FVU), sparsity (L0),
//! dead and dense features.
//!
//! FVU = Σ‖x − x̂‖² / Σ‖x − x̄‖² over all evaluated rows (x̄: their mean); L0 = mean active
//! features per token; a feature is dead when it never fires on the evaluated rows and dense when
//! it fires on more than 10% of them. Encoding uses each dictionary's batch-free inference rule.

use std::ops::Range;

use anyhow::{Result, bail};
use loupe_store::Activations;
use serde::{Deserialize, Serialize};

use super::Dictionary;

/// Rows encoded at a time.
const EVAL_CHUNK: usize = 4096;
/// Firing frequency above which a feature counts as dense.
pub const DENSE_FREQUENCY: f64 = 0.1;

/// What an evaluation measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalStats {
    pub tokens: u64,
    pub fvu: f64,
    pub l0: f64,
    pub dead_fraction: f64,
    pub dense_fraction: f64,
}

/// Evaluate `dict` on rows `rows` (storage order, across shards) of `acts`.
pub fn eval_reconstruction(dict: &dyn Dictionary, acts: &Activations, rows: Range<u64>) -> Result<EvalStats> {
    let d = acts.spec().d as usize;
    if dict.d_in() != d {
        bail!("dictionary reads width {}, hook {} has width {d}", dict.d_in(), acts.hook());
    }
    let n = dict.n_features();
    let mut fires = vec![0u64; n];
    let (mut err, mut sum_sq, mut nnz, mut tokens) = (0.0f64, 0.0f64, 0u64, 0u64);
    let mut sum = vec![0.0f64; d];
    let (mut x, mut xhat) = (Vec::new(), Vec::new());
    let mut offset = 0u64;
    for i in 0..acts.num_shards() {
        let shard = acts.open_shard(i)?;
        let shard_rows = shard.rows() as u64;
        let (lo, hi) = (rows.start.max(offset), rows.end.min(offset + shard_rows));
        let mut start = lo;
        while start < hi {
            let end = (start + EVAL_CHUNK as u64).min(hi);
            let local = (start - offset) as usize..(end - offset) as usize;
            shard.act().rows(local, d).to_f32_into(&mut x);
            let codes = dict.encode(&x);
            xhat.resize(x.len(), 0.0);
            dict.decode(&codes, &mut xhat);
            for (row, rec) in x.chunks(d).zip(xhat.chunks(d)) {
                for ((v, r), s) in row.iter().zip(rec).zip(sum.iter_mut()) {
                    err += ((v - r) as f64).powi(2);
                    sum_sq += (*v as f64).powi(2);
                    *s += *v as f64;
                }
            }
            for &f in &codes.feature {
                fires[f as usize] += 1;
            }
            nnz += codes.nnz() as u64;
            tokens += end - start;
            start = end;
        }
        offset += shard_rows;
    }
    if tokens == 0 {
        bail!("no rows to evaluate in {}..{} of hook {}", rows.start, rows.end, acts.hook());
    }
    let mean_sq: f64 = sum.iter().map(|s| s * s).sum::<f64>() / tokens as f64;
    let variance = (sum_sq - mean_sq).max(f64::MIN_POSITIVE);
    Ok(EvalStats {
        tokens,
        fvu: err / variance,
        l0: nnz as f64 / tokens as f64,
        dead_fraction: fires.iter().filter(|&&c| c == 0).count() as f64 / n as f64,
        dense_fraction: fires.iter().filter(|&&c| c as f64 > DENSE_FREQUENCY * tokens as f64).count() as f64
            / n as f64,
    })
}

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

/// Evaluate `dict` on rows `rows` (storage order, across shards) of `acts`: how well it
/// reconstructs them, or with `target`, the same rows of another hook captured with them (a
/// transcoder's output).
pub fn eval_reconstruction(
    dict: &dyn Dictionary,
    acts: &Activations,
    target: Option<&Activations>,
    rows: Range<u64>,
) -> Result<EvalStats> {
    let d = acts.spec().d as usize;
    if dict.d_in() != d {
        bail!("dictionary reads width {}, hook {} has width {d}", dict.d_in(), acts.hook());
    }
    let d_out = target.map_or(d, |t| t.spec().d as usize);
    if dict.d_out() != d_out {
        bail!("dictionary writes width {}, the target has width {d_out}", dict.d_out());
    }
    let n = dict.n_features();
    let mut fires = vec![0u64; n];
    let (mut err, mut sum_sq, mut nnz, mut tokens) = (0.0f64, 0.0f64, 0u64, 0u64);
    let mut sum = vec![0.0f64; d_out];
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut offset = 0u64;
    for i in 0..acts.num_shards() {
        let shard = acts.open_shard(i)?;
        let shard_rows = shard.rows() as u64;
        let target_shard = match target {
            Some(t) if i < t.num_shards() => Some(t.open_shard(i)?),
            Some(t) => {
                bail!("hook {} has fewer shards than {}: not captured together", t.hook(), acts.hook())
            }
            None => None,
        };
        if let Some(ts) = &target_shard
            && ts.rows() != shard.rows()
        {
            bail!("shard {i} of the two hooks holds different rows: not captured together");
        }
        let (lo, hi) = (rows.start.max(offset), rows.end.min(offset + shard_rows));
        let mut start = lo;
        while start < hi {
            let end = (start + EVAL_CHUNK as u64).min(hi);
            let local = (start - offset) as usize..(end - offset) as usize;
            shard.act().rows(local.clone(), d).to_f32_into(&mut x);
            let (codes, xhat) = dict.reconstruct(&x);
            let want = match &target_shard {
                Some(ts) => {
                    ts.act().rows(local, d_out).to_f32_into(&mut y);
                    &y
                }
                None => &x,
            };
            for (row, rec) in want.chunks(d_out).zip(xhat.chunks(d_out)) {
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

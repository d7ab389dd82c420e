//! The sums behind the training losses: total variance (FVU's denominator), squared distances,
//! and the upstream gradient of a reconstruction, each summed in a fixed order so that results do
//! not depend on the thread count's scheduling.

use rayon::prelude::*;

/// Σ‖x − x̄‖² over the rows of `x` (x̄: the mean row), in f64.
pub fn total_variance(x: &[f32], d: usize) -> f64 {
    let rows = (x.len() / d).max(1);
    let mut mean = vec![0.0f64; d];
    for row in x.chunks(d) {
        mean.iter_mut().zip(row).for_each(|(m, v)| *m += *v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= rows as f64);
    x.chunks(d).map(|row| row.iter().zip(&mean).map(|(v, m)| (*v as f64 - m).powi(2)).sum::<f64>()).sum()
}

/// Σ (a − b)², in f64 over fixed chunks.
pub fn sq_dist(a: &[f32], b: &[f32]) -> f64 {
    let parts: Vec<f64> = a
        .par_chunks(1 << 14)
        .zip(b.par_chunks(1 << 14))
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>())
        .collect();
    parts.iter().sum()
}

/// `out = scale · (xhat − target)`.
pub(super) fn upstream(xhat: &[f32], target: &[f32], scale: f32, out: &mut Vec<f32>) {
    out.clear();
    out.extend(xhat.iter().zip(target).map(|(a, b)| scale * (a - b)));
}

/// `out += scale · Σ rows`, summed in a fixed order.
pub(super) fn sum_rows_into(x: &[f32], d: usize, scale: f32, out: &mut [f32]) {
    let parts: Vec<Vec<f32>> = x
        .par_chunks(256 * d)
        .map(|block| {
            let mut acc = vec![0.0f32; d];
            for row in block.chunks(d) {
                acc.iter_mut().zip(row).for_each(|(a, v)| *a += v);
            }
            acc
        })
        .collect();
    for p in parts {
        out.iter_mut().zip(p).for_each(|(o, v)| *o += scale * v);
    }
}

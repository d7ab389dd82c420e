//! `x·wᵀ` without a weight gradient, and the chunked next-token loss head (with its gradient, or
//! the loss of each row alone).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use multiversion::multiversion;

use super::{exp_in_place, f32_slice, fast_exp, matmul, with_f32};

/// `x · wᵀ` for `x` `[rows, in]` and `w` `[out, in]`, whose backward gives `x` its gradient
/// (`∂y · w`) and `w` none: candle's matmul backward always computes the right operand's gradient
/// too, a second GEMM per layer wasted when weights are not trained.
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
}

struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (f32_slice(s1, l1, "linear")?, f32_slice(s2, l2, "linear")?);
        let (rows, k) = l1.shape().dims2()?;
        let (n, wk) = l2.shape().dims2()?;
        if wk != k {
            candle_core::bail!("linear: x {:?} and w {:?} do not fit", l1.shape(), l2.shape());
        }
        let mut y = vec![0f32; rows * n];
        matmul(x, (k, 1), w, (1, k), &mut y, (n, 1), rows, n, k);
        Ok((CpuStorage::F32(y), Shape::from((rows, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), None))
    }
}

/// Rows of logits the loss head computes at once (512 × 262,144 f32 = 512 MiB for Gemma 3): each
/// chunk streams the whole unembedding twice, so larger chunks read it less often (256 rows: 5%
/// slower on Gemma 3; BENCHMARKS.md).
pub const LOSS_ROWS: usize = 512;

/// The next-token loss head on `h` `[rows, d]` (final normalized hidden states) with the
/// unembedding `w` `[vocab, d]` and one target per row: the summed cross-entropy
/// `Σ logsumexp(h·wᵀ) − logit[target]` and its gradient `∂L/∂h = softmax(h·wᵀ)·w − w[target]`
/// `[rows, d]`. Runs `LOSS_ROWS` rows at a time in one reused buffer: a GEMM for the logits, one
/// pass per row for max, exp, sum and the loss, a GEMM for the gradient; the `[rows, vocab]`
/// logits of a whole batch never exist.
pub fn loss_head(h: &Tensor, w: &Tensor, targets: &[u32]) -> candle_core::Result<(f64, Tensor)> {
    let (rows, d) = h.dims2()?;
    let (vocab, wd) = w.dims2()?;
    if wd != d || targets.len() != rows {
        candle_core::bail!(
            "loss head: h {:?}, w {:?}, {} targets do not fit",
            h.dims(),
            w.dims(),
            targets.len()
        );
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("loss head: target {t} is outside the vocabulary of {vocab}");
    }
    let (loss, grad) = with_f32(h, |h| {
        with_f32(w, |w| {
            let mut logits = vec![0f32; LOSS_ROWS.min(rows) * vocab];
            let mut grad = vec![0f32; rows * d];
            let mut loss = 0f64;
            for start in (0..rows).step_by(LOSS_ROWS) {
                let n = LOSS_ROWS.min(rows - start);
                let hc = &h[start * d..(start + n) * d];
                let logits = &mut logits[..n * vocab];
                matmul(hc, (d, 1), w, (1, d), logits, (vocab, 1), n, vocab, d);
                let tc = &targets[start..start + n];
                loss += logits
                    .par_chunks_mut(vocab)
                    .zip(tc.par_iter())
                    .map(|(row, &t)| {
                        let target = row[t as usize];
                        let (max, sum) = exp_in_place(row);
                        f64::from(sum.ln() + max - target)
                    })
                    .collect::<Vec<f64>>()
                    .iter()
                    .sum::<f64>();
                let gc = &mut grad[start * d..(start + n) * d];
                matmul(logits, (vocab, 1), w, (d, 1), gc, (d, 1), n, d, vocab);
                for (g, &t) in gc.chunks_exact_mut(d).zip(tc) {
                    for (g, &wt) in g.iter_mut().zip(&w[t as usize * d..(t as usize + 1) * d]) {
                        *g -= wt;
                    }
                }
            }
            (loss, grad)
        })
    })??;
    Ok((loss, Tensor::from_vec(grad, (rows, d), h.device())?))
}

/// The next-token loss of each row of `h` `[rows, d]` with the unembedding `w` `[vocab, d]`:
/// `logsumexp(h·wᵀ) − logit[target]`, `LOSS_ROWS` rows of logits at a time in one reused buffer
/// (the loss head without the gradient GEMM: half its work).
pub fn loss_rows(h: &Tensor, w: &Tensor, targets: &[u32]) -> candle_core::Result<Vec<f32>> {
    let (rows, d) = h.dims2()?;
    let (vocab, wd) = w.dims2()?;
    if wd != d || targets.len() != rows {
        candle_core::bail!(
            "loss rows: h {:?}, w {:?}, {} targets do not fit",
            h.dims(),
            w.dims(),
            targets.len()
        );
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("loss rows: target {t} is outside the vocabulary of {vocab}");
    }
    with_f32(h, |h| {
        with_f32(w, |w| {
            let mut logits = vec![0f32; LOSS_ROWS.min(rows) * vocab];
            let mut losses = Vec::with_capacity(rows);
            for start in (0..rows).step_by(LOSS_ROWS) {
                let n = LOSS_ROWS.min(rows - start);
                let logits = &mut logits[..n * vocab];
                matmul(&h[start * d..(start + n) * d], (d, 1), w, (1, d), logits, (vocab, 1), n, vocab, d);
                let chunk: Vec<f32> = logits
                    .par_chunks_mut(vocab)
                    .zip(targets[start..start + n].par_iter())
                    .map(|(row, &t)| log_sum_exp(row) - row[t as usize])
                    .collect();
                losses.extend(chunk);
            }
            losses
        })
    })?
}

/// `log Σ exp(row)`, in two read-only passes (max, then the sum of exponentials in 8 lanes).
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512dq+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn log_sum_exp(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = l.max(x);
        }
    }
    let max = lanes.iter().copied().fold(rest, f32::max);
    let mut lanes = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|&x| fast_exp(x - max)).sum();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += fast_exp(x - max);
        }
    }
    (lanes.iter().sum::<f32>() + rest).ln() + max
}

#[cfg(test)]
mod tests {
    use candle_core::{D, Device};

    use super::*;

    #[test]
    fn loss_rows_are_the_cross_entropy_of_each_row() {
        let dev = Device::Cpu;
        // More rows than one chunk, a vocabulary that is not a multiple of the lanes.
        let (rows, d, vocab) = (LOSS_ROWS + 3, 16, 1001);
        let h = (Tensor::randn(0f32, 1.0, (rows, d), &dev).unwrap() * 3.0).unwrap();
        let w = Tensor::randn(0f32, 1.0, (vocab, d), &dev).unwrap();
        let targets: Vec<u32> = (0..rows).map(|i| (i * 37 % vocab) as u32).collect();
        let losses = loss_rows(&h, &w, &targets).unwrap();
        let log_probs = candle_nn::ops::log_softmax(&h.matmul(&w.t().unwrap()).unwrap(), D::Minus1).unwrap();
        let log_probs: Vec<Vec<f32>> = log_probs.to_vec2().unwrap();
        for (i, (&loss, &t)) in losses.iter().zip(&targets).enumerate() {
            let expected = -log_probs[i][t as usize];
            assert!(
                (loss - expected).abs() < 1e-4 * expected.abs().max(1.0),
                "row {i}: {loss} vs {expected}"
            );
        }
        let (sum, _) = loss_head(&h, &w, &targets).unwrap();
        let total: f64 = losses.iter().map(|&l| f64::from(l)).sum();
        assert!((total - sum).abs() < 1e-6 * sum.abs(), "{total} vs {sum}");
        assert!(loss_rows(&h, &w, &[0]).is_err());
    }
}

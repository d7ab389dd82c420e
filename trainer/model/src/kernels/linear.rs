//! `x·wᵀ` without a weight gradient, and the chunked next-token loss head.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{exp_in_place, f32_slice, matmul, with_f32};

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

//! The next-token loss and its gradient at hook points.
//!
//! [`loss_gradients`] never builds the `[tokens, vocab]` logits of a whole batch (2 GiB for
//! 8 × 256 tokens of Gemma 3's 262,144-token vocabulary), nor their gradient: it runs the model to
//! the final normalized hidden state `h`, then, a chunk of rows at a time, computes the logits
//! `h·Wᵀ`, the loss `logsumexp − logit[target]` and `∂L/∂h = softmax·W − W[target]` (on the CPU
//! in f32 by [`kernels::loss_head`]: two GEMMs and one fused pass per chunk). The gradient
//! at the hooks then comes from one backward pass of the surrogate `Σ h ⊙ ∂L/∂h` (same gradient
//! upstream of `h`), so only the model's blocks are differentiated by candle. [`token_losses`]:
//! the loss of chosen rows of the final hidden state alone (head ablations).

use anyhow::{Context, Result, bail};
use candle_core::backprop::GradStore;
use candle_core::{D, DType, Tensor};

use super::{HookedModel, Hooks, kernels};

/// Rows of logits computed at once by the candle-ops fallback (256 × 262,144 f32 = 256 MiB for
/// Gemma 3).
const CHUNK_ROWS: usize = 256;

/// Mean next-token cross-entropy over positions `0..seq-1` of every sequence (f32 scalar),
/// differentiable, from full logits `[batch, seq, vocab]`.
pub fn next_token_loss(logits: &Tensor, tokens: &Tensor) -> Result<Tensor> {
    let (b, s, v) = logits.dims3()?;
    if s < 2 {
        bail!("the next-token loss needs at least 2 tokens per sequence");
    }
    let pred = logits.narrow(1, 0, s - 1)?.reshape((b * (s - 1), v))?;
    let target = tokens.narrow(1, 1, s - 1)?.reshape(b * (s - 1))?;
    let log_probs = candle_nn::ops::log_softmax(&pred, D::Minus1)?;
    Ok(candle_nn::loss::nll(&log_probs, &target)?)
}

/// Run `model` on `tokens` `[batch, seq]` and return the *summed* next-token cross-entropy of all
/// sequences and the gradients of that sum at the `grad` hooks of `hooks` (read them with
/// `grads.get(hooks.var(hook)?.as_tensor())`). No weight gradient is computed.
pub fn loss_gradients(
    model: &dyn HookedModel,
    tokens: &Tensor,
    hooks: &mut Hooks,
) -> Result<(f64, GradStore)> {
    let w = model.unembedding().context("the model has no unembedding (not a causal language model)")?;
    let (b, s) = tokens.dims2()?;
    if s < 2 {
        bail!("the next-token loss needs at least 2 tokens per sequence");
    }
    if !hooks.wants_grad() {
        bail!("loss_gradients: no hook is marked for a gradient");
    }
    let mut run = std::mem::take(hooks).skip_unembed();
    let hidden = model.forward(tokens, &mut run)?.context("the forward pass stopped early")?;
    *hooks = run;
    let d = hidden.dim(2)?;
    // Rows with a target: positions 0..s-1 of each sequence.
    let h = hidden.narrow(1, 0, s - 1)?.reshape((b * (s - 1), d))?.detach().contiguous()?;
    let targets: Vec<u32> = tokens.narrow(1, 1, s - 1)?.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
    let (loss, grad_h) = if h.device().is_cpu() && h.dtype() == DType::F32 && w.dtype() == DType::F32 {
        kernels::loss_head(&h, w, &targets)?
    } else {
        loss_head(&h, w, &Tensor::new(targets.as_slice(), h.device())?)?
    };
    let grad_h = grad_h.reshape((b, s - 1, d))?;
    let grad_h = Tensor::cat(&[&grad_h, &Tensor::zeros((b, 1, d), grad_h.dtype(), grad_h.device())?], 1)?;
    let surrogate = (hidden * grad_h)?.sum_all()?;
    Ok((loss, surrogate.backward()?))
}

/// The next-token loss of each row of `hidden` `[rows, d_model]` (final normalized hidden states,
/// from a pass with [`Hooks::skip_unembed`]) against its target: the logits of only these rows,
/// a chunk at a time (on the CPU in f32 by [`kernels::loss_rows`]; the `[rows, vocab]` logits
/// never exist at once).
pub fn token_losses(model: &dyn HookedModel, hidden: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
    let w = model.unembedding().context("the model has no unembedding (not a causal language model)")?;
    let h = hidden.contiguous()?;
    if h.device().is_cpu() && h.dtype() == DType::F32 && w.dtype() == DType::F32 {
        return Ok(kernels::loss_rows(&h, w, targets)?);
    }
    let (rows, _) = h.dims2()?;
    if targets.len() != rows {
        bail!("{rows} rows and {} targets", targets.len());
    }
    let targets = Tensor::new(targets, h.device())?;
    let mut losses = Vec::with_capacity(rows);
    for start in (0..rows).step_by(CHUNK_ROWS) {
        let n = CHUNK_ROWS.min(rows - start);
        let logits = h.narrow(0, start, n)?.matmul(&w.t()?)?;
        let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let picked = log_probs.gather(&targets.narrow(0, start, n)?.unsqueeze(1)?, 1)?;
        losses.extend(picked.neg()?.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    }
    Ok(losses)
}

/// [`kernels::loss_head`] from candle ops, for tensors that kernel cannot take (other devices or
/// dtypes): the summed loss and `∂L/∂h`, `CHUNK_ROWS` rows of logits at a time.
fn loss_head(h: &Tensor, w: &Tensor, targets: &Tensor) -> Result<(f64, Tensor)> {
    let rows = h.dim(0)?;
    let wt = w.t()?;
    let mut loss = 0f64;
    let mut grad_rows = Vec::new();
    for start in (0..rows).step_by(CHUNK_ROWS) {
        let n = CHUNK_ROWS.min(rows - start);
        let hc = h.narrow(0, start, n)?;
        let tc = targets.narrow(0, start, n)?;
        let logits = hc.matmul(&wt)?; // [n, vocab]
        let max = logits.max_keepdim(D::Minus1)?;
        let exp = logits.broadcast_sub(&max)?.exp()?;
        let sum = exp.sum_keepdim(D::Minus1)?;
        let w_target = w.index_select(&tc, 0)?; // [n, d]
        let target_logit = (&hc * &w_target)?.sum(D::Minus1)?;
        let lse = (sum.log()? + max)?.squeeze(D::Minus1)?;
        loss += (lse - target_logit)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        let probs = exp.broadcast_div(&sum)?;
        grad_rows.push((probs.matmul(w)? - w_target)?);
    }
    Ok((loss, Tensor::cat(&grad_rows, 0)?))
}

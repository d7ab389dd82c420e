//! Splicing a dictionary into the model: how much of the model's next-token loss it keeps.
//!
//! Each held-out context is run three times: clean; with the hook's activation replaced by the
//! dictionary's reconstruction (spliced); and with it set to zero (zero ablation). Then
//! CE-loss recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean) (SAELens' `ce_loss_score`: 1 is
//! perfect, 0 is no better than deleting the activation) and KL = mean over positions of
//! KL(p_clean ‖ p_spliced). The BOS position is left untouched in both interventions — capture
//! never stores it, so no dictionary has seen its outlier activation — and losses are averaged over
//! the predictions made at positions 1.. (position 0's prediction does not depend on the hook).
//! Per-head hooks (`blocks.L.attn.hook_z`, `[batch, pos, head, d_head]`) are read with the heads
//! of a position concatenated, as capture stores them, and written back in their own shape.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::Dictionary;
use loupe_model::{HookedModel, Hooks, Intervention};

/// What splicing measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SpliceStats {
    pub contexts: usize,
    /// Predictions averaged over.
    pub tokens: usize,
    pub ce_clean: f64,
    pub ce_spliced: f64,
    pub ce_zero_ablation: f64,
    pub ce_loss_recovered: f64,
    pub kl: f64,
}

/// Splice `dict` at `hook` of `model` on `contexts` (token ids, BOS first). With `input`, `dict`
/// is a transcoder: it reads that hook (earlier in the same forward pass) and its output replaces
/// `hook`.
pub fn eval_splice(
    model: &dyn HookedModel,
    dict: Arc<dyn Dictionary>,
    hook: &str,
    input: Option<&str>,
    contexts: &[Vec<u32>],
) -> Result<SpliceStats> {
    if !model.config().causal {
        bail!("CE-loss recovered needs a causal model; {} is not one", model.config().architecture);
    }
    for h in std::iter::once(hook).chain(input) {
        if !model.hook_names().iter().any(|n| n == h) {
            bail!("the model has no hook {h}");
        }
    }
    let (d, d_out) = (dict.d_in(), dict.d_out());
    // The transcoder's input, stashed when the forward pass reaches its hook.
    let stash: Arc<std::sync::Mutex<Vec<f32>>> = Arc::default();
    let keep = stash.clone();
    let stash_input: loupe_model::hooks::MapFn = Arc::new(move |x: &Tensor| {
        *keep.lock().expect("stash") = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        Ok(x.clone())
    });
    let transcoder = input.is_some();
    let splice: loupe_model::hooks::MapFn = Arc::new(move |x: &Tensor| {
        let dims = x.dims().to_vec();
        let flat = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let source = if transcoder { stash.lock().expect("stash").clone() } else { flat.clone() };
        // [batch, pos, d], or per head [batch, pos, head, d_head] with head · d_head = d: each
        // position's row is the heads concatenated, as capture stores it, and the reconstruction
        // goes back in the same shape.
        let width: usize = dims.iter().skip(2).product();
        if dims.len() < 3 || width != d_out || source.len() % d != 0 || source.len() / d != flat.len() / d_out
        {
            return Err(candle_core::Error::Msg(format!(
                "activation {dims:?} is not [batch, pos, {d_out}] (or [batch, pos, head, d_head] with {d_out} in all)"
            )));
        }
        let seq = dims[1];
        let mut out = flat.clone();
        // Every position but 0 of each sequence.
        let rows: Vec<usize> = (0..flat.len() / d_out).filter(|r| r % seq != 0).collect();
        let x_rows: Vec<f32> =
            rows.iter().flat_map(|&r| source[r * d..(r + 1) * d].iter().copied()).collect();
        let (_, rec) = dict.reconstruct(&x_rows);
        for (i, &r) in rows.iter().enumerate() {
            out[r * d_out..(r + 1) * d_out].copy_from_slice(&rec[i * d_out..(i + 1) * d_out]);
        }
        Tensor::from_vec(out, dims, x.device())?.to_dtype(x.dtype())
    });
    let zero: loupe_model::hooks::MapFn = Arc::new(|x: &Tensor| {
        let seq = x.dim(1)?;
        let first = x.narrow(1, 0, 1)?;
        let rest = x.narrow(1, 1, seq - 1)?.zeros_like()?;
        Tensor::cat(&[&first, &rest], 1)
    });

    let mut stats = SpliceStats { contexts: contexts.len(), ..SpliceStats::default() };
    let (mut clean_sum, mut spliced_sum, mut zero_sum, mut kl_sum) = (0.0f64, 0.0, 0.0, 0.0);
    for ctx in contexts {
        if ctx.len() < 3 {
            continue;
        }
        let tokens = Tensor::from_vec(ctx.clone(), (1, ctx.len()), &Device::Cpu)?;
        let run = |hooks: &mut Hooks| -> Result<Tensor> {
            let logits = model.forward(&tokens, hooks)?.context("the model returned no logits")?;
            // Predictions at positions 1..len-1 of targets 2..len.
            let n = ctx.len() - 2;
            Ok(candle_nn::ops::log_softmax(&logits.narrow(1, 1, n)?.squeeze(0)?, D::Minus1)?)
        };
        let clean = run(&mut Hooks::new())?;
        let mut splicing = Hooks::new().intervene(hook, Intervention::Map(splice.clone()));
        if let Some(input) = input {
            splicing = splicing.intervene(input, Intervention::Map(stash_input.clone()));
        }
        let spliced = run(&mut splicing)?;
        let zeroed = run(&mut Hooks::new().intervene(hook, Intervention::Map(zero.clone())))?;
        let targets = Tensor::from_vec(ctx[2..].to_vec(), ctx.len() - 2, &Device::Cpu)?;
        let nll = |lp: &Tensor| -> Result<f64> {
            let picked = lp.gather(&targets.unsqueeze(1)?, 1)?;
            Ok(-(picked.sum_all()?.to_scalar::<f32>()? as f64))
        };
        clean_sum += nll(&clean)?;
        spliced_sum += nll(&spliced)?;
        zero_sum += nll(&zeroed)?;
        let kl = (clean.exp()? * (&clean - &spliced)?)?.sum_all()?.to_scalar::<f32>()? as f64;
        kl_sum += kl;
        stats.tokens += ctx.len() - 2;
    }
    if stats.tokens == 0 {
        bail!("no held-out context of at least 3 tokens to splice on");
    }
    let n = stats.tokens as f64;
    stats.ce_clean = clean_sum / n;
    stats.ce_spliced = spliced_sum / n;
    stats.ce_zero_ablation = zero_sum / n;
    stats.kl = kl_sum / n;
    let gap = stats.ce_zero_ablation - stats.ce_clean;
    stats.ce_loss_recovered =
        if gap.abs() > 1e-12 { (stats.ce_zero_ablation - stats.ce_spliced) / gap } else { f64::NAN };
    Ok(stats)
}

/// Contexts (BOS + tokens) rebuilt from stored rows: runs of consecutive positions of one
/// document, cut to `context − 1` tokens, as capture made them. At most `max` contexts.
pub fn contexts_from_rows(
    doc: &[u32],
    pos: &[u32],
    token: &[u32],
    bos: u32,
    context: usize,
    max: usize,
) -> Vec<Vec<u32>> {
    let mut out: Vec<Vec<u32>> = Vec::new();
    let mut current: Vec<u32> = Vec::new();
    for i in 0..doc.len() {
        let continues = i > 0 && doc[i] == doc[i - 1] && pos[i] == pos[i - 1] + 1 && current.len() < context;
        if !continues {
            if current.len() > 1 {
                out.push(std::mem::take(&mut current));
                if out.len() == max {
                    return out;
                }
            }
            current = vec![bos];
        }
        current.push(token[i]);
    }
    if current.len() > 1 && out.len() < max {
        out.push(current);
    }
    out
}

//! Splicing a whole [`TranscoderSet`] into the model: every MLP replaced at once.
//!
//! The spliced run reads, at each layer L, its own `blocks.L.ln2.hook_normalized` (which already
//! depends on the replaced MLPs of the earlier layers), encodes it with layer L's transcoder, and
//! replaces `blocks.L.hook_mlp_out` with the set's output for layer L: the decoded features of
//! layer L and (cross-layer transcoder) of every earlier layer, the bias and the skip connection.
//! The baseline zero-ablates every MLP output. CE-loss recovered and KL are defined as in
//! [`super::splice`] (position 0, the BOS, is left untouched in both interventions; losses are over
//! the predictions at positions 1..). Works for per-layer transcoder sets and CLTs alike, so the
//! two can be compared on the same contexts.

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor};
use rayon::prelude::*;

use super::kernels::{Codes, axpy, matmul_nt, topk_row};
use super::splice::SpliceStats;
use super::transcoder::{Activation, TranscoderLayer, TranscoderSet};
use loupe_model::hooks::{MapFn, in_block, names};
use loupe_model::{HookedModel, Hooks, Intervention};

/// The active features of `layer` on each row of `x` (`[tokens, d]`): the same rule as
/// [`TranscoderSet::activations`], with the encoder as one GEMM.
pub fn layer_codes(layer: &TranscoderLayer, d: usize, x: &[f32]) -> Codes {
    let n = layer.n_features;
    let tokens = x.len() / d;
    let mut pre = vec![0f32; tokens * n];
    matmul_nt(x, &layer.w_enc, &mut pre, tokens, n, d, false);
    let rows: Vec<Vec<(u32, f32)>> = pre
        .par_chunks_mut(n)
        .map_init(Vec::new, |scratch, row| {
            row.iter_mut().zip(&layer.b_enc).for_each(|(p, b)| *p += b);
            let mut out: Vec<(u32, f32)> = match &layer.activation {
                Activation::TopK { k } => {
                    let mut out = Vec::with_capacity(*k);
                    topk_row(row, None, *k, &mut out, scratch);
                    out
                }
                Activation::JumpRelu { threshold } => row
                    .iter()
                    .zip(threshold)
                    .enumerate()
                    .filter(|(_, (v, t))| **v > **t)
                    .map(|(f, (v, _))| (f as u32, *v))
                    .collect(),
                Activation::Relu => {
                    row.iter().enumerate().filter(|(_, v)| **v > 0.0).map(|(f, v)| (f as u32, *v)).collect()
                }
            };
            out.sort_unstable_by_key(|e| e.0);
            out
        })
        .collect();
    Codes::from_rows(rows.iter().map(Vec::as_slice))
}

/// Layer `target`'s replacement MLP output (`[tokens, d]`) from every layer's codes up to it and
/// its own input `x` (for the skip connection): what [`TranscoderSet::output`] computes.
pub fn output_from_codes(set: &TranscoderSet, target: usize, codes: &[Codes], x: &[f32]) -> Vec<f32> {
    let d = set.d_model;
    let tokens = x.len() / d;
    let mut out: Vec<f32> = set.layers[target].b_dec.iter().copied().cycle().take(tokens * d).collect();
    out.par_chunks_mut(d).enumerate().for_each(|(t, o)| {
        for (source, l) in set.layers.iter().enumerate().take(target + 1) {
            let Some(w_dec) = l.w_dec.get(target - source) else { continue };
            let (fs, vs) = codes[source].row(t);
            for (&f, &a) in fs.iter().zip(vs) {
                axpy(a, &w_dec[f as usize * d..(f as usize + 1) * d], o);
            }
        }
        if let Some(w_skip) = &set.layers[target].w_skip {
            let xr = &x[t * d..(t + 1) * d];
            for (i, o) in o.iter_mut().enumerate() {
                *o += super::kernels::dot(&w_skip[i * d..(i + 1) * d], xr);
            }
        }
    });
    out
}

/// A layer's codes and MLP input, as the spliced forward pass met them.
type Seen = (Codes, Vec<f32>);

/// CE-loss recovered and KL with every MLP of `model` replaced by `set` on `contexts` (token
/// ids, BOS first).
pub fn eval_splice_all(
    model: &dyn HookedModel,
    set: &TranscoderSet,
    contexts: &[Vec<u32>],
) -> Result<SpliceStats> {
    let cfg = model.config();
    if !cfg.causal {
        bail!("CE-loss recovered needs a causal model; {} is not one", cfg.architecture);
    }
    let n_layers = set.n_layers();
    if n_layers != cfg.n_layers {
        bail!("the transcoder set covers {n_layers} layers, the model has {}", cfg.n_layers);
    }
    for (i, l) in set.layers.iter().enumerate() {
        if l.layer != i {
            bail!("the transcoder set's layer {i} is the transcoder of layer {}", l.layer);
        }
    }
    let valid = model.hook_names();
    for layer in 0..n_layers {
        for h in [in_block(layer, names::LN2), in_block(layer, names::MLP_OUT)] {
            if !valid.contains(&h) {
                bail!("the model has no hook {h}");
            }
        }
    }
    let set = Arc::new(set.clone());
    // Each layer's codes and input, kept when the forward pass reaches its ln2.
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let mut splicing = Hooks::new();
    for layer in 0..n_layers {
        let (set_in, seen_in) = (set.clone(), seen.clone());
        let stash: MapFn = Arc::new(move |x: &Tensor| {
            let flat = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let d = set_in.d_model;
            if flat.len() % d != 0 {
                return Err(candle_core::Error::Msg(format!("activation {:?} is not [.., {d}]", x.dims())));
            }
            let codes = layer_codes(&set_in.layers[layer], d, &flat);
            let mut seen = seen_in.lock().expect("stash");
            seen.truncate(layer);
            if seen.len() != layer {
                return Err(candle_core::Error::Msg(format!("layer {layer}'s MLP input came out of order")));
            }
            seen.push((codes, flat));
            Ok(x.clone())
        });
        let (set_out, seen_out) = (set.clone(), seen.clone());
        let replace: MapFn = Arc::new(move |x: &Tensor| {
            let dims = x.dims().to_vec();
            let flat = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let seen = seen_out.lock().expect("stash");
            if seen.len() != layer + 1 || dims.len() != 3 || seen[layer].1.len() != flat.len() {
                return Err(candle_core::Error::Msg(format!(
                    "layer {layer}'s MLP output {dims:?} does not match the inputs seen"
                )));
            }
            let codes: Vec<Codes> = seen.iter().map(|(c, _)| c.clone()).collect();
            let rec = output_from_codes(&set_out, layer, &codes, &seen[layer].1);
            let (seq, d) = (dims[1], dims[2]);
            let mut out = rec;
            // Position 0 of each sequence keeps the model's own output.
            for (r, row) in out.chunks_mut(d).enumerate() {
                if r % seq == 0 {
                    row.copy_from_slice(&flat[r * d..(r + 1) * d]);
                }
            }
            Tensor::from_vec(out, dims, x.device())?.to_dtype(x.dtype())
        });
        splicing = splicing
            .intervene(in_block(layer, names::LN2), Intervention::Map(stash))
            .intervene(in_block(layer, names::MLP_OUT), Intervention::Map(replace));
    }
    let zero: MapFn = Arc::new(|x: &Tensor| {
        let seq = x.dim(1)?;
        let first = x.narrow(1, 0, 1)?;
        let rest = x.narrow(1, 1, seq - 1)?.zeros_like()?;
        Tensor::cat(&[&first, &rest], 1)
    });
    let mut zeroing = Hooks::new();
    for layer in 0..n_layers {
        zeroing = zeroing.intervene(in_block(layer, names::MLP_OUT), Intervention::Map(zero.clone()));
    }

    let mut stats = SpliceStats { contexts: contexts.len(), ..SpliceStats::default() };
    let (mut clean_sum, mut spliced_sum, mut zero_sum, mut kl_sum) = (0.0f64, 0.0, 0.0, 0.0);
    for ctx in contexts {
        if ctx.len() < 3 {
            continue;
        }
        let tokens = Tensor::from_vec(ctx.clone(), (1, ctx.len()), &Device::Cpu)?;
        let run = |hooks: &mut Hooks| -> Result<Tensor> {
            let logits = model.forward(&tokens, hooks)?.context("the model returned no logits")?;
            let n = ctx.len() - 2;
            Ok(candle_nn::ops::log_softmax(
                &logits.narrow(1, 1, n)?.squeeze(0)?.to_dtype(DType::F32)?,
                D::Minus1,
            )?)
        };
        let clean = run(&mut Hooks::new())?;
        seen.lock().expect("stash").clear();
        let spliced = run(&mut splicing)?;
        let zeroed = run(&mut zeroing)?;
        let targets = Tensor::from_vec(ctx[2..].to_vec(), ctx.len() - 2, &Device::Cpu)?;
        let nll = |lp: &Tensor| -> Result<f64> {
            let picked = lp.gather(&targets.unsqueeze(1)?, 1)?;
            Ok(-(picked.sum_all()?.to_scalar::<f32>()? as f64))
        };
        clean_sum += nll(&clean)?;
        spliced_sum += nll(&spliced)?;
        zero_sum += nll(&zeroed)?;
        kl_sum += (clean.exp()? * (&clean - &spliced)?)?.sum_all()?.to_scalar::<f32>()? as f64;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_from_codes_equals_the_reference_output() {
        let (d, n) = (4, 6);
        let mk = |layer: usize, targets: usize, activation: Activation, skip: bool| TranscoderLayer {
            layer,
            n_features: n,
            w_enc: (0..n * d).map(|i| ((i * 7 + layer) as f32 * 0.37).sin()).collect(),
            b_enc: (0..n).map(|i| (i as f32 * 0.1) - 0.2).collect(),
            activation,
            w_dec: (0..targets)
                .map(|t| (0..n * d).map(|i| ((i + 3 * t) as f32 * 0.23).cos()).collect())
                .collect(),
            b_dec: vec![0.1 * layer as f32; d],
            w_skip: skip.then(|| (0..d * d).map(|i| i as f32 * 0.01).collect()),
        };
        let set = TranscoderSet {
            kind: "clt".into(),
            names: vec!["x".into()],
            d_model: d,
            layers: vec![
                mk(0, 2, Activation::TopK { k: 2 }, false),
                mk(1, 1, Activation::JumpRelu { threshold: vec![0.1; n] }, true),
            ],
        };
        let x0: Vec<f32> = (0..3 * d).map(|i| (i as f32 * 0.5).sin()).collect();
        let x1: Vec<f32> = (0..3 * d).map(|i| (i as f32 * 0.9).cos()).collect();
        let inputs = [&x0[..], &x1[..]];
        let codes: Vec<Codes> = (0..2).map(|l| layer_codes(&set.layers[l], d, inputs[l])).collect();
        for l in 0..2 {
            let want = set.activations(l, inputs[l]);
            assert_eq!((&codes[l].offsets, &codes[l].feature), (&want.offsets, &want.feature));
            assert!(codes[l].value.iter().zip(&want.value).all(|(a, b)| (a - b).abs() < 1e-5));
            let (a, b) = (output_from_codes(&set, l, &codes, inputs[l]), set.output(l, &inputs));
            assert!(a.iter().zip(&b).all(|(a, b)| (a - b).abs() < 1e-4), "layer {l}: {a:?} vs {b:?}");
        }
    }
}

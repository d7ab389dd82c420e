//! Direct feature attribution (`loupe dfa`, the app's feature page), and the weight-based head
//! attribution `loupe analyze` writes for attention-output SAEs.
//!
//! An SAE's pre-activation is linear in its input: pre_i(x) = W_enc[:, i] · (x − b_dec) + b_enc[i]
//! (the files Loupe writes read raw activations; SAELens settings that change this are folded into
//! the weights when loaded). So when x is a sum of parts, each part's share is its projection on
//! W_enc[:, i], and the constant b_enc[i] − b_dec · W_enc[:, i] is the rest, exactly:
//!
//! - an attention-output SAE at `blocks.L.attn.hook_z` reads the heads' z concatenated:
//!   DFA_i(h) = z_h · W_enc[block h, i] per position, and since z_h = Σ_s A_h[d, s] v_h[s], per
//!   source token DFA_i(h, s) = A_h[d, s] (v_h[s] · W_enc[block h, i]) (query head h reads KV head
//!   h / (n_heads / n_kv_heads); GPT-2's v holds its bias, so the rows of A summing to 1 keep the
//!   sum exact);
//! - a residual-stream SAE reads the sum of the embedding, each earlier head, each earlier MLP and
//!   bias terms, as the model splits it ([`HookedModel::residual_components`]).
//!
//! Any other hook, or a dictionary that is not an SAE, is refused.

use anyhow::{Result, bail};
use candle_core::{DType, Device, Tensor};
use loupe_dict::Sae;
use loupe_model::hooks::{self, names};
use loupe_model::residual::residual_point;
use loupe_model::{HookedModel, Hooks};
use serde::Serialize;

/// What a feature's pre-activation is attributed to.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DfaKind {
    /// An attention-output SAE at `blocks.{layer}.attn.hook_z`: components are its heads.
    Heads { layer: usize },
    /// A residual-stream SAE at `hook`: components are the embedding, each earlier head, each
    /// earlier MLP (and any bias terms the architecture adds to the stream).
    Residual { hook: String },
}

/// Direct feature attribution of one feature on one prompt.
#[derive(Clone, Debug, Serialize)]
pub struct Dfa {
    pub kind: DfaKind,
    pub feature: u32,
    /// The prompt's token ids (BOS first).
    pub tokens: Vec<u32>,
    /// Names of the components: heads as `L.H`, then for residual SAEs `embed`, `L.mlp`, ….
    pub components: Vec<String>,
    /// `[pos][component]`: each component's share of the pre-activation.
    pub contributions: Vec<Vec<f32>>,
    /// The constant part, b_enc[i] − b_dec · W_enc[:, i] (the same at every position).
    pub bias: f32,
    /// `[pos]`: the feature's pre-activation as the SAE computes it from the activation at its
    /// hook (before its top-k or threshold); equal to Σ contributions + bias up to rounding.
    pub pre_activation: Vec<f32>,
    /// For [`DfaKind::Heads`]: `[pos][head][source]` for sources 0..=pos, which sums over sources
    /// to `contributions[pos][head]`.
    pub per_source: Option<Vec<Vec<Vec<f32>>>>,
}

/// The layer of an attention-output hook `blocks.L.attn.hook_z`.
pub fn hook_z_layer(hook: &str) -> Option<usize> {
    let rest = hook.strip_prefix("blocks.")?;
    let (layer, name) = rest.split_once('.')?;
    if name != names::Z {
        return None;
    }
    layer.parse().ok()
}

/// What DFA decomposes for a dictionary at `hook` of `model`, or the error naming the two kinds
/// it supports.
pub fn dfa_kind(model: &dyn HookedModel, hook: &str) -> Result<DfaKind> {
    let n_layers = model.config().n_layers;
    if let Some(layer) = hook_z_layer(hook).filter(|&l| l < n_layers) {
        return Ok(DfaKind::Heads { layer });
    }
    if residual_point(hook, n_layers).is_some() {
        return Ok(DfaKind::Residual { hook: hook.to_string() });
    }
    bail!("{}", unsupported(hook))
}

/// The refusal for a dictionary at any other hook.
pub fn unsupported(hook: &str) -> String {
    format!(
        "direct feature attribution needs an SAE at an attention output (blocks.L.attn.hook_z) or in the \
         residual stream (hook_embed, blocks.L.hook_resid_pre|mid|post); this dictionary reads {hook}"
    )
}

/// Dot product in f64.
fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// The values of `t` as f32, row-major.
fn values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// The DFA of `feature` of `sae` (trained at `hook` of `model`) on `tokens`.
pub fn dfa(model: &dyn HookedModel, sae: &Sae, hook: &str, feature: u32, tokens: &[u32]) -> Result<Dfa> {
    let kind = dfa_kind(model, hook)?;
    let (n, d) = (sae.spec.n_features, sae.spec.d_in);
    if feature as usize >= n {
        bail!("feature {feature} does not exist (the dictionary has {n} features)");
    }
    if tokens.is_empty() {
        bail!("the prompt is empty");
    }
    let seq = tokens.len();
    let c = model.config().clone();
    let f = feature as usize;
    let w = &sae.w_enc[f * d..(f + 1) * d];
    let bias = (sae.b_enc[f] as f64 - dot(&sae.b_dec, w)) as f32;
    let input = Tensor::from_slice(tokens, (1, seq), &Device::Cpu)?;

    // The activation the SAE reads, and the parts it is split into.
    let (x, components, contributions, per_source) = match &kind {
        DfaKind::Heads { layer } => {
            let (h_n, dh) = (c.n_heads, c.d_head);
            if d != h_n * dh {
                bail!("the dictionary reads width {d}, but {hook} is {h_n} heads × {dh} = {}", h_n * dh);
            }
            let at = |s: &str| hooks::in_block(*layer, s);
            let mut run = Hooks::new()
                .capture(at(names::Z))
                .capture(at(names::PATTERN))
                .capture(at(names::V))
                .stop_after_layer(*layer);
            model.forward(&input, &mut run)?;
            let z = values(run.get(&at(names::Z))?)?; // [seq, head, d_head]
            let pattern = values(run.get(&at(names::PATTERN))?)?; // [head, seq, seq]
            let v = values(run.get(&at(names::V))?)?; // [seq, kv_head, d_head]
            let kv = c.n_kv_heads;
            if z.len() != seq * d || pattern.len() != h_n * seq * seq || v.len() != seq * kv * dh {
                bail!("unexpected activation shapes at {hook}");
            }
            let group = h_n / kv;
            // v_h[s] · W_enc[block h, i], per head and source.
            let vw: Vec<Vec<f64>> = (0..h_n)
                .map(|h| {
                    let g = h / group;
                    (0..seq)
                        .map(|s| dot(&v[(s * kv + g) * dh..(s * kv + g + 1) * dh], &w[h * dh..(h + 1) * dh]))
                        .collect()
                })
                .collect();
            let mut contributions = Vec::with_capacity(seq);
            let mut per_source = Vec::with_capacity(seq);
            for p in 0..seq {
                let row = &z[p * d..(p + 1) * d];
                contributions.push(
                    (0..h_n)
                        .map(|h| dot(&row[h * dh..(h + 1) * dh], &w[h * dh..(h + 1) * dh]) as f32)
                        .collect(),
                );
                per_source.push(
                    (0..h_n)
                        .map(|h| {
                            let a = &pattern[(h * seq + p) * seq..(h * seq + p + 1) * seq];
                            (0..=p).map(|s| (a[s] as f64 * vw[h][s]) as f32).collect()
                        })
                        .collect(),
                );
            }
            let names = (0..h_n).map(|h| format!("{layer}.{h}")).collect();
            (z, names, contributions, Some(per_source))
        }
        DfaKind::Residual { hook } => {
            if d != c.d_model {
                bail!("the dictionary reads width {d}, but the residual stream is {} wide", c.d_model);
            }
            let parts = model.residual_components(&input, hook)?;
            let last = residual_point(hook, c.n_layers).and_then(|p| p.last_block()).unwrap_or(0);
            let mut run = Hooks::new().capture(hook.as_str()).stop_after_layer(last);
            model.forward(&input, &mut run)?;
            let x = values(run.get(hook)?)?;
            let mut names = Vec::with_capacity(parts.len());
            let mut contributions = vec![Vec::with_capacity(parts.len()); seq];
            for (name, t) in parts {
                let t = values(&t)?;
                if t.len() != seq * d {
                    bail!("component {name} has {} values, expected {seq} × {d}", t.len());
                }
                for (p, row) in contributions.iter_mut().enumerate() {
                    row.push(dot(&t[p * d..(p + 1) * d], w) as f32);
                }
                names.push(name);
            }
            (x, names, contributions, None)
        }
    };
    // The pre-activation as the SAE computes it.
    let (mut xc, mut pre) = (Vec::new(), Vec::new());
    sae.pre_acts(&x, &mut xc, &mut pre);
    let pre_activation = (0..seq).map(|p| pre[p * n + f] + sae.b_enc[f]).collect();
    Ok(Dfa {
        kind,
        feature,
        tokens: tokens.to_vec(),
        components,
        contributions,
        bias,
        pre_activation,
        per_source,
    })
}

/// Weight-based head attribution of every feature of an attention-output SAE with `n_heads`
/// heads: w_i(h) = ‖W_dec[i, block h]‖ / Σ_h′ ‖W_dec[i, block h′]‖, `[feature][head]`.
pub fn head_attribution(sae: &Sae, n_heads: usize) -> Result<Vec<Vec<f32>>> {
    head_attribution_of(&sae.w_dec, sae.spec.d_in, n_heads)
}

/// [`head_attribution`] of any feature directions `[n, d]` (an SAE's decoder rows, or a Monet
/// expert's mean output). A zero direction is attributed to no head (all weights 0).
pub fn head_attribution_of(directions: &[f32], d: usize, n_heads: usize) -> Result<Vec<Vec<f32>>> {
    if n_heads == 0 || d == 0 || !d.is_multiple_of(n_heads) || !directions.len().is_multiple_of(d) {
        bail!("directions of width {d} do not split into {n_heads} heads");
    }
    let dh = d / n_heads;
    Ok(directions
        .chunks(d)
        .map(|row| {
            let norms: Vec<f64> = row.chunks(dh).map(|b| dot(b, b).sqrt()).collect();
            let total: f64 = norms.iter().sum();
            norms.iter().map(|v| if total > 0.0 { (v / total) as f32 } else { 0.0 }).collect()
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_attribution_is_the_share_of_each_block_norm() {
        // Two features, 2 heads of width 2: [3, 4 | 0, 0] and [0, 1 | 0, 3].
        let dirs = [3.0, 4.0, 0.0, 0.0, 0.0, 1.0, 0.0, 3.0];
        let w = head_attribution_of(&dirs, 4, 2).unwrap();
        assert_eq!(w[0], vec![1.0, 0.0]);
        assert!((w[1][0] - 0.25).abs() < 1e-7 && (w[1][1] - 0.75).abs() < 1e-7);
        assert_eq!(head_attribution_of(&[0.0; 4], 4, 2).unwrap()[0], vec![0.0, 0.0]);
        assert!(head_attribution_of(&dirs, 4, 3).is_err());
    }

    #[test]
    fn hook_z_layers_are_parsed() {
        assert_eq!(hook_z_layer("blocks.5.attn.hook_z"), Some(5));
        assert_eq!(hook_z_layer("blocks.5.attn.hook_result"), None);
        assert_eq!(hook_z_layer("blocks.x.attn.hook_z"), None);
        assert_eq!(hook_z_layer("hook_embed"), None);
    }
}

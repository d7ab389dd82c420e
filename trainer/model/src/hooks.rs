//! Hook points: read, replace or differentiate any named activation of a forward pass.
//!
//! Models call [`Hooks::apply`] at every hook point (TransformerLens names, see DESIGN.md). The
//! names are spelled once, in [`names`]; each architecture lists its hook points once, with the
//! shape of each, as a [`HookList`] (tested: every listed hook fires with that shape). A
//! [`Hooks`] value says which points to cache, which to change ([`Intervention`]) and at which to
//! take the gradient of a loss: there the activation is swapped for a fresh candle `Var`, so
//! `loss.backward()` reaches it without computing any weight gradient (weights are not variables).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anyhow::{Result, bail};
use candle_core::{Tensor, Var};

use crate::ModelConfig;

/// TransformerLens hook names; those inside a block are relative to `blocks.{L}.`.
pub mod names {
    pub const EMBED: &str = "hook_embed";
    pub const POS_EMBED: &str = "hook_pos_embed";
    pub const RESID_PRE: &str = "hook_resid_pre";
    pub const LN1: &str = "ln1.hook_normalized";
    pub const Q: &str = "attn.hook_q";
    pub const K: &str = "attn.hook_k";
    pub const V: &str = "attn.hook_v";
    pub const ROT_Q: &str = "attn.hook_rot_q";
    pub const ROT_K: &str = "attn.hook_rot_k";
    pub const PATTERN: &str = "attn.hook_pattern";
    pub const Z: &str = "attn.hook_z";
    pub const RESULT: &str = "attn.hook_result";
    pub const ATTN_OUT: &str = "hook_attn_out";
    pub const RESID_MID: &str = "hook_resid_mid";
    pub const LN2: &str = "ln2.hook_normalized";
    pub const MLP_PRE: &str = "mlp.hook_pre";
    pub const MLP_PRE_LINEAR: &str = "mlp.hook_pre_linear";
    pub const MLP_POST: &str = "mlp.hook_post";
    pub const MLP_OUT: &str = "hook_mlp_out";
    // Sparse mixture-of-experts MLPs (OLMoE, Qwen3-MoE); see `crate::moe`.
    pub const ROUTER_LOGITS: &str = "mlp.hook_router_logits";
    pub const ROUTER_PROBS: &str = "mlp.hook_router_probs";
    pub const EXPERT_WEIGHTS: &str = "mlp.hook_expert_weights";
    pub const EXPERT_INDICES: &str = "mlp.hook_expert_indices";
    pub const EXPERT_OUT: &str = "mlp.hook_expert_out";
    pub const RESID_POST: &str = "hook_resid_post";
    pub const LN_FINAL: &str = "ln_final.hook_normalized";
}

/// The shape of the activation at a hook point, for an input of `batch` sequences of `pos` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `[batch, pos, d_model]`: the residual stream, and what is added to it.
    Model,
    /// `[batch, pos, d_mlp]`: inside the MLP.
    Mlp,
    /// `[batch, pos, head, d_head]`: per query head.
    Heads,
    /// `[batch, pos, kv_head, d_head]`: per key/value head (fewer than the query heads when
    /// queries share them).
    KvHeads,
    /// `[batch, head, query_pos, key_pos]`: the attention pattern.
    Pattern,
    /// `[batch, pos, head, d_model]`: each head's output, before it is summed.
    HeadResults,
    /// `[batch, pos, n_experts]`: one value per expert of a sparse MoE MLP.
    Experts,
    /// `[batch, pos, experts_per_token]`: per chosen expert.
    ChosenExperts,
    /// `[batch, pos, experts_per_token, d_model]`: each chosen expert's output.
    ExpertOutputs,
}

impl Shape {
    pub fn dims(self, c: &ModelConfig, batch: usize, pos: usize) -> Vec<usize> {
        match self {
            Shape::Model => vec![batch, pos, c.d_model],
            Shape::Mlp => vec![batch, pos, c.d_mlp],
            Shape::Heads => vec![batch, pos, c.n_heads, c.d_head],
            Shape::KvHeads => vec![batch, pos, c.n_kv_heads, c.d_head],
            Shape::Pattern => vec![batch, c.n_heads, pos, pos],
            Shape::HeadResults => vec![batch, pos, c.n_heads, c.d_model],
            Shape::Experts => vec![batch, pos, c.n_experts],
            Shape::ChosenExperts => vec![batch, pos, c.experts_per_token],
            Shape::ExpertOutputs => vec![batch, pos, c.experts_per_token, c.d_model],
        }
    }
}

/// One hook point of an architecture: its name (from [`names`]) and shape.
#[derive(Clone, Copy, Debug)]
pub struct HookPoint {
    pub name: &'static str,
    pub shape: Shape,
}

/// Every hook point of an architecture, in forward order: before the blocks, in each block, after.
#[derive(Debug)]
pub struct HookList {
    pub first: &'static [HookPoint],
    pub block: &'static [HookPoint],
    pub last: &'static [HookPoint],
}

impl HookList {
    /// Every hook point with its full name, for a model of `n_layers` blocks.
    pub fn points(&self, n_layers: usize) -> Vec<(String, Shape)> {
        let blocks = (0..n_layers)
            .flat_map(|i| self.block.iter().map(move |p| (format!("blocks.{i}.{}", p.name), p.shape)));
        let plain = |p: &HookPoint| (p.name.to_string(), p.shape);
        self.first.iter().map(plain).chain(blocks).chain(self.last.iter().map(plain)).collect()
    }

    /// Every hook name, in forward order.
    pub fn names(&self, n_layers: usize) -> Vec<String> {
        self.points(n_layers).into_iter().map(|(name, _)| name).collect()
    }
}

/// The full name of hook `name` (from [`names`]) in block `layer`.
pub fn in_block(layer: usize, name: &str) -> String {
    format!("blocks.{layer}.{name}")
}

/// A function applied to an activation by [`Intervention::Map`].
pub type MapFn = Arc<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// A change made to an activation as it passes its hook point.
#[derive(Clone)]
pub enum Intervention {
    /// Replace with this tensor (same shape). Patching from another run is `Replace` with a
    /// tensor from that run's cache.
    Replace(Tensor),
    /// Add this tensor (broadcast), e.g. a feature's decoder direction times a strength.
    Add(Tensor),
    /// Set to zero.
    Zero,
    /// Zero these heads of a per-head activation `[batch, pos, head, d_head]`.
    ZeroHeads(Vec<usize>),
    /// Any function of the activation, e.g. a dictionary's reconstruction spliced in.
    Map(MapFn),
}

impl Intervention {
    fn apply(&self, x: Tensor) -> Result<Tensor> {
        Ok(match self {
            Intervention::Replace(t) => {
                if t.dims() != x.dims() {
                    bail!("replacement has shape {:?}, the activation has {:?}", t.dims(), x.dims());
                }
                t.to_dtype(x.dtype())?
            }
            Intervention::Add(t) => x.broadcast_add(&t.to_dtype(x.dtype())?)?,
            Intervention::Zero => x.zeros_like()?,
            Intervention::ZeroHeads(heads) => {
                let dims = x.dims();
                if dims.len() != 4 {
                    bail!("ZeroHeads needs a per-head activation [batch, pos, head, d_head], got {dims:?}");
                }
                let n = dims[2];
                if let Some(h) = heads.iter().find(|&&h| h >= n) {
                    bail!("head {h} does not exist (the layer has {n} heads)");
                }
                let keep: Vec<f32> = (0..n).map(|h| if heads.contains(&h) { 0.0 } else { 1.0 }).collect();
                let keep = Tensor::from_vec(keep, (1, 1, n, 1), x.device())?.to_dtype(x.dtype())?;
                x.broadcast_mul(&keep)?
            }
            Intervention::Map(f) => f(&x)?,
        })
    }
}

/// What to do at which hook points during one forward pass; holds the cache afterwards.
#[derive(Clone, Default)]
pub struct Hooks {
    capture: BTreeSet<String>,
    interventions: BTreeMap<String, Vec<Intervention>>,
    grad_at: BTreeSet<String>,
    stop_after_layer: Option<usize>,
    skip_unembed: bool,
    start_at: Option<(usize, Tensor)>,
    cache: BTreeMap<String, Tensor>,
    vars: BTreeMap<String, Var>,
}

impl Hooks {
    pub fn new() -> Hooks {
        Hooks::default()
    }

    /// Cache the activation at `hook`.
    pub fn capture(mut self, hook: impl Into<String>) -> Hooks {
        self.capture.insert(hook.into());
        self
    }

    /// Change the activation at `hook` (interventions at one hook apply in the order added).
    pub fn intervene(mut self, hook: impl Into<String>, intervention: Intervention) -> Hooks {
        self.interventions.entry(hook.into()).or_default().push(intervention);
        self
    }

    /// Make the activation at `hook` (after interventions) a gradient target; see [`Hooks::var`].
    pub fn grad(mut self, hook: impl Into<String>) -> Hooks {
        self.grad_at.insert(hook.into());
        self
    }

    /// Stop the forward pass after block `layer` (no logits): for capture of early layers, or a
    /// gradient of something computed inside the blocks up to `layer` (not of the loss: the
    /// loss needs the logits).
    pub fn stop_after_layer(mut self, layer: usize) -> Hooks {
        self.stop_after_layer = Some(layer);
        self
    }

    /// Return the final normalized hidden state `[batch, seq, d_model]` instead of logits (the
    /// chunked loss in [`crate::loss`] applies the unembedding itself).
    pub fn skip_unembed(mut self) -> Hooks {
        self.skip_unembed = true;
        self
    }

    /// Start the forward pass at block `layer` with `resid_pre` `[batch, seq, d_model]` as its
    /// input (it passes `blocks.{layer}.hook_resid_pre` as usual): the embedding and the blocks
    /// before it are not run. The tokens still give the batch and sequence length. With a
    /// `hook_resid_pre` cached from a run on the same tokens, the rest of the pass is that run's
    /// (e.g. many ablations downstream of one clean run). Gradients may be taken at hooks of
    /// block `layer` and later (e.g. at its `hook_resid_pre`), not before it.
    pub fn start_at(mut self, layer: usize, resid_pre: Tensor) -> Hooks {
        self.start_at = Some((layer, resid_pre));
        self
    }

    /// The block the model starts at and its input, checked against a model of `n_layers`
    /// blocks and tokens `[batch, seq]`; `None` for a pass from the embedding.
    pub fn start(&self, n_layers: usize, batch: usize, seq: usize) -> Result<Option<(usize, Tensor)>> {
        let Some((layer, x)) = &self.start_at else { return Ok(None) };
        if *layer >= n_layers {
            bail!("cannot start at block {layer}: the model has {n_layers} blocks");
        }
        let dims = x.dims();
        if dims.len() != 3 || dims[0] != batch || dims[1] != seq {
            bail!("the residual to start at block {layer} has shape {dims:?}, the tokens [{batch}, {seq}]");
        }
        if let Some(hook) =
            self.grad_at.iter().find(|h| hook_layer(h).map_or(h.starts_with("hook_"), |l| l < *layer))
        {
            bail!("a pass that starts at block {layer} cannot take a gradient at {hook}");
        }
        Ok(Some((*layer, x.clone())))
    }

    /// Whether the model should stop before the unembedding.
    pub fn skips_unembed(&self) -> bool {
        self.skip_unembed
    }

    /// Whether a gradient will be taken (models then use differentiable ops throughout).
    pub fn wants_grad(&self) -> bool {
        !self.grad_at.is_empty()
    }

    /// Whether block `layer` must run differentiable ops: a gradient is taken inside it or
    /// upstream of it (at `hook_embed`, or at a hook of this or an earlier block that the block's
    /// output depends on). Blocks before the first gradient hook may use the fast fused kernels.
    pub fn diff_at(&self, layer: usize) -> bool {
        self.grad_at.iter().any(|hook| match hook_layer(hook) {
            // A block's own `hook_resid_post` is its output: only later blocks depend on it.
            Some(l) if hook.ends_with(".hook_resid_post") => layer > l,
            Some(l) => layer >= l,
            None => hook == "hook_embed",
        })
    }

    /// The layer after which the model may stop, if any.
    pub fn stop_layer(&self) -> Option<usize> {
        self.stop_after_layer
    }

    /// Whether anything happens at `hook` (lets models skip computing optional activations).
    pub fn is_active(&self, hook: &str) -> bool {
        self.capture.contains(hook) || self.interventions.contains_key(hook) || self.grad_at.contains(hook)
    }

    /// Every hook this value refers to.
    pub fn names(&self) -> BTreeSet<&str> {
        self.capture
            .iter()
            .chain(self.interventions.keys())
            .chain(&self.grad_at)
            .map(String::as_str)
            .collect()
    }

    /// Check every named hook against the model's; an unknown name gets the nearest valid ones.
    pub fn validate(&self, valid: &[String]) -> Result<()> {
        for name in self.names() {
            if !valid.iter().any(|v| v == name) {
                let mut near: Vec<(usize, &String)> =
                    valid.iter().map(|v| (edit_distance(name, v), v)).collect();
                near.sort();
                let near: Vec<&str> = near.iter().take(3).map(|(_, v)| v.as_str()).collect();
                bail!("unknown hook {name:?}; nearest valid hooks: {}", near.join(", "));
            }
        }
        Ok(())
    }

    /// Called by models at each hook point: intervene, cache, and mark as a gradient target.
    pub fn apply(&mut self, hook: &str, mut x: Tensor) -> Result<Tensor> {
        if let Some(list) = self.interventions.get(hook) {
            for intervention in list {
                x = intervention.apply(x).map_err(|e| anyhow::anyhow!("intervention at {hook}: {e:#}"))?;
            }
        }
        if self.grad_at.contains(hook) {
            let var = Var::from_tensor(&x.detach())?;
            x = var.as_tensor().clone();
            self.vars.insert(hook.to_string(), var);
        }
        if self.capture.contains(hook) || self.grad_at.contains(hook) {
            self.cache.insert(hook.to_string(), x.clone());
        }
        Ok(x)
    }

    /// Cached activations of the last forward pass.
    pub fn cache(&self) -> &BTreeMap<String, Tensor> {
        &self.cache
    }

    /// The cached activation at `hook`.
    pub fn get(&self, hook: &str) -> Result<&Tensor> {
        match self.cache.get(hook) {
            Some(t) => Ok(t),
            None => bail!("hook {hook} was not captured in this forward pass"),
        }
    }

    /// The gradient target at `hook`: pass `var.as_tensor()` to `GradStore::get`.
    pub fn var(&self, hook: &str) -> Option<&Var> {
        self.vars.get(hook)
    }

    /// Forget the cache and gradient targets (keep the configuration) before another pass.
    pub fn clear(&mut self) {
        self.cache.clear();
        self.vars.clear();
    }
}

/// The block of a `blocks.{L}.…` hook name.
fn hook_layer(hook: &str) -> Option<usize> {
    hook.strip_prefix("blocks.")?.split('.').next()?.parse().ok()
}

/// Levenshtein distance, for "did you mean" suggestions (too small a need for a crate).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_hook_suggests_nearest() {
        let valid: Vec<String> =
            ["blocks.6.hook_resid_post", "blocks.6.hook_resid_pre", "blocks.5.hook_resid_post", "hook_embed"]
                .map(String::from)
                .to_vec();
        let err = Hooks::new().capture("blocks.6.hook_resid_pots").validate(&valid).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "unknown hook \"blocks.6.hook_resid_pots\"; nearest valid hooks: blocks.6.hook_resid_post"
            ),
            "{msg}"
        );
        assert!(Hooks::new().capture("hook_embed").validate(&valid).is_ok());
    }

    #[test]
    fn blocks_before_the_gradient_hook_are_not_differentiated() {
        let at = |hook: &str| (0..4).map(|l| Hooks::new().grad(hook).diff_at(l)).collect::<Vec<_>>();
        assert_eq!(at("blocks.1.hook_resid_post"), [false, false, true, true]);
        assert_eq!(at("blocks.1.hook_resid_pre"), [false, true, true, true]);
        assert_eq!(at("blocks.2.attn.hook_z"), [false, false, true, true]);
        assert_eq!(at("hook_embed"), [true; 4]);
        assert_eq!(at("ln_final.hook_normalized"), [false; 4]);
        assert_eq!(
            (0..4).map(|l| Hooks::new().capture("hook_embed").diff_at(l)).collect::<Vec<_>>(),
            [false; 4]
        );
    }

    #[test]
    fn a_started_pass_takes_gradients_from_its_block_on() {
        let x = Tensor::zeros((1, 2, 4), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let start = |hook: &str| Hooks::new().start_at(1, x.clone()).grad(hook).start(3, 1, 2);
        assert!(start("blocks.1.hook_resid_pre").is_ok() && start("blocks.2.attn.hook_z").is_ok());
        let err = start("blocks.0.hook_resid_post").unwrap_err().to_string();
        assert_eq!(err, "a pass that starts at block 1 cannot take a gradient at blocks.0.hook_resid_post");
        assert!(start("hook_embed").is_err());
    }
}

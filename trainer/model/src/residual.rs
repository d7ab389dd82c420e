//! The residual stream as a sum of parts: what [`crate::HookedModel::residual_components`]
//! returns for a residual-stream hook (`hook_embed`, `blocks.L.hook_resid_pre|mid|post`).
//!
//! The stream at a hook is the embedding plus what every earlier attention layer and MLP added.
//! Each architecture splits those additions further (one term per head, bias terms) in its own
//! file (`gpt2.rs`, `gemma3.rs`); this module says which layers a hook includes and holds the one
//! shared step, splitting a `[batch, pos, head, d_model]` per-head output into heads.

use anyhow::{Result, bail};
use candle_core::Tensor;

use crate::hooks::names::{EMBED, RESID_MID, RESID_POST, RESID_PRE};

/// Which blocks' outputs the residual stream at a hook holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResidualPoint {
    /// The attention outputs of blocks `0..attn_layers`.
    pub attn_layers: usize,
    /// The MLP outputs of blocks `0..mlp_layers`.
    pub mlp_layers: usize,
    /// The hook is `hook_embed` (before anything else is added, e.g. GPT-2's position embedding).
    pub embed_only: bool,
}

impl ResidualPoint {
    /// The last block the forward pass must run, if any.
    pub fn last_block(&self) -> Option<usize> {
        self.attn_layers.max(self.mlp_layers).checked_sub(1)
    }
}

/// Where `hook` sits in the residual stream of a model of `n_layers` blocks; `None` when it is not a
/// residual-stream hook.
pub fn residual_point(hook: &str, n_layers: usize) -> Option<ResidualPoint> {
    if hook == EMBED {
        return Some(ResidualPoint { attn_layers: 0, mlp_layers: 0, embed_only: true });
    }
    let rest = hook.strip_prefix("blocks.")?;
    let (layer, name) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if layer >= n_layers {
        return None;
    }
    let (attn_layers, mlp_layers) = match name {
        RESID_PRE => (layer, layer),
        RESID_MID => (layer + 1, layer),
        RESID_POST => (layer + 1, layer + 1),
        _ => return None,
    };
    Some(ResidualPoint { attn_layers, mlp_layers, embed_only: false })
}

/// The error for a hook that is not in the residual stream.
pub fn not_residual(hook: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{hook} is not a residual-stream hook (hook_embed, blocks.L.hook_resid_pre, hook_resid_mid or hook_resid_post)"
    )
}

/// Split `result` `[batch, pos, head, d_model]` of block `layer` into `("L.H", [batch, pos,
/// d_model])` terms, each multiplied by `scale` (broadcast) when given.
pub fn split_heads(layer: usize, result: &Tensor, scale: Option<&Tensor>) -> Result<Vec<(String, Tensor)>> {
    let dims = result.dims();
    if dims.len() != 4 {
        bail!("hook_result of block {layer} has shape {dims:?}, expected [batch, pos, head, d_model]");
    }
    (0..dims[2])
        .map(|h| {
            let part = result.narrow(2, h, 1)?.squeeze(2)?;
            let part = match scale {
                Some(s) => part.broadcast_mul(s)?,
                None => part,
            };
            Ok((format!("{layer}.{h}"), part))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_name_the_layers_they_include() {
        let p = |h: &str| residual_point(h, 4).map(|p| (p.attn_layers, p.mlp_layers, p.embed_only));
        assert_eq!(p("hook_embed"), Some((0, 0, true)));
        assert_eq!(p("blocks.0.hook_resid_pre"), Some((0, 0, false)));
        assert_eq!(p("blocks.2.hook_resid_mid"), Some((3, 2, false)));
        assert_eq!(p("blocks.3.hook_resid_post"), Some((4, 4, false)));
        assert_eq!(p("blocks.4.hook_resid_post"), None);
        assert_eq!(p("blocks.1.attn.hook_z"), None);
        assert_eq!(p("blocks.1.hook_mlp_out"), None);
        assert_eq!(residual_point("blocks.2.hook_resid_mid", 4).unwrap().last_block(), Some(2));
        assert_eq!(residual_point("hook_embed", 4).unwrap().last_block(), None);
    }
}

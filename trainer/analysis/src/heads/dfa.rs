//! Direct feature attribution (`loupe dfa`, the app's feature page).
//!
//! For an attention-output SAE at `blocks.L.attn.hook_z` (heads concatenated):
//! DFA_i(h) = z_h · W_enc[block h, i] per position, and per source token
//! DFA_i(h, s) = A_h[d, s] (v_h[s] · W_enc[block h, i]); Σ_h DFA_i(h) + b_enc[i] − b_dec · W_enc[:, i]
//! is the pre-activation. For a residual-stream SAE, the pre-activation decomposed exactly into
//! the embedding, each head's output and each MLP's output of the earlier layers.

use anyhow::{Result, bail};
use loupe_dict::Sae;
use loupe_model::HookedModel;

/// What a feature's pre-activation is attributed to.
#[derive(Clone, Debug, PartialEq)]
pub enum DfaKind {
    /// An attention-output SAE at `blocks.{layer}.attn.hook_z`: components are its heads.
    Heads { layer: usize },
    /// A residual-stream SAE at `hook`: components are the embedding, each earlier head, each
    /// earlier MLP (and any bias terms the architecture adds to the stream).
    Residual { hook: String },
}

/// Direct feature attribution of one feature on one prompt.
#[derive(Clone, Debug)]
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
    /// `[pos]`: the feature's pre-activation (Σ contributions + bias).
    pub pre_activation: Vec<f32>,
    /// For [`DfaKind::Heads`]: `[pos][head][source]` (source ≤ pos; zeros after), which sums
    /// over sources to `contributions[pos][head]`.
    pub per_source: Option<Vec<Vec<Vec<f32>>>>,
}

/// The DFA of `feature` of `sae` (trained at `hook` of `model`) on `tokens`.
pub fn dfa(model: &dyn HookedModel, sae: &Sae, hook: &str, feature: u32, tokens: &[u32]) -> Result<Dfa> {
    let _ = (model, sae, hook, feature, tokens);
    bail!("direct feature attribution is not built yet")
}

/// Weight-based head attribution of every feature of an attention-output SAE with `n_heads`
/// heads: w_i(h) = ‖W_dec[i, block h]‖ / Σ_h′ ‖W_dec[i, block h′]‖, `[feature][head]`.
pub fn head_attribution(sae: &Sae, n_heads: usize) -> Result<Vec<Vec<f32>>> {
    let _ = (sae, n_heads);
    bail!("head attribution is not built yet")
}

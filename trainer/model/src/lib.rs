//! loupe-model: Loupe's hooked transformer runtime, from a model file to activations in a store.
//!
//! - the architectures, one file each ([`gemma3`] from GGUF or HF safetensors, [`gpt2`] and
//!   [`bert`] from HF folders), with Loupe's own TransformerLens hook points ([`hooks`]) for
//!   caching, interventions and gradients (candle-transformers exposes no internals); what they
//!   share is here: the [`HookedModel`] trait, loading by path, and the loss whose gradient
//!   capture uses ([`loss`]); [`kernels`] and [`ops`]: the fused CPU kernels; [`gguf`]: the file;
//! - [`tokenizer`]: tokenizers from an HF `tokenizer.json` or rebuilt from a GGUF's vocabulary
//!   (Gemma 3's matches transformers id for id);
//! - [`corpus`]: text files, folders and JSONL as numbered documents;
//! - [`capture`]: corpus → contexts → activations (and loss gradients) at hooks → store,
//!   resumable;
//! - [`frozen`]: one prompt's frozen linear model (patterns and norm scales fixed), for
//!   attribution graphs;
//! - [`residual`]: the residual stream at a hook as a sum of embeddings, heads and MLPs;
//! - [`session`]: the model (and tokenizer) that goes with a store, resolved one way for every
//!   stage that runs it.
//!
//! The crate talks to the later stages only through [`loupe_store`].

pub mod bert;
pub mod capture;
pub mod corpus;
pub mod frozen;
pub mod gemma3;
pub mod gguf;
pub mod gpt2;
pub mod hooks;
pub mod kernels;
pub mod loss;
pub mod ops;
pub mod residual;
pub mod session;
pub mod tokenizer;

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::Tensor;

pub use hooks::{HookList, HookPoint, Hooks, Intervention, Shape};
pub use loss::{loss_gradients, next_token_loss, token_losses};
pub use session::Session;

/// Architectures Loupe can run, for error messages.
pub const SUPPORTED: &str =
    "gemma3 (GGUF file or HF safetensors directory), gpt2 (HF directory), bert (HF directory)";

/// Shape facts every architecture reports.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// `gemma3`, `gpt2` or `bert`.
    pub architecture: String,
    pub n_layers: usize,
    pub d_model: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub d_head: usize,
    pub d_mlp: usize,
    pub vocab_size: usize,
    /// Longest context the model supports.
    pub max_context: usize,
    /// Whether the model predicts the next token (has a next-token loss).
    pub causal: bool,
}

/// A transformer whose forward pass goes through [`Hooks`].
pub trait HookedModel: Send + Sync {
    fn config(&self) -> &ModelConfig;

    /// The unembedding `[vocab, d_model]` of a causal model (logits = final hidden · Wᵀ).
    fn unembedding(&self) -> Option<&Tensor> {
        None
    }

    /// The logits that residual-stream directions (`[n, d_model]`) add through the final norm and
    /// the unembedding (`[n, vocab]`), with the norm's linear part applied as the model does
    /// (its scale; LayerNorm's centring too) and its division by the norm left out: the direct
    /// logit effect of writing along each direction.
    fn direction_logits(&self, directions: &Tensor) -> Result<Tensor> {
        let _ = directions;
        bail!("{} has no unembedding, so directions have no logit effects", self.config().architecture)
    }

    /// The residual stream at `hook` (`hook_embed`, `blocks.L.hook_resid_pre|mid|post`) on
    /// `tokens` `[batch, seq]`, split into named terms `[batch, seq, d_model]` that sum to it: the
    /// embedding (`embed`, and GPT-2's `pos_embed`), each head `L.H` and each MLP `L.mlp` of the
    /// blocks before the hook, and the architecture's bias terms (GPT-2's `L.attn_bias`). A sum the
    /// model normalises before adding it (Gemma 3's post-attention norm) is split with that
    /// position's norm frozen, so the terms still add up exactly. See [`residual`].
    fn residual_components(&self, tokens: &Tensor, hook: &str) -> Result<Vec<(String, Tensor)>> {
        let _ = (tokens, hook);
        bail!("{} cannot split its residual stream into components", self.config().architecture)
    }

    /// The frozen linear model of `tokens` (one prompt): attention patterns and norm scales
    /// fixed at their values on it (see [`frozen`]). Causal models only.
    fn freeze(&self, tokens: &[u32]) -> Result<frozen::Frozen> {
        let _ = tokens;
        bail!(
            "{} has no frozen linear model: attribution graphs need a causal model (gemma3 or gpt2)",
            self.config().architecture
        )
    }

    /// Every hook point of the architecture, with its shape.
    fn hook_list(&self) -> &'static HookList;

    /// Every hook point, in forward order.
    fn hook_names(&self) -> Vec<String> {
        self.hook_list().names(self.config().n_layers)
    }

    /// Run on token ids `[batch, seq]` (u32). Returns logits `[batch, seq, vocab]` for causal
    /// models (the last hidden state for encoders), or `None` when `hooks` stopped the pass early.
    fn forward(&self, tokens: &Tensor, hooks: &mut Hooks) -> Result<Option<Tensor>>;
}

/// Load a model from a GGUF file or an HF directory (`config.json` + `model.safetensors`).
pub fn load(path: &Path) -> Result<Box<dyn HookedModel>> {
    if !path.exists() {
        bail!("model not found: {} does not exist", path.display());
    }
    if path.is_dir() {
        let config_path = path.join("config.json");
        let text = std::fs::read_to_string(&config_path).with_context(|| {
            format!("{} is not an HF model directory (no readable config.json)", path.display())
        })?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
        let model_type = config.get("model_type").and_then(|v| v.as_str()).unwrap_or("(none)");
        return match model_type {
            "gemma3_text" | "gemma3" => Ok(Box::new(gemma3::Gemma3::from_hf_dir(path, &config)?)),
            "gpt2" => Ok(Box::new(gpt2::Gpt2::from_hf_dir(path, &config)?)),
            "bert" => Ok(Box::new(bert::Bert::from_hf_dir(path, &config)?)),
            other => bail!("{}: unsupported architecture {other:?}; supported: {SUPPORTED}", path.display()),
        };
    }
    let mut file = gguf::Gguf::open(path)?;
    let arch = file.architecture()?;
    match arch.as_str() {
        "gemma3" => Ok(Box::new(gemma3::Gemma3::from_gguf(&mut file)?)),
        other => bail!("{}: unsupported GGUF architecture {other:?}; supported: {SUPPORTED}", path.display()),
    }
}

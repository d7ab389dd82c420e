//! loupe-model: Loupe's hooked transformer runtime, from a model file to activations in a store.
//!
//! - the architectures, one file each ([`gemma3`] from GGUF or HF safetensors, [`gpt2`] and
//!   [`bert`] from HF folders; the sparse-MoE [`olmoe`] and [`qwen3_moe`] on the shared decoder
//!   [`moe_lm`] and MoE MLP [`moe`]), with Loupe's own TransformerLens hook points ([`hooks`]) for
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
pub mod moe;
pub mod moe_lm;
pub mod olmoe;
pub mod ops;
pub mod qwen3_moe;
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
pub const SUPPORTED: &str = "gemma3 (GGUF file or HF safetensors directory), gpt2 (HF directory), bert (HF directory), olmoe and qwen3_moe (sparse MoE, HF directory)";

/// Sparse-MoE architectures Loupe recognises but cannot run, with what their MoE does that
/// [`moe`]'s softmax top-k router does not.
const UNSUPPORTED_MOE: &[(&str, &str)] = &[
    (
        "mixtral",
        "Mixtral: a softmax top-k router like Qwen3-MoE's, but attention without QK-norm and block_sparse_moe weights, not implemented",
    ),
    ("qwen2_moe", "Qwen2-MoE: a shared expert with its own sigmoid gate beside the routed experts"),
    ("deepseek_v2", "DeepSeek-V2: grouped top-k routing, shared experts, multi-head latent attention"),
    ("deepseek_v3", "DeepSeek-V3: sigmoid scoring with a correction bias, grouped top-k, shared experts"),
    ("qwen3_next", "Qwen3-Next: a shared expert, hybrid linear attention"),
    ("llama4", "Llama 4: sigmoid top-1 router with a shared expert"),
    ("dbrx", "DBRX: fused expert weights and clipped-QKV attention of its own"),
    ("jamba", "Jamba: Mamba layers between the attention and MoE layers"),
    ("granitemoe", "GraniteMoE: a router and scalings of its own"),
    ("phimoe", "PhiMoE: sparsemixer routing"),
];

/// Shape facts every architecture reports.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// `gemma3`, `gpt2`, `bert`, `olmoe` or `qwen3_moe`.
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
    /// Experts per sparse MoE MLP (0 for a dense model); `d_mlp` is then each expert's width.
    pub n_experts: usize,
    /// Experts each token is routed to (0 for a dense model).
    pub experts_per_token: usize,
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

/// Whether `config.json` (of `model_type`) describes a sparse mixture of experts.
fn is_moe(model_type: &str, config: &serde_json::Value) -> bool {
    let keys =
        ["num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_experts_per_tok"];
    UNSUPPORTED_MOE.iter().any(|(t, _)| *t == model_type)
        || keys.iter().any(|k| config.get(k).is_some_and(|v| !v.is_null()))
        || config
            .get("text_config")
            .is_some_and(|t| keys.iter().any(|k| t.get(k).is_some_and(|v| !v.is_null())))
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
            "olmoe" => Ok(Box::new(olmoe::from_hf_dir(path, &config)?)),
            "qwen3_moe" => Ok(Box::new(qwen3_moe::from_hf_dir(path, &config)?)),
            other if is_moe(other, &config) => {
                let what = UNSUPPORTED_MOE
                    .iter()
                    .find(|(t, _)| *t == other)
                    .map_or("a router Loupe does not know", |(_, w)| w);
                bail!(
                    "{}: unsupported sparse-MoE architecture {other:?} ({what}); supported MoE: olmoe, qwen3_moe (softmax top-k router, SwiGLU experts, no shared expert); supported: {SUPPORTED}",
                    path.display()
                )
            }
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

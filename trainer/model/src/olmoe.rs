//! OLMoE (`OlmoeForCausalLM`, model_type `olmoe`) from an HF safetensors directory, run by the
//! shared sparse-MoE decoder ([`super::moe_lm`]).
//!
//! What is OLMoE's own (transformers 5.23 `models/olmoe/modeling_olmoe.py`): QK-norm over the whole
//! q and k projections (`q_norm` of `n_heads·d_head`, `k_norm` of `n_kv_heads·d_head`) before they
//! are split into heads, the optional `clip_qkv` clamp after it, experts of `intermediate_size`,
//! softmax router with `norm_topk_prob` (false in the released models), untied unembedding unless
//! `tie_word_embeddings`, RMSNorm eps `rms_norm_eps` (1e-5).

use std::path::Path;

use anyhow::Result;

use super::moe_lm::{HfWeights, MoeLm, MoeLmConfig, QkNorm};

/// Load from an HF directory (`config.json` + `model.safetensors` or sharded with an index).
pub fn from_hf_dir(dir: &Path, config: &serde_json::Value) -> Result<MoeLm> {
    let cfg = MoeLmConfig::from_hf(dir, config, "olmoe", "intermediate_size", QkNorm::Projection)?;
    let flag = |k: &str| config.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    let weights = HfWeights::open(dir)?;
    MoeLm::from_weights(cfg, &weights, flag("norm_topk_prob"), flag("tie_word_embeddings"))
}

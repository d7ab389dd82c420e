//! Qwen3-MoE (`Qwen3MoeForCausalLM`, model_type `qwen3_moe`) from an HF safetensors directory, run
//! by the shared sparse-MoE decoder ([`super::moe_lm`]).
//!
//! What is Qwen3-MoE's own (transformers 5.23 `models/qwen3_moe/modeling_qwen3_moe.py`): QK-norm
//! per head (`q_norm`, `k_norm` of `head_dim`), `head_dim` independent of `hidden_size /
//! num_attention_heads`, experts of `moe_intermediate_size`, softmax router with `norm_topk_prob`
//! (true in the released models), RMSNorm eps `rms_norm_eps` (1e-6). Dense MLP layers
//! (`mlp_only_layers`, `decoder_sparse_step` > 1) are refused: every block of Loupe's MoE models
//! has the router hooks; the released Qwen3-MoE models have none.

use std::path::Path;

use anyhow::{Result, bail};

use super::moe_lm::{HfWeights, MoeLm, MoeLmConfig, QkNorm};

/// Load from an HF directory (`config.json` + `model.safetensors` or sharded with an index).
pub fn from_hf_dir(dir: &Path, config: &serde_json::Value) -> Result<MoeLm> {
    let cfg = MoeLmConfig::from_hf(dir, config, "qwen3_moe", "moe_intermediate_size", QkNorm::Head)?;
    let dense: Vec<u64> = config
        .get("mlp_only_layers")
        .and_then(|v| v.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
        .unwrap_or_default();
    let step = config.get("decoder_sparse_step").and_then(|v| v.as_u64()).unwrap_or(1);
    if !dense.is_empty() || step != 1 {
        bail!(
            "{}: qwen3_moe with dense MLP layers (mlp_only_layers {dense:?}, decoder_sparse_step {step}) is not supported: Loupe runs Qwen3-MoE models whose every layer is sparse",
            dir.display()
        );
    }
    let flag = |k: &str| config.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
    let weights = HfWeights::open(dir)?;
    MoeLm::from_weights(cfg, &weights, flag("norm_topk_prob"), flag("tie_word_embeddings"))
}

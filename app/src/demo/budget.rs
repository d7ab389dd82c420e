//! The demo's sizes, in one place: the full budget (under 15 minutes of stages on a 2-core
//! machine) and `--quick`'s tiny one (a check of the whole pipeline in a few minutes).

/// Every size the demo's stages use.
#[derive(Clone, Debug)]
pub struct Budget {
    /// `full` or `quick`, as the summary says.
    pub name: &'static str,
    /// Tokens captured (every hook of the one capture holds this many rows).
    pub tokens: u64,
    /// Tokens per context of the capture.
    pub context: usize,
    /// The SAEs (TopK and Mutual Choice share them): features, k, learning rate, batch.
    pub sae_features: usize,
    pub sae_k: usize,
    pub sae_lr: Option<f32>,
    pub sae_batch: usize,
    /// SAE training tokens (None: one pass over the training rows; more: further passes).
    pub sae_tokens: Option<u64>,
    /// Held-out contexts spliced in for CE-loss recovered (SAEs and the MoE-X).
    pub eval_contexts: usize,
    /// MoE-X transcoder at layer 6: experts, units per expert, experts per token, training tokens.
    pub moex_experts: usize,
    pub moex_width: usize,
    pub moex_top_k: usize,
    pub moex_tokens: u64,
    /// MoE-X learning rate and load-balancing weight (None: train-moex's defaults).
    pub moex_lr: Option<f32>,
    pub moex_balance: Option<f32>,
    /// Per-layer skip transcoders (one per layer, for the graph): features, k, training tokens.
    pub tc_features: usize,
    pub tc_k: usize,
    pub tc_tokens: u64,
    pub tc_batch: usize,
    /// Features explained per SAE (None: every live feature; the search index embeds each
    /// explanation), and of those the first ones scored by embedding (MiniLM: ~1 s a feature).
    pub explained: Option<u32>,
    pub scored: u32,
    /// Repeated and natural-text sequences for `loupe heads`.
    pub head_sequences: usize,
    /// IOI pairs (the first ones of assets/tasks/ioi.jsonl).
    pub ioi_pairs: usize,
    /// Feature nodes whose incoming edges the graph computes.
    pub graph_feature_nodes: u32,
}

impl Budget {
    /// The full demo, as measured in RESULTS.md ("The demo's budget"): TopK and Mutual Choice at
    /// 250k training tokens over a 100k-token capture, lr 1e-3 (CE-loss recovered 0.94 at layer
    /// 6 on 8 held-out contexts); MoE-X at lr 1e-3 with load balancing 0.1; the per-layer
    /// transcoders on 60k tokens (the graph's replacement score 0.63 at 10k, 0.94 at 60k).
    pub fn full() -> Budget {
        Budget {
            name: "full",
            tokens: 100_000,
            context: 256,
            sae_features: 4096,
            sae_k: 32,
            sae_lr: Some(1e-3),
            sae_batch: 1024,
            sae_tokens: Some(250_000),
            eval_contexts: 8,
            moex_experts: 16,
            moex_width: 256,
            moex_top_k: 2,
            moex_tokens: 150_000,
            moex_lr: Some(1e-3),
            moex_balance: Some(0.1),
            tc_features: 1024,
            tc_k: 16,
            tc_tokens: 60_000,
            tc_batch: 512,
            explained: None,
            scored: 20,
            head_sequences: 8,
            ioi_pairs: 16,
            graph_feature_nodes: 1024,
        }
    }

    /// `--quick`: a few thousand tokens, small widths, few pairs.
    pub fn quick() -> Budget {
        Budget {
            name: "quick",
            tokens: 4_096,
            context: 128,
            sae_features: 512,
            sae_k: 16,
            sae_lr: None,
            sae_batch: 256,
            sae_tokens: None,
            eval_contexts: 2,
            moex_experts: 4,
            moex_width: 64,
            moex_top_k: 2,
            moex_tokens: 2_048,
            moex_lr: None,
            moex_balance: None,
            tc_features: 128,
            tc_k: 8,
            tc_tokens: 1_024,
            tc_batch: 256,
            explained: Some(64),
            scored: 3,
            head_sequences: 2,
            ioi_pairs: 2,
            graph_feature_nodes: 64,
        }
    }
}

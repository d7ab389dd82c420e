//! Training configuration: every hyper-parameter of a run (everything but the data), with the
//! papers' defaults, as `train-sae` flags, TOML keys and checkpoints' `state.json` record it.

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::Variant;
use super::jumprelu::L0Penalty;

/// Training hyper-parameters (everything but the data).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub variant: Variant,
    pub d_in: usize,
    pub n_features: usize,
    /// Active features per token (mean, for the batch-level variants).
    pub k: usize,
    /// Tokens per step.
    pub batch: usize,
    /// Adam learning rate.
    pub lr: f32,
    pub seed: u64,
    /// AuxK / aux_zipf weight (0: off).
    pub auxk_alpha: f32,
    /// Pairs per token in the auxiliary reconstruction.
    pub k_aux: usize,
    /// A feature that has not fired for this many training tokens is dead (for AuxK).
    pub dead_tokens: u64,
    /// Add the FVU at 4k weighted 1/8.
    pub multi_topk: bool,
    /// Feature Choice: exponent α of the Zipf capacities.
    pub zipf_exponent: f32,
    /// g-SAE: weight β of the gradient term.
    pub gsae_beta: f32,
    /// Decay per step of the firing densities' moving averages (Feature Choice's ranking).
    pub ema_decay: f32,
    /// Decay per step of the inference thresholds' moving averages (Mutual and Feature Choice).
    /// Shorter than `ema_decay`: the thresholds must follow the encoder as it trains, and a run of
    /// ~130 steps with 0.99 still weighs its first batch by 0.28 (RESULTS.md).
    #[serde(default = "default_threshold_decay")]
    pub threshold_decay: f32,
    /// Factor the activations are multiplied by before training (the job sets it so that their
    /// mean norm is √d, as SAELens' `expected_average_only_in`; 1: raw). The trainer works in
    /// this scaled space; [`super::sae::Sae::folded`] turns its weights into raw-space ones.
    #[serde(default = "one")]
    pub input_scale: f32,
    /// Mutual and Feature Choice: rank pairs by `pre / ‖x − b_dec‖` and learn thresholds relative
    /// to that norm (Loupe's default, see [`super::mutual_choice`]); `false`: by raw `pre` with
    /// absolute thresholds, as the papers (and loadable by SAELens).
    #[serde(default = "yes")]
    pub scale_free: bool,
    /// ReLU: weight λ of the L1 penalty; JumpReLU: of the L0 penalty (both in SAELens' units:
    /// its per-token loss, divided here by the per-token variance; see [`super::jumprelu`]).
    #[serde(default = "default_sparsity")]
    pub sparsity_coefficient: f32,
    /// JumpReLU: bandwidth ε of the straight-through estimator's rectangle kernel (SAELens 6's
    /// default, 0.05).
    #[serde(default = "default_bandwidth")]
    pub jumprelu_bandwidth: f32,
    /// JumpReLU: initial threshold of every feature (SAELens 6's default, 0.01).
    #[serde(default = "default_init_threshold")]
    pub jumprelu_init_threshold: f32,
    /// JumpReLU: the penalty on each token's L0 (`step`, or `quadratic` around k).
    #[serde(default)]
    pub jumprelu_sparsity: L0Penalty,
    /// A transcoder: the encoder reads the input hook's `x` (no b_dec subtracted, SAELens'
    /// transcoder convention) and the decoder writes the output hook's activation
    /// ([`super::transcode`]).
    #[serde(default)]
    pub transcoder: bool,
    /// A skip transcoder: the output adds `W_skip · x` (`[d_out, d_in]`, initialised to zero).
    #[serde(default)]
    pub skip: bool,
    /// A transcoder's factor for its targets (as `input_scale` for its inputs; 1: raw).
    #[serde(default = "one")]
    pub output_scale: f32,
}

fn default_threshold_decay() -> f32 {
    0.9
}

fn default_sparsity() -> f32 {
    1.0
}

fn default_bandwidth() -> f32 {
    0.05
}

fn default_init_threshold() -> f32 {
    0.01
}

fn one() -> f32 {
    1.0
}

fn yes() -> bool {
    true
}

impl TrainConfig {
    /// Defaults of the papers and sparsify for a `variant` with these sizes: learning rate
    /// 2e-4/√(n/2¹⁴), AuxK α 1/32 with k_aux = d/2 and 10M dead tokens (capped by the caller to
    /// the run's length), Zipf α 0.5, g-SAE β 1.
    pub fn new(variant: Variant, d_in: usize, n_features: usize, k: usize, batch: usize) -> TrainConfig {
        TrainConfig {
            variant,
            d_in,
            n_features,
            k,
            batch,
            lr: default_lr(n_features),
            seed: 0,
            auxk_alpha: 1.0 / 32.0,
            k_aux: (d_in / 2).max(1),
            dead_tokens: 10_000_000,
            multi_topk: false,
            zipf_exponent: 0.5,
            gsae_beta: 1.0,
            ema_decay: 0.99,
            threshold_decay: default_threshold_decay(),
            input_scale: 1.0,
            scale_free: true,
            sparsity_coefficient: default_sparsity(),
            jumprelu_bandwidth: default_bandwidth(),
            jumprelu_init_threshold: default_init_threshold(),
            jumprelu_sparsity: L0Penalty::Step,
            transcoder: false,
            skip: false,
            output_scale: 1.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.d_in == 0 || self.n_features == 0 || self.batch == 0 {
            bail!("d_in, n_features and batch must be at least 1");
        }
        if self.k == 0 || self.k > self.n_features {
            bail!("k = {} must be between 1 and n_features = {}", self.k, self.n_features);
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("learning rate {} must be a positive number", self.lr);
        }
        if !(self.input_scale.is_finite() && self.input_scale > 0.0) {
            bail!("input_scale {} must be a positive number", self.input_scale);
        }
        if !(self.sparsity_coefficient.is_finite() && self.sparsity_coefficient >= 0.0) {
            bail!("sparsity_coefficient {} must be a number ≥ 0", self.sparsity_coefficient);
        }
        if !(self.jumprelu_bandwidth.is_finite() && self.jumprelu_bandwidth > 0.0) {
            bail!("jumprelu_bandwidth {} must be a positive number", self.jumprelu_bandwidth);
        }
        if !(self.jumprelu_init_threshold.is_finite() && self.jumprelu_init_threshold > 0.0) {
            bail!("jumprelu_init_threshold {} must be a positive number", self.jumprelu_init_threshold);
        }
        if !(0.0..1.0).contains(&self.ema_decay) || !(0.0..1.0).contains(&self.threshold_decay) {
            bail!(
                "ema_decay {} and threshold_decay {} must be in [0, 1)",
                self.ema_decay,
                self.threshold_decay
            );
        }
        if !(self.output_scale.is_finite() && self.output_scale > 0.0) {
            bail!("output_scale {} must be a positive number", self.output_scale);
        }
        if self.skip && !self.transcoder {
            bail!("a skip connection needs a transcoder (an input hook other than the output hook)");
        }
        if self.transcoder {
            super::transcode::check_variant(self.variant)?;
        }
        if self.n_features > u32::MAX as usize / 2 || self.batch > u32::MAX as usize / 2 {
            bail!("n_features and batch must fit in 31 bits");
        }
        Ok(())
    }
}

impl TrainConfig {
    /// Whether the trained SAE's inference thresholds are relative to ‖x − b_dec‖.
    pub fn relative_thresholds(&self) -> bool {
        self.scale_free && matches!(self.variant, Variant::MutualChoice | Variant::FeatureChoice)
    }
}

/// Adam learning rate scaled with the width: 2e-4 / √(n / 2¹⁴).
pub fn default_lr(n_features: usize) -> f32 {
    2e-4 / (n_features as f32 / 16384.0).sqrt()
}

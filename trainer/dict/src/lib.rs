//! loupe-dict: sparse dictionaries: what every variant shares, and the SAE family.
//!
//! - [`Dictionary`]: the one interface evaluation, splicing, analysis and the app use (encode a
//!   batch to sparse [`Codes`] with the batch-free inference rule, reconstruct, save), for SAEs
//!   Monet experts ([`monet`]) and MoE-X experts ([`moex`]) alike;
//! - [`Sae`] ([`sae`]): the weights of every SAE variant, SAELens layout, and their inference rule;
//! - [`Variant`]: TopK, Mutual Choice (BatchTopK), Feature Choice, g-SAE — how a training batch
//!   picks its (token, feature) pairs: [`topk`], [`mutual_choice`], [`feature_choice`], [`gsae`];
//!   JumpReLU and ReLU + L1, sparse by a penalty instead: [`jumprelu`];
//! - [`config`]: a run's hyper-parameters;
//! - [`train`]: the training step shared by the TopK family (sparse backward, fused Adam), with
//!   its per-feature gradient + Adam pass in `update.rs`;
//! - [`kernels`]: GEMM, partial top-k, sparse codes;
//! - [`job`]: `train-sae` over a store (checkpoints, resume; [`checkpoints`]: a run's files and
//!   the removal of unlisted checkpoints), [`eval`]: held-out evaluation,
//!   [`splice`]: CE-loss recovered and KL with the dictionary spliced into the model;
//!   [`steer`]: the model run with a feature's decoder direction added at a hook;
//! - [`transcode`]: SAE-family transcoders (MLP input → MLP output, optional skip connection),
//!   trained by [`train`] with `input_hook`, and their files;
//! - [`transcoder`]: a set of transcoders replacing every MLP (per-layer or cross-layer), what
//!   attribution graphs read; [`clt`]: cross-layer transcoders (`train-clt`);
//!   [`splice_all`]: CE-loss recovered with every MLP replaced by a transcoder set;
//! - [`io`]: SAELens and sparsify files, trainer state; [`saelens`]: the SAELens `cfg.json`
//!   settings that change encoding (folded or refused); [`import`]: such files into a store.
//!
//! Layout of the weights (row-major `f32`): `w_enc` `[n_features, d_in]` (row `f` is feature `f`'s
//! encoder vector), `b_enc` `[n_features]`, `w_dec` `[n_features, d_in]` (row `f` is its decoder
//! direction, unit norm), `b_dec` `[d_in]`. Saved as SAELens' `W_enc [d_in, d_sae]` (transposed).

pub mod amx;
pub mod checkpoints;
pub mod clt;
pub mod config;
pub mod eval;
pub mod feature_choice;
pub mod gsae;
pub mod import;
pub mod io;
pub mod job;
pub mod jumprelu;
pub mod kernels;
pub mod loss;
pub mod moex;
pub mod monet;
pub mod mutual_choice;
pub mod sae;
mod sae_fit;
pub mod saelens;
pub mod splice;
pub mod splice_all;
pub mod steer;
pub mod topk;
pub mod train;
pub mod transcode;
pub mod transcoder;
mod update;

use std::path::Path;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

pub use kernels::Codes;
pub use sae::Sae;
pub use train::{StepStats, TrainConfig, Trainer};

/// The interface shared by every dictionary, whatever its variant.
pub trait Dictionary: Send + Sync {
    /// Width of the activations it reads.
    fn d_in(&self) -> usize;
    /// Number of features.
    fn n_features(&self) -> usize;
    /// Width of what it reconstructs (d_in, except for transcoders).
    fn d_out(&self) -> usize {
        self.d_in()
    }
    /// Sparse codes of `x` (`[tokens, d_in]`) with the batch-free inference rule.
    fn encode(&self, x: &[f32]) -> Codes;
    /// The codes of `x` and its reconstruction (`[tokens, d_out]`): what splicing writes back.
    /// (An SAE decodes its codes; Monet's experts also read `x`, so there is no decode from codes
    /// alone in this interface.)
    fn reconstruct(&self, x: &[f32]) -> (Codes, Vec<f32>);
    /// Write the dictionary (SAELens layout) into `dir`.
    fn save(&self, dir: &Path) -> Result<()>;
    /// Each feature's output direction, `[n_features, d_out]` row-major, when every feature
    /// writes one fixed vector (an SAE's decoder rows); `None` when what a feature writes depends
    /// on the input (Monet experts).
    fn decoder_directions(&self) -> Option<&[f32]> {
        None
    }
    /// For dictionaries without [`Self::decoder_directions`]: each feature's mean output per unit
    /// of activation over the inputs `inputs[f]` (`[rows, d_in]`; empty gives zeros), as
    /// `[n_features, d_out]` — what a Monet expert writes on the tokens it is given.
    fn mean_feature_outputs(&self, inputs: &[Vec<f32>]) -> Option<Vec<f32>> {
        let _ = inputs;
        None
    }
    /// How the features group into experts, for a mixture-of-experts dictionary (Monet: each
    /// expert is one feature; MoE-X: expert e owns features e·m … e·m + m − 1); `None` for
    /// dictionaries without experts (SAEs, transcoders).
    fn experts(&self) -> Option<ExpertLayout> {
        None
    }
    /// Which experts each token of `x` (`[tokens, d_in]`) is routed to, with its gate: sparse
    /// codes over *expert* ids (not feature ids), gates at or below the dictionary's floor left
    /// out; `None` for dictionaries without experts. What `loupe experts` counts.
    fn route(&self, x: &[f32]) -> Option<Codes> {
        let _ = x;
        None
    }
}

/// How a dictionary's features group into experts ([`Dictionary::experts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExpertLayout {
    pub n_experts: usize,
    /// Features per expert; expert e owns features e·m … e·m + m − 1.
    pub features_per_expert: usize,
}

/// Load dictionary `name` of `store`, whatever its kind; it must have finished training.
pub fn open_in_store(
    store: &loupe_store::Store,
    name: &str,
) -> Result<(loupe_store::DictEntry, Box<dyn Dictionary>)> {
    let manifest = store.manifest();
    let Some(entry) = manifest.dictionaries.get(name).cloned() else {
        let names: Vec<&str> = manifest.dictionaries.keys().map(String::as_str).collect();
        let listed = if names.is_empty() { "none".to_string() } else { names.join(", ") };
        bail!("store {} has no dictionary named {name:?} (it has: {listed})", store.root().display());
    };
    if !entry.is_done() {
        bail!("dictionary {name} is still training (step {}); finish or resume it first", entry.step);
    }
    let dir = store.dictionary_dir(name);
    // The files must be the ones listed (size and checksum), not edited since.
    store.check_listed_files(&dir, &entry.files.iter().collect::<Vec<_>>())?;
    let dict: Box<dyn Dictionary> = match entry.kind.as_str() {
        "sae" => transcode::load_any(&dir)?,
        "monet" => Box::new(monet::io::load(&dir)?.0),
        "moex" => Box::new(moex::io::load(&dir)?.0),
        "clt" => bail!(
            "dictionary {name} is a cross-layer transcoder: open it as a set (TranscoderSet::from_store)"
        ),
        other => bail!("dictionary {name} has unknown kind {other:?} (expected sae, monet or moex)"),
    };
    if dict.d_in() != entry.d_in as usize || dict.n_features() != entry.n_features as usize {
        bail!(
            "dictionary {name}'s files (d {}, {} features) disagree with the manifest (d {}, {} features)",
            dict.d_in(),
            dict.n_features(),
            entry.d_in,
            entry.n_features
        );
    }
    Ok((entry, dict))
}

/// How a training batch chooses which (token, feature) pairs are active.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variant {
    /// Each token keeps its k largest pre-activations (Gao et al.).
    Topk,
    /// The batch keeps its k·B largest pre-activations (BatchTopK); inference uses a learned
    /// threshold.
    MutualChoice,
    /// Each feature keeps its m_f largest tokens, capacities from a Zipf law; inference uses
    /// learned per-feature thresholds.
    FeatureChoice,
    /// TopK over the pre-activation scaled by the loss gradient's projection on the decoder
    /// (Olmo et al.); needs the store's `grad` column.
    Gsae,
    /// JumpReLU (Rajamanoharan et al.): active above a learned per-feature threshold, trained
    /// with an L0 penalty through straight-through estimators.
    Jumprelu,
    /// Standard ReLU SAE, trained with an L1 penalty (SAELens' `standard`).
    Relu,
}

impl Variant {
    /// Every variant (Loupe trains them all).
    pub const ALL: [Variant; 6] = [
        Variant::Topk,
        Variant::MutualChoice,
        Variant::FeatureChoice,
        Variant::Gsae,
        Variant::Jumprelu,
        Variant::Relu,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Variant::Topk => "topk",
            Variant::MutualChoice => "mutual_choice",
            Variant::FeatureChoice => "feature_choice",
            Variant::Gsae => "gsae",
            Variant::Jumprelu => "jumprelu",
            Variant::Relu => "relu",
        }
    }

    /// Whether inference uses per-feature thresholds (saved as `threshold`) rather than top-k.
    pub fn uses_threshold(self) -> bool {
        matches!(self, Variant::MutualChoice | Variant::FeatureChoice | Variant::Jumprelu)
    }
}

impl std::fmt::Display for Variant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Variant {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let key = s.to_ascii_lowercase().replace('-', "_");
        Ok(match key.as_str() {
            "topk" => Variant::Topk,
            "mutual_choice" | "batchtopk" | "batch_topk" => Variant::MutualChoice,
            "feature_choice" => Variant::FeatureChoice,
            "gsae" | "g_sae" => Variant::Gsae,
            "jumprelu" => Variant::Jumprelu,
            "relu" | "l1" | "standard" => Variant::Relu,
            _ => bail!(
                "unknown variant {s:?} (expected topk, mutual_choice, feature_choice, gsae, jumprelu or relu)"
            ),
        })
    }
}

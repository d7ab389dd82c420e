//! Attention heads (`loupe heads`, `loupe dfa`, the app's Heads view): what each head `L.H` of
//! a model does, written as the table of [`loupe_store::heads`].
//!
//! - [`detectors`]: TransformerLens' `detect_head` scores (previous-token, duplicate-token,
//!   induction patterns; "mul": Σ(A⊙P)/ΣA) and its induction-stripe score, on [BOS] + R + R and
//!   on natural text;
//! - [`pattern`]: one head's attention pattern on a prompt (the app's heatmap);
//! - [`ablation`]: the next-token loss on the repeated half with each single head's `hook_z`
//!   zeroed or mean-ablated, as a delta against the clean loss;
//! - [`run`]: `loupe heads` — the sequences (seeded repeated ones; natural text from the store's
//!   captured tokens or a file), the detectors and ablations, one table in the store;
//! - [`dfa`]: direct feature attribution of a dictionary feature's pre-activation to heads (and
//!   source tokens) for attention-output SAEs at `hook_z`, or to the embedding, each head and each
//!   MLP for residual-stream SAEs.

pub mod ablation;
pub mod detectors;
pub mod dfa;
pub mod group;
pub mod pattern;

mod run;

use anyhow::{Result, bail};

pub use run::{HeadsReport, check_settings, run};

/// The settings of one `loupe heads` run.
#[derive(Clone, Debug)]
pub struct HeadsConfig {
    /// Seed of the random token ids R.
    pub seed: u64,
    /// Number of [BOS] + R + R sequences.
    pub sequences: usize,
    /// |R|.
    pub repeat_len: usize,
    /// Natural-text sequences (and tokens each) for the `_text` detector scores.
    pub text_sequences: usize,
    pub text_len: usize,
    /// Also mean-ablate each head.
    pub mean_ablation: bool,
}

impl Default for HeadsConfig {
    fn default() -> Self {
        HeadsConfig {
            seed: 0,
            sequences: 16,
            repeat_len: 50,
            text_sequences: 16,
            text_len: 128,
            mean_ablation: false,
        }
    }
}

/// Parse a head written `L.H`, checked against the model's `n_layers` × `n_heads`.
pub fn parse_head(text: &str, n_layers: usize, n_heads: usize) -> Result<(usize, usize)> {
    let bad = || anyhow::anyhow!("bad head {text:?}: write a head as LAYER.HEAD, e.g. 5.1");
    let (l, h) = text.split_once('.').ok_or_else(bad)?;
    let (l, h): (usize, usize) = (l.parse().map_err(|_| bad())?, h.parse().map_err(|_| bad())?);
    if l >= n_layers || h >= n_heads {
        bail!(
            "head {text} does not exist: the model has {n_layers} layers of {n_heads} heads (0.0 to {}.{})",
            n_layers - 1,
            n_heads - 1
        );
    }
    Ok((l, h))
}

//! Discrete-SAE circuit discovery (O'Neill & Bui): per-head outputs (`attn.hook_result`) averaged
//! over positions for positive (clean) and negative (corrupt) prompts, one small SAE fitted on
//! them, each (prompt, head) coded by its most active feature; a node scores
//! |codes_pos(h) \ codes_neg(h)|, an edge the code pairs seen only in positives.

use anyhow::{Result, bail};
use loupe_model::HookedModel;
use loupe_store::Progress;

use super::patch::Runs;
use super::{Scores, Task};

/// The discrete SAE's settings (the paper's defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct DiscreteSaeConfig {
    pub features: usize,
    pub l1: f32,
    pub lr: f64,
    pub epochs: usize,
    pub seed: u64,
}

impl Default for DiscreteSaeConfig {
    fn default() -> Self {
        DiscreteSaeConfig { features: 200, l1: 0.02, lr: 1e-3, epochs: 200, seed: 0 }
    }
}

/// Node scores (and edges between heads) of the discrete-SAE method.
pub fn discrete_sae(
    model: &dyn HookedModel,
    task: &Task,
    runs: &Runs,
    config: &DiscreteSaeConfig,
    progress: &dyn Progress,
) -> Result<Scores> {
    let _ = (model, task, runs, config, progress);
    bail!("discrete-SAE circuit discovery is not implemented yet")
}

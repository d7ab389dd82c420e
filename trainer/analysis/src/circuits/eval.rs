//! Each fast method against the patching ground truth: node and edge ROC AUC (positives: the top
//! 10 % by |effect|, or |effect| ≥ 0.05), MIB-style faithfulness f(k) of the top k % of nodes
//! kept (the rest patched from the corrupt run), CPR (area under f) and CMD (area under |1 − f|).

use anyhow::{Result, bail};
use loupe_model::HookedModel;

use super::Task;
use super::patch::Runs;

/// The k (percent of nodes kept) of the faithfulness curve.
pub const K_PERCENT: [f32; 7] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0];

/// ROC AUC of `scores` for `positive` (ties count a half); `None` when a class is empty.
pub fn roc_auc(scores: &[f32], positive: &[bool]) -> Option<f32> {
    let _ = (scores, positive);
    None
}

/// f(k) for each k of `k_percent`: the top k % of nodes by |`node_scores`| kept.
pub fn faithfulness(
    model: &dyn HookedModel,
    task: &Task,
    runs: &Runs,
    node_scores: &[f32],
    k_percent: &[f32],
) -> Result<Vec<f32>> {
    let _ = (model, task, runs, node_scores, k_percent);
    bail!("faithfulness is not implemented yet")
}

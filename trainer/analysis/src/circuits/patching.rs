//! The ground truth: each node's output patched alone from the corrupt run into the clean run at
//! every position; effect = (m_patched − m_clean) / (m_corrupt − m_clean), the metric averaged
//! over the pairs first. Layers before the patched node are not recomputed: a pass starts at the
//! node's block from the clean run's cached `hook_resid_pre` ([`Hooks::start_at`]).
//!
//! [`Hooks::start_at`]: loupe_model::Hooks::start_at

use anyhow::{Result, bail};
use loupe_model::HookedModel;
use loupe_store::Progress;

use super::Task;
use super::patch::Runs;

/// Each node of [`super::nodes`] patched alone: its normalised effect, in that order.
pub fn patching(
    model: &dyn HookedModel,
    task: &Task,
    runs: &Runs,
    progress: &dyn Progress,
) -> Result<Vec<f32>> {
    let _ = (model, task, runs, progress);
    bail!("activation patching is not implemented yet")
}

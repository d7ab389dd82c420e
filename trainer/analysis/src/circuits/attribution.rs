//! Attribution patching: each node's effect to first order, (a_corrupt − a_clean) · ∂m/∂a, from
//! the cached clean and corrupt runs and one backward pass of the clean run; and each edge's
//! (EAP): the source's output difference times the gradient of the metric at the target's input.

use anyhow::{Result, bail};
use loupe_model::HookedModel;
use loupe_store::Progress;

use super::patch::Runs;
use super::{Scores, Task};

/// Node and edge scores, normalised like [`super::patching`]'s effects (divided by
/// m_corrupt − m_clean).
pub fn attribution(
    model: &dyn HookedModel,
    task: &Task,
    runs: &Runs,
    progress: &dyn Progress,
) -> Result<Scores> {
    let _ = (model, task, runs, progress);
    bail!("attribution patching is not implemented yet")
}

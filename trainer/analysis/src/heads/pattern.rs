//! One head's attention pattern on a prompt, for the app's heatmap.

use anyhow::{Result, bail};
use loupe_model::HookedModel;

/// Head `layer.head`'s attention pattern on `tokens` (ids, BOS included as the caller wants):
/// `[query][key]` row-major, `tokens.len()²` values (zero above the diagonal).
pub fn attention_pattern(
    model: &dyn HookedModel,
    tokens: &[u32],
    layer: usize,
    head: usize,
) -> Result<Vec<f32>> {
    let _ = (model, tokens, layer, head);
    bail!("attention patterns are not built yet")
}

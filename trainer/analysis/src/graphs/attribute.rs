//! Edge weights of an attribution graph: the direct effect of each source node on each target
//! through the frozen replacement model, a batch of targets per backward pass.

use anyhow::{Result, bail};
use loupe_dict::transcoder::TranscoderSet;
use loupe_model::HookedModel;
use loupe_store::{GraphSettings, Progress};

use super::RawGraph;

/// The unpruned graph of `tokens` (BOS first) through `transcoders`: the top logits, the
/// features selected by influence (at most `settings.max_feature_nodes`), every error and
/// embedding node, and the incoming edges of the logits and selected features.
pub fn attribute(
    model: &dyn HookedModel,
    transcoders: &TranscoderSet,
    tokens: &[u32],
    settings: &GraphSettings,
    progress: &dyn Progress,
) -> Result<RawGraph> {
    let _ = (model, transcoders, settings, progress);
    bail!("attribution of a {}-token prompt is not built yet", tokens.len())
}

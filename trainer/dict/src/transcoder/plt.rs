//! Per-layer transcoders (SAE family, `train-sae --input-hook`) as a [`TranscoderSet`].

use anyhow::{Result, bail};

use super::TranscoderSet;

/// The per-layer transcoders `names` of `store`, one for each of `n_layers` layers.
pub(super) fn load(store: &loupe_store::Store, names: &[String], n_layers: usize) -> Result<TranscoderSet> {
    let _ = (store, n_layers);
    bail!("per-layer transcoder sets ({}) are not built yet", names.join(", "))
}

//! A cross-layer transcoder (`train-clt`) as a [`TranscoderSet`].

use anyhow::{Result, bail};

use super::TranscoderSet;

/// The cross-layer transcoder `name` of `store`, covering `n_layers` layers.
pub(super) fn load(store: &loupe_store::Store, name: &str, n_layers: usize) -> Result<TranscoderSet> {
    let _ = (store, n_layers);
    bail!("cross-layer transcoder {name} cannot be loaded as a set yet")
}

//! `loupe graph export`: a stored graph as circuit-tracer's JSON (`nodes` with node_id, feature,
//! layer, ctx_idx, feature_type, influence, activation and `clerp` from the store's
//! explanations; `links` with source, target, weight; `metadata`), written as it is read.

use std::path::Path;

use anyhow::{Result, bail};
use loupe_store::Store;

/// Write graph `name` of `store` to `out`; returns the nodes and links written.
pub fn export(store: &Store, name: &str, out: &Path) -> Result<(u64, u64)> {
    bail!(
        "loupe graph export is not built yet (graph {name} of {} to {})",
        store.root().display(),
        out.display()
    )
}

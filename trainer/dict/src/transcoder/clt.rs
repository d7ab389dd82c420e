//! A cross-layer transcoder (`train-clt`, [`crate::clt`]) as a [`TranscoderSet`].

use anyhow::{Context, Result, bail};

use super::TranscoderSet;

/// The cross-layer transcoder `name` of `store`, covering `n_layers` layers: it must be finished,
/// its files the listed ones, cover layers 0..n_layers, and have the store's model width.
pub(super) fn load(store: &loupe_store::Store, name: &str, n_layers: usize) -> Result<TranscoderSet> {
    let manifest = store.manifest();
    let entry = manifest.dictionaries.get(name).with_context(|| format!("no dictionary named {name}"))?;
    if entry.kind != "clt" {
        bail!("dictionary {name} is a {}, not a cross-layer transcoder", entry.kind);
    }
    if !entry.is_done() {
        bail!("cross-layer transcoder {name} is still training (step {})", entry.step);
    }
    let dir = store.dictionary_dir(name);
    store.check_listed_files(&dir, &entry.files.iter().collect::<Vec<_>>())?;
    let clt = crate::clt::files::load(&dir)?;
    // The model's width, from a residual-width hook the store captured (if any).
    let width = (0..n_layers)
        .flat_map(|l| {
            ["ln2.hook_normalized", "hook_mlp_out", "hook_resid_pre", "hook_resid_post"]
                .map(|h| format!("blocks.{l}.{h}"))
        })
        .find_map(|h| manifest.hooks.get(&h).map(|e| (h, e.spec.d as usize)));
    if let Some((hook, d_model)) = width
        && clt.d != d_model
    {
        bail!(
            "cross-layer transcoder {name} has width {}, but the model's d_model is {d_model} (hook {hook})",
            clt.d
        );
    }
    clt.to_set(name, n_layers)
}

//! Per-layer transcoders (SAE family, `train-sae --input-hook`, [`crate::transcode`]) as a
//! [`TranscoderSet`]: one dictionary per layer, each reading `blocks.L.ln2.hook_normalized` and
//! writing `blocks.L.hook_mlp_out`. Their final files already read raw activations (the job folds
//! its normalisation into them), so the weights are taken as they are.

use anyhow::{Result, bail};

use super::{Activation, TranscoderLayer, TranscoderSet};
use crate::Variant;
use crate::transcode::SaeTranscoder;

/// The layer whose MLP `input` → `output` hooks these are, if they are an MLP's.
fn mlp_layer(input: &str, output: Option<&str>) -> Option<usize> {
    let layer: usize = input.strip_prefix("blocks.")?.strip_suffix(".ln2.hook_normalized")?.parse().ok()?;
    (output? == format!("blocks.{layer}.hook_mlp_out")).then_some(layer)
}

/// The model's width as the store's activations show it: the width of an MLP output, MLP input
/// or residual hook (None when the store holds none of them).
fn store_d_model(manifest: &loupe_store::Manifest) -> Option<usize> {
    manifest
        .hooks
        .iter()
        .find(|(name, _)| {
            name.starts_with("blocks.")
                && (name.ends_with(".hook_mlp_out")
                    || name.ends_with(".ln2.hook_normalized")
                    || name.contains(".hook_resid_"))
        })
        .map(|(_, entry)| entry.spec.d as usize)
}

/// The per-layer transcoders `names` of `store`, one for each of `n_layers` layers.
pub(super) fn load(store: &loupe_store::Store, names: &[String], n_layers: usize) -> Result<TranscoderSet> {
    let manifest = store.manifest();
    let mut by_layer: Vec<Option<(String, TranscoderLayer)>> = (0..n_layers).map(|_| None).collect();
    let mut d_model = store_d_model(&manifest);
    for name in names {
        let entry = &manifest.dictionaries[name];
        let Some(layer) =
            mlp_layer(&entry.hook, entry.output_hook.as_deref()).filter(|_| entry.kind == "sae")
        else {
            bail!(
                "dictionary {name} is not a per-layer MLP transcoder: it is a {} reading {} and writing {} \
                 (expected kind sae, blocks.L.ln2.hook_normalized → blocks.L.hook_mlp_out)",
                entry.kind,
                entry.hook,
                entry.output_hook.as_deref().unwrap_or(&entry.hook)
            );
        };
        if layer >= n_layers {
            bail!("dictionary {name} is a transcoder of layer {layer}, but the model has {n_layers} layers");
        }
        if let Some((other, _)) = &by_layer[layer] {
            bail!("layer {layer} has two transcoders: {other} and {name}");
        }
        if !entry.is_done() {
            bail!("dictionary {name} is still training (step {}); finish or resume it first", entry.step);
        }
        let dir = store.dictionary_dir(name);
        store.check_listed_files(&dir, &entry.files.iter().collect::<Vec<_>>())?;
        let (tc, _) = crate::transcode::load(&dir)?;
        let width = tc.sae.spec.d_in;
        match d_model {
            Some(d) if d != width => {
                bail!("dictionary {name} has width {width}, but the model's d_model is {d}")
            }
            _ => d_model = Some(width),
        }
        by_layer[layer] = Some((name.clone(), layer_of(tc, layer)));
    }
    let missing: Vec<String> =
        by_layer.iter().enumerate().filter(|(_, l)| l.is_none()).map(|(i, _)| i.to_string()).collect();
    if !missing.is_empty() {
        bail!(
            "no transcoder for layer{} {} (the model has {n_layers} layers; give one per layer)",
            if missing.len() > 1 { "s" } else { "" },
            missing.join(", ")
        );
    }
    let (names, layers): (Vec<String>, Vec<TranscoderLayer>) = by_layer.into_iter().flatten().unzip();
    Ok(TranscoderSet { kind: "plt".to_string(), names, d_model: d_model.unwrap_or(0), layers })
}

/// One transcoder as layer `layer` of a set.
fn layer_of(tc: SaeTranscoder, layer: usize) -> TranscoderLayer {
    let sae = tc.sae;
    let activation = match sae.spec.variant {
        Variant::Jumprelu => Activation::JumpRelu { threshold: sae.threshold.clone().unwrap_or_default() },
        Variant::Relu => Activation::Relu,
        _ => Activation::TopK { k: sae.spec.k },
    };
    TranscoderLayer {
        layer,
        n_features: sae.spec.n_features,
        w_enc: sae.w_enc,
        b_enc: sae.b_enc,
        activation,
        w_dec: vec![sae.w_dec],
        b_dec: sae.b_dec,
        w_skip: tc.w_skip,
    }
}

//! What a SAELens `cfg.json` says beyond the weights' shapes: the architecture, k, and the settings
//! that change how a checkpoint encodes. Each such setting is either folded into the weights,
//! where that is exact, or refused with its name; none is ignored. Checked against `sae-lens` 6.54
//! itself (`tests/fixtures/saelens/settings/`, `tests/tests/saelens_import.rs`).
//!
//! - `apply_b_dec_to_input: false` (the encoder reads `x`, not `x − b_dec`): folded into b_enc
//!   ([`Sae::fold_input_bias`]).
//! - `rescale_acts_by_decoder_norm: true` (TopK: pre-activations times ‖W_dec[f]‖ before the
//!   top-k, activations divided by it before decoding): folded into the encoder and decoder rows
//!   ([`Sae::fold_decoder_norms`]). SAELens reads it on `topk` only; elsewhere it is refused.
//! - `normalize_activations` other than `"none"`: refused. `layer_norm` and
//!   `constant_norm_rescale` normalize each input row, which a Loupe SAE (a function of the raw
//!   row) cannot represent; `expected_average_only_in` and `covariance_whitening` need statistics
//!   the checkpoint does not hold (SAELens can fold them into the weights first).
//! - `reshape_activations`: `"none"` or `"hook_z"` (Loupe stores a `hook_z` row as its
//!   `[heads, d_head]` values flattened, which is SAELens' reshape); anything else is refused.
//! - `metadata.hook_head_index` set (the SAE reads one head of its hook): refused.
//! - Configs older than SAELens 6.0 (no `sae_lens_version` ≥ 6, top-level or in `metadata`) are
//!   read as SAELens' `handle_pre_6_0_config` reads them: `activation_fn: "topk"` with
//!   `activation_fn_kwargs.k` is a TopK SAE, `activation_fn` other than `relu`/`topk` is refused,
//!   and a boolean `normalize_activations` true means `expected_average_only_in`.
//!
//! Other keys do not change how SAELens 6 encodes (its config classes drop keys they lack).

use anyhow::{Result, bail};
use serde_json::Value;

use super::sae::Sae;

/// The encoding-relevant part of a SAELens `cfg.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct SaelensCfg {
    /// SAELens' architecture name (`standard` when the file names none).
    pub architecture: String,
    /// Active features per token of a TopK SAE.
    pub k: Option<usize>,
    pub apply_b_dec_to_input: bool,
    pub rescale_acts_by_decoder_norm: bool,
}

impl SaelensCfg {
    /// Read `cfg`, refusing any setting Loupe cannot reproduce exactly (see the module docs).
    pub fn read(cfg: &Value) -> Result<SaelensCfg> {
        let meta = if cfg["metadata"].is_object() { &cfg["metadata"] } else { cfg };
        let version = cfg["sae_lens_version"].as_str().or(meta["sae_lens_version"].as_str());
        let pre_6 =
            version.and_then(|v| v.split('.').next()?.parse::<u32>().ok()).is_none_or(|major| major < 6);

        let mut architecture = cfg["architecture"].as_str().unwrap_or("standard").to_string();
        let mut k = cfg["k"].as_u64().map(|k| k as usize);
        if pre_6 {
            let activation = cfg["activation_fn"].as_str().or(cfg["activation_fn_str"].as_str());
            let kwargs_k = cfg["activation_fn_kwargs"]["k"].as_u64();
            match (activation, kwargs_k) {
                (None | Some("relu"), _) => {}
                (Some("topk"), Some(kk)) => {
                    architecture = "topk".to_string();
                    k = Some(kk as usize);
                }
                (Some(other), _) => bail!(
                    "activation_fn is {other:?} (a SAELens < 6 config); Loupe reads relu, and topk with \
                     activation_fn_kwargs.k"
                ),
            }
        }

        let apply_b_dec_to_input = flag(cfg, "apply_b_dec_to_input", true)?;
        let rescale_acts_by_decoder_norm = flag(cfg, "rescale_acts_by_decoder_norm", false)?;
        if rescale_acts_by_decoder_norm && architecture != "topk" {
            bail!(
                "rescale_acts_by_decoder_norm is true, a setting SAELens defines for topk only, but the \
                 architecture is {architecture:?}; remove the key if the SAE was not trained with it"
            );
        }
        check_normalization(&cfg["normalize_activations"])?;
        match &cfg["reshape_activations"] {
            Value::Null => {}
            Value::String(s) if s == "none" || s == "hook_z" => {}
            other => bail!("reshape_activations is {other}; Loupe reads \"none\" and \"hook_z\""),
        }
        let head = [&meta["hook_head_index"], &cfg["hook_head_index"], &cfg["hook_point_head_index"]]
            .into_iter()
            .find(|v| !v.is_null());
        if let Some(head) = head {
            bail!(
                "hook_head_index is {head}: the SAE reads one attention head of its hook, and Loupe's \
                 hooks hold every head"
            );
        }
        Ok(SaelensCfg { architecture, k, apply_b_dec_to_input, rescale_acts_by_decoder_norm })
    }

    /// Fold the settings into `sae`'s weights, so that Loupe's inference rule on raw activations
    /// gives SAELens' codes and reconstructions.
    pub fn apply(&self, sae: &mut Sae) -> Result<()> {
        if !self.apply_b_dec_to_input {
            sae.fold_input_bias()?;
        }
        if self.rescale_acts_by_decoder_norm {
            sae.fold_decoder_norms()?;
        }
        Ok(())
    }
}

/// A boolean key (`default` when absent or null).
fn flag(cfg: &Value, key: &str, default: bool) -> Result<bool> {
    match &cfg[key] {
        Value::Null => Ok(default),
        Value::Bool(b) => Ok(*b),
        other => bail!("{key} is {other}, not true or false"),
    }
}

/// Only `"none"` (or absent, null, false) is accepted; every other value is refused, saying why.
fn check_normalization(value: &Value) -> Result<()> {
    let (name, shown) = match value {
        Value::Null | Value::Bool(false) => return Ok(()),
        Value::String(s) if s == "none" => return Ok(()),
        // SAELens < 6 wrote a boolean; true meant what 6.x calls expected_average_only_in.
        Value::Bool(true) => {
            ("expected_average_only_in", "true (SAELens < 6 for \"expected_average_only_in\")".into())
        }
        Value::String(s) => (s.as_str(), format!("{s:?}")),
        other => bail!("normalize_activations is {other}, not a SAELens setting"),
    };
    let why = match name {
        "expected_average_only_in" => {
            "the SAE expects inputs multiplied by a dataset constant that the checkpoint does not hold; \
             fold it into the weights with SAELens (sae.fold_activation_norm_scaling_factor(factor), \
             then sae.save_model(dir)) and import that"
        }
        "covariance_whitening" => {
            "the SAE expects whitened inputs, and the whitening statistics are not in the checkpoint; \
             fold them into the weights with SAELens (sae.fold_activation_whitening(...), then \
             sae.save_model(dir)) and import that"
        }
        "layer_norm" => {
            "SAELens layer-normalizes each input row before encoding and undoes it after decoding, \
             which a Loupe SAE (a function of the raw row) cannot represent"
        }
        "constant_norm_rescale" => {
            "SAELens rescales each input row to norm √d_in before encoding and undoes it after \
             decoding, which a Loupe SAE (a function of the raw row) cannot represent"
        }
        _ => "Loupe does not know this setting",
    };
    bail!("normalize_activations is {shown}: {why} (Loupe reads \"none\")")
}

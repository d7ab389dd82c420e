//! Dictionary files: the SAELens layout Loupe writes, sparsify's layout it imports, and the
//! trainer state that makes a checkpoint resumable.
//!
//! SAELens layout (a folder): `cfg.json` + `sae_weights.safetensors` with `W_enc [d_in, d_sae]`,
//! `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]` and, for threshold variants,
//! `threshold [d_sae]`. `cfg.json` carries SAELens' keys (`architecture` is `topk` for TopK and
//! g-SAE, `jumprelu` for JumpReLU and for Mutual and Feature Choice with absolute thresholds,
//! `standard` for ReLU; scale-free Mutual and Feature Choice, whose thresholds are relative to
//! ‖x − b_dec‖, get Loupe's own `relative_jumprelu`, which SAELens cannot load),
//! the `metadata` block (model and hook names), and a `loupe` block with the variant and the
//! training configuration. Reading, the settings of other SAELens files that change encoding are
//! folded into the weights or refused ([`super::saelens`]), as are tensors Loupe would not use. sparsify layout: `cfg.json` + `sae.safetensors` with `encoder.weight
//! [n, d]`, `encoder.bias`, `W_dec [n, d]`, `b_dec`.
//!
//! Trainer state: `state.safetensors` (Adam moments, firing counters, densities) + `state.json`
//! (step, tokens, the configuration, and the caller's resume position).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use half::{bf16, f16};
use loupe_store::fsutil::write_atomic;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::Variant;
use super::sae::{Sae, SaeSpec};
use super::saelens::SaelensCfg;
use super::train::{Moments, TrainConfig, TrainerState};

/// The SAELens config format Loupe writes (`metadata.sae_lens_version`): 6.0 introduced the
/// nested `metadata` block and the per-architecture configs.
pub const SAELENS_FORMAT_VERSION: &str = "6.0.0";

/// What a dictionary was trained on (SAELens' `metadata`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SaeMeta {
    pub model_name: String,
    pub hook_name: String,
    /// A transcoder's input hook (Loupe's key; SAELens has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_hook: Option<String>,
    pub context_size: Option<usize>,
    pub prepend_bos: Option<bool>,
    pub dataset_path: Option<String>,
}

/// Write `cfg.json` and `sae_weights.safetensors` into `dir` (created if missing), each atomically.
pub fn save_sae(sae: &Sae, meta: &SaeMeta, dir: &Path) -> Result<()> {
    save_sae_with(sae, meta, None, dir)
}

/// [`save_sae`] with the training configuration recorded in `cfg.json`'s `loupe` block.
pub fn save_sae_with(sae: &Sae, meta: &SaeMeta, train: Option<&TrainConfig>, dir: &Path) -> Result<()> {
    sae.validate().context("refusing to save an invalid SAE")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (n, d) = (sae.spec.n_features, sae.spec.d_in);
    let w_enc_t = transpose(&sae.w_enc, n, d);
    let mut tensors: Vec<(&str, Vec<usize>, &[f32])> = vec![
        ("W_enc", vec![d, n], &w_enc_t),
        ("b_enc", vec![n], &sae.b_enc),
        ("W_dec", vec![n, d], &sae.w_dec),
        ("b_dec", vec![d], &sae.b_dec),
    ];
    if let Some(t) = &sae.threshold {
        tensors.push(("threshold", vec![n], t));
    }
    // No safetensors metadata: the model and hook names are in cfg.json's `metadata`, and a
    // metadata map would be written in hash order, making identical weights differ byte-wise.
    write_atomic(&dir.join("sae_weights.safetensors"), &serialize(&tensors, None)?)?;
    let architecture = match sae.spec.variant {
        Variant::Relu => "standard",
        _ if sae.threshold_relative => "relative_jumprelu",
        v if v.uses_threshold() => "jumprelu",
        _ => "topk",
    };
    let mut cfg = json!({
        "architecture": architecture,
        "d_in": d,
        "d_sae": n,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": true,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": meta.model_name,
            "hook_name": meta.hook_name,
            "hook_head_index": null,
            "context_size": meta.context_size,
            "prepend_bos": meta.prepend_bos,
            "dataset_path": meta.dataset_path,
            // SAELens >= 6 reads this block only when it names a 6.x format version; without it,
            // `handle_pre_6_0_config` rebuilds `metadata` from top-level keys and drops ours.
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": null,
        },
        "loupe": {
            "variant": sae.spec.variant,
            "k": sae.spec.k,
            "train": train,
        },
    });
    if architecture == "topk" {
        cfg["k"] = json!(sae.spec.k);
    }
    let text = serde_json::to_string_pretty(&cfg)? + "\n";
    write_atomic(&dir.join("cfg.json"), text.as_bytes())
}

/// Read a dictionary folder in SAELens or sparsify layout (whichever files it holds).
pub fn load_sae(dir: &Path) -> Result<(Sae, SaeMeta)> {
    let cfg_path = dir.join("cfg.json");
    let text =
        std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?;
    let cfg: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
    if dir.join("sae_weights.safetensors").exists() {
        load_saelens(dir, &cfg)
            .with_context(|| format!("cannot load the SAELens dictionary in {}", dir.display()))
    } else if dir.join("sae.safetensors").exists() {
        load_sparsify(dir, &cfg)
            .with_context(|| format!("cannot load the sparsify dictionary in {}", dir.display()))
    } else {
        bail!(
            "{} holds neither sae_weights.safetensors (SAELens) nor sae.safetensors (sparsify)",
            dir.display()
        )
    }
}

fn load_saelens(dir: &Path, cfg: &Value) -> Result<(Sae, SaeMeta)> {
    if super::transcode::is_transcoder_cfg(cfg) {
        bail!("this is a transcoder (architecture {}), not an SAE", cfg["architecture"]);
    }
    let bytes = read(&dir.join("sae_weights.safetensors"))?;
    let st = SafeTensors::deserialize(&bytes)
        .context("sae_weights.safetensors is not a valid safetensors file")?;
    let (d, n) = (usize_field(cfg, "d_in")?, usize_field(cfg, "d_sae")?);
    let settings = SaelensCfg::read(cfg).context("cfg.json")?;
    let architecture = settings.architecture.as_str();
    let loupe_variant = cfg["loupe"]["variant"].as_str();
    let variant = match (loupe_variant, architecture) {
        (Some(v), _) => v.parse()?,
        (None, "topk") => Variant::Topk,
        (None, "jumprelu") => Variant::Jumprelu,
        (None, "standard") => Variant::Relu,
        (None, other) => {
            bail!("SAELens architecture {other:?} is not supported yet (supported: topk, jumprelu, standard)")
        }
    };
    let k = cfg["loupe"]["k"].as_u64().map(|k| k as usize).or(settings.k).unwrap_or(0);
    check_tensor_names(&st, variant.uses_threshold())?;
    let w_enc_t = tensor(&st, "W_enc", &[d, n])?;
    let threshold = if variant.uses_threshold() { Some(tensor(&st, "threshold", &[n])?) } else { None };
    let mut sae = Sae {
        spec: SaeSpec { variant, d_in: d, n_features: n, k },
        w_enc: transpose(&w_enc_t, d, n),
        b_enc: tensor(&st, "b_enc", &[n])?,
        w_dec: tensor(&st, "W_dec", &[n, d])?,
        b_dec: tensor(&st, "b_dec", &[d])?,
        threshold,
        threshold_relative: architecture == "relative_jumprelu",
    };
    if matches!(variant, Variant::Topk | Variant::Gsae) && k == 0 {
        bail!("cfg.json has no k for a TopK SAE");
    }
    sae.validate()?;
    settings.apply(&mut sae).context("cfg.json")?;
    // SAELens < 6 kept these at the top level, with no `metadata` block.
    let meta_block = if cfg["metadata"].is_object() { &cfg["metadata"] } else { cfg };
    let text = |key: &str| meta_block[key].as_str().unwrap_or_default().to_string();
    let meta = SaeMeta {
        model_name: text("model_name"),
        // SAELens < 6 called it hook_point.
        hook_name: Some(text("hook_name")).filter(|h| !h.is_empty()).unwrap_or_else(|| text("hook_point")),
        input_hook: None,
        context_size: meta_block["context_size"].as_u64().map(|v| v as usize),
        prepend_bos: meta_block["prepend_bos"].as_bool(),
        dataset_path: meta_block["dataset_path"].as_str().map(str::to_string),
    };
    Ok((sae, meta))
}

/// Refuse tensors a SAELens checkpoint of this kind does not have: SAELens 6 refuses them too
/// (its `load_state_dict` is strict), and each would change the encoding if it meant anything.
/// An all-ones `scaling_factor` is dropped, as SAELens drops it.
fn check_tensor_names(st: &SafeTensors, threshold: bool) -> Result<()> {
    let mut known = vec!["W_enc", "b_enc", "W_dec", "b_dec"];
    if threshold {
        known.push("threshold");
    }
    for name in st.names() {
        if known.contains(&name) {
            continue;
        }
        if name == "scaling_factor" {
            let shape = st.tensor(name)?.shape().to_vec();
            if tensor(st, name, &shape)?.iter().all(|&v| v == 1.0) {
                continue;
            }
            bail!(
                "sae_weights.safetensors holds a scaling_factor other than 1 (SAELens < 6's \
                 finetuning_scaling_factor), which Loupe does not apply"
            );
        }
        bail!(
            "sae_weights.safetensors holds tensor {name:?}, which Loupe does not read (it reads {})",
            known.join(", ")
        );
    }
    Ok(())
}

fn load_sparsify(dir: &Path, cfg: &Value) -> Result<(Sae, SaeMeta)> {
    let bytes = read(&dir.join("sae.safetensors"))?;
    let st = SafeTensors::deserialize(&bytes).context("sae.safetensors is not a valid safetensors file")?;
    let enc = st.tensor("encoder.weight").context("sae.safetensors has no encoder.weight")?;
    let [n, d] = enc.shape() else { bail!("encoder.weight is not 2-D") };
    let (n, d) = (*n, *d);
    let k = usize_field(cfg, "k")?;
    let sae = Sae {
        spec: SaeSpec { variant: Variant::Topk, d_in: d, n_features: n, k },
        w_enc: tensor(&st, "encoder.weight", &[n, d])?,
        b_enc: tensor(&st, "encoder.bias", &[n])?,
        w_dec: tensor(&st, "W_dec", &[n, d])?,
        b_dec: tensor(&st, "b_dec", &[d])?,
        threshold: None,
        threshold_relative: false,
    };
    sae.validate()?;
    let hook = dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    Ok((sae, SaeMeta { hook_name: hook, ..SaeMeta::default() }))
}

/// Write the trainer state (`state.safetensors` + `state.json`, with `extra` recorded as
/// `resume`) into `dir`.
pub fn save_state(cfg: &TrainConfig, state: &TrainerState, extra: &Value, dir: &Path) -> Result<()> {
    let since_bytes: Vec<u8> = state.since_fired.iter().flat_map(|v| v.to_le_bytes()).collect();
    let (n, d) = (cfg.n_features, cfg.d_in);
    let mut f32s: Vec<(&str, Vec<usize>, &[f32])> = vec![
        ("w_enc.m", vec![n, d], &state.w_enc.m),
        ("w_enc.v", vec![n, d], &state.w_enc.v),
        ("b_enc.m", vec![n], &state.b_enc.m),
        ("b_enc.v", vec![n], &state.b_enc.v),
        ("w_dec.m", vec![n, d], &state.w_dec.m),
        ("w_dec.v", vec![n, d], &state.w_dec.v),
        ("b_dec.m", vec![d], &state.b_dec.m),
        ("b_dec.v", vec![d], &state.b_dec.v),
        ("density", vec![n], &state.density),
    ];
    if !state.threshold.m.is_empty() {
        f32s.push(("threshold.m", vec![n], &state.threshold.m));
        f32s.push(("threshold.v", vec![n], &state.threshold.v));
    }
    let mut views: Vec<(String, TensorView)> = Vec::new();
    for (name, shape, values) in &f32s {
        views.push((
            name.to_string(),
            TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(values))?,
        ));
    }
    views.push(("since_fired".to_string(), TensorView::new(Dtype::U64, vec![n], &since_bytes)?));
    let bytes = safetensors::serialize(views, None)?;
    write_atomic(&dir.join("state.safetensors"), &bytes)?;
    let json = json!({ "step": state.step, "tokens": state.tokens, "train": cfg, "resume": extra });
    write_atomic(&dir.join("state.json"), (serde_json::to_string_pretty(&json)? + "\n").as_bytes())
}

/// Read what [`save_state`] wrote: the configuration, the state and the caller's `resume` value.
pub fn load_state(dir: &Path) -> Result<(TrainConfig, TrainerState, Value)> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let json: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let cfg: TrainConfig = serde_json::from_value(json["train"].clone())
        .with_context(|| format!("{} has no valid train block", path.display()))?;
    let (n, d) = (cfg.n_features, cfg.d_in);
    let bytes = read(&dir.join("state.safetensors"))?;
    let st = SafeTensors::deserialize(&bytes).context("state.safetensors is not a valid safetensors file")?;
    let moments = |name: &str, shape: &[usize]| -> Result<Moments> {
        Ok(Moments {
            m: tensor(&st, &format!("{name}.m"), shape)?,
            v: tensor(&st, &format!("{name}.v"), shape)?,
        })
    };
    let since = st.tensor("since_fired").context("state has no since_fired")?;
    if since.dtype() != Dtype::U64 || since.shape() != [n] {
        bail!("since_fired has the wrong type or shape");
    }
    let state = TrainerState {
        step: json["step"].as_u64().context("state.json has no step")?,
        tokens: json["tokens"].as_u64().context("state.json has no tokens")?,
        w_enc: moments("w_enc", &[n, d])?,
        b_enc: moments("b_enc", &[n])?,
        w_dec: moments("w_dec", &[n, d])?,
        b_dec: moments("b_dec", &[d])?,
        since_fired: since
            .data()
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        density: tensor(&st, "density", &[n])?,
        threshold: if cfg.variant == Variant::Jumprelu {
            moments("threshold", &[n])?
        } else {
            Moments::default()
        },
    };
    Ok((cfg, state, json["resume"].clone()))
}

fn serialize(
    tensors: &[(&str, Vec<usize>, &[f32])],
    meta: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, shape, values)| {
            Ok((name.to_string(), TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(values))?))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(safetensors::serialize(views, meta)?)
}

/// A tensor of `shape` as f32 (F32, F16 and BF16 files are read).
pub(crate) fn read_tensor(st: &SafeTensors, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    tensor(st, name, shape)
}

fn tensor(st: &SafeTensors, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let t = st.tensor(name).with_context(|| format!("tensor {name} is missing"))?;
    if t.shape() != shape {
        bail!("tensor {name} has shape {:?}, expected {shape:?}", t.shape());
    }
    let data = t.data();
    Ok(match t.dtype() {
        Dtype::F32 => data.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        other => bail!("tensor {name} has dtype {other:?} (supported: F32, F16, BF16)"),
    })
}

fn usize_field(cfg: &Value, key: &str) -> Result<usize> {
    cfg[key].as_u64().map(|v| v as usize).with_context(|| format!("cfg.json has no integer {key:?}"))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// `[rows, cols]` → `[cols, rows]`.
pub fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = x[r * cols + c];
        }
    }
    out
}

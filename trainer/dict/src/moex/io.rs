//! MoE-X files: `cfg.json` + `sae_weights.safetensors` (a dictionary folder, SAELens' layout and
//! tensor names, read as one wide MLP), and the trainer state (`state.safetensors` +
//! `state.json`) of a checkpoint.
//!
//! `sae_weights.safetensors` (f32): `W_enc [d_in, E·m]` (column `e·m + j` is unit j of expert e,
//! SAELens' transposed layout), `b_enc [E·m]`, `W_dec [E·m, d_out]` (row `e·m + j` is feature
//! `e·m + j`'s decoder direction), `b_dec [d_out]`. The router has no tensors: it is computed from
//! `W_enc` and `b_enc` ([`super::router`]). `cfg.json`: `architecture` "moex", `spec` (the
//! [`MoexSpec`] fields `d_in`, `d_out`, `experts`, `expert_width`, `top_k`), `d_in`, `d_sae`
//! (E·m), `metadata` (model, hook, `input_hook` for a transcoder) and `loupe.train`.
//! `state.safetensors`: Adam's `m.<tensor>` and `v.<tensor>` for the four tensors (in the internal
//! `[E·m, d_in]` layout for `w_enc`) and `since_fired [E·m]`.

use std::path::Path;

use anyhow::{Context, Result, bail};
use loupe_store::fsutil::write_atomic;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde_json::{Value, json};

use super::train::{MoexState, MoexTrainConfig, Moments};
use super::{Moex, MoexSpec};
use crate::io::SaeMeta;

fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = w[r * cols + c];
        }
    }
    out
}

/// Write `cfg.json` and `sae_weights.safetensors` into `dir`.
pub fn save(moex: &Moex, meta: &SaeMeta, train: Option<&MoexTrainConfig>, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let s = &moex.spec;
    let n = s.n_features();
    let w_enc = transpose(&moex.w_enc, n, s.d_in);
    let tensors: Vec<(&str, Vec<usize>, &[f32])> = vec![
        ("W_enc", vec![s.d_in, n], &w_enc),
        ("b_enc", vec![n], &moex.b_enc),
        ("W_dec", vec![n, s.d_out], &moex.w_dec),
        ("b_dec", vec![s.d_out], &moex.b_dec),
    ];
    write_atomic(&dir.join("sae_weights.safetensors"), &serialize(&tensors)?)?;
    let cfg = json!({
        "architecture": "moex",
        "spec": s,
        "d_in": s.d_in,
        "d_sae": n,
        "metadata": {
            "model_name": meta.model_name,
            "hook_name": meta.hook_name,
            "input_hook": meta.input_hook,
            "context_size": meta.context_size,
            "prepend_bos": meta.prepend_bos,
            "dataset_path": meta.dataset_path,
        },
        "loupe": { "train": train },
    });
    write_atomic(&dir.join("cfg.json"), (serde_json::to_string_pretty(&cfg)? + "\n").as_bytes())
}

/// Read what [`save`] wrote.
pub fn load(dir: &Path) -> Result<(Moex, SaeMeta)> {
    let cfg_path = dir.join("cfg.json");
    let text =
        std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?;
    let cfg: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
    if cfg["architecture"] != "moex" {
        bail!("{} is not a MoE-X dictionary (architecture {})", dir.display(), cfg["architecture"]);
    }
    let spec: MoexSpec = serde_json::from_value(cfg["spec"].clone()).context("cfg.json has no valid spec")?;
    spec.validate()?;
    let bytes = std::fs::read(dir.join("sae_weights.safetensors"))
        .with_context(|| format!("cannot read {}/sae_weights.safetensors", dir.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .context("sae_weights.safetensors is not a valid safetensors file")?;
    let n = spec.n_features();
    let moex = Moex {
        w_enc: transpose(&tensor(&st, "W_enc", &[spec.d_in, n])?, spec.d_in, n),
        b_enc: tensor(&st, "b_enc", &[n])?,
        w_dec: tensor(&st, "W_dec", &[n, spec.d_out])?,
        b_dec: tensor(&st, "b_dec", &[spec.d_out])?,
        spec,
    };
    let text = |key: &str| cfg["metadata"][key].as_str().map(str::to_string);
    let meta = SaeMeta {
        model_name: text("model_name").unwrap_or_default(),
        hook_name: text("hook_name").unwrap_or_default(),
        input_hook: text("input_hook"),
        context_size: cfg["metadata"]["context_size"].as_u64().map(|v| v as usize),
        prepend_bos: cfg["metadata"]["prepend_bos"].as_bool(),
        dataset_path: text("dataset_path"),
    };
    Ok((moex, meta))
}

/// Write the optimiser state and counters (`state.safetensors` + `state.json` with `resume`).
pub fn save_state(cfg: &MoexTrainConfig, state: &MoexState, resume: &Value, dir: &Path) -> Result<()> {
    let mo = &state.moments;
    let since: Vec<f32> = state.since_fired.iter().map(|&t| t as f32).collect();
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    for (name, (m, v)) in
        [("w_enc", &mo.w_enc), ("b_enc", &mo.b_enc), ("w_dec", &mo.w_dec), ("b_dec", &mo.b_dec)]
    {
        tensors.push((format!("m.{name}"), vec![m.len()], m));
        tensors.push((format!("v.{name}"), vec![v.len()], v));
    }
    tensors.push(("since_fired".to_string(), vec![since.len()], &since));
    let refs: Vec<(&str, Vec<usize>, &[f32])> =
        tensors.iter().map(|(n, s, v)| (n.as_str(), s.clone(), *v)).collect();
    write_atomic(&dir.join("state.safetensors"), &serialize(&refs)?)?;
    let json = json!({ "step": state.step, "tokens": state.tokens, "train": cfg, "resume": resume });
    write_atomic(&dir.join("state.json"), (serde_json::to_string_pretty(&json)? + "\n").as_bytes())
}

/// Read what [`save_state`] wrote, for a layer shaped like `moex`.
pub fn load_state(dir: &Path, moex: &Moex) -> Result<(MoexTrainConfig, MoexState, Value)> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let json: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let cfg: MoexTrainConfig =
        serde_json::from_value(json["train"].clone()).context("state.json has no valid train block")?;
    let bytes = std::fs::read(dir.join("state.safetensors")).context("cannot read state.safetensors")?;
    let st = SafeTensors::deserialize(&bytes).context("state.safetensors is not a valid safetensors file")?;
    let pair = |name: &str, len: usize| -> Result<(Vec<f32>, Vec<f32>)> {
        Ok((tensor(&st, &format!("m.{name}"), &[len])?, tensor(&st, &format!("v.{name}"), &[len])?))
    };
    let moments = Moments {
        w_enc: pair("w_enc", moex.w_enc.len())?,
        b_enc: pair("b_enc", moex.b_enc.len())?,
        w_dec: pair("w_dec", moex.w_dec.len())?,
        b_dec: pair("b_dec", moex.b_dec.len())?,
    };
    let since = tensor(&st, "since_fired", &[moex.spec.n_features()])?;
    let state = MoexState {
        step: json["step"].as_u64().context("state.json has no step")?,
        tokens: json["tokens"].as_u64().context("state.json has no tokens")?,
        moments,
        since_fired: since.iter().map(|&t| t as u64).collect(),
    };
    Ok((cfg, state, json["resume"].clone()))
}

fn serialize(tensors: &[(&str, Vec<usize>, &[f32])]) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(n, shape, values)| {
            Ok((n.to_string(), TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(values))?))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(safetensors::serialize(views, None)?)
}

fn tensor(st: &SafeTensors, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let t = st.tensor(name).with_context(|| format!("tensor {name} is missing"))?;
    if t.shape() != shape || t.dtype() != Dtype::F32 {
        bail!("tensor {name} is {:?} {:?}, expected F32 {shape:?}", t.dtype(), t.shape());
    }
    let values: Vec<f32> =
        t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    if let Some(v) = values.iter().find(|v| !v.is_finite()) {
        bail!("tensor {name} holds a non-finite value ({v})");
    }
    Ok(values)
}

//! Monet files: `cfg.json` + `monet_weights.safetensors` (a dictionary folder, as SAELens' layout
//! for SAEs), and the trainer state (`state.safetensors` + `state.json`) of a checkpoint.
//!
//! `monet_weights.safetensors` (f32, `x @ w` convention): `router.w1`, `router.w2` `[d_in, H·E]`,
//! `router.bn1.mean`, `router.bn1.var`, `router.bn2.mean`, `router.bn2.var` `[H]` (BatchNorm
//! running statistics); HD: `u [d_in, E·m]`, `c [E·m]`, `v [E·m, d_out]`, `b [E, d_out]`; VD:
//! `u1`, `u2 [d_in, E·m/2]`, `c1`, `c2 [E·m/2]`, `v11`, `v12`, `v21`, `v22 [E·m/2, d_out/2]`, `b1`,
//! `b2 [E, d_out/2]`. `cfg.json`: `architecture` "monet", the [`MonetSpec`] fields
//! (`decomposition`, `d_in`, `d_out`, `experts`, `heads`, `topk`, `dim`), `metadata` (model, hook,
//! `input_hook` for a transcoder) and `loupe.train` (the training configuration).

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use loupe_store::fsutil::write_atomic;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde_json::{Value, json};

use super::sparse::{Layout, Params};
use super::train::{MonetState, MonetTrainConfig};
use super::{Monet, MonetSpec};
use crate::io::SaeMeta;

/// Write `cfg.json` and `monet_weights.safetensors` into `dir`.
pub fn save(monet: &Monet, meta: &SaeMeta, train: Option<&MonetTrainConfig>, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut tensors: Vec<(String, Tensor)> =
        monet.named().into_iter().map(|(n, v)| (n.to_string(), v.as_tensor().clone())).collect();
    let h = monet.router.heads;
    for r in 0..2 {
        let stat = |v: &Vec<f32>| Tensor::from_slice(v, h, &Device::Cpu);
        tensors.push((format!("router.bn{}.mean", r + 1), stat(&monet.router.running_mean[r])?));
        tensors.push((format!("router.bn{}.var", r + 1), stat(&monet.router.running_var[r])?));
    }
    write_atomic(&dir.join("monet_weights.safetensors"), &serialize(&tensors)?)?;
    let cfg = json!({
        "architecture": "monet",
        "spec": monet.spec,
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
pub fn load(dir: &Path) -> Result<(Monet, SaeMeta)> {
    let cfg_path = dir.join("cfg.json");
    let text =
        std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?;
    let cfg: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
    if cfg["architecture"] != "monet" {
        bail!("{} is not a Monet dictionary (architecture {})", dir.display(), cfg["architecture"]);
    }
    let spec: MonetSpec =
        serde_json::from_value(cfg["spec"].clone()).context("cfg.json has no valid spec")?;
    spec.validate()?;
    let bytes = std::fs::read(dir.join("monet_weights.safetensors"))
        .with_context(|| format!("cannot read {}/monet_weights.safetensors", dir.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .context("monet_weights.safetensors is not a valid safetensors file")?;
    let named =
        spec.shapes().iter().map(|(name, shape)| values(&st, name, shape)).collect::<Result<Vec<_>>>()?;
    let h = spec.heads;
    let stat = |what: &str, r: usize| values(&st, &format!("router.bn{}.{what}", r + 1), &[h]);
    let (mean, var) = ([stat("mean", 0)?, stat("mean", 1)?], [stat("var", 0)?, stat("var", 1)?]);
    let monet = Monet::from_named(spec, &named, mean, var)?;
    let text = |key: &str| cfg["metadata"][key].as_str().map(str::to_string);
    let meta = SaeMeta {
        model_name: text("model_name").unwrap_or_default(),
        hook_name: text("hook_name").unwrap_or_default(),
        input_hook: text("input_hook"),
        context_size: cfg["metadata"]["context_size"].as_u64().map(|v| v as usize),
        prepend_bos: cfg["metadata"]["prepend_bos"].as_bool(),
        dataset_path: text("dataset_path"),
    };
    Ok((monet, meta))
}

/// Write the optimiser state and counters (`state.safetensors` + `state.json` with `resume`).
pub fn save_state(cfg: &MonetTrainConfig, state: &MonetState, resume: &Value, dir: &Path) -> Result<()> {
    // Moments in the file layout of the weights they belong to (`m.i`, `v.i`: the i-th weight).
    let lay = Layout::of(&cfg.spec);
    let mut tensors = Vec::new();
    let shapes = cfg.spec.shapes();
    for (i, ((m, v), (_, shape))) in
        state.m.to_named(&lay).into_iter().zip(state.v.to_named(&lay)).zip(&shapes).enumerate()
    {
        tensors.push((format!("m.{i}"), Tensor::from_vec(m, shape.as_slice(), &Device::Cpu)?));
        tensors.push((format!("v.{i}"), Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?));
    }
    let since: Vec<f32> = state.since_fired.iter().map(|&t| t as f32).collect();
    tensors
        .push(("since_fired".to_string(), Tensor::from_vec(since, state.since_fired.len(), &Device::Cpu)?));
    write_atomic(&dir.join("state.safetensors"), &serialize(&tensors)?)?;
    let json = json!({ "step": state.step, "tokens": state.tokens, "train": cfg, "resume": resume });
    write_atomic(&dir.join("state.json"), (serde_json::to_string_pretty(&json)? + "\n").as_bytes())
}

/// Read what [`save_state`] wrote, for a layer shaped like `monet`.
pub fn load_state(dir: &Path, monet: &Monet) -> Result<(MonetTrainConfig, MonetState, Value)> {
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let json: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let cfg: MonetTrainConfig =
        serde_json::from_value(json["train"].clone()).context("state.json has no valid train block")?;
    let bytes = std::fs::read(dir.join("state.safetensors")).context("cannot read state.safetensors")?;
    let st = SafeTensors::deserialize(&bytes).context("state.safetensors is not a valid safetensors file")?;
    let shapes = monet.spec.shapes();
    let moment = |which: &str| -> Result<Params> {
        let named = (0..shapes.len())
            .map(|i| values(&st, &format!("{which}.{i}"), &shapes[i].1))
            .collect::<Result<Vec<_>>>()?;
        Ok(Params::from_named(&Layout::of(&monet.spec), &named))
    };
    let n = monet.spec.n_experts();
    let since = values(&st, "since_fired", &[n])?;
    let state = MonetState {
        step: json["step"].as_u64().context("state.json has no step")?,
        tokens: json["tokens"].as_u64().context("state.json has no tokens")?,
        m: moment("m")?,
        v: moment("v")?,
        since_fired: since.iter().map(|&t| t as u64).collect(),
    };
    Ok((cfg, state, json["resume"].clone()))
}

fn serialize(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let data: Vec<(String, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?)))
        .collect::<Result<_>>()?;
    let views = data
        .iter()
        .map(|(n, shape, values)| {
            Ok((n.clone(), TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(values))?))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(safetensors::serialize(views, None)?)
}

fn values(st: &SafeTensors, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
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

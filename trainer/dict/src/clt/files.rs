//! A CLT's files: circuit-tracer's lazy-loading CLT layout plus Loupe's `cfg.json`.
//!
//! For each CLT layer i (0-based within the CLT): `W_enc_{i}.safetensors` holds `W_enc_{i}`
//! `[n, d]`, `b_enc_{i}` `[n]`, `b_dec_{i}` `[d]` and `threshold_{i}` `[n]`; `W_dec_{i}.safetensors`
//! holds `W_dec_{i}` `[n, n_layers − i, d]` (feature f's decoders to layers i, i+1, …). All `f32`.
//! circuit-tracer's `load_clt(dir)` reads exactly these (with `threshold_{i}` it builds a JumpReLU;
//! it has no TopK). `cfg.json` says what circuit-tracer cannot: Loupe encodes with TopK (`k`), the
//! model layers covered (`first_layer`, `n_layers`), the hooks, the model and the training settings.
//! A CLT has no skip connection (circuit-tracer's CLT `W_skip` would be `[n_layers, d, d]` applied
//! as `x @ W_skip[l]`, the transpose of the per-layer transcoders' orientation; none is written).

use std::path::Path;

use anyhow::{Context, Result, bail};
use loupe_store::fsutil::write_atomic;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde_json::{Value, json};

use super::Clt;
use super::train::CltConfig;
use crate::io::SaeMeta;

/// The files of a CLT of `n_layers` layers, relative to its folder.
pub fn file_names(n_layers: usize) -> Vec<String> {
    let mut files = vec!["cfg.json".to_string()];
    for i in 0..n_layers {
        files.push(format!("W_enc_{i}.safetensors"));
        files.push(format!("W_dec_{i}.safetensors"));
    }
    files
}

/// Model hook names of CLT layer i's input and output.
pub fn hooks(first_layer: usize, i: usize) -> (String, String) {
    let layer = first_layer + i;
    (format!("blocks.{layer}.ln2.hook_normalized"), format!("blocks.{layer}.hook_mlp_out"))
}

/// Write `clt` into `dir` (created if missing), each file atomically.
pub fn save(clt: &Clt, meta: &SaeMeta, train: Option<&CltConfig>, dir: &Path) -> Result<()> {
    clt.validate().context("refusing to save an invalid CLT")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (n, d) = (clt.n_features, clt.d);
    for i in 0..clt.n_layers {
        let enc: Vec<(String, Vec<usize>, &[f32])> = vec![
            (format!("W_enc_{i}"), vec![n, d], &clt.w_enc[i]),
            (format!("b_enc_{i}"), vec![n], &clt.b_enc[i]),
            (format!("b_dec_{i}"), vec![d], &clt.b_dec[i]),
            (format!("threshold_{i}"), vec![n], &clt.threshold[i]),
        ];
        write_atomic(&dir.join(format!("W_enc_{i}.safetensors")), &serialize(&enc)?)?;
        let dec: Vec<(String, Vec<usize>, &[f32])> =
            vec![(format!("W_dec_{i}"), vec![n, clt.targets(i), d], &clt.w_dec[i])];
        write_atomic(&dir.join(format!("W_dec_{i}.safetensors")), &serialize(&dec)?)?;
    }
    let (input_hooks, output_hooks): (Vec<String>, Vec<String>) =
        (0..clt.n_layers).map(|i| hooks(clt.first_layer, i)).unzip();
    let cfg = json!({
        "architecture": "cross_layer_transcoder",
        "activation": "topk",
        "k": clt.k,
        "first_layer": clt.first_layer,
        "n_layers": clt.n_layers,
        "d_model": d,
        "d_transcoder": n,
        "dtype": "float32",
        "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out",
        "input_hooks": input_hooks,
        "output_hooks": output_hooks,
        "threshold": "per-layer JumpReLU thresholds approximating TopK, for circuit-tracer (Loupe encodes with TopK)",
        "metadata": {
            "model_name": meta.model_name,
            "context_size": meta.context_size,
            "prepend_bos": meta.prepend_bos,
            "dataset_path": meta.dataset_path,
        },
        "loupe": { "train": train },
    });
    write_atomic(&dir.join("cfg.json"), (serde_json::to_string_pretty(&cfg)? + "\n").as_bytes())
}

/// Read the CLT in `dir`.
pub fn load(dir: &Path) -> Result<Clt> {
    let cfg_path = dir.join("cfg.json");
    let text =
        std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?;
    let cfg: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
    if cfg["architecture"] != "cross_layer_transcoder" {
        bail!("{} does not describe a cross-layer transcoder", cfg_path.display());
    }
    let field = |key: &str| {
        cfg[key]
            .as_u64()
            .map(|v| v as usize)
            .with_context(|| format!("{} has no number {key}", cfg_path.display()))
    };
    let (l, n, d, k, first) =
        (field("n_layers")?, field("d_transcoder")?, field("d_model")?, field("k")?, field("first_layer")?);
    let mut clt = Clt {
        first_layer: first,
        n_layers: l,
        d,
        n_features: n,
        k,
        w_enc: Vec::new(),
        b_enc: Vec::new(),
        w_dec: Vec::new(),
        b_dec: Vec::new(),
        threshold: Vec::new(),
    };
    for i in 0..l {
        let path = dir.join(format!("W_enc_{i}.safetensors"));
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{} is not safetensors", path.display()))?;
        clt.w_enc.push(tensor(&st, &format!("W_enc_{i}"), &[n, d])?);
        clt.b_enc.push(tensor(&st, &format!("b_enc_{i}"), &[n])?);
        clt.b_dec.push(tensor(&st, &format!("b_dec_{i}"), &[d])?);
        clt.threshold.push(tensor(&st, &format!("threshold_{i}"), &[n])?);
        let path = dir.join(format!("W_dec_{i}.safetensors"));
        let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let st = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{} is not safetensors", path.display()))?;
        clt.w_dec.push(tensor(&st, &format!("W_dec_{i}"), &[n, l - i, d])?);
    }
    clt.validate().with_context(|| format!("the CLT in {}", dir.display()))?;
    Ok(clt)
}

fn serialize(tensors: &[(String, Vec<usize>, &[f32])]) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, shape, values)| {
            Ok((name.clone(), TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(values))?))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(safetensors::serialize(views, None)?)
}

fn tensor(st: &SafeTensors, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let t = st.tensor(name).with_context(|| format!("no tensor {name}"))?;
    if t.shape() != shape {
        bail!("tensor {name} has shape {:?}, expected {shape:?}", t.shape());
    }
    if t.dtype() != Dtype::F32 {
        bail!("tensor {name} is {:?}, expected F32", t.dtype());
    }
    Ok(t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

#[cfg(test)]
mod tests {
    use super::super::tests::random_clt;
    use super::*;

    #[test]
    fn files_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let clt = random_clt(3, 10, 4, 2, 9);
        save(&clt, &SaeMeta::default(), None, dir.path()).unwrap();
        assert_eq!(load(dir.path()).unwrap(), clt);
        for f in file_names(3) {
            assert!(dir.path().join(f).exists());
        }
    }
}

//! SAE-family transcoders: a dictionary that reads one hook (an MLP's input,
//! `blocks.L.ln2.hook_normalized`) and writes another (its output, `blocks.L.hook_mlp_out`).
//!
//! - Encoder `pre = W_enc x + b_enc` (no b_dec subtracted from the input: SAELens' transcoder
//!   convention), the variant's activation, decoder `ŷ = W_dec a + b_dec`, and for a skip
//!   transcoder (Paulo et al. 2025) `+ W_skip x`, `W_skip` `[d_out, d_in]` initialised to zero.
//!   The training step is the SAE trainer's ([`super::train`], `cfg.transcoder`); this module
//!   holds the skip connection's two dense GEMMs, the trained dictionary ([`SaeTranscoder`]) and
//!   its files.
//! - Variants: TopK, JumpReLU and ReLU select per token from `pre` and train as transcoders.
//!   Mutual and Feature Choice (whose scale-free thresholds are relative to ‖x − b_dec‖, an SAE
//!   quantity) and g-SAE (whose second input is the loss gradient, not a target) are refused.
//! - `d_out` must equal `d_in` (Gemma's MLP input and output are both d_model): the SAE trainer's
//!   buffers are `[tokens, d]`; other widths are refused with an error.
//!
//! Files (a folder): SAELens 6's transcoder layout — `cfg.json` with `architecture`
//! `transcoder` / `skip_transcoder` (ReLU), `jumprelu_transcoder` / `jumprelu_skip_transcoder`,
//! or Loupe's own `topk_transcoder` / `topk_skip_transcoder` (SAELens has no TopK transcoder), `d_out`,
//! `hook_name_out`, `metadata.hook_name` the input hook, `apply_b_dec_to_input: false`; weights
//! `sae_weights.safetensors` (`W_enc [d_in, d_sae]`, `b_enc`, `W_dec [d_sae, d_out]`, `b_dec [d_out]`,
//! `threshold` for JumpReLU, `W_skip [d_out, d_in]`). The final files add
//! `circuit_tracer.safetensors`, what circuit-tracer's `SingleLayerTranscoder` loads: `W_enc [d_sae,
//! d_in]`, `W_dec [d_sae, d_out]`, `b_enc`, `b_dec`, `W_skip`, and `activation_function.threshold`
//! for JumpReLU (its `TopK(k)` keeps the k largest even when negative, Loupe only positive ones;
//! `tests/fixtures/circuit_tracer_check.py`).

use std::path::Path;

use anyhow::{Context, Result, bail};
use loupe_store::fsutil::write_atomic;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};
use serde_json::{Value, json};

use super::io::{SAELENS_FORMAT_VERSION, SaeMeta, read_tensor, transpose};
use super::kernels::{self, Codes};
use super::sae::{Sae, SaeSpec};
use super::train::{Moments, TrainConfig};
use super::{Dictionary, Variant};

/// Refuse a variant that cannot train as a transcoder, naming it.
pub fn check_variant(variant: Variant) -> Result<()> {
    match variant {
        Variant::Topk | Variant::Jumprelu | Variant::Relu => Ok(()),
        Variant::MutualChoice | Variant::FeatureChoice => bail!(
            "variant {variant} cannot train as a transcoder: its scale-free thresholds are relative to \
             ‖x − b_dec‖, which a transcoder's encoder does not read (transcoders: topk, jumprelu, relu)"
        ),
        Variant::Gsae => bail!(
            "variant gsae cannot train as a transcoder: its second input is the loss gradient, a \
             transcoder's is its target (transcoders: topk, jumprelu, relu)"
        ),
    }
}

/// A skip transcoder's `W_skip` (`[d_out, d_in]`) and its Adam moments.
#[derive(Clone, Debug, PartialEq)]
pub struct Skip {
    pub w: Vec<f32>,
    pub moments: Moments,
}

impl Skip {
    pub fn zeros(d_out: usize, d_in: usize) -> Skip {
        Skip { w: vec![0.0; d_out * d_in], moments: Moments::zeros(d_out * d_in) }
    }
}

/// `out = y − x·W_skipᵀ`: what the sparse part of a skip transcoder reconstructs (`d_out = d`).
pub(super) fn skip_target(w_skip: &[f32], x: &[f32], y: &[f32], d: usize, out: &mut Vec<f32>) {
    let tokens = x.len() / d;
    out.resize(tokens * d, 0.0);
    kernels::matmul_nt(x, w_skip, out, tokens, d, d, false);
    out.iter_mut().zip(y).for_each(|(o, y)| *o = y - *o);
}

/// `∂loss/∂W_skip = Σ_sources dXᵀ · x` (`[d_out, d_in]`) from upstream gradients `dxs`
/// (`[tokens, d_out]` each) and the inputs `x` (`[tokens, d_in]`): one GEMM over the summed dX.
pub(super) fn skip_gradient(dxs: &[&[f32]], x: &[f32], d_out: usize, d_in: usize) -> Vec<f32> {
    let tokens = x.len() / d_in;
    let mut dx = dxs.first().map(|d| d.to_vec()).unwrap_or_else(|| vec![0.0; tokens * d_out]);
    for other in dxs.iter().skip(1) {
        dx.iter_mut().zip(*other).for_each(|(a, b)| *a += b);
    }
    let mut g = vec![0.0f32; d_out * d_in];
    if tokens > 0 {
        // C[i, j] = Σ_t dX[t, i] · x[t, j]: A = dXᵀ (strides (1, d_out)), B = x (strides (d_in, 1)).
        loupe_model::kernels::matmul(&dx, (1, d_out), x, (d_in, 1), &mut g, (d_in, 1), d_out, d_in, tokens);
    }
    g
}

/// A trained transcoder: the SAE weights (`b_dec` is the output bias; the encoder reads `x`
/// itself) and an optional skip connection `[d_out, d_in]`.
#[derive(Clone, Debug, PartialEq)]
pub struct SaeTranscoder {
    pub sae: Sae,
    pub w_skip: Option<Vec<f32>>,
}

impl SaeTranscoder {
    /// The same transcoder for inputs `input` and targets `output` times smaller than the ones
    /// it was trained on: encodes raw `x` as this one encodes `input·x`, writes 1/`output` of its
    /// output. (JumpReLU thresholds compare pre-activations, which do not change.)
    pub fn folded(&self, input: f32, output: f32) -> SaeTranscoder {
        let mut out = self.clone();
        out.sae.w_enc.iter_mut().for_each(|w| *w *= input);
        out.sae.w_dec.iter_mut().for_each(|w| *w /= output);
        out.sae.b_dec.iter_mut().for_each(|b| *b /= output);
        if let Some(w) = out.w_skip.as_mut() {
            w.iter_mut().for_each(|w| *w *= input / output);
        }
        out
    }

    /// Check shapes and values.
    pub fn validate(&self) -> Result<()> {
        self.sae.validate()?;
        check_variant(self.sae.spec.variant)?;
        if self.sae.threshold_relative {
            bail!("a transcoder cannot have relative thresholds");
        }
        let d = self.sae.spec.d_in;
        if let Some(w) = &self.w_skip {
            if w.len() != d * d {
                bail!("W_skip has {} values, expected {d} × {d}", w.len());
            }
            if let Some(i) = w.iter().position(|v| !v.is_finite()) {
                bail!("W_skip[{}, {}] is {} (weights must be finite)", i / d, i % d, w[i]);
            }
        }
        Ok(())
    }

    /// SAELens' architecture name (Loupe's own for TopK, which SAELens lacks).
    pub fn architecture(&self) -> &'static str {
        match (self.sae.spec.variant, self.w_skip.is_some()) {
            (Variant::Relu, false) => "transcoder",
            (Variant::Relu, true) => "skip_transcoder",
            (Variant::Jumprelu, false) => "jumprelu_transcoder",
            (Variant::Jumprelu, true) => "jumprelu_skip_transcoder",
            (_, false) => "topk_transcoder",
            (_, true) => "topk_skip_transcoder",
        }
    }
}

impl Dictionary for SaeTranscoder {
    fn d_in(&self) -> usize {
        self.sae.spec.d_in
    }

    fn n_features(&self) -> usize {
        self.sae.spec.n_features
    }

    fn d_out(&self) -> usize {
        self.sae.spec.d_in
    }

    fn encode(&self, x: &[f32]) -> Codes {
        self.sae.encode_input(x, false)
    }

    fn reconstruct(&self, x: &[f32]) -> (Codes, Vec<f32>) {
        let d = self.sae.spec.d_in;
        let codes = self.encode(x);
        let mut out = vec![0.0; x.len()];
        if let Some(w) = &self.w_skip {
            kernels::matmul_nt(x, w, &mut out, x.len() / d, d, d, false);
        }
        let mut sparse = vec![0.0; x.len()];
        self.sae.decode(&codes, &mut sparse);
        out.iter_mut().zip(&sparse).for_each(|(o, s)| *o += s);
        (codes, out)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        save(self, &SaeMeta::default(), None, dir, false)
    }

    fn decoder_directions(&self) -> Option<&[f32]> {
        Some(&self.sae.w_dec)
    }
}

/// Write `cfg.json` and `sae_weights.safetensors` (and with `circuit_tracer`,
/// `circuit_tracer.safetensors`) into `dir`. `meta.hook_name` is the output hook,
/// `meta.input_hook` the input hook.
pub fn save(
    tc: &SaeTranscoder,
    meta: &SaeMeta,
    train: Option<&TrainConfig>,
    dir: &Path,
    circuit_tracer: bool,
) -> Result<()> {
    tc.validate().context("refusing to save an invalid transcoder")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let sae = &tc.sae;
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
    if let Some(w) = &tc.w_skip {
        tensors.push(("W_skip", vec![d, d], w));
    }
    write_atomic(&dir.join("sae_weights.safetensors"), &serialize(&tensors)?)?;
    if circuit_tracer {
        let mut ct: Vec<(&str, Vec<usize>, &[f32])> = vec![
            ("W_enc", vec![n, d], &sae.w_enc),
            ("W_dec", vec![n, d], &sae.w_dec),
            ("b_enc", vec![n], &sae.b_enc),
            ("b_dec", vec![d], &sae.b_dec),
        ];
        if let Some(t) = &sae.threshold {
            ct.push(("activation_function.threshold", vec![n], t));
        }
        if let Some(w) = &tc.w_skip {
            ct.push(("W_skip", vec![d, d], w));
        }
        write_atomic(&dir.join("circuit_tracer.safetensors"), &serialize(&ct)?)?;
    }
    let input = meta.input_hook.as_deref().unwrap_or(&meta.hook_name);
    let mut cfg = json!({
        "architecture": tc.architecture(),
        "d_in": d,
        "d_sae": n,
        "d_out": d,
        "hook_name_out": meta.hook_name,
        "hook_layer_out": layer_of(&meta.hook_name),
        "hook_head_index_out": null,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": false,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": meta.model_name,
            "hook_name": input,
            "hook_head_index": null,
            "context_size": meta.context_size,
            "prepend_bos": meta.prepend_bos,
            "dataset_path": meta.dataset_path,
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": null,
        },
        "loupe": { "variant": sae.spec.variant, "k": sae.spec.k, "skip": tc.w_skip.is_some(), "train": train },
    });
    if sae.spec.variant == Variant::Topk {
        cfg["k"] = json!(sae.spec.k);
    }
    write_atomic(&dir.join("cfg.json"), (serde_json::to_string_pretty(&cfg)? + "\n").as_bytes())
}

/// The layer number of a `blocks.L.…` hook (0 otherwise).
fn layer_of(hook: &str) -> usize {
    hook.strip_prefix("blocks.").and_then(|r| r.split('.').next()).and_then(|l| l.parse().ok()).unwrap_or(0)
}

/// Whether `cfg` (a `cfg.json`) describes a transcoder.
pub fn is_transcoder_cfg(cfg: &Value) -> bool {
    cfg["architecture"].as_str().is_some_and(|a| a.ends_with("transcoder")) || !cfg["d_out"].is_null()
}

/// Whether folder `dir` holds a transcoder (its `cfg.json` says so).
pub fn is_transcoder_dir(dir: &Path) -> bool {
    let text = std::fs::read_to_string(dir.join("cfg.json")).unwrap_or_default();
    serde_json::from_str::<Value>(&text).is_ok_and(|cfg| is_transcoder_cfg(&cfg))
}

/// Read a transcoder folder written by [`save`] (or SAELens 6's transcoder layout).
pub fn load(dir: &Path) -> Result<(SaeTranscoder, SaeMeta)> {
    let cfg_path = dir.join("cfg.json");
    let text =
        std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?;
    let cfg: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
    load_cfg(dir, &cfg).with_context(|| format!("cannot load the transcoder in {}", dir.display()))
}

fn load_cfg(dir: &Path, cfg: &Value) -> Result<(SaeTranscoder, SaeMeta)> {
    let field =
        |key: &str| cfg[key].as_u64().map(|v| v as usize).with_context(|| format!("cfg.json has no {key}"));
    let (d, n, d_out) = (field("d_in")?, field("d_sae")?, field("d_out")?);
    if d_out != d {
        bail!("d_out {d_out} differs from d_in {d}: Loupe's transcoders write as wide as they read");
    }
    let architecture = cfg["architecture"].as_str().unwrap_or_default();
    let (variant, skip) = match architecture {
        "transcoder" => (Variant::Relu, false),
        "skip_transcoder" => (Variant::Relu, true),
        "jumprelu_transcoder" => (Variant::Jumprelu, false),
        "jumprelu_skip_transcoder" => (Variant::Jumprelu, true),
        "topk_transcoder" => (Variant::Topk, false),
        "topk_skip_transcoder" => (Variant::Topk, true),
        other => bail!(
            "transcoder architecture {other:?} is not supported (supported: transcoder, skip_transcoder, \
             jumprelu_transcoder, jumprelu_skip_transcoder, topk_transcoder, topk_skip_transcoder)"
        ),
    };
    if cfg["normalize_activations"].as_str().is_some_and(|s| s != "none") {
        bail!("normalize_activations is {}; Loupe reads \"none\"", cfg["normalize_activations"]);
    }
    let k = cfg["k"].as_u64().or(cfg["loupe"]["k"].as_u64()).unwrap_or(0) as usize;
    if variant == Variant::Topk && k == 0 {
        bail!("cfg.json has no k for a TopK transcoder");
    }
    let bytes =
        std::fs::read(dir.join("sae_weights.safetensors")).context("cannot read sae_weights.safetensors")?;
    let st = SafeTensors::deserialize(&bytes)
        .context("sae_weights.safetensors is not a valid safetensors file")?;
    let mut known = vec!["W_enc", "b_enc", "W_dec", "b_dec"];
    if variant == Variant::Jumprelu {
        known.push("threshold");
    }
    if skip {
        known.push("W_skip");
    }
    if let Some(other) = st.names().into_iter().find(|name| !known.contains(name)) {
        bail!("sae_weights.safetensors holds tensor {other:?}, which a {architecture} does not have");
    }
    let w_enc_t = read_tensor(&st, "W_enc", &[d, n])?;
    let threshold =
        if variant == Variant::Jumprelu { Some(read_tensor(&st, "threshold", &[n])?) } else { None };
    let sae = Sae {
        spec: SaeSpec { variant, d_in: d, n_features: n, k },
        w_enc: transpose(&w_enc_t, d, n),
        b_enc: read_tensor(&st, "b_enc", &[n])?,
        w_dec: read_tensor(&st, "W_dec", &[n, d])?,
        b_dec: read_tensor(&st, "b_dec", &[d])?,
        threshold,
        threshold_relative: false,
    };
    let w_skip = if skip { Some(read_tensor(&st, "W_skip", &[d, d])?) } else { None };
    let tc = SaeTranscoder { sae, w_skip };
    tc.validate()?;
    let meta_block = &cfg["metadata"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let meta = SaeMeta {
        model_name: text(&meta_block["model_name"]),
        hook_name: text(&cfg["hook_name_out"]),
        input_hook: Some(text(&meta_block["hook_name"])),
        context_size: meta_block["context_size"].as_u64().map(|v| v as usize),
        prepend_bos: meta_block["prepend_bos"].as_bool(),
        dataset_path: meta_block["dataset_path"].as_str().map(str::to_string),
    };
    Ok((tc, meta))
}

/// A store dictionary of kind `sae`: an SAE or a transcoder, as its `cfg.json` says.
pub fn load_any(dir: &Path) -> Result<Box<dyn Dictionary>> {
    let path = dir.join("cfg.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let cfg: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(if is_transcoder_cfg(&cfg) { Box::new(load(dir)?.0) } else { Box::new(super::io::load_sae(dir)?.0) })
}

/// A skip transcoder's Adam moments (`w_skip.m`, `w_skip.v` in `skip_state.safetensors`).
pub fn save_skip_state(skip: &Skip, d: usize, dir: &Path) -> Result<()> {
    let t = [("w_skip.m", vec![d, d], &skip.moments.m[..]), ("w_skip.v", vec![d, d], &skip.moments.v[..])];
    write_atomic(&dir.join("skip_state.safetensors"), &serialize(&t)?)
}

/// What [`save_skip_state`] wrote, with the weights `w`.
pub fn load_skip_state(w: Vec<f32>, d: usize, dir: &Path) -> Result<Skip> {
    let bytes =
        std::fs::read(dir.join("skip_state.safetensors")).context("cannot read skip_state.safetensors")?;
    let st =
        SafeTensors::deserialize(&bytes).context("skip_state.safetensors is not a valid safetensors file")?;
    let moments =
        Moments { m: read_tensor(&st, "w_skip.m", &[d, d])?, v: read_tensor(&st, "w_skip.v", &[d, d])? };
    Ok(Skip { w, moments })
}

fn serialize(tensors: &[(&str, Vec<usize>, &[f32])]) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, shape, values)| {
            Ok((name.to_string(), TensorView::new(Dtype::F32, shape.clone(), bytemuck::cast_slice(values))?))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(safetensors::serialize(views, None)?)
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, StandardNormal};

    use super::*;
    use crate::Trainer;

    fn gaussian(rng: &mut StdRng, len: usize, scale: f32) -> Vec<f32> {
        (0..len)
            .map(|_| scale * <StandardNormal as Distribution<f32>>::sample(&StandardNormal, rng))
            .collect()
    }

    fn param(t: &mut Trainer, tensor: usize, i: usize) -> &mut f32 {
        match tensor {
            0 => &mut t.sae.w_enc[i],
            1 => &mut t.sae.b_enc[i],
            2 => &mut t.sae.w_dec[i],
            3 => &mut t.sae.b_dec[i],
            _ => &mut t.skip.as_mut().expect("a skip transcoder").w[i],
        }
    }

    /// Central differences of the transcoder loss (selection and the auxiliary target held
    /// fixed) against the analytic gradients of every tensor, W_skip included.
    fn check_gradients(variant: Variant, skip: bool, multi_topk: bool) {
        let (d, n, k, tokens) = (10, 32, 4, 24);
        let mut rng = StdRng::seed_from_u64(11);
        let mut cfg = TrainConfig::new(variant, d, n, k, tokens);
        (cfg.transcoder, cfg.skip, cfg.multi_topk) = (true, skip, multi_topk);
        (cfg.dead_tokens, cfg.k_aux, cfg.auxk_alpha, cfg.sparsity_coefficient) = (0, 3, 0.5, 0.5);
        let mut t = Trainer::new(cfg).unwrap();
        t.state.step = 1;
        t.sae.w_enc.iter_mut().zip(gaussian(&mut rng, n * d, 0.3)).for_each(|(w, e)| *w += e);
        t.sae.b_enc = gaussian(&mut rng, n, 0.1);
        t.sae.b_dec = gaussian(&mut rng, d, 0.2);
        if variant == Variant::Jumprelu {
            t.sae.threshold = Some((0..n).map(|_| rng.random_range(0.2..0.8)).collect());
        }
        if let Some(s) = t.skip.as_mut() {
            s.w = gaussian(&mut rng, d * d, 0.2);
        }
        let x = gaussian(&mut rng, tokens * d, 1.0);
        let y = gaussian(&mut rng, tokens * d, 1.5);
        let (loss0, an) = t.gradients(&x, Some(&y), None).unwrap();
        assert!(loss0.fvu > 0.0);
        assert_eq!(an.w_skip.len(), if skip { d * d } else { 0 });
        let codes0 = t.last_codes().clone();
        let residual = t.last_residual(&y);
        let eps = 1e-3f32;
        let mut checked = 0;
        for tensor in 0..5 {
            let len = [n * d, n, n * d, d, an.w_skip.len()][tensor];
            if len == 0 {
                continue;
            }
            let analytic: &[f32] = [&an.w_enc[..], &an.b_enc, &an.w_dec, &an.b_dec, &an.w_skip][tensor];
            let scale = analytic.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
            for _ in 0..30 {
                let i = rng.random_range(0..len);
                let mut eval = |delta: f32| {
                    let old = *param(&mut t, tensor, i);
                    *param(&mut t, tensor, i) = old + delta;
                    let (loss, _) = t.gradients(&x, Some(&y), Some(&residual)).unwrap();
                    let codes = t.last_codes();
                    let same = codes.feature == codes0.feature && codes.offsets == codes0.offsets;
                    *param(&mut t, tensor, i) = old;
                    (loss.total(), same)
                };
                let ((plus, s1), (minus, s2)) = (eval(eps), eval(-eps));
                if !(s1 && s2) {
                    continue;
                }
                let fd = (plus - minus) / (2.0 * eps as f64);
                let err = (fd - analytic[i] as f64).abs() / scale.max(1e-12);
                assert!(
                    err < 2e-3,
                    "{variant} tensor {tensor}[{i}]: finite difference {fd:e} vs {:e}",
                    analytic[i]
                );
                checked += 1;
            }
        }
        assert!(checked > 80, "{variant}: only {checked} parameters checked");
    }

    #[test]
    fn topk_transcoder_backward_matches_finite_differences() {
        check_gradients(Variant::Topk, true, false);
        check_gradients(Variant::Topk, true, true);
        check_gradients(Variant::Topk, false, false);
    }

    #[test]
    fn relu_transcoder_backward_matches_finite_differences() {
        check_gradients(Variant::Relu, true, false);
    }

    #[test]
    fn jumprelu_transcoder_backward_matches_finite_differences() {
        check_gradients(Variant::Jumprelu, true, false);
    }

    #[test]
    fn other_variants_are_refused_by_name() {
        for v in [Variant::MutualChoice, Variant::FeatureChoice, Variant::Gsae] {
            let mut cfg = TrainConfig::new(v, 8, 16, 2, 8);
            cfg.transcoder = true;
            let err = format!("{:#}", Trainer::new(cfg).err().unwrap());
            assert!(err.contains(v.name()), "{err}");
        }
    }

    /// The folded transcoder on raw inputs gives 1/output of the trained one on scaled inputs;
    /// files round-trip exactly (both layouts).
    #[test]
    fn folding_and_files_round_trip() {
        let mut rng = StdRng::seed_from_u64(3);
        let (d, n) = (8, 24);
        let mut sae = Sae::init(SaeSpec { variant: Variant::Topk, d_in: d, n_features: n, k: 3 }, 1);
        sae.b_enc = gaussian(&mut rng, n, 0.1);
        sae.b_dec = gaussian(&mut rng, d, 0.3);
        let tc = SaeTranscoder { sae, w_skip: Some(gaussian(&mut rng, d * d, 0.2)) };
        let x = gaussian(&mut rng, 5 * d, 1.0);
        let (s_in, s_out) = (2.0f32, 4.0f32);
        let raw = tc.folded(s_in, s_out);
        let scaled: Vec<f32> = x.iter().map(|v| v * s_in).collect();
        let (c1, y1) = tc.reconstruct(&scaled);
        let (c2, y2) = raw.reconstruct(&x);
        assert_eq!(c1.feature, c2.feature);
        for (a, b) in y1.iter().zip(&y2) {
            assert!((a / s_out - b).abs() < 1e-4, "{a} {b}");
        }
        let dir = tempfile::tempdir().unwrap();
        let meta = SaeMeta {
            hook_name: "blocks.2.hook_mlp_out".into(),
            input_hook: Some("blocks.2.ln2.hook_normalized".into()),
            ..SaeMeta::default()
        };
        save(&raw, &meta, None, dir.path(), true).unwrap();
        let (back, meta_back) = load(dir.path()).unwrap();
        assert_eq!(back, raw);
        assert_eq!(meta_back.hook_name, meta.hook_name);
        assert_eq!(meta_back.input_hook, meta.input_hook);
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("cfg.json")).unwrap()).unwrap();
        assert_eq!(cfg["architecture"], "topk_skip_transcoder");
        assert_eq!(cfg["d_out"], d);
        let bytes = std::fs::read(dir.path().join("circuit_tracer.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(read_tensor(&st, "W_enc", &[n, d]).unwrap(), raw.sae.w_enc);
        assert_eq!(read_tensor(&st, "W_skip", &[d, d]).unwrap(), raw.w_skip.clone().unwrap());
        assert!(crate::io::load_sae(dir.path()).is_err(), "an SAE loader must refuse a transcoder");
    }
}

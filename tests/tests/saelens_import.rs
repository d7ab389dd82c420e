//! SAELens checkpoints whose `cfg.json` settings change how they encode, made and encoded by the
//! real `sae-lens` (tests/fixtures/saelens/settings.py, run by regen.sh): Loupe applies each
//! setting it can reproduce exactly (its codes and reconstructions equal sae-lens') and refuses
//! the others with one error line naming the setting; `loupe import` warns, naming both models,
//! when the checkpoint was made for another model than the store's.

use std::path::Path;

use loupe_dict::io::load_sae;
use loupe_dict::{Dictionary, Sae};
use loupe_store::{DType, HookSpec, ModelInfo, Store};
use loupe_tests::{assert_one_error, fixture, loupe, stderr, write_synthetic};
use serde_json::{Value, json};

const HOOK: &str = "blocks.6.hook_resid_post";

fn reference() -> Value {
    let path = fixture("saelens/settings/reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap())
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-5 * (1.0 + b.abs())
}

/// Loupe's codes and reconstructions of `x` against sae-lens' (`acts`: per token, its non-zero
/// `[feature, value]` pairs): the same active features, values within 1e-5 (relative above 1).
/// Returns how many tokens have sae-lens' active set, or the first mismatches.
fn compare(sae: &Sae, x: &[f32], acts: &Value, recons: &[f32]) -> Result<usize, String> {
    let codes = sae.encode(x);
    let mut errors = Vec::new();
    let mut rows_agree = 0;
    for (t, want) in acts.as_array().unwrap().iter().enumerate() {
        let want: Vec<(u32, f32)> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32))
            .collect();
        let (lo, hi) = (codes.offsets[t] as usize, codes.offsets[t + 1] as usize);
        let got: Vec<(u32, f32)> =
            codes.feature[lo..hi].iter().copied().zip(codes.value[lo..hi].iter().copied()).collect();
        let same_set = got.len() == want.len() && got.iter().zip(&want).all(|(a, b)| a.0 == b.0);
        if !same_set {
            errors.push(format!("token {t}: Loupe {got:?}, sae-lens {want:?}"));
            continue;
        }
        rows_agree += 1;
        for ((f, a), (_, b)) in got.iter().zip(&want) {
            if !close(*a, *b) {
                errors.push(format!("token {t} feature {f}: Loupe {a}, sae-lens {b}"));
            }
        }
    }
    let mut out = vec![0.0f32; x.len()];
    sae.decode(&codes, &mut out);
    let d = sae.spec.d_in;
    for (i, (a, b)) in out.iter().zip(recons).enumerate() {
        if !close(*a, *b) {
            errors.push(format!("reconstruction token {} dim {}: Loupe {a}, sae-lens {b}", i / d, i % d));
        }
    }
    if errors.is_empty() {
        Ok(rows_agree)
    } else {
        Err(format!(
            "{} tokens of {} keep the active set; {} mismatches, first: {}",
            rows_agree,
            acts.as_array().unwrap().len(),
            errors.len(),
            errors[0]
        ))
    }
}

/// A copy of the checkpoint folder `src` in `dst` with `overrides` merged into its cfg.json.
fn copy_with(src: &Path, dst: &Path, overrides: &Value) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("sae_weights.safetensors"), dst.join("sae_weights.safetensors")).unwrap();
    let mut cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("cfg.json")).unwrap()).unwrap();
    for (key, value) in overrides.as_object().unwrap() {
        cfg[key] = value.clone();
    }
    std::fs::write(dst.join("cfg.json"), cfg.to_string()).unwrap();
}

fn cases(expect: &str) -> Vec<(String, Value)> {
    let r = reference();
    let cases = r["cases"].as_object().unwrap();
    let out: Vec<(String, Value)> =
        cases.iter().filter(|(_, c)| c["expect"] == expect).map(|(n, c)| (n.clone(), c.clone())).collect();
    assert!(out.len() >= 4, "too few {expect} cases in the fixture");
    out
}

#[test]
fn loupe_encodes_as_saelens_with_each_setting_applied() {
    let r = reference();
    println!("reference: sae-lens {}, torch {}", r["sae_lens_version"], r["torch_version"]);
    let x = floats(&r["x"]);
    let tmp = tempfile::tempdir().unwrap();
    for (name, case) in cases("match") {
        let dir = fixture(&format!("saelens/settings/{name}"));
        let (sae, meta) = load_sae(&dir).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        let recons = floats(&case["recons"]);
        let tokens = compare(&sae, &x, &case["acts"], &recons)
            .unwrap_or_else(|e| panic!("{name}: Loupe and sae-lens disagree: {e}"));
        assert_eq!(meta.model_name, "gemma-3-270m", "{name}");
        println!("{name}: all {tokens} tokens as sae-lens ({})", case["class"]);

        // Not vacuous: the same files with the setting ignored encode otherwise (as sae-lens
        // itself found), and the comparison sees it.
        if case["changes_encoding"] == true {
            let ignored = tmp.path().join(&name);
            copy_with(&dir, &ignored, &case["ignored"]);
            let (plain, _) = load_sae(&ignored).unwrap();
            let err = compare(&plain, &x, &case["acts"], &recons)
                .expect_err(&format!("{name}: ignoring {} went unnoticed", case["setting"]));
            println!("  with {} ignored: {err}", case["setting"]);
        }
    }
}

/// The imported copy is an ordinary SAELens file (settings folded, `apply_b_dec_to_input` true,
/// no rescaling) that still encodes as sae-lens did.
#[test]
fn imported_copies_keep_the_encoding() {
    let r = reference();
    let x = floats(&r["x"]);
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    Store::create(&store_dir).unwrap();
    let s = store_dir.to_str().unwrap();
    for (name, case) in cases("match") {
        let dir = fixture(&format!("saelens/settings/{name}"));
        let out = loupe(&["import", dir.to_str().unwrap(), "--store", s, "--name", &name]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert_eq!(stderr(&out), "", "{name}");
        let copy = store_dir.join("dictionaries").join(&name);
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(copy.join("cfg.json")).unwrap()).unwrap();
        assert_eq!(
            (&cfg["apply_b_dec_to_input"], &cfg["normalize_activations"]),
            (&json!(true), &json!("none"))
        );
        assert!(cfg.get("rescale_acts_by_decoder_norm").is_none(), "{name}: {cfg}");
        let (sae, _) = load_sae(&copy).unwrap();
        compare(&sae, &x, &case["acts"], &floats(&case["recons"]))
            .unwrap_or_else(|e| panic!("{name}: the imported copy encodes otherwise: {e}"));
    }
}

#[test]
fn import_refuses_settings_it_cannot_apply() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    Store::create(&store_dir).unwrap();
    let s = store_dir.to_str().unwrap();
    let mut folders: Vec<(String, std::path::PathBuf, String)> = Vec::new();
    for (name, case) in cases("refuse") {
        let setting = case["setting"].as_str().unwrap().to_string();
        folders.push((name.clone(), fixture(&format!("saelens/settings/{name}")), setting));
        // sae-lens encodes differently with the per-row normalizations ignored.
        if name.contains("layer_norm") || name.contains("constant_norm_rescale") {
            assert_eq!(case["changes_encoding"], true, "{name}");
        }
    }
    // Hand-made variants of files sae-lens wrote.
    let topk = fixture("saelens/settings/topk_no_b_dec_in");
    let jumprelu = fixture("saelens/settings/jumprelu_no_b_dec_in");
    let pre6 = fixture("saelens/settings/pre6_topk");
    let edits = [
        (
            "rescale_on_jumprelu",
            &jumprelu,
            json!({"rescale_acts_by_decoder_norm": true}),
            "rescale_acts_by_decoder_norm",
        ),
        ("reshape_other", &topk, json!({"reshape_activations": "hook_q"}), "reshape_activations"),
        ("apply_b_dec_text", &topk, json!({"apply_b_dec_to_input": "no"}), "apply_b_dec_to_input"),
        ("pre6_normalize_true", &pre6, json!({"normalize_activations": true}), "normalize_activations"),
        ("pre6_tanh_relu", &pre6, json!({"activation_fn_str": "tanh-relu"}), "activation_fn"),
        ("normalize_unknown", &topk, json!({"normalize_activations": "rms"}), "normalize_activations"),
    ];
    for (name, src, overrides, setting) in edits {
        let dst = tmp.path().join(name);
        copy_with(src, &dst, &overrides);
        folders.push((name.to_string(), dst, setting.to_string()));
    }
    // Tensors Loupe would not use: an extra one, and a scaling factor other than 1.
    for (name, tensor, value) in
        [("extra_tensor", "W_skip", 0.5f32), ("scaling_factor", "scaling_factor", 2.0)]
    {
        let dst = tmp.path().join(name);
        copy_with(&topk, &dst, &json!({}));
        add_tensor(&dst.join("sae_weights.safetensors"), tensor, value);
        folders.push((name.to_string(), dst, tensor.to_string()));
    }
    for (name, dir, setting) in &folders {
        let args = ["import", dir.to_str().unwrap(), "--store", s, "--name", name];
        assert_one_error(&store_dir, &args, setting);
        println!("{name}: {}", stderr(&loupe(&args)).trim());
    }
    assert!(
        !store_dir.join("dictionaries").exists()
            || std::fs::read_dir(store_dir.join("dictionaries")).unwrap().next().is_none()
    );

    // An all-ones scaling factor is dropped (as sae-lens drops it).
    let ones = tmp.path().join("ones");
    copy_with(&topk, &ones, &json!({}));
    add_tensor(&ones.join("sae_weights.safetensors"), "scaling_factor", 1.0);
    let out = loupe(&["import", ones.to_str().unwrap(), "--store", s, "--name", "ones"]);
    assert!(out.status.success(), "{}", stderr(&out));
}

/// Rewrite the safetensors file at `path` with one more F32 tensor `[d_sae]` filled with `value`.
fn add_tensor(path: &Path, name: &str, value: f32) {
    use safetensors::{SafeTensors, tensor::TensorView};
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let n = st.tensor("b_enc").unwrap().shape()[0];
    let extra = vec![value; n];
    let mut views: Vec<(String, TensorView)> = st.tensors().into_iter().collect();
    views.push((
        name.to_string(),
        TensorView::new(safetensors::Dtype::F32, vec![n], bytemuck::cast_slice(&extra)).unwrap(),
    ));
    let out = safetensors::serialize(views, None::<std::collections::HashMap<String, String>>).unwrap();
    std::fs::write(path, out).unwrap();
}

#[test]
fn import_warns_when_the_models_differ() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    let store = Store::create(&store_dir).unwrap();
    let spec = HookSpec { d: 16, dtype: DType::F32, grad: false };
    write_synthetic(&store, HOOK, spec, 2, 8, 64, 1);
    let model = |name: &str| ModelInfo {
        name: name.to_string(),
        architecture: "gpt2".to_string(),
        path: "/nowhere".to_string(),
        sha256: "0".repeat(64),
    };
    store.set_model(model("gpt2-small"), None).unwrap();
    drop(store);
    let s = store_dir.to_str().unwrap();
    let dir = fixture("saelens/settings/topk_rescale");
    let out = loupe(&["import", dir.to_str().unwrap(), "--store", s, "--name", "other"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let err = stderr(&out);
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(warnings[0].contains("\"gemma-3-270m\"") && warnings[0].contains("\"gpt2-small\""), "{err}");

    // Same model under an organisation prefix and another case: no warning.
    let store = Store::open_rw(&store_dir).unwrap();
    store.set_model(model("Google/Gemma-3-270m"), None).unwrap();
    drop(store);
    let out = loupe(&["import", dir.to_str().unwrap(), "--store", s, "--name", "same"]);
    assert!(out.status.success() && stderr(&out).is_empty(), "{}", stderr(&out));
}

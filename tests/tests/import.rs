//! `loupe import`: sparsify and SAELens folders into a store, and bad folders refused.

use std::collections::HashMap;

use loupe_dict::Dictionary;
use loupe_dict::io::load_sae;
use loupe_store::{DType, HookSpec, Store};
use loupe_tests::{loupe, stderr};
use safetensors::{Dtype, tensor::TensorView};

const HOOK: &str = "blocks.0.hook_resid_post";

fn f32_view(values: &[f32], shape: Vec<usize>) -> TensorView<'_> {
    TensorView::new(Dtype::F32, shape, bytemuck::cast_slice(values)).unwrap()
}

/// A sparsify-layout folder: cfg.json + sae.safetensors (encoder.weight [n, d], W_dec [n, d]).
fn sparsify_folder(dir: &std::path::Path, d: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
    std::fs::create_dir_all(dir).unwrap();
    let enc: Vec<f32> = (0..n * d).map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0).collect();
    let dec: Vec<f32> = (0..n * d).map(|i| ((i * 53 % 97) as f32 - 48.0) / 48.0).collect();
    let (b_enc, b_dec) = (vec![0.1f32; n], vec![-0.2f32; d]);
    let tensors = vec![
        ("encoder.weight", f32_view(&enc, vec![n, d])),
        ("encoder.bias", f32_view(&b_enc, vec![n])),
        ("W_dec", f32_view(&dec, vec![n, d])),
        ("b_dec", f32_view(&b_dec, vec![d])),
    ];
    let bytes = safetensors::serialize(tensors, None::<HashMap<String, String>>).unwrap();
    std::fs::write(dir.join("sae.safetensors"), bytes).unwrap();
    let cfg = serde_json::json!({"expansion_factor": n / d, "normalize_decoder": true, "num_latents": n, "k": 4,
        "multi_topk": false, "skip_connection": false, "d_in": d});
    std::fs::write(dir.join("cfg.json"), cfg.to_string()).unwrap();
    (enc, dec)
}

#[test]
fn imports_sparsify_and_reexports_saelens_and_refuses_bad_folders() {
    let tmp = tempfile::tempdir().unwrap();
    let store_dir = tmp.path().join("store");
    let store = Store::create(&store_dir).unwrap();
    let spec = HookSpec { d: 8, dtype: DType::F32, grad: false };
    let mut writer = store.activation_writer(HOOK, spec).unwrap();
    let act: Vec<f32> = (0..10 * 8).map(|i| (i as f32).sin()).collect();
    writer.append(&[0u32; 10], &(0..10).collect::<Vec<u32>>(), &[5u32; 10], &act, None).unwrap();
    writer.finish().unwrap();
    drop(store);
    let s = store_dir.to_str().unwrap();

    let sp = tmp.path().join("layers.0");
    let (enc, dec) = sparsify_folder(&sp, 8, 32);
    // sparsify names modules, not TransformerLens hooks: --hook is required.
    let out = loupe(&["import", sp.to_str().unwrap(), "--store", s]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("give --hook"), "{}", stderr(&out));
    let out = loupe(&["import", sp.to_str().unwrap(), "--store", s, "--hook", HOOK, "--name", "sp"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (sae, meta) = load_sae(&store_dir.join("dictionaries/sp")).unwrap();
    assert_eq!((sae.d_in(), sae.n_features(), sae.spec.k), (8, 32, 4));
    assert_eq!(sae.w_enc, enc);
    assert_eq!(sae.w_dec, dec);
    assert_eq!(meta.hook_name, HOOK);
    let verify = loupe(&["store", "verify", s]);
    assert!(verify.status.success() && String::from_utf8_lossy(&verify.stdout).contains("1 dictionaries"));

    // The stored copy (SAELens layout) imports again under another name, not under the same one.
    let saelens = store_dir.join("dictionaries/sp");
    let out = loupe(&["import", saelens.to_str().unwrap(), "--store", s, "--name", "sp"]);
    assert!(stderr(&out).contains("already has a dictionary named sp"), "{}", stderr(&out));
    let out = loupe(&["import", saelens.to_str().unwrap(), "--store", s, "--name", "again"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Wrong width, corrupt weights, missing folder: one error line each, store untouched.
    let before = std::fs::read(store_dir.join("manifest.json")).unwrap();
    let wide = tmp.path().join("wide");
    sparsify_folder(&wide, 16, 32);
    let corrupt = tmp.path().join("corrupt");
    sparsify_folder(&corrupt, 8, 32);
    let bytes = std::fs::read(corrupt.join("sae.safetensors")).unwrap();
    std::fs::write(corrupt.join("sae.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    for (folder, needle) in [
        (wide.to_str().unwrap(), "width"),
        (corrupt.to_str().unwrap(), "not a valid safetensors file"),
        ("/nonexistent/sae", "is not a dictionary folder"),
    ] {
        let out = loupe(&["import", folder, "--store", s, "--hook", HOOK, "--name", "x"]);
        let err = stderr(&out);
        assert!(!out.status.success() && err.trim().lines().count() == 1, "{folder}: {err}");
        assert!(err.contains(needle), "{folder}: {err}");
    }
    assert_eq!(before, std::fs::read(store_dir.join("manifest.json")).unwrap());
}

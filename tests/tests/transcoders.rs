//! Per-layer transcoders end to end on the tiny GPT-2 fixture: capture an MLP's input and output
//! hooks, `train-sae --input-hook` with and without `--skip` (TopK, ReLU, JumpReLU), splice into
//! the model (eval.json), the SAELens-transcoder files through `loupe import`, the per-layer
//! [`TranscoderSet`] against each dictionary, and bad input (one error line, store unchanged).

use std::path::Path;

use loupe_dict::transcoder::TranscoderSet;
use loupe_dict::{Dictionary, open_in_store};
use loupe_store::{DType, HookSpec, Store};
use loupe_tests::{assert_one_error, loupe, stderr, tiny_model};

fn run(args: &[&str]) {
    let out = loupe(args);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
}

/// A store with both MLP hooks of layers 0 and 1 (and layer 0's residual), captured together.
fn captured(dir: &Path) -> std::path::PathBuf {
    let model = tiny_model(&dir.join("model"));
    std::fs::write(model.join("tokenizer_config.json"), r#"{"bos_token": "\u0000"}"#).unwrap();
    let corpus = dir.join("corpus.txt");
    let text: String = (0..400).map(|i| format!("the cat {} sat on the mat {}. ", i % 7, i % 13)).collect();
    std::fs::write(&corpus, text).unwrap();
    let store = dir.join("store");
    let mut args = vec!["capture", "--model", model.to_str().unwrap(), "--corpus", corpus.to_str().unwrap()];
    args.extend(["--store", store.to_str().unwrap(), "--context", "32", "--max-tokens", "6000"]);
    for hook in [
        "blocks.0.ln2.hook_normalized",
        "blocks.0.hook_mlp_out",
        "blocks.1.ln2.hook_normalized",
        "blocks.1.hook_mlp_out",
        "blocks.0.hook_resid_post",
    ] {
        args.extend(["--hook", hook]);
    }
    run(&args);
    store
}

fn train(store: &Path, name: &str, input: &str, output: &str, extra: &[&str]) {
    let mut args = vec!["train-sae", "--store", store.to_str().unwrap(), "--dictionary", name];
    args.extend(["--hook", output, "--input-hook", input, "--n-features", "64", "--k", "4"]);
    args.extend(["--tokens", "8000", "--batch", "256", "--lr", "0.003", "--eval-contexts", "4"]);
    args.extend(extra);
    run(&args);
}

fn mlp(store: &Path, name: &str, layer: usize, extra: &[&str]) {
    let (input, output) =
        (format!("blocks.{layer}.ln2.hook_normalized"), format!("blocks.{layer}.hook_mlp_out"));
    train(store, name, &input, &output, extra);
}

fn held_out_rows(store: &Store, hook: &str, rows: usize) -> Vec<f32> {
    let acts = store.activations(hook).unwrap();
    let shard = acts.open_shard(0).unwrap();
    let d = acts.spec().d as usize;
    let mut x = Vec::new();
    shard.act().rows(0..rows, d).to_f32_into(&mut x);
    x
}

#[test]
fn transcoders_train_splice_round_trip_and_form_a_set() {
    let tmp = tempfile::tempdir().unwrap();
    let store_path = captured(tmp.path());
    mlp(&store_path, "skip0", 0, &["--skip"]);
    mlp(&store_path, "plain1", 1, &[]);
    mlp(&store_path, "relu0", 0, &["--variant", "relu", "--sparsity-coefficient", "0.1", "--skip"]);
    mlp(&store_path, "jump1", 1, &["--variant", "jumprelu", "--sparsity-coefficient", "0.1"]);
    let store = Store::open(&store_path).unwrap();
    let manifest = store.manifest();

    for (name, arch) in [
        ("skip0", "topk_skip_transcoder"),
        ("plain1", "topk_transcoder"),
        ("relu0", "skip_transcoder"),
        ("jump1", "jumprelu_transcoder"),
    ] {
        let entry = &manifest.dictionaries[name];
        assert_eq!(entry.output_hook.as_deref().map(|h| h.ends_with("hook_mlp_out")), Some(true), "{name}");
        assert!(entry.hook.ends_with("ln2.hook_normalized"), "{name}");
        let dir = store.dictionary_dir(name);
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("cfg.json")).unwrap()).unwrap();
        assert_eq!(cfg["architecture"], arch, "{name}");
        assert_eq!(cfg["hook_name_out"], entry.output_hook.clone().unwrap());
        assert_eq!(cfg["metadata"]["hook_name"], entry.hook);
        assert!(dir.join("circuit_tracer.safetensors").exists());
        // Held-out FVU of the target, L0, dead, and the splice at the MLP output.
        let eval: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("eval.json")).unwrap()).unwrap();
        let fvu = eval["held_out"]["fvu"].as_f64().unwrap();
        assert!(fvu.is_finite() && fvu < 1.0, "{name}: FVU {fvu}");
        assert!(eval["held_out"]["l0"].as_f64().unwrap() > 0.0);
        assert!(eval["held_out"]["dead_fraction"].as_f64().is_some());
        for key in ["ce_loss_recovered", "kl", "ce_spliced"] {
            assert!(eval["splice"][key].as_f64().is_some_and(f64::is_finite), "{name} {key}: {eval}");
        }
    }
    // Skip vs none on the same layer: the skip transcoder's W_skip was trained (non-zero).
    let (_, skip0) = loupe_dict::transcode::load(&store.dictionary_dir("skip0")).unwrap();
    assert!(skip0.input_hook.is_some());

    // The set: layer outputs and activations equal each dictionary's reconstruct and codes.
    let names = vec!["skip0".to_string(), "plain1".to_string()];
    let set = TranscoderSet::from_store(&store, &names, 2).unwrap();
    assert_eq!((set.kind.as_str(), set.n_layers(), set.d_model), ("plt", 2, 64));
    assert!(set.layers[0].w_skip.is_some() && set.layers[1].w_skip.is_none());
    for (layer, name) in names.iter().enumerate() {
        let x = held_out_rows(&store, &format!("blocks.{layer}.ln2.hook_normalized"), 40);
        let (_, dict) = open_in_store(&store, name).unwrap();
        let (codes, want) = dict.reconstruct(&x);
        let mut inputs: Vec<&[f32]> = vec![&x; layer + 1];
        inputs[layer] = &x;
        let got = set.output(layer, &inputs);
        let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-3, "layer {layer}: set output differs from reconstruct by {worst}");
        let acts = set.activations(layer, &x);
        assert_eq!((&acts.offsets, &acts.feature), (&codes.offsets, &codes.feature), "layer {layer}");
        for (a, b) in acts.value.iter().zip(&codes.value) {
            assert!((a - b).abs() < 1e-3 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
    // ReLU + JumpReLU also form a set.
    let other = TranscoderSet::from_store(&store, &["jump1".to_string(), "relu0".to_string()], 2).unwrap();
    assert_eq!(other.names, ["relu0", "jump1"]);

    // Set errors: a missing layer, a doubled layer, a dictionary that is not an MLP transcoder.
    let err = |names: &[&str]| {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        format!("{:#}", TranscoderSet::from_store(&store, &names, 2).unwrap_err())
    };
    assert!(err(&["skip0"]).contains("no transcoder for layer 1"), "{}", err(&["skip0"]));
    assert!(err(&["skip0", "relu0", "plain1"]).contains("layer 0 has two transcoders"));
    drop(store);
    train(&store_path, "cross", "blocks.0.ln2.hook_normalized", "blocks.1.hook_mlp_out", &[]);
    let store = Store::open(&store_path).unwrap();
    let names = vec!["skip0".to_string(), "cross".to_string()];
    let e = format!("{:#}", TranscoderSet::from_store(&store, &names, 2).unwrap_err());
    assert!(
        e.contains("cross is not a per-layer MLP transcoder") && e.contains("blocks.1.hook_mlp_out"),
        "{e}"
    );
    drop(store);

    // Files: `loupe import` reads the folder back into another store, unchanged.
    let other_store = tmp.path().join("other");
    Store::create(&other_store).unwrap();
    let src = store_path.join("dictionaries/skip0");
    run(&["import", "--store", other_store.to_str().unwrap(), src.to_str().unwrap(), "--dictionary", "back"]);
    let other = Store::open(&other_store).unwrap();
    let entry = &other.manifest().dictionaries["back"];
    assert_eq!(entry.hook, "blocks.0.ln2.hook_normalized");
    assert_eq!(entry.output_hook.as_deref(), Some("blocks.0.hook_mlp_out"));
    let (a, _) = loupe_dict::transcode::load(&src).unwrap();
    let (b, _) = loupe_dict::transcode::load(&other.dictionary_dir("back")).unwrap();
    assert_eq!(a, b);
    let (_, imported) = open_in_store(&other, "back").unwrap();
    assert_eq!(imported.d_out(), 64);
}

#[test]
fn bad_transcoder_settings_get_one_error_line() {
    let tmp = tempfile::tempdir().unwrap();
    let store = captured(tmp.path());
    let s = store.to_str().unwrap();
    let base = |input: &'static str| {
        vec![
            "train-sae",
            "--store",
            s,
            "--hook",
            "blocks.0.hook_mlp_out",
            "--input-hook",
            input,
            "--n-features",
            "32",
        ]
    };
    assert_one_error(&store, &base("blocks.0.ln1.hook_normalized"), "no activations for hook blocks.0.ln1");
    let mut a = base("blocks.0.ln2.hook_normalized");
    a.extend(["--variant", "mutual_choice"]);
    assert_one_error(&store, &a, "mutual_choice cannot train as a transcoder");
    let mut a = base("blocks.0.ln2.hook_normalized");
    a.extend(["--variant", "gsae"]);
    assert_one_error(&store, &a, "gsae cannot train as a transcoder");
    assert_one_error(&store, &base("blocks.0.hook_mlp_out"), "--input-hook is the same as --hook");
    let skip_alone =
        ["train-sae", "--store", s, "--hook", "blocks.0.hook_mlp_out", "--skip", "--n-features", "32"];
    assert_one_error(&store, &skip_alone, "--skip needs --input-hook");

    // Rows that differ: a store whose two hooks were not captured together.
    let odd = tmp.path().join("odd");
    let st = Store::create(&odd).unwrap();
    let spec = HookSpec { d: 8, dtype: DType::F32, grad: false };
    for (hook, rows) in [("blocks.0.ln2.hook_normalized", 300u32), ("blocks.0.hook_mlp_out", 280)] {
        let mut w = st.activation_writer(hook, spec).unwrap();
        let n = rows as usize;
        let x: Vec<f32> = (0..n * 8).map(|i| (i % 17) as f32 * 0.1).collect();
        w.append::<f32>(&vec![0; n], &(0..rows).collect::<Vec<_>>(), &vec![1; n], &x, None).unwrap();
        w.finish().unwrap();
    }
    drop(st);
    let o = odd.to_str().unwrap();
    let a = [
        "train-sae",
        "--store",
        o,
        "--hook",
        "blocks.0.hook_mlp_out",
        "--input-hook",
        "blocks.0.ln2.hook_normalized",
        "--n-features",
        "16",
        "--batch",
        "64",
    ];
    assert_one_error(&odd, &a, "hold different rows");
}

/// circuit-tracer computes what Loupe computes: the committed `tiny-skip` transcoder (Loupe's
/// files, trained on the tiny GPT-2) was loaded by circuit-tracer's `SingleLayerTranscoder` from
/// `circuit_tracer.safetensors` (strict) and run on seeded inputs
/// (`tests/fixtures/transcoders/circuit_tracer_check.py`); Loupe, reading the SAELens-layout
/// files, gives the same activations and outputs.
#[test]
fn circuit_tracer_computes_the_same_outputs() {
    let dir = loupe_tests::fixture("transcoders/tiny-skip");
    let (tc, meta) = loupe_dict::transcode::load(&dir).unwrap();
    assert_eq!(meta.input_hook.as_deref(), Some("blocks.0.ln2.hook_normalized"));
    let bytes = std::fs::read(loupe_tests::fixture("transcoders/tiny-skip-ct.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let read = |name: &str| -> Vec<f32> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let (x, acts, out) = (read("x"), read("acts"), read("out"));
    let n = tc.n_features();
    let (codes, got) = tc.reconstruct(&x);
    let worst = got.iter().zip(&out).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "outputs differ from circuit-tracer's by {worst}");
    for t in 0..codes.tokens() {
        let mut dense = vec![0.0f32; n];
        let (features, values) = codes.row(t);
        features.iter().zip(values).for_each(|(&f, &v)| dense[f as usize] = v);
        for (a, b) in dense.iter().zip(&acts[t * n..(t + 1) * n]) {
            assert!((a - b).abs() < 1e-4, "token {t}: activation {a} vs circuit-tracer's {b}");
        }
    }
}

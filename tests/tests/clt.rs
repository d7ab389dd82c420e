//! `loupe train-clt` and `loupe splice-transcoders` end to end: a cross-layer transcoder trained on
//! every layer of the tiny GPT-2 fixture (captured by `loupe capture`), evaluated, spliced into the
//! model with every MLP replaced, and loaded back as a `TranscoderSet`; bad input gets one clear
//! error line and leaves the store as it was.

use std::path::{Path, PathBuf};

use loupe_dict::clt::files;
use loupe_dict::transcoder::TranscoderSet;
use loupe_store::{DType, HookSpec, Store};
use loupe_tests::{assert_one_error, loupe, stderr, tiny_model};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const LAYERS: usize = 2;

/// The tiny model (BOS = NUL) and a store holding both MLP hooks of its two layers.
fn captured(dir: &Path) -> PathBuf {
    let model = tiny_model(&dir.join("model"));
    std::fs::write(model.join("tokenizer_config.json"), r#"{"bos_token": "\u0000"}"#).unwrap();
    let corpus = dir.join("corpus.txt");
    let text: String = (0..150)
        .map(|i| {
            format!("Call me Ishmael {i}. Some years ago - never mind how long precisely, {}. ", i * 7 % 13)
        })
        .collect();
    std::fs::write(&corpus, text).unwrap();
    let store = dir.join("store");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let mut args = vec!["capture".to_string(), "--model".into(), s(&model), "--corpus".into(), s(&corpus)];
    args.extend(["--store".into(), s(&store), "--context".into(), "32".into()]);
    for l in 0..LAYERS {
        let (input, output) = files::hooks(0, l);
        args.extend(["--hook".to_string(), input, "--hook".to_string(), output]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = loupe(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    store
}

fn train_args<'a>(store: &'a str, name: &'a str) -> Vec<&'a str> {
    vec![
        "train-clt",
        "--store",
        store,
        "--dictionary",
        name,
        "--n-features",
        "64",
        "--k",
        "4",
        "--batch",
        "256",
        "--tokens",
        "40960",
        "--lr",
        "0.004",
        "--eval-tokens",
        "1000",
        "--eval-contexts",
        "4",
    ]
}

#[test]
fn a_clt_trains_evaluates_splices_and_loads_as_a_set() {
    let tmp = tempfile::tempdir().unwrap();
    let store = captured(tmp.path());
    let s = store.to_str().unwrap();
    let out = loupe(&train_args(s, "clt-t"));
    let report = stderr(&out);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("every MLP replaced"), "{report}");
    let dir = store.join("dictionaries/clt-t");
    let eval: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("eval.json")).unwrap()).unwrap();
    let layers = eval["held_out"]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), LAYERS);
    for l in layers {
        let (fvu, l0) = (l["fvu"].as_f64().unwrap(), l["l0"].as_f64().unwrap());
        assert!(fvu < 0.8, "layer {}: the CLT learned little, FVU {fvu}", l["layer"]);
        assert!(l0 > 3.0 && l0 <= 4.0, "L0 {l0}");
    }
    let splice = &eval["splice_all_layers"];
    let recovered = splice["ce_loss_recovered"].as_f64().unwrap();
    assert!(recovered.is_finite(), "{splice}");
    assert!(splice["kl"].as_f64().unwrap() >= 0.0);

    // The manifest says what it is.
    let info = loupe(&["store", "info", s]);
    let info = String::from_utf8_lossy(&info.stdout).to_string();
    assert!(
        info.contains("clt-t  clt topk on blocks.0.ln2.hook_normalized → blocks.1.hook_mlp_out  d 64 → 128 features  done"),
        "{info}"
    );

    // Loaded as a set: kind clt, its output equals the CLT's own forward.
    let opened = Store::open(&store).unwrap();
    let set = TranscoderSet::from_store(&opened, &["clt-t".to_string()], LAYERS).unwrap();
    assert_eq!(set.kind, "clt");
    assert_eq!(set.n_layers(), LAYERS);
    assert_eq!(set.layers[0].w_dec.len(), 2);
    assert_eq!(set.layers[1].w_dec.len(), 1);
    let clt = files::load(&dir).unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    let xs: Vec<Vec<f32>> =
        (0..LAYERS).map(|_| (0..5 * 64).map(|_| rng.random_range(-2.0f32..2.0)).collect()).collect();
    let inputs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
    let (_, want) = clt.forward(&inputs);
    for (l, want) in want.iter().enumerate() {
        let got = set.output(l, &inputs);
        assert!(got.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-3), "layer {l}");
    }
    let err = TranscoderSet::from_store(&opened, &["clt-t".to_string()], 3).unwrap_err();
    assert!(format!("{err:#}").contains("every MLP"), "{err:#}");
    // A CLT is not opened as a single dictionary.
    let err = loupe_dict::open_in_store(&opened, "clt-t").err().unwrap();
    assert!(err.to_string().contains("TranscoderSet"), "{err}");

    // splice-transcoders on the same held-out rows measures the same numbers.
    let out = loupe(&[
        "splice-transcoders",
        "--store",
        s,
        "--transcoders",
        "clt-t",
        "--eval-contexts",
        "4",
        "--eval-tokens",
        "1000",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(again["ce_loss_recovered"], splice["ce_loss_recovered"]);
    assert_eq!(again["kl"], splice["kl"]);

    // A second run of the same name is refused (no checkpoints to resume).
    assert_one_error(&store, &train_args(s, "clt-t"), "no checkpoints");
    // More layers than the model has; k larger than the features.
    let mut args = train_args(s, "clt-u");
    args.extend(["--layers", "0-2"]);
    assert_one_error(&store, &args, "layers 0..=1");
    let mut args = train_args(s, "clt-u");
    args[8] = "65";
    assert_one_error(&store, &args, "k = 65");
}

/// A store without a model: layer 0 complete; layer 1's output missing, or with other rows.
fn synthetic(dir: &Path, layer1_out_rows: Option<usize>) {
    let d = 8;
    let mut rng = StdRng::seed_from_u64(4);
    let store = Store::create(dir).unwrap();
    let spec = HookSpec { d: d as u32, dtype: DType::F32, grad: false };
    let mut hooks = vec![files::hooks(0, 0).0, files::hooks(0, 0).1, files::hooks(0, 1).0];
    if layer1_out_rows.is_some() {
        hooks.push(files::hooks(0, 1).1);
    }
    for h in hooks {
        let rows = if h == "blocks.1.hook_mlp_out" { layer1_out_rows.unwrap() } else { 2000 };
        let mut w = store.activation_writer(&h, spec).unwrap();
        for doc in 0..(rows / 100) as u32 {
            let x: Vec<f32> = (0..100 * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let pos: Vec<u32> = (0..100).collect();
            w.append::<f32>(&vec![doc; 100], &pos, &vec![7u32; 100], &x, None).unwrap();
        }
        w.finish().unwrap();
    }
}

#[test]
fn bad_input_gets_one_error_line() {
    let tmp = tempfile::tempdir().unwrap();
    let args = |s: &Path| -> Vec<String> {
        let s = s.to_str().unwrap();
        ["train-clt", "--store", s, "--layers", "0-1", "--n-features", "16", "--k", "2", "--batch", "100"]
            .map(String::from)
            .to_vec()
    };
    let missing = tmp.path().join("missing");
    synthetic(&missing, None);
    let a = args(&missing);
    assert_one_error(
        &missing,
        &a.iter().map(String::as_str).collect::<Vec<_>>(),
        "no activations for hook blocks.1.hook_mlp_out",
    );
    let differ = tmp.path().join("differ");
    synthetic(&differ, Some(1500));
    let a = args(&differ);
    assert_one_error(&differ, &a.iter().map(String::as_str).collect::<Vec<_>>(), "not captured together");
    // The same store with matching rows trains (no model: the splice is skipped, and says why).
    let fine = tmp.path().join("fine");
    synthetic(&fine, Some(2000));
    let mut a = args(&fine);
    a.extend(["--tokens", "2000", "--eval-tokens", "200"].map(String::from));
    let out = loupe(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("CE-loss recovered: not measured"), "{}", stderr(&out));
}

/// The committed circuit-tracer fixture: a small CLT in Loupe's files, inputs, and what Loupe
/// computes from them (`expected.json`: each layer's inputs, pre-activations, TopK activations
/// and outputs). `scripts/clt-circuit-tracer-check.sh` checks circuit-tracer against the same
/// file; `LOUPE_WRITE_CLT_FIXTURE=1` rewrites it.
#[test]
fn circuit_tracer_fixture_is_what_loupe_computes() {
    let dir = loupe_tests::fixture("clt-circuit-tracer");
    if std::env::var_os("LOUPE_WRITE_CLT_FIXTURE").is_some() {
        write_ct_fixture(&dir);
    }
    let clt = files::load(&dir).unwrap();
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    let floats = |v: &serde_json::Value| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32))
            .collect()
    };
    let xs: Vec<Vec<f32>> = (0..clt.n_layers).map(|l| floats(&expected["x"][l])).collect();
    let inputs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
    let (codes, out) = clt.forward(&inputs);
    let close =
        |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-4);
    for l in 0..clt.n_layers {
        assert!(close(&clt.pre_activations(l, inputs[l]), &floats(&expected["pre"][l])), "layer {l} pre");
        let mut dense = vec![0f32; inputs[l].len() / clt.d * clt.n_features];
        for t in 0..codes[l].tokens() {
            let (fs, vs) = codes[l].row(t);
            for (f, v) in fs.iter().zip(vs) {
                dense[t * clt.n_features + *f as usize] = *v;
            }
        }
        assert!(close(&dense, &floats(&expected["acts"][l])), "layer {l} activations");
        assert!(close(&out[l], &floats(&expected["out"][l])), "layer {l} output");
    }
}

fn write_ct_fixture(dir: &Path) {
    use loupe_dict::clt::train::{CltConfig, CltTrainer};
    let (l, n, d, k, tokens) = (3, 32, 16, 4, 6);
    let mut clt = CltTrainer::new(CltConfig::new(0, l, d, n, k, 8)).unwrap().clt;
    let mut rng = StdRng::seed_from_u64(21);
    for b in clt.b_enc.iter_mut().chain(clt.b_dec.iter_mut()) {
        b.iter_mut().for_each(|v| *v = rng.random_range(-0.1f32..0.3));
    }
    for t in clt.threshold.iter_mut() {
        t.fill(0.2);
    }
    files::save(&clt, &loupe_dict::io::SaeMeta::default(), None, dir).unwrap();
    let xs: Vec<Vec<f32>> =
        (0..l).map(|_| (0..tokens * d).map(|_| rng.random_range(-2.0f32..2.0)).collect()).collect();
    let inputs: Vec<&[f32]> = xs.iter().map(Vec::as_slice).collect();
    let (codes, out) = clt.forward(&inputs);
    let rows = |v: &[f32], w: usize| -> Vec<Vec<f32>> { v.chunks(w).map(<[f32]>::to_vec).collect() };
    let acts: Vec<Vec<Vec<f32>>> = codes
        .iter()
        .map(|c| {
            (0..tokens)
                .map(|t| {
                    let mut row = vec![0f32; n];
                    let (fs, vs) = c.row(t);
                    fs.iter().zip(vs).for_each(|(f, v)| row[*f as usize] = *v);
                    row
                })
                .collect()
        })
        .collect();
    let json = serde_json::json!({
        "x": xs.iter().map(|x| rows(x, d)).collect::<Vec<_>>(),
        "pre": (0..l).map(|i| rows(&clt.pre_activations(i, inputs[i]), n)).collect::<Vec<_>>(),
        "acts": acts,
        "out": out.iter().map(|o| rows(o, d)).collect::<Vec<_>>(),
    });
    std::fs::write(dir.join("expected.json"), serde_json::to_string(&json).unwrap() + "\n").unwrap();
}

/// A set whose every layer writes zeros is exactly the all-MLP zero ablation (CE-loss recovered
/// 0), and one that is told a wrong layer count is refused: the all-layer splice replaces every
/// `hook_mlp_out` of the run.
#[test]
fn a_set_writing_zeros_is_the_zero_ablation() {
    use loupe_dict::transcoder::{Activation, TranscoderLayer};
    let model = loupe_model::load(&loupe_tests::fixture("gpt2-tiny")).unwrap();
    let (d, n_layers) = (model.config().d_model, model.config().n_layers);
    let vocab = model.config().vocab_size as u32;
    let layer = |l: usize| TranscoderLayer {
        layer: l,
        n_features: 2,
        w_enc: vec![0.0; 2 * d],
        b_enc: vec![-1.0; 2],
        activation: Activation::Relu,
        w_dec: vec![vec![0.0; 2 * d]; n_layers - l],
        b_dec: vec![0.0; d],
        w_skip: None,
    };
    let mut set = TranscoderSet {
        kind: "clt".into(),
        names: vec!["zeros".into()],
        d_model: d,
        layers: (0..n_layers).map(layer).collect(),
    };
    let contexts: Vec<Vec<u32>> =
        (0..3).map(|c| (0..20).map(|i| (i * 7 + c * 13) % vocab).collect()).collect();
    let stats = loupe_dict::splice_all::eval_splice_all(model.as_ref(), &set, &contexts).unwrap();
    assert_eq!(stats.tokens, 3 * 18);
    assert!((stats.ce_spliced - stats.ce_zero_ablation).abs() < 1e-5, "{stats:?}");
    assert!((stats.ce_zero_ablation - stats.ce_clean).abs() > 1e-3, "{stats:?}");
    assert!(stats.ce_loss_recovered.abs() < 1e-3, "{stats:?}");
    set.layers.pop();
    let err = loupe_dict::splice_all::eval_splice_all(model.as_ref(), &set, &contexts).unwrap_err();
    assert!(err.to_string().contains("covers 1 layers"), "{err}");
}

//! `loupe train-monet` end to end on a synthetic store with an MLP's input and output hooks: a
//! transcoder run killed (SIGKILL) and restarted ends with the same files as an uninterrupted one;
//! an autoencoder from a TOML config; bad settings get one clear error line.

use std::path::Path;

use loupe_store::{DType, HookSpec, Store};
use loupe_tests::{assert_one_error, dictionary_step, kill_while_training, loupe, stderr};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const INPUT: &str = "blocks.0.ln2.hook_normalized";
const OUTPUT: &str = "blocks.0.hook_mlp_out";

/// `rows` tokens of width 16 at both hooks: the output is a fixed nonlinear map of the input
/// (ReLU² of a random projection, projected back), as an MLP would make.
fn mlp_store(dir: &Path, rows: usize) {
    let d = 16;
    let mut rng = StdRng::seed_from_u64(6);
    let a: Vec<f32> = (0..d * 24).map(|_| rng.random_range(-0.5f32..0.5)).collect();
    let b: Vec<f32> = (0..24 * d).map(|_| rng.random_range(-0.5f32..0.5)).collect();
    let store = Store::create(dir).unwrap();
    let spec = HookSpec { d: d as u32, dtype: DType::F32, grad: false };
    let mut w_in = store.activation_writer(INPUT, spec).unwrap().with_shard_rows(2000);
    let mut w_out = store.activation_writer(OUTPUT, spec).unwrap().with_shard_rows(2000);
    for doc in 0..(rows / 100) as u32 {
        let x: Vec<f32> = (0..100 * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let mut y = vec![0.0f32; 100 * d];
        for t in 0..100 {
            for h in 0..24 {
                let pre: f32 = (0..d).map(|i| x[t * d + i] * a[i * 24 + h]).sum();
                let act = pre.max(0.0).powi(2);
                for o in 0..d {
                    y[t * d + o] += act * b[h * d + o];
                }
            }
        }
        let pos: Vec<u32> = (0..100).collect();
        w_in.append::<f32>(&vec![doc; 100], &pos, &vec![7u32; 100], &x, None).unwrap();
        w_out.append::<f32>(&vec![doc; 100], &pos, &vec![7u32; 100], &y, None).unwrap();
    }
    w_in.finish().unwrap();
    w_out.finish().unwrap();
}

fn transcoder_args(store: &str) -> Vec<&str> {
    vec![
        "train-monet",
        "--store",
        store,
        "--hook",
        OUTPUT,
        "--input-hook",
        INPUT,
        "--name",
        "monet",
        "--experts",
        "8",
        "--heads",
        "2",
        "--topk",
        "2",
        "--dim",
        "8",
        "--batch",
        "128",
        "--tokens",
        "12800",
        "--checkpoint-every",
        "1",
        "--eval-tokens",
        "1000",
        "--lr",
        "0.005",
    ]
}

fn files(store: &Path) -> Vec<(String, Vec<u8>)> {
    ["cfg.json", "monet_weights.safetensors", "train_log.arrow", "eval.json"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(store.join("dictionaries/monet").join(f)).unwrap()))
        .collect()
}

#[test]
fn transcoder_killed_and_resumed_matches_uninterrupted() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    mlp_store(&a, 12_000);
    mlp_store(&b, 12_000);
    let out = loupe(&transcoder_args(a.to_str().unwrap()));
    assert!(out.status.success(), "uninterrupted run failed: {}", stderr(&out));
    let report = stderr(&out);
    assert!(report.contains("transcoder blocks.0.ln2.hook_normalized → blocks.0.hook_mlp_out"), "{report}");
    let eval: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("dictionaries/monet/eval.json")).unwrap()).unwrap();
    let fvu = eval["held_out"]["fvu"].as_f64().unwrap();
    assert!(fvu < 0.9, "the transcoder learned nothing: held-out FVU {fvu}");

    let kills = kill_while_training(&transcoder_args(b.to_str().unwrap()), &b, "monet", &[5, 40]);
    assert!(kills >= 1, "the run finished before it could be killed; the test did not test resume");
    let out = loupe(&transcoder_args(b.to_str().unwrap()));
    assert!(out.status.success(), "resumed run failed: {}", stderr(&out));
    assert!(stderr(&out).contains("resumed from the checkpoint"), "{}", stderr(&out));
    assert_eq!(dictionary_step(&b, "monet").unwrap().1, "done");
    for ((name, fa), (_, fb)) in files(&a).into_iter().zip(files(&b)) {
        assert!(fa == fb, "{name} differs between the uninterrupted and the killed+resumed run");
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b.join("manifest.json")).unwrap()).unwrap();
    let entry = &manifest["dictionaries"]["monet"];
    assert_eq!(entry["kind"], "monet");
    assert_eq!(entry["hook"], INPUT, "a transcoder is listed under the hook it reads");
    assert_eq!(entry["output_hook"], OUTPUT);
    assert_eq!(entry["variant"], "vd");
    assert_eq!(entry["n_features"], 64);
}

#[test]
fn autoencoder_from_toml_and_bad_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("s");
    mlp_store(&store, 3000);
    let s = store.to_str().unwrap();
    let config = tmp.path().join("monet.toml");
    std::fs::write(
        &config,
        format!(
            "store = {s:?}\nhook = {INPUT:?}\nname = \"ae\"\ndecomposition = \"horizontal\"\nexperts = 8\nheads = 2\n\
             topk = 2\ndim = 8\nbatch = 100\ntokens = 1000\neval_tokens = 500\n"
        ),
    )
    .unwrap();
    let out = loupe(&["train-monet", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("dictionaries/ae/cfg.json")).unwrap()).unwrap();
    assert_eq!(cfg["architecture"], "monet");
    assert_eq!(cfg["spec"]["decomposition"], "horizontal");
    assert_eq!(cfg["metadata"]["hook_name"], INPUT);

    let one_error = |args: &[&str], needle: &str| assert_one_error(&store, args, needle);
    let base =
        ["train-monet", "--store", s, "--experts", "8", "--heads", "2", "--dim", "8", "--batch", "100"];
    one_error(
        &[&base[..], &["--hook", OUTPUT, "--input-hook", "blocks.9.nope"]].concat(),
        "no activations for hook",
    );
    one_error(&[&base[..], &["--hook", OUTPUT, "--topk", "8"]].concat(), "topk = 8 must be between 1");
    one_error(&[&base[..], &["--hook", OUTPUT, "--decomposition", "diagonal"]].concat(), "expected hd or vd");
    one_error(&[&base[..], &["--hook", OUTPUT, "--name", "ae", "--topk", "2"]].concat(), "already trained");
}

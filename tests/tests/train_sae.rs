//! `loupe train-sae` end to end: a run killed (SIGKILL) and restarted ends with the same files as
//! an uninterrupted one; configs from TOML; bad settings get one clear error line.

use std::path::Path;

use loupe_store::{DType, HookSpec, Store};
use loupe_tests::{assert_one_error, dictionary_step, kill_while_training, loupe, stderr};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const HOOK: &str = "blocks.0.hook_resid_post";

/// A store with `rows` activations of width 32: sums of 4 of 64 planted directions plus noise,
/// with (random) gradients.
fn planted_store(dir: &Path, rows: usize) {
    let d = 32;
    let mut rng = StdRng::seed_from_u64(5);
    let atoms: Vec<f32> = (0..64 * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let store = Store::create(dir).unwrap();
    let spec = HookSpec { d: d as u32, dtype: DType::F32, grad: true };
    let mut writer = store.activation_writer(HOOK, spec).unwrap().with_shard_rows(3000);
    for doc in 0..(rows / 100) as u32 {
        let mut act = Vec::with_capacity(100 * d);
        for _ in 0..100 {
            let mut row: Vec<f32> = (0..d).map(|_| rng.random_range(-0.05f32..0.05)).collect();
            for _ in 0..4 {
                let a = rng.random_range(0..64);
                let c = rng.random_range(0.5f32..2.0);
                row.iter_mut().zip(&atoms[a * d..(a + 1) * d]).for_each(|(r, v)| *r += c * v);
            }
            act.extend(row);
        }
        let grad: Vec<f32> = (0..100 * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let pos: Vec<u32> = (0..100).collect();
        writer.append(&vec![doc; 100], &pos, &vec![7u32; 100], &act, Some(&grad)).unwrap();
    }
    writer.finish().unwrap();
}

fn train_args<'a>(store: &'a str, variant: &'a str) -> Vec<&'a str> {
    vec![
        "train-sae",
        "--store",
        store,
        "--hook",
        HOOK,
        "--name",
        "sae",
        "--variant",
        variant,
        "--n-features",
        "128",
        "--k",
        "4",
        "--batch",
        "128",
        "--tokens",
        "10240",
        "--checkpoint-every",
        "1",
        "--eval-tokens",
        "1000",
        "--dead-tokens",
        "512",
    ]
}

fn files(store: &Path) -> Vec<(String, Vec<u8>)> {
    ["cfg.json", "sae_weights.safetensors", "train_log.arrow", "eval.json"]
        .iter()
        .map(|f| (f.to_string(), std::fs::read(store.join("dictionaries/sae").join(f)).unwrap()))
        .collect()
}

fn killed_and_resumed_matches_uninterrupted(variant: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    planted_store(&a, 12_000);
    planted_store(&b, 12_000);

    let out = loupe(&train_args(a.to_str().unwrap(), variant));
    assert!(out.status.success(), "uninterrupted run failed: {}", stderr(&out));

    // Kill the second run twice while it trains, then let it finish.
    let kills = kill_while_training(&train_args(b.to_str().unwrap(), variant), &b, "sae", &[5, 30]);
    assert!(
        kills >= 1,
        "{variant}: the run finished before it could be killed; the test did not test resume"
    );
    let out = loupe(&train_args(b.to_str().unwrap(), variant));
    assert!(out.status.success(), "resumed run failed: {}", stderr(&out));
    assert!(stderr(&out).contains("resumed from the checkpoint"), "{}", stderr(&out));
    assert_eq!(dictionary_step(&b, "sae").unwrap().1, "done");
    let log = |s: &Path| {
        loupe_store::dictionaries::read_train_log(&s.join("dictionaries/sae/train_log.arrow")).unwrap()
    };
    let (la, lb) = (log(&a), log(&b));
    if let Some(i) = la.iter().zip(&lb).position(|(x, y)| x != y) {
        panic!("{variant}: training logs first differ at step {}: {:?} vs {:?}", la[i].step, la[i], lb[i]);
    }
    for ((name, fa), (_, fb)) in files(&a).into_iter().zip(files(&b)) {
        assert!(fa == fb, "{variant}: {name} differs between the uninterrupted and the killed+resumed run");
    }
    assert!(!b.join("dictionaries/sae/checkpoints").exists(), "checkpoints are removed when training ends");
}

#[test]
fn topk_killed_and_resumed_matches_uninterrupted() {
    killed_and_resumed_matches_uninterrupted("topk");
}

#[test]
fn feature_choice_killed_and_resumed_matches_uninterrupted() {
    killed_and_resumed_matches_uninterrupted("feature_choice");
}

#[test]
fn gsae_killed_and_resumed_matches_uninterrupted() {
    killed_and_resumed_matches_uninterrupted("gsae");
}

#[test]
fn config_file_and_bad_settings() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("s");
    planted_store(&store, 3000);
    let s = store.to_str().unwrap();

    let config = tmp.path().join("sae.toml");
    std::fs::write(
        &config,
        format!(
            "store = {s:?}\nhook = {HOOK:?}\nname = \"from-toml\"\nvariant = \"jumprelu\"\nn_features = 64\n\
             k = 4\nbatch = 100\ntokens = 1000\neval_tokens = 500\njumprelu_sparsity = \"quadratic\"\n"
        ),
    )
    .unwrap();
    let out = loupe(&["train-sae", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("dictionaries/from-toml/cfg.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["architecture"], "jumprelu");
    assert_eq!(cfg["d_sae"], 64);
    assert_eq!(cfg["loupe"]["variant"], "jumprelu");
    assert_eq!(cfg["loupe"]["train"]["jumprelu_sparsity"], "quadratic");
    assert_eq!(cfg["metadata"]["hook_name"], HOOK);

    let one_error = |args: &[&str], needle: &str| assert_one_error(&store, args, needle);
    let base = ["train-sae", "--store", s, "--n-features", "64", "--batch", "100", "--tokens", "500"];
    one_error(
        &[&base[..], &["--hook", "blocks.9.hook_resid_post", "--k", "4"]].concat(),
        "no activations for hook",
    );
    one_error(&[&base[..], &["--hook", HOOK, "--k", "4", "--name", "from-toml"]].concat(), "already trained");
    one_error(&[&base[..], &["--hook", HOOK, "--k", "0"]].concat(), "k = 0");
    one_error(
        &[&base[..], &["--hook", HOOK, "--k", "4", "--eval-tokens", "3000"]].concat(),
        "leaves nothing to train on",
    );
    one_error(
        &[&base[..], &["--hook", HOOK, "--variant", "jumprelu", "--jumprelu-bandwidth", "0"]].concat(),
        "jumprelu_bandwidth 0 must be a positive number",
    );
    one_error(
        &[&base[..], &["--hook", HOOK, "--absolute-thresholds"]].concat(),
        "applies to mutual_choice and feature_choice only",
    );
    one_error(
        &["train-sae", "--store", tmp.path().join("nope").to_str().unwrap(), "--hook", HOOK],
        "no store at",
    );
    std::fs::write(&config, "store = [1, 2\n").unwrap();
    one_error(&["train-sae", "--config", config.to_str().unwrap()], "is malformed");
    std::fs::write(&config, "stroe = \"x\"\n").unwrap();
    one_error(&["train-sae", "--config", config.to_str().unwrap()], "unknown field");
}

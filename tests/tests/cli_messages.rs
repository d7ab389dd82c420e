//! One clear line for faults in what a user hands the CLI: TOML configs (file, line, key and
//! reason), a zero-length or foreign model file, `--tokens 0`; and values printed plainly (no Rust
//! `Debug` forms such as `Some(2)`).

use std::path::Path;

use loupe_store::{DType, HookSpec, ModelInfo, Store, TokenizerInfo};
use loupe_tests::{HOOK, assert_one_error, loupe, stderr, tiny_model, write_synthetic};

fn make_store(dir: &Path) {
    let spec = HookSpec { d: 8, dtype: DType::F32, grad: false };
    write_synthetic(&Store::create(dir).unwrap(), HOOK, spec, 4, 50, 100, 3);
}

#[test]
fn config_errors_name_file_line_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    make_store(&store);
    let config = tmp.path().join("sae.toml");
    let cfg = config.to_str().unwrap();
    let head = format!("# an SAE\nstore = {:?}\nhook = \"{HOOK}\"\n", store.to_str().unwrap());

    let cases = [
        (
            "train-sae",
            "n_features = \"sixty-four\"\n",
            "line 4, key `n_features`: invalid type: string \"sixty-four\", expected a whole number",
        ),
        ("train-sae", "k = 4\nbatch = -3\n", "line 5, key `batch`: invalid value: integer `-3`"),
        (
            "train-sae",
            "lr = \"fast\"\n",
            "line 4, key `lr`: invalid type: string \"fast\", expected a number",
        ),
        ("train-sae", "variant = \"topkk\"\n", "line 4, key `variant`: unknown variant"),
        (
            "train-sae",
            "no_normalize = 1\n",
            "line 4, key `no_normalize`: invalid type: integer `1`, expected true or false",
        ),
        ("train-monet", "experts = \"many\"\n", "line 4, key `experts`"),
        ("train-sae", "\nstroe = \"x\"\n", "line 5: unknown field `stroe`"),
        ("train-sae", "k = [1, 2\n", "is malformed at line 4"),
    ];
    for (command, tail, needle) in cases {
        std::fs::write(&config, format!("{head}{tail}")).unwrap();
        let out = loupe(&[command, "--config", cfg]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{tail}: {err}");
        assert_eq!(err.lines().count(), 1, "{tail}: expected one line, got:\n{err}");
        assert!(err.starts_with(&format!("error: config {cfg}")), "{tail}: {err}");
        assert!(err.contains(needle), "{tail}: {err:?} does not contain {needle:?}");
        assert!(!err.contains("usize") && !err.contains("f32"), "{tail}: Rust type names in {err:?}");
    }
}

#[test]
fn zero_tokens_is_refused_from_the_flag_and_the_config() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    make_store(&store);
    let s = store.to_str().unwrap();
    let base = ["--store", s, "--hook", HOOK, "--batch", "10", "--eval-tokens", "20"];
    for command in ["train-sae", "train-monet"] {
        assert_one_error(&store, &[&[command][..], &base, &["--tokens", "0"]].concat(), "--tokens 0");
    }
    let config = tmp.path().join("c.toml");
    std::fs::write(&config, format!("store = {s:?}\nhook = \"{HOOK}\"\ntokens = 0\n")).unwrap();
    assert_one_error(&store, &["train-sae", "--config", config.to_str().unwrap()], "--tokens 0");
    assert!(
        !store.join("dictionaries").exists()
            || std::fs::read_dir(store.join("dictionaries")).unwrap().count() == 0
    );
}

#[test]
fn an_empty_or_foreign_model_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("model.gguf");
    std::fs::write(&empty, "").unwrap();
    let text = tmp.path().join("notes.gguf");
    std::fs::write(&text, "these are notes").unwrap();
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, "some text").unwrap();
    let store = tmp.path().join("store");
    for (model, needle) in [
        (&empty, format!("model file {} is empty (0 bytes), not a GGUF file", empty.display())),
        (&text, format!("{} is not a GGUF file", text.display())),
    ] {
        let m = model.to_str().unwrap();
        let capture = [
            "capture",
            "--model",
            m,
            "--corpus",
            corpus.to_str().unwrap(),
            "--store",
            store.to_str().unwrap(),
            "--hook",
            HOOK,
        ];
        for args in [&capture[..], &["tokenize", "--model", m, "hello"][..]] {
            let out = loupe(args);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
            assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
            assert!(err.starts_with("error: ") && err.contains(&needle), "{args:?}: {err}");
            assert!(!err.contains("failed to fill whole buffer"), "{err}");
        }
        assert!(!store.exists());
    }
}

#[test]
fn store_info_prints_token_ids_plainly() {
    let tmp = tempfile::tempdir().unwrap();
    let store = tmp.path().join("store");
    make_store(&store);
    let model = tiny_model(&tmp.path().join("model"));
    Store::open_rw(&store)
        .unwrap()
        .set_model(
            ModelInfo {
                name: "tiny".into(),
                architecture: "gpt2".into(),
                path: model.display().to_string(),
                sha256: "0".repeat(64),
            },
            Some(TokenizerInfo { kind: "hf".into(), vocab_size: 512, bos: Some(2), eos: None }),
        )
        .unwrap();
    let out = loupe(&["store", "info", store.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("tokenizer  hf vocab 512 bos 2 eos none"), "{stdout}");
    assert!(!stdout.contains("Some(") && !stdout.contains("None"), "{stdout}");
}

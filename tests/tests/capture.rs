//! `loupe capture` on the real Gemma 3 270M: output shape, resume after a kill (same store as an
//! uninterrupted run), and bad input.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use loupe_store::Store;
use loupe_tests::{gemma_gguf, loupe, loupe_bin, stderr};

const HOOKS: [&str; 2] = ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"];

fn corpus(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let moby = "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my \
                purse, and nothing particular to interest me on shore, I thought I would sail about a little and \
                see the watery part of the world.";
    for i in 0..6 {
        let text = format!("Document {i}. {}", moby.repeat(1 + i % 3));
        std::fs::write(dir.join(format!("doc{i:02}.txt")), text).unwrap();
    }
}

fn args<'a>(corpus: &'a str, store: &'a str, model: &'a str) -> Vec<&'a str> {
    let mut a = vec!["capture", "--model", model, "--corpus", corpus, "--store", store];
    for h in HOOKS {
        a.extend(["--hook", h]);
    }
    a.extend(["--context", "24", "--batch", "2", "--shard-rows", "60", "--dtype", "f16", "--with-grads"]);
    a
}

#[test]
fn capture_resumes_to_the_same_store_as_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let model = gemma_gguf();
    let model = model.to_str().unwrap();
    let corpus_dir = tmp.path().join("corpus");
    corpus(&corpus_dir);
    let corpus_dir = corpus_dir.to_str().unwrap();

    let whole = tmp.path().join("whole");
    let out = loupe(&args(corpus_dir, whole.to_str().unwrap(), model));
    assert!(out.status.success(), "capture failed: {}", stderr(&out));
    let whole_store = Store::open(&whole).unwrap();
    let m = whole_store.manifest();
    for hook in HOOKS {
        let acts = whole_store.activations(hook).unwrap();
        assert_eq!(acts.spec().d, 640);
        assert!(acts.spec().grad);
        assert!(acts.num_shards() >= 3, "expected several shards, got {}", acts.num_shards());
        let shard = acts.open_shard(0).unwrap();
        assert_eq!(shard.doc()[0], 0);
        assert_eq!(shard.pos()[0], 0, "the BOS position must not be stored");
    }
    assert!(m.capture.as_ref().unwrap()["complete"].as_bool().unwrap());

    // Kill a second run after its first commit, then run it again with the same arguments.
    let resumed = tmp.path().join("resumed");
    let mut killed_mid_run = false;
    for _attempt in 0..5 {
        let _ = std::fs::remove_dir_all(&resumed);
        let mut child = Command::new(loupe_bin())
            .args(args(corpus_dir, resumed.to_str().unwrap(), model))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        loop {
            if let Ok(store) = Store::open(&resumed)
                && store.manifest().hooks.values().next().is_some_and(|h| !h.shards.is_empty())
            {
                break;
            }
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().ok();
        child.wait().unwrap();
        let state = Store::open(&resumed).ok().and_then(|s| s.manifest().capture);
        if state.is_some_and(|c| !c["complete"].as_bool().unwrap()) {
            killed_mid_run = true;
            break;
        }
    }
    assert!(killed_mid_run, "could not stop a capture half-way in 5 attempts");
    let out = loupe(&args(corpus_dir, resumed.to_str().unwrap(), model));
    assert!(out.status.success(), "resumed capture failed: {}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("resumed at"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let again = Store::open(&resumed).unwrap().manifest();
    assert_eq!(again.hooks, m.hooks, "resumed store differs from the uninterrupted one");
    assert_eq!(again.capture, m.capture);
    let verify = loupe(&["store", "verify", resumed.to_str().unwrap()]);
    assert!(verify.status.success(), "{}", stderr(&verify));

    // Same arguments once more: nothing to do. Other arguments: refused, store untouched.
    let out = loupe(&args(corpus_dir, resumed.to_str().unwrap(), model));
    assert!(String::from_utf8_lossy(&out.stdout).contains("already complete"));
    let mut other = args(corpus_dir, resumed.to_str().unwrap(), model);
    let at = other.iter().position(|a| *a == "24").unwrap();
    other[at] = "16";
    let out = loupe(&other);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("context: stored 24, asked 16"), "{}", stderr(&out));
}

fn expect_error(args: &[&str], needle: &str) {
    let out = loupe(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{err}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{err}");
}

#[test]
fn capture_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let model = gemma_gguf();
    let model = model.to_str().unwrap();
    let corpus_dir = tmp.path().join("corpus");
    corpus(&corpus_dir);
    let store = tmp.path().join("store");
    let (c, s) = (corpus_dir.to_str().unwrap(), store.to_str().unwrap());
    let base = |m: &'static str| -> Vec<&str> {
        vec!["capture", "--corpus", c, "--store", s, "--hook", "blocks.0.hook_resid_post", "--model", m]
    };

    expect_error(&base("/nonexistent/model.gguf"), "model not found");
    let mut a =
        vec!["capture", "--corpus", c, "--store", s, "--model", model, "--hook", "blocks.0.hook_resid_pots"];
    expect_error(&a, "nearest valid hooks: blocks.0.hook_resid_post");
    a[8] = "blocks.0.hook_resid_post";
    a.extend(["--context", "40000"]);
    expect_error(&a, "exceeds the model's limit of 32768");
    assert!(!store.join("manifest.json").exists(), "a failed capture created a store");

    // Truncated GGUF.
    let truncated = tmp.path().join("truncated.gguf");
    let bytes = std::fs::read(model).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let t = truncated.to_str().unwrap().to_string();
    let a = vec!["capture", "--corpus", c, "--store", s, "--hook", "blocks.0.hook_resid_post", "--model", &t];
    expect_error(&a, "truncated");

    // A GGUF of another architecture (a tiny llama-style file written with candle's GGUF writer).
    let llama = tmp.path().join("llama.gguf");
    {
        use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
        let t =
            candle_core::Tensor::zeros((4, 32), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        let arch = gguf_file::Value::String("llama".into());
        let mut f = std::fs::File::create(&llama).unwrap();
        gguf_file::write(&mut f, &[("general.architecture", &arch)], &[("token_embd.weight", &q)]).unwrap();
    }
    let l = llama.to_str().unwrap().to_string();
    let a = vec!["capture", "--corpus", c, "--store", s, "--hook", "blocks.0.hook_resid_post", "--model", &l];
    expect_error(&a, "unsupported GGUF architecture \"llama\"; supported: gemma3");

    // A truncated safetensors file in an HF directory.
    let gpt2 = tmp.path().join("gpt2-truncated");
    std::fs::create_dir_all(&gpt2).unwrap();
    std::fs::copy(loupe_tests::fixture("gpt2-tiny/config.json"), gpt2.join("config.json")).unwrap();
    let weights = std::fs::read(loupe_tests::fixture("gpt2-tiny/model.safetensors")).unwrap();
    std::fs::write(gpt2.join("model.safetensors"), &weights[..weights.len() - 1000]).unwrap();
    let g = gpt2.to_str().unwrap().to_string();
    let a = vec!["capture", "--corpus", c, "--store", s, "--hook", "blocks.0.hook_resid_post", "--model", &g];
    expect_error(&a, "model.safetensors");
    assert!(!store.join("manifest.json").exists(), "a failed capture created a store");

    // Invalid UTF-8 in the corpus: skipped and counted.
    std::fs::write(corpus_dir.join("zz-bad.txt"), b"bad \xff\xfe bytes").unwrap();
    let out = loupe(&[
        "capture",
        "--corpus",
        c,
        "--store",
        s,
        "--model",
        model,
        "--hook",
        "blocks.0.hook_resid_post",
        "--context",
        "32",
        "--max-tokens",
        "10",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let _ = out; // max-tokens stops before the bad file; read the whole corpus in the next run
    let store2 = tmp.path().join("store2");
    let out = loupe(&[
        "capture",
        "--corpus",
        c,
        "--store",
        store2.to_str().unwrap(),
        "--model",
        model,
        "--hook",
        "blocks.0.hook_resid_post",
        "--context",
        "64",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("skipped 1 documents that are not valid UTF-8"), "{}", stderr(&out));
}

//! `loupe tokenize` through the binary: JSON output for the default Gemma GGUF and for an HF
//! directory, the tab-separated listing, and one clear error line for bad model paths.

use std::path::PathBuf;

use loupe_tests::{loupe, stderr};
use serde_json::{Value, json};

fn model(name: &str) -> PathBuf {
    let cache = match std::env::var_os("LOUPE_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache").join("loupe"),
    };
    let path = cache.join("models").join(name);
    assert!(path.exists(), "{} is missing: run `loupe fetch` first (or set LOUPE_CACHE)", path.display());
    path
}

fn json_of(args: &[&str]) -> Value {
    let out = loupe(args);
    assert!(out.status.success(), "loupe {args:?} failed: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

#[test]
fn json_output_has_ids_and_tokens_with_bos() {
    let gguf = model("gemma-3-270m-q4_k_m.gguf");
    let gguf = gguf.to_str().unwrap();
    let text = "The capital of France is Paris.";
    // Ids from tests/fixtures/gemma3/tokenizer_reference.json (transformers).
    assert_eq!(
        json_of(&["tokenize", "--model", gguf, "--json", text]),
        json!({
            "ids": [2, 818, 5279, 529, 7001, 563, 9079, 236761],
            "tokens": ["<bos>", "The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", "."],
        })
    );
    assert_eq!(
        json_of(&["tokenize", "--model", gguf, "--json", "--no-bos", "a b"])["tokens"],
        json!(["a", "▁b"])
    );

    let minilm = model("all-MiniLM-L6-v2");
    assert_eq!(
        json_of(&["tokenize", "--model", minilm.to_str().unwrap(), "--json", "Hello world"]),
        json!({"ids": [101, 7592, 2088, 102], "tokens": ["[CLS]", "hello", "world", "[SEP]"]})
    );
}

#[test]
fn lines_show_whitespace() {
    let gguf = model("gemma-3-270m-q4_k_m.gguf");
    let out = loupe(&["tokenize", "--model", gguf.to_str().unwrap(), "Hi\n\tyou"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first(), Some(&"2\t\"<bos>\""));
    assert!(lines.contains(&"107\t\"\\n\""), "{stdout}");
    assert!(lines.contains(&"255968\t\"\\t\""), "{stdout}");
}

#[test]
fn bad_model_paths_give_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let not_gguf = dir.path().join("model.gguf");
    std::fs::write(&not_gguf, "this is not a GGUF file").unwrap();
    let missing = dir.path().join("missing.gguf");
    for (path, expect) in [
        (not_gguf.as_path(), "is not a GGUF file"),
        (dir.path(), "has no tokenizer.json"),
        (missing.as_path(), "does not exist"),
    ] {
        let out = loupe(&["tokenize", "--model", path.to_str().unwrap(), "hello"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{path:?}: {err}");
        assert!(out.stdout.is_empty(), "{path:?} printed tokens");
        assert_eq!(err.lines().count(), 1, "{path:?}: expected one line, got:\n{err}");
        assert!(err.starts_with("error: ") && err.contains(expect), "{path:?}: {err}");
    }
}

/// `loupe tokenize --model <model> --json -` with `input` on standard input.
fn tokenize_stdin(model: &std::path::Path, input: &[u8]) -> std::process::Output {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(loupe_tests::loupe_bin())
        .args(["tokenize", "--model", model.to_str().unwrap(), "--json", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    out
}

#[test]
fn dash_reads_the_text_from_stdin() {
    let tmp = tempfile::tempdir().unwrap();
    let model = loupe_tests::tiny_model(tmp.path());
    // A NUL byte cannot pass through argv; stdin keeps it (and the trailing newline).
    let out = tokenize_stdin(&model, b"a\0b\n");
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["tokens"], json!(["a", "\u{0}", "b", "\n"]));
    assert_eq!(json["ids"], json!([69, 1, 70, 3]));

    // 4 MiB: far over the 128 KiB a single argument may hold.
    let long = "whale ".repeat(700_000);
    let out = tokenize_stdin(&model, long.as_bytes());
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["ids"].as_array().unwrap().len(), long.len());

    let out = tokenize_stdin(&model, b"caf\xe9");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim(), "error: standard input is not UTF-8 text (invalid byte at offset 3)");
}

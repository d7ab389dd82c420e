//! `loupe capture` on corpora a careful user and a hostile file would give it, with the tiny GPT-2
//! fixture (no download): empty and binary corpora and zero counts are refused with one line and
//! no store; one huge JSONL line costs memory in proportion to what `--max-tokens` uses; a capture
//! does not resume on a corpus edited in place (same size), while a store from before the corpus
//! hash was recorded still resumes.

use std::path::{Path, PathBuf};
use std::process::Command;

use loupe_tests::{loupe, loupe_bin, snapshot, stderr, tiny_model};

fn capture_args(model: &Path, corpus: &Path, store: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> =
        ["capture", "--model", "", "--corpus", "", "--store", ""].iter().map(|s| s.to_string()).collect();
    a[2] = model.display().to_string();
    a[4] = corpus.display().to_string();
    a[6] = store.display().to_string();
    for s in ["--hook", "blocks.0.hook_resid_post", "--no-bos", "--context", "16", "--batch", "2"] {
        a.push(s.to_string());
    }
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn run(args: &[String]) -> std::process::Output {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    loupe(&args)
}

/// Exactly one `error:` line containing `needle`, exit 1.
fn expect_one_error(args: &[String], needle: &str) {
    let out = run(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one error line, got:\n{err}");
    assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{args:?}: {err}");
}

#[test]
fn empty_and_binary_corpora_and_zero_counts_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    let store = tmp.path().join("store");

    let empty = tmp.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let blank = tmp.path().join("blank");
    std::fs::create_dir_all(&blank).unwrap();
    std::fs::write(blank.join("a.txt"), "").unwrap();
    std::fs::write(blank.join("b.jsonl"), "\n  \n{\"text\": \"\"}\n\n").unwrap();
    let binary = tmp.path().join("weights.bin");
    std::fs::write(&binary, [0x93u8, 0xff, 0x00, 0x81, 0xfe, 0x12, 0xc0]).unwrap();
    let binaries = tmp.path().join("binaries");
    std::fs::create_dir_all(&binaries).unwrap();
    std::fs::write(binaries.join("a.bin"), [0xffu8, 0xfe]).unwrap();
    std::fs::write(binaries.join("b.bin"), [0x80u8]).unwrap();

    let empty_needle = format!("corpus {} is empty", empty.display());
    expect_one_error(&capture_args(&model, &empty, &store, &[]), &empty_needle);
    expect_one_error(
        &capture_args(&model, &blank, &store, &[]),
        "is empty: none of its documents holds any text",
    );
    let binary_needle = format!("{} is not UTF-8 text", binary.display());
    expect_one_error(&capture_args(&model, &binary, &store, &[]), &binary_needle);
    let a_bin = format!("{} is not UTF-8 text (and 1 more like it)", binaries.join("a.bin").display());
    expect_one_error(&capture_args(&model, &binaries, &store, &[]), &a_bin);

    let good = tmp.path().join("good.txt");
    std::fs::write(&good, "Call me Ishmael. Some years ago, never mind how long precisely.").unwrap();
    expect_one_error(&capture_args(&model, &good, &store, &["--max-tokens", "0"]), "--max-tokens");
    expect_one_error(&capture_args(&model, &good, &store, &["--shard-rows", "0"]), "--shard-rows");
    assert!(!store.exists(), "a refused capture created the store");

    let out = run(&capture_args(&model, &good, &store, &[]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("captured 63 tokens"), "{:?}", out);
}

/// Runs `command` to the end and returns its output with its own peak resident memory (KiB).
///
/// `wait4` reports the one child it reaps; `getrusage(RUSAGE_CHILDREN)` would report the largest
/// child of the whole test binary, which runs many other tests' commands.
fn output_and_max_rss_kib(mut command: Command) -> (std::process::Output, i64) {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    // Reaped by the wait4 below, which std cannot see.
    #[allow(clippy::zombie_processes)]
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut out_pipe = child.stdout.take().unwrap();
    let mut err_pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        out_pipe.read_to_end(&mut buf).unwrap();
        buf
    });
    let mut stderr_bytes = Vec::new();
    err_pipe.read_to_end(&mut stderr_bytes).unwrap();
    let stdout_bytes = reader.join().unwrap();
    let mut status = 0;
    // SAFETY: wait4 reaps the child we spawned and only writes into the two values it is given;
    // `child` is not waited on again.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(
            libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage),
            child.id() as libc::pid_t
        );
        usage
    };
    let output = std::process::Output {
        status: std::process::ExitStatus::from_raw(status),
        stdout: stdout_bytes,
        stderr: stderr_bytes,
    };
    (output, usage.ru_maxrss)
}

#[test]
fn one_huge_jsonl_line_costs_only_what_max_tokens_uses() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    let corpus = tmp.path().join("corpus.jsonl");
    let line_bytes = 50 << 20;
    {
        let mut text = String::with_capacity(line_bytes + 64);
        text.push_str("{\"source\": {\"nested\": [1, \"}\"]}, \"text\": \"");
        while text.len() < line_bytes {
            text.push_str("Call me Ishmael. \\n");
        }
        text.push_str("\"}\n{\"text\": \"a second document\"}\n");
        std::fs::write(&corpus, text).unwrap();
    }
    let store = tmp.path().join("store");
    let args = capture_args(&model, &corpus, &store, &["--max-tokens", "300"]);
    let mut command = Command::new(loupe_bin());
    command.args(&args);
    let (out, max_rss_kib) = output_and_max_rss_kib(command);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    // 300 tokens, rounded up to a whole batch of 2 contexts of 16.
    assert!(stdout.contains("captured 320 tokens"), "{stdout}");
    // The capture reads 64 KiB of the line at most (11 KiB to tokenize for the run, 64 KiB to see
    // that the corpus has text); a reader that reads the line whole holds 50 MiB twice over (the
    // raw line and its decoded text), and tokenizing it all took 7.2 GB with Gemma.
    let peak_mib = max_rss_kib / 1024;
    println!("peak RSS of capture: {peak_mib} MiB for a {} MiB line", line_bytes >> 20);
    assert!(peak_mib < 64, "capture of 300 tokens from a 50 MiB line peaked at {peak_mib} MiB");

    // The captured tokens are the start of the document's text (escapes decoded).
    let shard = loupe_store::Store::open(&store).unwrap().activations("blocks.0.hook_resid_post").unwrap();
    let tokens = shard.open_shard(0).unwrap().token().to_vec();
    let text: String = "Call me Ishmael. \n".repeat(20);
    let expected: Vec<u32> = text.chars().take(tokens.len()).map(char_id).collect();
    assert_eq!(tokens, expected);
}

/// The tiny tokenizer's id of a printable ASCII character or newline.
fn char_id(c: char) -> u32 {
    match c {
        '\n' => 3,
        c => c as u32 - ' ' as u32 + 4,
    }
}

fn set_capture(store: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = store.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut m["capture"]);
    std::fs::write(path, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

#[test]
fn capture_does_not_resume_on_an_edited_corpus() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(&tmp.path().join("model"));
    let corpus: PathBuf = tmp.path().join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    for i in 0..3 {
        std::fs::write(corpus.join(format!("doc{i}.txt")), format!("Document {i}: the whale, the sea."))
            .unwrap();
    }
    let store = tmp.path().join("store");
    let args = capture_args(&model, &corpus, &store, &["--shard-rows", "20"]);
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("manifest.json")).unwrap()).unwrap();
    let hash = manifest["capture"]["settings"]["corpus_xxh3"].as_str().expect("corpus hash recorded");
    assert_eq!(hash.len(), 32);

    // An interrupted capture (its state says unfinished), then doc1 edited in place: same size.
    set_capture(&store, |c| c["complete"] = false.into());
    std::fs::write(corpus.join("doc1.txt"), "Document 1: the whale, the SEA.").unwrap();
    let before = snapshot(&store);
    expect_one_error(&args, "changed since it began");
    assert_eq!(before, snapshot(&store), "a refused resume changed the store");

    // A store written before the hash was recorded resumes as it did then.
    set_capture(&store, |c| {
        c["settings"].as_object_mut().unwrap().remove("corpus_xxh3");
    });
    let out = run(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("resumed at"), "{out:?}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(store.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["capture"]["complete"], true);
    assert!(manifest["capture"]["settings"].get("corpus_xxh3").is_none());
    let verify = loupe(&["store", "verify", store.to_str().unwrap()]);
    assert!(verify.status.success(), "{}", stderr(&verify));
}

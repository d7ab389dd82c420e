//! `loupe fetch --check` against an empty cache: one clear error naming the first missing file, and
//! nothing created. (A real fetch needs the registries; `scripts/demo.sh` runs it.)

use loupe_tests::stderr;

#[test]
fn check_on_an_empty_cache_fails_clearly_and_writes_nothing() {
    let cache = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(loupe_tests::loupe_bin())
        .args(["fetch", "--check"])
        .env("LOUPE_CACHE", cache.path())
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("models/gemma-3-270m-q4_k_m.gguf"), "{err}");
    assert_eq!(std::fs::read_dir(cache.path()).unwrap().count(), 0, "--check wrote into the cache");
}

#[test]
fn pinned_sums_cover_the_three_defaults() {
    let sums = include_str!("../../assets/defaults.sha256");
    let gguf =
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  models/gemma-3-270m-q4_k_m.gguf";
    assert!(sums.lines().any(|l| l == gguf));
    for file in [
        "models/all-MiniLM-L6-v2/model.safetensors",
        "models/all-MiniLM-L6-v2/tokenizer.json",
        "corpus/moby-dick/data.txt",
    ] {
        assert!(sums.lines().any(|l| l.ends_with(&format!("  {file}"))), "{file} is not pinned");
    }
    assert_eq!(sums.lines().filter(|l| l.contains("  corpus/sotu/")).count(), 233);
}

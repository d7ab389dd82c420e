//! Shared helpers for Loupe's end-to-end tests: synthetic activation stores, running the `loupe`
//! binary, and snapshots of a store's files (to prove a failing command left them untouched).

pub mod planted;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use half::f16;
use loupe_store::{DType, HookSpec, Store, Values};
use rand::{Rng, SeedableRng};

pub const HOOK: &str = "blocks.0.hook_resid_post";

/// The `loupe` binary of this build (`cargo build --workspace` puts it next to the test binaries).
pub fn loupe_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/..");
    let bin = dir.join(format!("loupe{}", std::env::consts::EXE_SUFFIX));
    assert!(bin.exists(), "{} is missing: run `cargo build --workspace` before the tests", bin.display());
    bin
}

/// Run `loupe` with `args`.
pub fn loupe(args: &[&str]) -> Output {
    Command::new(loupe_bin()).args(args).output().expect("run loupe")
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Rows written to a synthetic store, in write order.
#[derive(Clone, Debug, PartialEq)]
pub struct Rows {
    pub doc: Vec<u32>,
    pub pos: Vec<u32>,
    pub token: Vec<u32>,
    pub act: Values,
    pub grad: Option<Values>,
}

/// Random finite values of the given type; f16 values are drawn as raw bit patterns (all
/// exponents, subnormals and both zeros), so that a round trip checks bits, not just values.
pub fn random_values(dtype: DType, n: usize, rng: &mut impl Rng) -> Values {
    match dtype {
        DType::F16 => Values::F16(
            (0..n)
                .map(|_| {
                    loop {
                        let v = f16::from_bits(rng.random());
                        if v.is_finite() {
                            break v;
                        }
                    }
                })
                .collect(),
        ),
        DType::F32 => Values::F32(
            (0..n)
                .map(|_| {
                    loop {
                        let v = f32::from_bits(rng.random());
                        if v.is_finite() {
                            break v;
                        }
                    }
                })
                .collect(),
        ),
    }
}

/// Write `docs` documents of `doc_len` positions to `hook`, appending in uneven pieces so that
/// appends straddle shard boundaries. Returns what was written.
pub fn write_synthetic(
    store: &Store,
    hook: &str,
    spec: HookSpec,
    docs: u32,
    doc_len: u32,
    shard_rows: usize,
    seed: u64,
) -> Rows {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let d = spec.d as usize;
    let n = (docs * doc_len) as usize;
    let rows = Rows {
        doc: (0..docs).flat_map(|doc| std::iter::repeat_n(doc, doc_len as usize)).collect(),
        pos: (0..docs).flat_map(|_| 0..doc_len).collect(),
        token: (0..n).map(|_| rng.random_range(0..50_000)).collect(),
        act: random_values(spec.dtype, n * d, &mut rng),
        grad: spec.grad.then(|| random_values(spec.dtype, n * d, &mut rng)),
    };
    let mut writer = store.activation_writer(hook, spec).expect("writer").with_shard_rows(shard_rows);
    let mut start = 0;
    let mut piece = 1;
    while start < n {
        let end = (start + piece).min(n);
        let r = start..end;
        match (&rows.act, &rows.grad) {
            (Values::F16(a), g) => {
                let g = g.as_ref().map(|g| match g {
                    Values::F16(g) => &g[r.start * d..r.end * d],
                    _ => unreachable!(),
                });
                writer.append(
                    &rows.doc[r.clone()],
                    &rows.pos[r.clone()],
                    &rows.token[r.clone()],
                    &a[r.start * d..r.end * d],
                    g,
                )
            }
            (Values::F32(a), g) => {
                let g = g.as_ref().map(|g| match g {
                    Values::F32(g) => &g[r.start * d..r.end * d],
                    _ => unreachable!(),
                });
                writer.append(
                    &rows.doc[r.clone()],
                    &rows.pos[r.clone()],
                    &rows.token[r.clone()],
                    &a[r.start * d..r.end * d],
                    g,
                )
            }
        }
        .expect("append");
        start = end;
        piece = piece * 3 % 37 + 1;
    }
    writer.finish().expect("finish");
    rows
}

/// Every file under `dir` with its contents (small test stores only).
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.insert(path.clone(), std::fs::read(&path).expect("read"));
            }
        }
    }
    out
}

/// The default Gemma 3 270M GGUF in the cache; panics with the fix when it is missing.
pub fn gemma_gguf() -> PathBuf {
    cached("models/gemma-3-270m-q4_k_m.gguf")
}

/// The all-MiniLM-L6-v2 HF directory in the cache; panics with the fix when it is missing.
pub fn minilm_dir() -> PathBuf {
    cached("models/all-MiniLM-L6-v2/model.safetensors").parent().expect("model dir").to_path_buf()
}

/// A file fetched into `$LOUPE_CACHE` (default `~/.cache/loupe`); panics with the fix when missing.
fn cached(rel: &str) -> PathBuf {
    let cache = std::env::var_os("LOUPE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/loupe"));
    let path = cache.join(rel);
    assert!(path.exists(), "{} is missing: run `loupe fetch` (scripts/test.sh does)", path.display());
    path
}

/// A committed fixture file under `tests/fixtures/`.
pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(rel)
}

/// The listed step and status of dictionary `name` in `store` (None before its first listing).
pub fn dictionary_step(store: &Path, name: &str) -> Option<(u64, String)> {
    let text = std::fs::read_to_string(store.join("manifest.json")).ok()?;
    let manifest: serde_json::Value = serde_json::from_str(&text).ok()?;
    let entry = &manifest["dictionaries"][name];
    Some((entry["step"].as_u64()?, entry["status"].as_str()?.to_string()))
}

/// Run `loupe args` once per entry of `kill_at`, SIGKILLing it as soon as dictionary `name` is
/// listed as training at that step or later; after each kill the store must pass `store verify`.
/// Returns how many runs were killed (a run may finish first).
pub fn kill_while_training(args: &[&str], store: &Path, name: &str, kill_at: &[u64]) -> usize {
    let mut kills = 0;
    for &at in kill_at {
        let mut child =
            Command::new(loupe_bin()).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        let start = Instant::now();
        loop {
            match dictionary_step(store, name) {
                Some((step, status)) if status == "training" && step >= at => {
                    child.kill().unwrap();
                    kills += 1;
                    break;
                }
                Some((_, status)) if status == "done" => break,
                _ => {}
            }
            if child.try_wait().unwrap().is_some() || start.elapsed() > Duration::from_secs(60) {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        child.wait().unwrap();
        let verify = loupe(&["store", "verify", store.to_str().unwrap()]);
        assert!(verify.status.success(), "killed run left a store that fails verify: {}", stderr(&verify));
    }
    kills
}

/// `loupe args` must fail with exactly one error line that mentions `needle` (clap's "For more
/// information" hint aside), leaving `store`'s manifest as it was.
pub fn assert_one_error(store: &Path, args: &[&str], needle: &str) {
    let before = std::fs::read(store.join("manifest.json")).unwrap();
    let out = loupe(args);
    let err = stderr(&out);
    assert!(!out.status.success(), "{args:?} should fail");
    let lines =
        err.lines().filter(|l| !l.trim().is_empty() && !l.starts_with("For more information")).count();
    assert_eq!(lines, 1, "{args:?}: expected one error line, got {err}");
    assert!(err.contains(needle), "{args:?}: {err:?} does not mention {needle:?}");
    assert_eq!(before, std::fs::read(store.join("manifest.json")).unwrap(), "{args:?} changed the manifest");
}

/// A model that needs no download: the 2-layer random GPT-2 fixture (vocab 512, 64 positions) in
/// `dir`, with a character-level WordLevel `tokenizer.json` (printable ASCII, `\n`, `\t` and NUL;
/// anything else is `[UNK]`, id 0) and no BOS token. Returns `dir`.
pub fn tiny_model(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(fixture(&format!("gpt2-tiny/{file}")), dir.join(file)).unwrap();
    }
    let mut vocab = serde_json::Map::new();
    vocab.insert("[UNK]".into(), 0.into());
    for c in ['\0', '\t', '\n'].into_iter().chain(' '..='~') {
        vocab.insert(c.to_string(), (vocab.len() as u32).into());
    }
    let tokenizer = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(?s)."}, "behavior": "Isolated", "invert": false},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"},
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_vec(&tokenizer).unwrap()).unwrap();
    dir.to_path_buf()
}

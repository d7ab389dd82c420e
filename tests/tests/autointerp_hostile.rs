//! `loupe explain` and `loupe score` against hostile or failing OpenAI-compatible endpoints (a
//! scripted axum server on loopback, over the planted dictionary's analysis):
//! - an endpoint that echoes the Authorization header: the key is in no file, output or export;
//! - a 10 MB answer and a 50,000-character explanation: recorded as failures, nothing stored whole;
//! - every request refused: each one counted, one error line, a non-zero exit, every row kept;
//! - `Retry-After: 86400`: the wait is announced; an endpoint that keeps failing: the run stops
//!   retrying and says so;
//! - an `--llm-config` with a wrong type: one line with the file, the line, the key and why;
//! - a second explain run embeds only the new explanations for the search index.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use loupe_store::Store;
use loupe_tests::planted::{N, planted_store, planted_values};
use loupe_tests::{loupe, loupe_bin, stderr};

/// What the server is asked: an explanation or a score (a 0/1 list).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Explain,
    Score,
}

/// One request as the script sees it: its kind, its number among requests of that kind, the
/// Authorization header and the last user message.
struct Req<'a> {
    kind: Kind,
    n: usize,
    auth: &'a str,
    user: &'a str,
}

type Script = Box<dyn Fn(&Req) -> Response + Send + Sync>;

struct Server {
    script: Script,
    explain: AtomicUsize,
    score: AtomicUsize,
    auth: Mutex<HashSet<String>>,
}

impl Server {
    fn sent(&self, kind: Kind) -> usize {
        match kind {
            Kind::Explain => self.explain.load(Ordering::SeqCst),
            Kind::Score => self.score.load(Ordering::SeqCst),
        }
    }
}

async fn handle(State(s): State<Arc<Server>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let auth = headers.get("authorization").map_or("", |a| a.to_str().unwrap()).to_string();
    s.auth.lock().unwrap().insert(auth.clone());
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let messages = body["messages"].as_array().unwrap();
    let system = messages[0]["content"].as_str().unwrap();
    let user = messages.last().unwrap()["content"].as_str().unwrap();
    let (kind, counter) =
        if system.contains("[EXPLANATION]") { (Kind::Explain, &s.explain) } else { (Kind::Score, &s.score) };
    let n = counter.fetch_add(1, Ordering::SeqCst);
    (s.script)(&Req { kind, n, auth: &auth, user })
}

/// Start `script` on a server of its own; returns the server and its base URL.
fn serve(script: Script) -> (Arc<Server>, String) {
    let server = Arc::new(Server {
        script,
        explain: AtomicUsize::new(0),
        score: AtomicUsize::new(0),
        auth: Mutex::default(),
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let state = server.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let app = Router::new().route("/v1/chat/completions", post(handle)).with_state(state);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (server, format!("http://{}/v1", rx.recv().unwrap()))
}

fn completion(text: &str) -> Response {
    let body = serde_json::json!({
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 10},
    });
    ([("content-type", "application/json")], body.to_string()).into_response()
}

/// A good answer of either kind.
fn good(r: &Req) -> Response {
    match r.kind {
        Kind::Explain => {
            let token = r.user.split("<<").nth(1).and_then(|t| t.split(">>").next()).unwrap_or("?");
            completion(&format!("[EXPLANATION]: the token {token} (request {})", r.n))
        }
        Kind::Score => {
            let n = r.user.lines().filter(|l| l.starts_with("Text ")).count();
            completion(&format!("[{}]", vec!["1"; n].join(", ")))
        }
    }
}

fn status(code: u16, headers: &[(&'static str, &str)], body: String) -> Response {
    let mut r = (StatusCode::from_u16(code).unwrap(), body).into_response();
    for (k, v) in headers {
        r.headers_mut().insert(*k, v.parse().unwrap());
    }
    r
}

/// One request at a time, one retry.
const ONE: &str = "concurrency = 1\nmax_retries = 1\n";

/// A store with the planted dictionary `sae` analysed, and an LLM config for `url` with
/// `settings` (TOML lines).
fn setup(dir: &Path, url: &str, settings: &str) -> (PathBuf, PathBuf) {
    let store = dir.join("store");
    drop(planted_store(&store, &planted_values()));
    let out = loupe(&["analyze", "--store", store.to_str().unwrap(), "--dictionary", "sae", "--no-index"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cfg = dir.join("llm.toml");
    std::fs::write(
        &cfg,
        format!(
            "base_url = \"{url}\"\nmodel = \"scripted\"\ntimeout_seconds = 5\nbackoff_seconds = 0.01\n{settings}"
        ),
    )
    .unwrap();
    (store, cfg)
}

/// `loupe <command>` on `store` with the LLM config, no cache, small example sets, and no
/// embedder (none is found in the empty `LOUPE_CACHE`).
fn run(command: &str, store: &Path, cfg: &Path, extra: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(loupe_bin());
    cmd.args([command, "--store", store.to_str().unwrap(), "--dictionary", "sae"])
        .args(["--llm-config", cfg.to_str().unwrap(), "--no-cache"])
        .args(["--train-examples", "8", "--test-examples", "8"])
        .args(extra)
        .env("LOUPE_CACHE", "/nonexistent-loupe-cache");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn live() -> usize {
    N - 1
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The lines of stderr that are errors.
fn error_lines(out: &Output) -> Vec<String> {
    stderr(out).lines().filter(|l| l.starts_with("error:")).map(str::to_string).collect()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

/// A file's text as a reader sees it: Parquet decoded to its values, gzip inflated, others raw.
fn readable(path: &Path) -> String {
    let name = path.to_string_lossy();
    if name.ends_with(".parquet") {
        let file = std::fs::File::open(path).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        return reader.map(|b| format!("{:?}", b.unwrap())).collect();
    }
    let bytes = std::fs::read(path).unwrap();
    if name.ends_with(".gz") {
        let mut text = String::new();
        flate2::read::GzDecoder::new(&bytes[..]).read_to_string(&mut text).unwrap();
        return text;
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

#[test]
fn an_echoed_api_key_is_redacted_everywhere() {
    const KEY: &str = "sk-echoed-71c3b9e0aa4f52d8";
    let tmp = tempfile::tempdir().unwrap();
    // Explanations: refused with the header in the body, answered with the header in the
    // explanation, or failing with it (500) until retries run out. Scores: the header instead of
    // a list.
    let (server, url) = serve(Box::new(|r: &Req| match (r.kind, r.n % 3) {
        (Kind::Explain, 0) => status(401, &[], format!("{{\"error\": \"bad key: {}\"}}", r.auth)),
        (Kind::Explain, 1) => completion(&format!("[EXPLANATION]: the header {}", r.auth)),
        (Kind::Explain, _) => status(500, &[], format!("upstream saw {}", r.auth)),
        (Kind::Score, _) => completion(&format!("I only see {}", r.auth)),
    }));
    // No retries: a 500 is the request's last word.
    let (store, cfg) =
        setup(tmp.path(), &url, "concurrency = 1\nmax_retries = 0\napi_key_env = \"LOUPE_ECHO_KEY\"\n");
    let env = [("LOUPE_ECHO_KEY", KEY)];
    let cache = tmp.path().join("cache");
    let cached = ["--cache", cache.to_str().unwrap()];
    let explain = {
        let mut cmd = Command::new(loupe_bin());
        cmd.args(["explain", "--store", store.to_str().unwrap(), "--dictionary", "sae"])
            .args(["--llm-config", cfg.to_str().unwrap(), "--train-examples", "8"])
            .args(cached)
            .env("LOUPE_CACHE", tmp.path().join("no-models"))
            .envs(env);
        cmd.output().unwrap()
    };
    let score = run("score", &store, &cfg, &["--scorers", "detection"], &env);
    let export_dir = tmp.path().join("export");
    let export = Command::new(loupe_bin())
        .args(["export", "--store", store.to_str().unwrap(), "--dictionary", "sae"])
        .args(["--out", export_dir.to_str().unwrap(), "--model-id", "planted"])
        .output()
        .unwrap();
    assert!(explain.status.success(), "{}", stderr(&explain));
    assert!(export.status.success(), "{}", stderr(&export));
    assert_eq!(*server.auth.lock().unwrap(), HashSet::from([format!("Bearer {KEY}")]));

    // The endpoint's strings were kept, with the key replaced.
    let all = Store::open(&store).unwrap().explanations("sae").unwrap();
    let text: String = all
        .explanations
        .iter()
        .flat_map(|e| [e.explanation.clone(), e.failure.clone()])
        .chain(all.scores.iter().map(|s| s.failure.clone()))
        .flatten()
        .collect::<Vec<_>>()
        .join("\n");
    for seen in
        ["bad key: Bearer [redacted]", "the header Bearer [redacted]", "upstream saw Bearer [redacted]"]
    {
        assert!(text.contains(seen), "{seen:?} not in {text}");
    }
    assert!(all.scores.iter().any(|s| s.failure.as_deref().is_some_and(|f| f.contains("Bearer [redacted]"))));

    for out in [&explain, &score, &export] {
        for stream in [stdout(out), stderr(out)] {
            assert!(!stream.contains(KEY), "{stream}");
        }
    }
    assert!(stdout(&explain).contains("[redacted]"), "the failures are printed: {}", stdout(&explain));
    let files: Vec<PathBuf> = [store, cache.clone(), export_dir].iter().flat_map(|d| walk(d)).collect();
    assert!(files.iter().any(|f| f.to_string_lossy().ends_with(".parquet")));
    assert!(files.iter().any(|f| f.to_string_lossy().ends_with(".jsonl.gz")));
    assert!(files.iter().any(|f| f.to_string_lossy().ends_with(".json") && f.starts_with(&cache)));
    for file in files {
        assert!(!readable(&file).contains(KEY), "{} holds the key", file.display());
    }
}

#[test]
fn huge_answers_become_failures_and_a_run_that_did_nothing_exits_nonzero() {
    let tmp = tempfile::tempdir().unwrap();
    // Even requests: a 10 MB answer; odd ones: a 50,000-character explanation.
    let (server, url) = serve(Box::new(|r: &Req| {
        if r.n.is_multiple_of(2) {
            completion(&"whale ".repeat((10 << 20) / 6))
        } else {
            completion(&format!("[EXPLANATION]: {}", "very ".repeat(10_000)))
        }
    }));
    let (store, cfg) = setup(tmp.path(), &url, ONE);
    let out = run("explain", &store, &cfg, &[], &[]);
    assert!(!out.status.success(), "{}", stdout(&out));
    let errors = error_lines(&out);
    assert_eq!(errors.len(), 1, "{}", stderr(&out));
    assert!(
        errors[0].contains(&format!("no feature could be explained: all {} failed", live())),
        "{errors:?}"
    );
    let sent = server.sent(Kind::Explain);
    assert_eq!(sent, live(), "one request per feature: a large answer is not retried");
    assert!(stdout(&out).contains(&format!("{sent} requests sent (0 of them retries)")), "{}", stdout(&out));

    let s = Store::open(&store).unwrap();
    let all = s.explanations("sae").unwrap();
    assert_eq!(all.explanations.len(), live(), "every feature has a row");
    for e in &all.explanations {
        let why = e.failure.as_deref().unwrap();
        assert!(e.explanation.is_none() && why.len() < 400, "{why}");
        assert!(
            why.contains("larger than 1048576 bytes")
                || why.contains("characters long, more than the 2000 kept"),
            "{why}"
        );
    }
    let tables = walk(&s.explanations_dir("sae"));
    let bytes: u64 = tables.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
    assert!(!tables.is_empty() && bytes < 64 << 10, "nothing was stored whole: {bytes} bytes in {tables:?}");
    assert!(loupe(&["store", "verify", store.to_str().unwrap()]).status.success());
}

#[test]
fn every_request_refused_is_counted_and_fails_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, url) = serve(Box::new(|_: &Req| status(400, &[], "model not loaded".into())));
    let (store, cfg) = setup(tmp.path(), &url, ONE);
    let out = run("explain", &store, &cfg, &[], &[]);
    assert!(!out.status.success());
    assert_eq!(server.sent(Kind::Explain), live());
    let report = stdout(&out);
    assert!(report.contains(&format!("{} finished ({} failed)", live(), live())), "{report}");
    assert!(report.contains(&format!("; {} requests sent", live())), "{report}");
    let errors = error_lines(&out);
    assert_eq!(errors.len(), 1, "{}", stderr(&out));
    assert!(
        errors[0].contains("no feature could be explained") && errors[0].contains("HTTP 400"),
        "{errors:?}"
    );
    let all = Store::open(&store).unwrap().explanations("sae").unwrap();
    assert_eq!(all.explanations.len(), live());
    assert!(
        all.explanations.iter().all(|e| e.failure.as_deref().is_some_and(|f| f.contains("model not loaded")))
    );
}

#[test]
fn a_long_retry_after_is_announced() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, url) = serve(Box::new(|r: &Req| {
        if r.n == 0 { status(429, &[("retry-after", "86400")], "slow down".into()) } else { good(r) }
    }));
    let (store, cfg) = setup(tmp.path(), &url, &format!("{ONE}backoff_max_seconds = 1\n"));
    let out = run("explain", &store, &cfg, &["--features", "0,1"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(server.sent(Kind::Explain), 3);
    let err = stderr(&out);
    let line =
        err.lines().find(|l| l.starts_with("waiting ")).unwrap_or_else(|| panic!("no wait said: {err}"));
    assert!(line.starts_with("waiting 1 s before retrying feature "), "{line}");
    assert!(line.contains("Retry-After 86400 s") && line.contains("HTTP 429: slow down"), "{line}");
    assert!(stdout(&out).contains("3 requests sent (1 of them retries)"), "{}", stdout(&out));
}

#[test]
fn a_scorer_stops_retrying_an_endpoint_that_keeps_failing() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, url) = serve(Box::new(|r: &Req| match r.kind {
        Kind::Explain => good(r),
        Kind::Score => status(503, &[("retry-after-ms", "20")], "overloaded".into()),
    }));
    let (store, cfg) = setup(tmp.path(), &url, "concurrency = 2\nmax_retries = 2\n");
    let out = run("explain", &store, &cfg, &[], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run("score", &store, &cfg, &["--scorers", "detection,fuzzing"], &[]);
    assert!(!out.status.success());
    // Without the breaker: 11 features × 2 scorers × 2 batches × 3 attempts = 132 requests.
    let sent = server.sent(Kind::Score);
    let most = (loupe_autointerp::breaker::GIVE_UP_AFTER as usize + 2) * 3;
    assert!(sent <= most, "{sent} scoring requests sent, more than {most}");
    let err = stderr(&out);
    assert!(
        err.contains("stopping: the run stopped sending after 5 requests in a row failed for good"),
        "{err}"
    );
    assert_eq!(error_lines(&out).len(), 1, "{err}");
    let all = Store::open(&store).unwrap().explanations("sae").unwrap();
    assert_eq!(all.scores.len(), 2 * live(), "every score has a row");
    let stopped = all.scores.iter().filter(|s| s.failure.as_deref().is_some_and(|f| f.contains("not sent:")));
    assert!(stopped.count() >= 2 * live() - 7, "the rest were not sent");
}

#[test]
fn a_bad_llm_config_names_the_file_line_key_and_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("llm.toml");
    std::fs::write(
        &cfg,
        "base_url = \"http://127.0.0.1:9/v1\"\nmodel = \"m\"\nconcurrency = \"sixty-four\"\n",
    )
    .unwrap();
    let out = loupe(&[
        "explain",
        "--store",
        tmp.path().join("store").to_str().unwrap(),
        "--dictionary",
        "sae",
        "--llm-config",
        cfg.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    for needle in [cfg.to_str().unwrap(), "line 3", "key concurrency", "invalid type: string \"sixty-four\""]
    {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
}

#[test]
fn explain_embeds_only_new_explanations() {
    let tmp = tempfile::tempdir().unwrap();
    let (_server, url) = serve(Box::new(good));
    let (store, cfg) = setup(tmp.path(), &url, ONE);
    let minilm = loupe_tests::minilm_dir();
    let common =
        ["--store", store.to_str().unwrap(), "--dictionary", "sae", "--embedder", minilm.to_str().unwrap()];
    let offline = loupe(&[&["explain"][..], &common, &["--train-examples", "8"]].concat());
    assert!(offline.status.success(), "{}", stderr(&offline));
    let all = Store::open(&store).unwrap().explanations("sae").unwrap();
    let n = all.explanations.iter().map(|e| e.explanation.clone().unwrap()).collect::<HashSet<_>>().len();
    assert_eq!(n, live(), "the offline explanations differ");
    let said = stdout(&offline);
    assert!(said.contains(&format!("search index: {n} explanations embedded, 0 kept")), "{said}");

    // Three delphi explanations more: only they are embedded.
    let delphi = loupe(
        &[&["explain"][..], &common, &["--train-examples", "8", "--features", "0..3", "--no-cache"]]
            .concat()
            .into_iter()
            .chain(["--llm-config", cfg.to_str().unwrap()])
            .collect::<Vec<_>>(),
    );
    assert!(delphi.status.success(), "{}", stderr(&delphi));
    let said = stdout(&delphi);
    assert!(said.contains(&format!("search index: 3 explanations embedded, {n} kept")), "{said}");
    // Nothing changed: nothing is embedded.
    let again = loupe(&[&["explain"][..], &common, &["--train-examples", "8", "--redo"]].concat());
    assert!(again.status.success(), "{}", stderr(&again));
    let said = stdout(&again);
    assert!(said.contains(&format!("search index: 0 explanations embedded, {} kept", n + 3)), "{said}");
    assert!(loupe(&["store", "verify", store.to_str().unwrap()]).status.success());

    // The kept embeddings sit at the right rows: each text finds its own feature first.
    let all = Store::open(&store).unwrap().explanations("sae").unwrap();
    for e in all.explanations.iter().filter(|e| e.feature_id == 2 || e.feature_id == 7) {
        let text = e.explanation.clone().unwrap();
        let out = loupe(&[&["search"][..], &common, &[&text, "-k", "1"]].concat());
        assert!(out.status.success(), "{}", stderr(&out));
        let first = stdout(&out);
        assert!(
            first.contains(&format!("feature {:>6}  [{}]", e.feature_id, e.explainer)),
            "{text}: {first}"
        );
    }
}

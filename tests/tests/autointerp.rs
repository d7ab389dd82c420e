//! `loupe explain` and `loupe score` end to end against a scripted OpenAI-compatible server on
//! loopback (axum), over the planted dictionary's analysis:
//! - 429 with Retry-After, 500, truncated JSON, a hung request and 503, then unparseable
//!   answers and a budget hit: every feature ends explained, scored, or recorded as failed with
//!   the reason;
//! - a run killed mid-way and restarted sends none of the requests it had cached;
//! - a planted API key reaches the server but no file of the store, the cache or the export,
//!   and no output.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use loupe_store::Store;
use loupe_tests::planted::{N, planted_store, planted_values};
use loupe_tests::{loupe, loupe_bin, stderr};
use sha2::{Digest, Sha256};

/// A failure the server plays before answering normally.
#[derive(Clone, Copy, Debug)]
enum Fault {
    TooMany,
    Internal,
    Truncated,
    Hang,
    Unavailable,
}

#[derive(Default)]
struct Server {
    faults: Mutex<VecDeque<Fault>>,
    /// SHA-256 of every request body received, in order.
    bodies: Mutex<Vec<String>>,
    auth: Mutex<HashSet<String>>,
    explain_requests: AtomicUsize,
    unparseable: AtomicUsize,
    /// Delay before each answer.
    delay_ms: u64,
}

fn completion(text: &str, logprobs: Option<serde_json::Value>, prompt_tokens: usize) -> Response {
    let mut choice = serde_json::json!({"index": 0, "message": {"role": "assistant", "content": text}});
    if let Some(lp) = logprobs {
        choice["logprobs"] = serde_json::json!({ "content": lp });
    }
    let body = serde_json::json!({
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": text.len() / 4 + 1},
    });
    ([("content-type", "application/json")], body.to_string()).into_response()
}

/// Answers in the shape each prompt asks for: an explanation naming the first highlighted
/// token (every fifth one unparseable), a 0/1 list with log-probabilities, or per-token
/// predictions.
fn answer_for(s: &Server, body: &serde_json::Value) -> Response {
    let messages = body["messages"].as_array().unwrap();
    let system = messages[0]["content"].as_str().unwrap();
    let user = messages.last().unwrap()["content"].as_str().unwrap();
    let prompt_tokens = (system.len() + user.len()) / 4;
    if system.contains("[EXPLANATION]") {
        if s.explain_requests.fetch_add(1, Ordering::SeqCst) % 5 == 3 {
            s.unparseable.fetch_add(1, Ordering::SeqCst);
            return completion("I cannot tell what these have in common.", None, prompt_tokens);
        }
        let token = user.split("<<").nth(1).and_then(|t| t.split(">>").next()).unwrap_or("?");
        return completion(&format!("Marked tokens.\n[EXPLANATION]: the token {token}"), None, prompt_tokens);
    }
    if system.contains("answer 1 if") {
        let texts: Vec<&str> = user.lines().filter(|l| l.starts_with("Text ")).collect();
        let labels: Vec<u8> = texts.iter().map(|t| (t.len() % 2) as u8).collect();
        let text = format!("[{}]", labels.iter().map(u8::to_string).collect::<Vec<_>>().join(", "));
        let mut lp = vec![serde_json::json!({"token": "[", "logprob": 0.0, "top_logprobs": []})];
        for (i, l) in labels.iter().enumerate() {
            let (chosen, other) = if *l == 1 { ("1", "0") } else { ("0", "1") };
            let p = -0.05 - 0.1 * i as f32;
            lp.push(serde_json::json!({"token": chosen, "logprob": p,
                "top_logprobs": [{"token": chosen, "logprob": p}, {"token": other, "logprob": -1.5 - 0.1 * i as f32}]}));
            lp.push(serde_json::json!({"token": if i + 1 < labels.len() { ", " } else { "]" }, "logprob": 0.0, "top_logprobs": []}));
        }
        return completion(&text, Some(serde_json::Value::Array(lp)), prompt_tokens);
    }
    let n = user.lines().count();
    let text: String = (1..=n).map(|i| format!("{i}\t{}\n", (i * 7) % 11)).collect();
    completion(&text, None, prompt_tokens)
}

async fn handle(State(s): State<Arc<Server>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    s.bodies.lock().unwrap().push(hex(&Sha256::digest(&body)));
    if let Some(a) = headers.get("authorization") {
        s.auth.lock().unwrap().insert(a.to_str().unwrap().to_string());
    }
    if s.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(s.delay_ms)).await;
    }
    let fault = s.faults.lock().unwrap().pop_front();
    match fault {
        Some(Fault::TooMany) => {
            return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", "0")], "slow down").into_response();
        }
        Some(Fault::Internal) => return (StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        Some(Fault::Truncated) => {
            return ([("content-type", "application/json")], r#"{"choices":[{"message":{"content":"[EXPL"#)
                .into_response();
        }
        Some(Fault::Hang) => tokio::time::sleep(Duration::from_secs(3)).await,
        Some(Fault::Unavailable) => {
            return (StatusCode::SERVICE_UNAVAILABLE, [("retry-after-ms", "5")], "busy").into_response();
        }
        None => {}
    }
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
    answer_for(&s, &body)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Start the server on a thread of its own; returns its base URL.
fn serve(server: Arc<Server>) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let app = Router::new().route("/v1/chat/completions", post(handle)).with_state(server);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    format!("http://{}/v1", rx.recv().unwrap())
}

/// A store with the planted dictionary `sae` analysed, and an LLM config for `url`.
fn setup(dir: &Path, url: &str, concurrency: usize, key_env: Option<&str>) -> (PathBuf, PathBuf) {
    let store = dir.join("store");
    drop(planted_store(&store, &planted_values()));
    let out = loupe(&["analyze", "--store", store.to_str().unwrap(), "--dictionary", "sae", "--no-index"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let cfg = dir.join("llm.toml");
    let key = key_env.map_or(String::new(), |k| format!("api_key_env = \"{k}\"\n"));
    std::fs::write(
        &cfg,
        format!(
            "base_url = \"{url}\"\nmodel = \"scripted\"\n{key}concurrency = {concurrency}\ntimeout_seconds = 0.5\n\
             backoff_seconds = 0.01\nmax_retries = 6\ncost_per_1m_prompt = 1.0\ncost_per_1m_completion = 2.0\n"
        ),
    )
    .unwrap();
    (store, cfg)
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(loupe_bin());
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// `loupe <command> --store … --dictionary sae --llm-config … --cache …` plus `extra`.
fn args<'a>(
    command: &'a str,
    store: &'a Path,
    cfg: &'a Path,
    cache: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut a = vec![
        command,
        "--store",
        store.to_str().unwrap(),
        "--dictionary",
        "sae",
        "--llm-config",
        cfg.to_str().unwrap(),
        "--cache",
        cache.to_str().unwrap(),
        "--train-examples",
        "8",
        "--test-examples",
        "8",
        "--embedder",
        "/nonexistent-embedder",
    ];
    a.extend_from_slice(extra);
    a
}

/// The features that fire (the planted feature N-1 never does).
fn live() -> HashSet<u32> {
    (0..N as u32 - 1).collect()
}

#[test]
fn flaky_server_and_budget_lose_no_feature() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Arc::new(Server::default());
    server.faults.lock().unwrap().extend([
        Fault::TooMany,
        Fault::Internal,
        Fault::Truncated,
        Fault::Hang,
        Fault::Unavailable,
        Fault::Internal,
    ]);
    let url = serve(server.clone());
    let (store, cfg) = setup(tmp.path(), &url, 3, None);
    let cache = tmp.path().join("cache");

    // An embedder that does not exist is one clear error, before any request.
    let out = run(&args("explain", &store, &cfg, &cache, &[]), &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/nonexistent-embedder"), "{}", stderr(&out));
    assert!(server.bodies.lock().unwrap().is_empty());

    let mut explain = args("explain", &store, &cfg, &cache, &[]);
    explain.truncate(explain.len() - 2);
    let out = run(&explain, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("from the cache") && text.contains("cost"), "{text}");
    assert!(server.faults.lock().unwrap().is_empty(), "every fault was played");

    let s = Store::open(&store).unwrap();
    let all = s.explanations("sae").unwrap();
    let explained: HashSet<u32> = all.explanations.iter().map(|e| e.feature_id).collect();
    assert_eq!(explained, live(), "every live feature has a row");
    let failed: Vec<_> = all.explanations.iter().filter(|e| e.failure.is_some()).collect();
    assert_eq!(failed.len(), server.unparseable.load(Ordering::SeqCst));
    assert!(!failed.is_empty());
    for e in &all.explanations {
        assert_eq!((e.explainer.as_str(), e.provenance.model.as_str()), ("delphi", "scripted"));
        assert_eq!(e.provenance.prompt_hash.len(), 64);
        assert!(!e.provenance.example_rows.is_empty() && e.provenance.prompt_tokens > 0);
        match (&e.explanation, &e.failure) {
            (Some(x), None) => assert!(x.starts_with("the token "), "{x}"),
            (None, Some(why)) => assert!(why.contains("[EXPLANATION]:"), "{why}"),
            other => panic!("feature {}: {other:?}", e.feature_id),
        }
    }
    assert!(!s.explanations_dir("sae").join("explain-delphi.journal.jsonl").exists());

    // A rerun finds everything done or cached: failed features are retried from the cache, fail
    // again, and so the run, which explained nothing, says so and exits non-zero.
    let sent = server.bodies.lock().unwrap().len();
    let out = run(&explain, &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(&format!("no feature could be explained: all {} failed", failed.len())));
    assert_eq!(server.bodies.lock().unwrap().len(), sent, "a rerun sends nothing");

    let mut score = args("score", &store, &cfg, &cache, &["--scorers", "detection,fuzzing,simulation"]);
    score.extend(["--simulation-windows", "2"]);
    let drop_embedder = |a: &mut Vec<&str>| {
        let at = a.iter().position(|x| *x == "--embedder").unwrap();
        a.drain(at..at + 2);
    };
    drop_embedder(&mut score);
    let out = run(&score, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let all = Store::open(&store).unwrap().explanations("sae").unwrap();
    let ok: HashSet<u32> =
        all.explanations.iter().filter(|e| e.failure.is_none()).map(|e| e.feature_id).collect();
    for scorer in ["detection", "fuzzing", "simulation"] {
        let rows: Vec<_> = all.scores.iter().filter(|s| s.scorer == scorer).collect();
        assert_eq!(rows.iter().map(|s| s.feature_id).collect::<HashSet<_>>(), ok, "{scorer}");
        for r in rows {
            assert!(r.failure.is_none(), "{scorer} of {}: {:?}", r.feature_id, r.failure);
            assert!(r.score.is_some() && r.n_examples > 0 && !r.provenance.example_rows.is_empty());
            if scorer == "simulation" {
                assert!(r.pearson.is_some() && r.auroc.is_none());
            } else {
                assert!(r.balanced_accuracy.is_some() && r.f1.is_some());
                assert!(r.auroc.is_some(), "the server returned log-probabilities");
            }
        }
    }

    // A budget of one token: the requests already allowed finish, the rest fail with the
    // reason, the run ends cleanly, and every feature still has a row.
    let mut budget = args("score", &store, &cfg, &cache, &["--scorers", "detection", "--redo", "--no-cache"]);
    drop_embedder(&mut budget);
    let at = budget.iter().position(|x| *x == "--cache").unwrap();
    budget.drain(at..at + 2);
    budget.extend(["--max-tokens-total", "1"]);
    let out = run(&budget, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("token budget reached"), "{text}");
    assert!(stderr(&out).contains("stopping: token budget reached"), "said once: {}", stderr(&out));
    let all = Store::open(&store).unwrap().explanations("sae").unwrap();
    let rows: Vec<_> = all.scores.iter().filter(|s| s.scorer == "detection").collect();
    // A run in which every score failed exits non-zero (its rows are committed all the same).
    let all_failed = rows.iter().all(|s| s.failure.is_some());
    assert_eq!(out.status.success(), !all_failed, "{}", stderr(&out));
    assert_eq!(rows.iter().map(|s| s.feature_id).collect::<HashSet<_>>(), ok);
    let over =
        rows.iter().filter(|s| s.failure.as_deref().is_some_and(|f| f.contains("token budget reached")));
    assert!(over.count() >= ok.len() - 3, "at most `concurrency` requests pass the budget");
    // The other scorers' rows are untouched.
    assert!(all.scores.iter().filter(|s| s.scorer != "detection").all(|s| s.failure.is_none()));
}

#[test]
fn killed_run_resends_no_cached_request() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Arc::new(Server { delay_ms: 150, ..Server::default() });
    let url = serve(server.clone());
    let (store, cfg) = setup(tmp.path(), &url, 2, None);
    let cache = tmp.path().join("cache");
    let mut explain = args("explain", &store, &cfg, &cache, &[]);
    explain.truncate(explain.len() - 2);

    let mut child =
        Command::new(loupe_bin()).args(&explain).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let cached = |dir: &Path| -> HashSet<String> {
        walk(dir)
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    let start = Instant::now();
    while cached(&cache).len() < 4 {
        assert!(start.elapsed() < Duration::from_secs(60), "the run never cached 4 answers");
        assert!(child.try_wait().unwrap().is_none(), "the run ended before it was killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = cached(&cache);
    assert!(before.len() < live().len(), "killed before the end");
    let first_run = server.bodies.lock().unwrap().len();

    let out = run(&explain, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let second: Vec<String> = server.bodies.lock().unwrap()[first_run..].to_vec();
    let resent: Vec<&String> = second.iter().filter(|b| before.contains(*b)).collect();
    assert!(resent.is_empty(), "cached requests sent again: {resent:?}");
    assert!(second.len() + before.len() >= live().len());
    let all = Store::open(&store).unwrap().explanations("sae").unwrap();
    assert_eq!(all.explanations.iter().map(|e| e.feature_id).collect::<HashSet<_>>(), live());
    assert!(
        !Store::open(&store).unwrap().explanations_dir("sae").join("explain-delphi.journal.jsonl").exists()
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn planted_api_key_reaches_only_the_server() {
    const KEY: &str = "sk-planted-3f9a7c21e4b8d605";
    let tmp = tempfile::tempdir().unwrap();
    let server = Arc::new(Server::default());
    let url = serve(server.clone());
    let (store, cfg) = setup(tmp.path(), &url, 2, Some("LOUPE_TEST_API_KEY"));
    let cache = tmp.path().join("cache");
    let env = [("LOUPE_TEST_API_KEY", KEY)];

    // Without the variable: one error naming the variable, not a key.
    let mut explain = args("explain", &store, &cfg, &cache, &[]);
    explain.truncate(explain.len() - 2);
    let out = run(&explain, &[]);
    assert!(!out.status.success() && stderr(&out).contains("LOUPE_TEST_API_KEY"), "{}", stderr(&out));

    let mut outputs = vec![run(&explain, &env)];
    let mut score = args("score", &store, &cfg, &cache, &["--scorers", "detection"]);
    score.truncate(score.len() - 4);
    score.extend(["--scorers", "detection"]);
    outputs.push(run(&score, &env));
    let export = tmp.path().join("export");
    outputs.push(run(
        &[
            "export",
            "--store",
            store.to_str().unwrap(),
            "--dictionary",
            "sae",
            "--out",
            export.to_str().unwrap(),
            "--model-id",
            "planted",
        ],
        &env,
    ));
    for out in &outputs {
        assert!(out.status.success(), "{}", stderr(out));
        for stream in [&out.stdout, &out.stderr] {
            assert!(!String::from_utf8_lossy(stream).contains(KEY));
        }
    }
    assert_eq!(*server.auth.lock().unwrap(), HashSet::from([format!("Bearer {KEY}")]));
    let files: Vec<PathBuf> =
        [tmp.path().join("store"), cache, export].iter().flat_map(|d| walk(d)).collect();
    assert!(files.len() > 10);
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        assert!(!bytes.windows(KEY.len()).any(|w| w == KEY.as_bytes()), "{} holds the key", file.display());
    }
}

/// No LLM: the offline explainer, the embedding scorer (the real MiniLM) and semantic search.
#[test]
fn offline_explanations_are_scored_and_searchable() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, _) = setup(tmp.path(), "http://127.0.0.1:9/v1", 1, None);
    let minilm = loupe_tests::minilm_dir();
    let common =
        ["--store", store.to_str().unwrap(), "--dictionary", "sae", "--embedder", minilm.to_str().unwrap()];
    let out =
        loupe(&[&["explain"][..], &common, &["--train-examples", "8", "--test-examples", "8"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    let out = loupe(&[&["score"][..], &common, &["--train-examples", "8", "--test-examples", "8"]].concat());
    assert!(out.status.success(), "{}", stderr(&out));

    let s = Store::open(&store).unwrap();
    let all = s.explanations("sae").unwrap();
    assert_eq!(all.explanations.iter().map(|e| e.feature_id).collect::<HashSet<_>>(), live());
    for e in &all.explanations {
        let p = &e.provenance;
        assert_eq!((e.explainer.as_str(), p.model.as_str(), p.prompt_tokens), ("offline", "offline", 0));
        assert!(
            e.explanation.as_ref().unwrap().starts_with("offline explainer (token statistics): fires on ")
        );
    }
    let scores: Vec<_> = all.scores.iter().filter(|s| s.scorer == "embedding").collect();
    assert_eq!(scores.len(), live().len());
    for sc in scores {
        let auroc = sc.auroc.unwrap_or_else(|| panic!("feature {}: {:?}", sc.feature_id, sc.failure));
        assert!((0.0..=1.0).contains(&auroc) && sc.score == Some(auroc) && sc.n_examples == 16);
        assert_eq!(sc.provenance.model, "all-MiniLM-L6-v2");
    }
    assert_eq!(s.explanations_entry("sae").unwrap().index_model.as_deref(), Some("all-MiniLM-L6-v2"));

    // Searching for an explanation's own text finds that explanation first.
    let target = &all.explanations[4];
    let text = target.explanation.clone().unwrap();
    let out = loupe(&[
        "search", common[0], common[1], common[2], common[3], common[4], common[5], &text, "-k", "3",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let first = String::from_utf8_lossy(&out.stdout).lines().next().unwrap().to_string();
    assert!(first.contains(&format!("feature {:>6}", target.feature_id)), "{first}");
    assert!(first.starts_with("1.000") || first.starts_with("0.99"), "{first}");

    // The search of a store without explanations names the fix.
    let out = loupe(&[
        "search",
        "--store",
        store.to_str().unwrap(),
        "--dictionary",
        "other",
        "--embedder",
        minilm.to_str().unwrap(),
        "x",
    ]);
    assert!(!out.status.success() && stderr(&out).contains("run `loupe explain` first"), "{}", stderr(&out));
}

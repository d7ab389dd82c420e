//! The chat client against a scripted OpenAI-compatible server on loopback (axum): retries on
//! 429 with `retry-after-ms`, 500s, truncated JSON and timeouts; no retry on 400; giving up after
//! `max_retries`; the API key only in the Authorization header.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use loupe_autointerp::client::{ChatRequest, Client, ClientConfig, ClientError, Message};

/// One scripted answer.
#[derive(Clone)]
enum Script {
    Status(u16, Vec<(&'static str, &'static str)>),
    Body(&'static str),
    Slow(Duration),
}

#[derive(Default)]
struct Server {
    script: Mutex<VecDeque<Script>>,
    seen: Mutex<Vec<(Option<String>, String)>>,
}

const OK: &str = r#"{"choices":[{"message":{"role":"assistant","content":"[EXPLANATION]: whales"},
  "logprobs":{"content":[{"token":"wh","logprob":-0.1,"top_logprobs":[{"token":"wh","logprob":-0.1},{"token":"sh","logprob":-2.5}]}]}}],
  "usage":{"prompt_tokens":12,"completion_tokens":5}}"#;

async fn answer(State(s): State<Arc<Server>>, headers: HeaderMap, body: String) -> Response {
    let auth = headers.get("authorization").map(|v| v.to_str().unwrap().to_string());
    s.seen.lock().unwrap().push((auth, body));
    let next = s.script.lock().unwrap().pop_front().unwrap_or(Script::Body(OK));
    match next {
        Script::Status(code, headers) => {
            let mut r = (StatusCode::from_u16(code).unwrap(), "scripted failure").into_response();
            for (k, v) in headers {
                r.headers_mut().insert(k, v.parse().unwrap());
            }
            r
        }
        Script::Body(text) => ([("content-type", "application/json")], text).into_response(),
        Script::Slow(d) => {
            tokio::time::sleep(d).await;
            ([("content-type", "application/json")], OK).into_response()
        }
    }
}

async fn serve(script: Vec<Script>) -> (String, Arc<Server>) {
    let state = Arc::new(Server { script: Mutex::new(script.into()), ..Server::default() });
    let app = Router::new().route("/v1/chat/completions", post(answer)).with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1"), state)
}

fn request() -> ChatRequest {
    ChatRequest {
        messages: vec![Message { role: "user".into(), content: "Explain feature 3.".into() }],
        max_tokens: 32,
        temperature: 0.0,
        top_logprobs: Some(2),
    }
}

fn config(url: &str) -> ClientConfig {
    let mut cfg = ClientConfig::new(url, "test-model");
    cfg.backoff_seconds = 0.01;
    cfg.timeout_seconds = 0.5;
    cfg
}

#[tokio::test]
async fn retries_429_500_truncated_json_and_timeouts_then_succeeds() {
    let (url, server) = serve(vec![
        Script::Status(429, vec![("retry-after-ms", "150")]),
        Script::Status(500, vec![]),
        Script::Body(r#"{"choices":[{"message":{"content":"cut o"#),
        Script::Slow(Duration::from_secs(2)),
        Script::Status(503, vec![("retry-after", "0")]),
    ])
    .await;
    let client = Client::new(config(&url)).unwrap();
    let started = Instant::now();
    let r = client.chat(&request()).await.unwrap();
    assert_eq!(r.attempts, 6);
    assert!(started.elapsed() >= Duration::from_millis(150 + 500), "{:?}", started.elapsed());
    assert_eq!(r.text, "[EXPLANATION]: whales");
    assert_eq!((r.usage.prompt_tokens, r.usage.completion_tokens), (12, 5));
    let lp = r.logprobs.unwrap();
    assert_eq!(lp[0].top, vec![("wh".to_string(), -0.1), ("sh".to_string(), -2.5)]);
    let seen = server.seen.lock().unwrap();
    assert_eq!(seen.len(), 6);
    let body: serde_json::Value = serde_json::from_str(&seen[0].1).unwrap();
    assert_eq!(
        (body["model"].as_str(), body["logprobs"].as_bool(), body["top_logprobs"].as_u64()),
        (Some("test-model"), Some(true), Some(2))
    );
}

#[tokio::test]
async fn a_400_is_not_retried_and_retries_run_out() {
    let (url, server) = serve(vec![Script::Status(400, vec![])]).await;
    let client = Client::new(config(&url)).unwrap();
    match client.chat(&request()).await {
        Err(ClientError::Refused { status: 400, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(server.seen.lock().unwrap().len(), 1);

    let (url, server) = serve(vec![Script::Status(502, vec![]); 10]).await;
    let mut cfg = config(&url);
    cfg.max_retries = 2;
    let err = Client::new(cfg).unwrap().chat(&request()).await.unwrap_err();
    assert!(err.to_string().contains("gave up after 3 attempts: HTTP 502"), "{err}");
    assert_eq!(server.seen.lock().unwrap().len(), 3);
    // Nothing listens on a closed port: connection errors are retried, then reported.
    let mut cfg = config("http://127.0.0.1:9/v1");
    cfg.max_retries = 1;
    let err = Client::new(cfg).unwrap().chat(&request()).await.unwrap_err();
    assert!(err.to_string().contains("cannot connect"), "{err}");
}

#[tokio::test]
async fn the_api_key_goes_only_into_the_authorization_header() {
    const KEY: &str = "sk-planted-secret-4242";
    // SAFETY: this test binary's only use of this variable; set before any client reads it.
    unsafe { std::env::set_var("LOUPE_TEST_KEY", KEY) };
    let (url, server) = serve(vec![Script::Status(400, vec![])]).await;
    let mut cfg = config(&url);
    cfg.api_key_env = Some("LOUPE_TEST_KEY".into());
    let client = Client::new(cfg.clone()).unwrap();
    let err = client.chat(&request()).await.unwrap_err();
    client.chat(&request()).await.unwrap();
    for text in [format!("{client:?}"), err.to_string(), serde_json::to_string(&cfg).unwrap()] {
        assert!(!text.contains(KEY), "{text}");
    }
    let seen = server.seen.lock().unwrap();
    assert!(
        seen.iter()
            .all(|(auth, body)| auth.as_deref() == Some(&format!("Bearer {KEY}")[..]) && !body.contains(KEY))
    );
    cfg.api_key_env = Some("LOUPE_TEST_KEY_UNSET".into());
    assert!(Client::new(cfg).unwrap_err().to_string().contains("LOUPE_TEST_KEY_UNSET"));
}

//! A Chat Completions client for any OpenAI-compatible endpoint (vLLM, llama.cpp server, Ollama,
//! OpenAI, OpenRouter): a concurrency limit, and retries on connection errors, timeouts, 408,
//! 409, 429 and 5xx that honour `Retry-After` / `retry-after-ms` and otherwise back off
//! exponentially with full jitter. A wait of [`ANNOUNCE_WAIT`] or more is announced (what for,
//! and why); the run's [`Breaker`] stops all sending once requests keep failing for good.
//!
//! The API key is read from the environment variable the config names and sent only in the
//! `Authorization` header: it is in no error, no `Debug` output and no request body. Nothing the
//! endpoint sends back is trusted: bodies are read up to [`MAX_RESPONSE_BYTES`], and the key is
//! replaced by [`REDACTED`] in every string taken from them (an endpoint may echo the header).
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::breaker::Breaker;

/// The most bytes read of one response body. A chat completion of a few hundred tokens, even with
/// log-probabilities, is far smaller; a larger answer fails its request (it is not retried), and
/// only the start of a larger error body is read.
pub const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// What replaces the API key in every string that comes back from the endpoint.
pub const REDACTED: &str = "[redacted]";
/// Retry waits at least this long are announced through the client's notifier.
pub const ANNOUNCE_WAIT: Duration = Duration::from_secs(1);

/// Makes rustls' `ring` provider the process default (reqwest is built without a provider of its
/// own, see Cargo.toml); call before building any `reqwest::Client`. Later calls do nothing.
pub fn install_tls_provider() {
    // Err only when a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Where the client says what it waits for or why it stops (default: a line on stderr).
pub type Notifier = Arc<dyn Fn(&str) + Send + Sync>;

/// Where and how to call the endpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClientConfig {
    /// e.g. `http://127.0.0.1:8080/v1` (the client appends `/chat/completions`).
    pub base_url: String,
    pub model: String,
    /// Name of the environment variable holding the API key (none for local servers).
    pub api_key_env: Option<String>,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Per-request timeout.
    pub timeout_seconds: f64,
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// First backoff, doubled each retry (with full jitter), capped at `backoff_max_seconds`.
    pub backoff_seconds: f64,
    pub backoff_max_seconds: f64,
}

impl ClientConfig {
    pub fn new(base_url: &str, model: &str) -> ClientConfig {
        ClientConfig {
            base_url: base_url.trim_end_matches('/').to_string(),
            model: model.to_string(),
            api_key_env: None,
            concurrency: 8,
            timeout_seconds: 120.0,
            max_retries: 6,
            backoff_seconds: 0.5,
            backoff_max_seconds: 60.0,
        }
    }
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// What to ask (the model comes from the config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub max_tokens: u32,
    pub temperature: f32,
    /// Ask for the chosen tokens' log-probabilities, with this many alternatives each.
    pub top_logprobs: Option<u32>,
}

/// Token accounting of one response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// A log-probability of one generated token, with its alternatives when asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

/// The first choice of a completion.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatResponse {
    pub text: String,
    pub usage: Usage,
    /// Present when the endpoint returned log-probabilities.
    pub logprobs: Option<Vec<TokenLogprob>>,
    /// Attempts it took (1 = no retry).
    pub attempts: u32,
    /// Why generation stopped (`stop`, `length` when it hit `max_tokens`, ...), if the endpoint said.
    #[serde(default)]
    pub finish_reason: Option<String>,
}

/// Why a request failed for good.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Config(String),
    #[error("gave up after {attempts} attempts: {last}")]
    Exhausted { attempts: u32, last: String },
    #[error("the endpoint refused the request (HTTP {status}): {body}")]
    Refused { status: u16, body: String },
    #[error("the endpoint's answer is not a chat completion: {0}")]
    Malformed(String),
    #[error("the endpoint's answer is larger than {MAX_RESPONSE_BYTES} bytes, the most Loupe reads")]
    TooLarge,
    /// The run's breaker tripped before this request could be sent or retried.
    #[error("not sent: {0}")]
    Stopped(String),
}

impl ClientError {
    /// Whether a run that keeps getting this error should stop asking: retries ran out, or the
    /// endpoint refuses the key or does not know the route or model.
    pub fn is_hopeless(&self) -> bool {
        matches!(self, ClientError::Exhausted { .. } | ClientError::Refused { status: 401 | 403 | 404, .. })
    }
}

/// An OpenAI-compatible chat client.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    cfg: ClientConfig,
    key: Option<String>,
    slots: Arc<Semaphore>,
    /// HTTP requests sent (every attempt, failed ones included), and of them retries.
    sent: Arc<AtomicU64>,
    retries: Arc<AtomicU64>,
    breaker: Arc<Breaker>,
    notify: Notifier,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("cfg", &self.cfg)
            .field("key", &self.key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// What one attempt ended with.
enum Attempt {
    Done(ChatResponse),
    /// Retry, after at least this long when the server said so.
    Retry {
        why: String,
        after: Option<Duration>,
    },
    Fail(ClientError),
}

impl Client {
    pub fn new(cfg: ClientConfig) -> Result<Client, ClientError> {
        if cfg.concurrency == 0 || !cfg.timeout_seconds.is_finite() || cfg.timeout_seconds <= 0.0 {
            return Err(ClientError::Config("concurrency and timeout_seconds must be positive".into()));
        }
        // Each becomes a `Duration`, which panics on a negative or too large number.
        for (key, seconds) in [
            ("timeout_seconds", cfg.timeout_seconds),
            ("backoff_seconds", cfg.backoff_seconds),
            ("backoff_max_seconds", cfg.backoff_max_seconds),
        ] {
            if Duration::try_from_secs_f64(seconds).is_err() {
                return Err(ClientError::Config(format!(
                    "{key} = {seconds:?} is not a usable number of seconds"
                )));
            }
        }
        if cfg.concurrency > Semaphore::MAX_PERMITS {
            return Err(ClientError::Config(format!("concurrency = {} is too large", cfg.concurrency)));
        }
        let key = match &cfg.api_key_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                ClientError::Config(format!("the environment variable {var} (api_key_env) is not set"))
            })?),
            None => None,
        };
        install_tls_provider();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(cfg.timeout_seconds))
            .build()
            .map_err(|e| ClientError::Config(format!("cannot build the HTTP client: {e}")))?;
        let slots = Arc::new(Semaphore::new(cfg.concurrency));
        Ok(Client {
            http,
            cfg,
            key: key.filter(|k| !k.is_empty()),
            slots,
            sent: Arc::default(),
            retries: Arc::default(),
            breaker: Arc::default(),
            notify: Arc::new(|line: &str| eprintln!("{line}")),
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    /// Say waits and stops through `notify` instead of stderr (e.g. above a progress bar).
    pub fn set_notifier(&mut self, notify: Notifier) {
        self.notify = notify;
    }

    /// Say `line` through the notifier.
    pub fn notify(&self, line: &str) {
        (self.notify)(line);
    }

    /// HTTP requests sent so far by this client and its clones (every attempt), and how many of
    /// them were retries.
    pub fn sent(&self) -> (u64, u64) {
        (self.sent.load(Ordering::Relaxed), self.retries.load(Ordering::Relaxed))
    }

    /// Why the run stopped sending, once its breaker tripped.
    pub fn stopped(&self) -> Option<String> {
        self.breaker.stopped()
    }

    /// `text` with every occurrence of the API key replaced by [`REDACTED`].
    pub fn redact(&self, text: &str) -> String {
        match &self.key {
            Some(key) if text.contains(key.as_str()) => text.replace(key.as_str(), REDACTED),
            _ => text.to_string(),
        }
    }

    /// [`Client::redact`] applied to every string of an answer.
    pub fn redact_response(&self, r: &mut ChatResponse) {
        if self.key.is_none() {
            return;
        }
        r.text = self.redact(&r.text);
        r.finish_reason = r.finish_reason.as_deref().map(|f| self.redact(f));
        for t in r.logprobs.iter_mut().flatten() {
            t.token = self.redact(&t.token);
            for (token, _) in &mut t.top {
                *token = self.redact(token);
            }
        }
    }

    /// The JSON body sent for `req`.
    pub fn body(&self, req: &ChatRequest) -> serde_json::Value {
        let mut body = serde_json::json!({
            "model": self.cfg.model,
            "messages": req.messages,
            "max_tokens": req.max_tokens,
            "temperature": req.temperature,
        });
        if let Some(n) = req.top_logprobs {
            body["logprobs"] = true.into();
            body["top_logprobs"] = n.into();
        }
        body
    }

    /// Send `req`, retrying as the module docs say.
    pub async fn chat(&self, req: &ChatRequest) -> Result<ChatResponse, ClientError> {
        let _slot = self.slot().await;
        self.chat_in_slot(req, "the request").await
    }

    /// Wait for one of the `concurrency` request slots.
    pub async fn slot(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.slots.acquire().await.expect("the semaphore is never closed")
    }

    /// [`Client::chat`] for a caller already holding a [`Client::slot`] (e.g. to check a budget
    /// just before sending). `what` names the request in announced waits (e.g. `feature 3`).
    pub async fn chat_in_slot(&self, req: &ChatRequest, what: &str) -> Result<ChatResponse, ClientError> {
        let result = self.send_with_retries(req, what).await;
        match &result {
            Ok(_) => self.breaker.success(),
            Err(e) if e.is_hopeless() => {
                if let Some(why) = self.breaker.failure(&e.to_string()) {
                    self.notify(&format!(
                        "stopping: {why}; the requests left are not sent and are recorded as failed"
                    ));
                }
            }
            Err(_) => {}
        }
        result
    }

    async fn send_with_retries(&self, req: &ChatRequest, what: &str) -> Result<ChatResponse, ClientError> {
        let body = self.body(req);
        let mut attempt = 0u32;
        loop {
            if let Some(why) = self.breaker.stopped() {
                return Err(ClientError::Stopped(why));
            }
            attempt += 1;
            if attempt > 1 {
                self.retries.fetch_add(1, Ordering::Relaxed);
            }
            match self.attempt(&body).await {
                Attempt::Done(mut r) => {
                    r.attempts = attempt;
                    return Ok(r);
                }
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry { why, after } => {
                    if attempt > self.cfg.max_retries {
                        return Err(ClientError::Exhausted { attempts: attempt, last: why });
                    }
                    let wait = self.delay(attempt, after);
                    if wait >= ANNOUNCE_WAIT {
                        self.notify(&wait_line(wait, after, what, attempt, self.cfg.max_retries, &why));
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        why = self.breaker.tripped() => return Err(ClientError::Stopped(why)),
                    }
                }
            }
        }
    }

    /// Full-jitter exponential backoff, or what the server asked for (at most
    /// `backoff_max_seconds`).
    fn delay(&self, attempt: u32, after: Option<Duration>) -> Duration {
        let cap = self.cfg.backoff_max_seconds;
        match after {
            Some(d) => d.min(Duration::from_secs_f64(cap)),
            None => {
                let ceiling = (self.cfg.backoff_seconds * 2f64.powi(attempt as i32 - 1)).min(cap);
                Duration::from_secs_f64(rand::rng().random_range(0.0..=ceiling))
            }
        }
    }

    async fn attempt(&self, body: &serde_json::Value) -> Attempt {
        let url = format!("{}/chat/completions", self.cfg.base_url);
        let mut request = self.http.post(&url).json(body);
        if let Some(key) = &self.key {
            request = request.bearer_auth(key);
        }
        self.sent.fetch_add(1, Ordering::Relaxed);
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) if e.is_builder() => {
                return Attempt::Fail(ClientError::Config(format!("bad base_url {url:?}")));
            }
            Err(e) => return Attempt::Retry { why: self.redact(&describe(e)), after: None },
        };
        let status = response.status().as_u16();
        let after = retry_after(response.headers());
        let (text, too_large) = match read_capped(response).await {
            Ok(t) => t,
            Err(e) => return Attempt::Retry { why: self.redact(&describe(e)), after: None },
        };
        let text = self.redact(&text);
        if matches!(status, 408 | 409 | 429) || status >= 500 {
            return Attempt::Retry { why: format!("HTTP {status}: {}", snippet(&text)), after };
        }
        if !(200..300).contains(&status) {
            return Attempt::Fail(ClientError::Refused { status, body: snippet(&text) });
        }
        if too_large {
            return Attempt::Fail(ClientError::TooLarge);
        }
        match parse(&text) {
            Ok(mut r) => {
                // The key may also come JSON-escaped: redact the decoded strings too.
                self.redact_response(&mut r);
                Attempt::Done(r)
            }
            // A cut-off body is a transport failure; retry it like one.
            Err(e) if serde_json::from_str::<serde_json::Value>(&text).is_err() => {
                Attempt::Retry { why: format!("truncated or invalid JSON ({e})"), after: None }
            }
            Err(e) => Attempt::Fail(ClientError::Malformed(self.redact(&e))),
        }
    }
}

/// A body read up to [`MAX_RESPONSE_BYTES`]; `true` when there was more (or the declared length
/// is larger), in which case the text is what was read of it.
async fn read_capped(mut response: reqwest::Response) -> Result<(String, bool), reqwest::Error> {
    if response.content_length().is_some_and(|n| n > MAX_RESPONSE_BYTES as u64) {
        return Ok((String::new(), true));
    }
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_RESPONSE_BYTES - bytes.len();
        if chunk.len() > room {
            bytes.extend_from_slice(&chunk[..room]);
            return Ok((String::from_utf8_lossy(&bytes).into_owned(), true));
        }
        bytes.extend_from_slice(&chunk);
    }
    Ok((String::from_utf8_lossy(&bytes).into_owned(), false))
}

/// The line that announces a retry wait: how long, for what, and why.
fn wait_line(
    wait: Duration,
    asked: Option<Duration>,
    what: &str,
    attempt: u32,
    max_retries: u32,
    why: &str,
) -> String {
    let secs = |d: Duration| {
        let s = d.as_secs_f64();
        if s.fract() == 0.0 { format!("{s:.0} s") } else { format!("{s:.1} s") }
    };
    let reason = match asked {
        Some(a) if a > wait => {
            format!("the server asked Retry-After {} (capped at backoff_max_seconds)", secs(a))
        }
        Some(_) => "the server asked for it (Retry-After)".to_string(),
        None => "backoff".to_string(),
    };
    format!(
        "waiting {} before retrying {what} (retry {attempt} of {max_retries}; {reason}; {why})",
        secs(wait)
    )
}

/// A transport error in one line, without the URL or any header.
fn describe(e: reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".into()
    } else if e.is_connect() {
        "cannot connect".into()
    } else {
        format!("transport error: {}", e.without_url())
    }
}

fn snippet(text: &str) -> String {
    let t: String = text.chars().take(200).collect();
    t.replace('\n', " ")
}

/// `retry-after-ms` (milliseconds), else `Retry-After` in seconds (HTTP dates are not honoured:
/// the backoff applies).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |name: &str| {
        headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<f64>().ok())
    };
    if let Some(ms) = get("retry-after-ms").filter(|v| *v >= 0.0) {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    get("retry-after").filter(|v| *v >= 0.0).map(Duration::from_secs_f64)
}

/// The first choice of a Chat Completions response body.
pub fn parse(text: &str) -> Result<ChatResponse, String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let choice = v.get("choices").and_then(|c| c.get(0)).ok_or("no choices")?;
    let content = choice
        .get("message")
        .and_then(|m| m.get("content"))
        .and_then(|c| c.as_str())
        .ok_or("no message content")?;
    let usage = v.get("usage").map_or(Usage::default(), |u| Usage {
        prompt_tokens: u.get("prompt_tokens").and_then(|x| x.as_u64()).unwrap_or(0),
        completion_tokens: u.get("completion_tokens").and_then(|x| x.as_u64()).unwrap_or(0),
    });
    let logprobs =
        choice.get("logprobs").and_then(|l| l.get("content")).and_then(|c| c.as_array()).map(|items| {
            items
                .iter()
                .map(|t| TokenLogprob {
                    token: t.get("token").and_then(|x| x.as_str()).unwrap_or_default().to_string(),
                    logprob: t.get("logprob").and_then(|x| x.as_f64()).unwrap_or(f64::NEG_INFINITY) as f32,
                    top: t
                        .get("top_logprobs")
                        .and_then(|x| x.as_array())
                        .map(|alts| {
                            alts.iter()
                                .map(|a| {
                                    (
                                        a.get("token")
                                            .and_then(|x| x.as_str())
                                            .unwrap_or_default()
                                            .to_string(),
                                        a.get("logprob").and_then(|x| x.as_f64()).unwrap_or(f64::NEG_INFINITY)
                                            as f32,
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect()
        });
    let finish_reason = choice.get("finish_reason").and_then(|f| f.as_str()).map(str::to_string);
    Ok(ChatResponse { text: content.to_string(), usage, logprobs, attempts: 0, finish_reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_that_would_panic_are_config_errors() {
        // Found by the llm_toml fuzz target: `timeout_seconds = 1e300` panicked in
        // `Duration::from_secs_f64`; a negative backoff would have at the first retry.
        type Change = fn(&mut ClientConfig);
        let cases: [(Change, &str); 4] = [
            (|c| c.timeout_seconds = 1e300, "timeout_seconds = 1e300 is not a usable number of seconds"),
            (|c| c.backoff_seconds = -1.0, "backoff_seconds = -1.0 is not a usable number of seconds"),
            (|c| c.backoff_max_seconds = f64::INFINITY, "backoff_max_seconds = inf is not a usable"),
            (|c| c.concurrency = usize::MAX, "is too large"),
        ];
        for (change, expected) in cases {
            let mut cfg = ClientConfig::new("http://127.0.0.1:1/v1", "m");
            change(&mut cfg);
            let err = Client::new(cfg).unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
        assert!(Client::new(ClientConfig::new("http://127.0.0.1:1/v1", "m")).is_ok());
    }
}

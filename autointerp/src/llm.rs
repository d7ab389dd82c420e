//! The LLM a run talks to: its config file (`llm.toml`), and [`Llm`], the client behind the
//! response cache and the budget. Explainers and scorers only call [`Llm::ask`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::budget::{Budget, Spent};
use crate::cache::{Cache, request_key};
use crate::client::{ChatRequest, ChatResponse, Client, ClientConfig, ClientError, Message};

/// `llm.toml`: where the endpoint is and how to use it. Only `base_url` and `model` are required.
///
/// ```toml
/// base_url = "http://127.0.0.1:8080/v1"
/// model = "gemma-3-270m"
/// api_key_env = "OPENAI_API_KEY"   # the variable's name; the key itself is never written
/// concurrency = 8
/// cost_per_1m_prompt = 0.15
/// cost_per_1m_completion = 0.60
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmConfig {
    pub base_url: String,
    pub model: String,
    pub api_key_env: Option<String>,
    pub concurrency: Option<usize>,
    pub timeout_seconds: Option<f64>,
    pub max_retries: Option<u32>,
    pub backoff_seconds: Option<f64>,
    pub backoff_max_seconds: Option<f64>,
    /// Sampling temperature of every request (default 0).
    pub temperature: Option<f32>,
    /// Ask for log-probabilities (default true; turn off for endpoints that reject the field).
    pub logprobs: Option<bool>,
    /// Put the system prompt at the start of the first user message instead (default false; for
    /// models or chat templates without a system role).
    pub system_as_user: Option<bool>,
    #[serde(default)]
    pub cost_per_1m_prompt: f64,
    #[serde(default)]
    pub cost_per_1m_completion: f64,
}

impl LlmConfig {
    pub fn new(base_url: &str, model: &str) -> LlmConfig {
        LlmConfig {
            base_url: base_url.to_string(),
            model: model.to_string(),
            api_key_env: None,
            concurrency: None,
            timeout_seconds: None,
            max_retries: None,
            backoff_seconds: None,
            backoff_max_seconds: None,
            temperature: None,
            logprobs: None,
            system_as_user: None,
            cost_per_1m_prompt: 0.0,
            cost_per_1m_completion: 0.0,
        }
    }

    pub fn load(path: &Path) -> Result<LlmConfig> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let cfg: LlmConfig = toml::from_str(&text).map_err(|e| {
            anyhow::anyhow!("{} is not a valid LLM config: {}", path.display(), config_error(&text, &e))
        })?;
        if !cfg.base_url.starts_with("http://") && !cfg.base_url.starts_with("https://") {
            bail!("{}: base_url must start with http:// or https://", path.display());
        }
        Ok(cfg)
    }

    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new(&self.base_url, &self.model);
        c.api_key_env = self.api_key_env.clone();
        c.concurrency = self.concurrency.unwrap_or(c.concurrency);
        c.timeout_seconds = self.timeout_seconds.unwrap_or(c.timeout_seconds);
        c.max_retries = self.max_retries.unwrap_or(c.max_retries);
        c.backoff_seconds = self.backoff_seconds.unwrap_or(c.backoff_seconds);
        c.backoff_max_seconds = self.backoff_max_seconds.unwrap_or(c.backoff_max_seconds);
        c
    }
}

/// A TOML error of `text` on one line: where (line and key, when the error points at one) and
/// why (the parser's own message, which already names a missing or unknown key).
pub fn config_error(text: &str, e: &toml::de::Error) -> String {
    let why = e.message().trim().replace('\n', " ");
    let Some(span) = e.span().filter(|s| s.start <= text.len()) else { return why };
    let line_no = text[..span.start].matches('\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or("");
    let key = line.split_once('=').map(|(k, _)| k.trim()).filter(|k| {
        !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"'))
    });
    match key {
        Some(key) => format!("line {line_no}, key {key}: {why}"),
        None => format!("line {line_no}: {why}"),
    }
}

pub fn message(role: &str, content: &str) -> Message {
    Message { role: role.into(), content: content.into() }
}

/// The default cache folder: `~/.cache/loupe/llm-cache` (`$LOUPE_CACHE` overrides `~/.cache/loupe`).
pub fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("LOUPE_CACHE").map(PathBuf::from).unwrap_or_else(|| {
        let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        home.join(".cache").join("loupe")
    });
    base.join("llm-cache")
}

/// Why an LLM call gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("{0}")]
    Budget(String),
    /// The run stopped sending (its breaker tripped).
    #[error("not sent: {0}")]
    Stopped(String),
    #[error(transparent)]
    Client(ClientError),
}

impl From<ClientError> for LlmError {
    fn from(e: ClientError) -> LlmError {
        match e {
            ClientError::Stopped(why) => LlmError::Stopped(why),
            e => LlmError::Client(e),
        }
    }
}

/// An answer, with the key (SHA-256) of the request that produced it.
#[derive(Clone, Debug)]
pub struct Answer {
    pub response: ChatResponse,
    pub key: String,
    pub cached: bool,
}

/// The client behind the cache and the budget.
#[derive(Clone, Debug)]
pub struct Llm {
    pub client: Client,
    pub cache: Option<Cache>,
    pub budget: Arc<Budget>,
    pub temperature: f32,
    pub logprobs: bool,
    pub system_as_user: bool,
}

impl Llm {
    pub fn new(cfg: &LlmConfig, cache: Option<Cache>, max_tokens_total: Option<u64>) -> Result<Llm> {
        let client = Client::new(cfg.client_config())?;
        let budget =
            Arc::new(Budget::new(max_tokens_total, cfg.cost_per_1m_prompt, cfg.cost_per_1m_completion));
        Ok(Llm {
            client,
            cache,
            budget,
            temperature: cfg.temperature.unwrap_or(0.0),
            logprobs: cfg.logprobs.unwrap_or(true),
            system_as_user: cfg.system_as_user.unwrap_or(false),
        })
    }

    pub fn model(&self) -> &str {
        &self.client.config().model
    }

    /// A system + user request with this run's sampling settings.
    pub fn request(
        &self,
        system: String,
        user: String,
        max_tokens: u32,
        top_logprobs: Option<u32>,
    ) -> ChatRequest {
        self.request_messages(
            vec![message("system", &system), message("user", &user)],
            max_tokens,
            top_logprobs,
        )
    }

    /// A request of `messages` (the first one the system prompt) with this run's settings.
    pub fn request_messages(
        &self,
        mut messages: Vec<Message>,
        max_tokens: u32,
        top_logprobs: Option<u32>,
    ) -> ChatRequest {
        if self.system_as_user && messages.len() > 1 && messages[0].role == "system" {
            let system = messages.remove(0).content;
            messages[0].content = format!("{system}\n\n{}", messages[0].content);
        }
        ChatRequest {
            messages,
            max_tokens,
            temperature: self.temperature,
            top_logprobs: top_logprobs.filter(|_| self.logprobs),
        }
    }

    /// What this run spent: tokens, cost, answers from the cache, and the HTTP requests its
    /// client sent (every attempt, failed ones included).
    pub fn spent(&self) -> Spent {
        let (requests, retries) = self.client.sent();
        Spent { requests, retries, ..self.budget.spent() }
    }

    /// The cached answer to `req`, else the endpoint's (if the budget allows), cached. `what`
    /// names the request in announced waits (e.g. `feature 3`).
    pub async fn ask(&self, req: &ChatRequest, what: &str) -> Result<Answer, LlmError> {
        let key = request_key(&self.client.body(req));
        if let Some(mut response) = self.cache.as_ref().and_then(|c| c.get(&key)) {
            // An older cache may hold what an endpoint echoed before redaction existed.
            self.client.redact_response(&mut response);
            self.budget.add_cached();
            return Ok(Answer { response, key, cached: true });
        }
        // Checked once a slot is free, so at most `concurrency` requests overshoot the budget.
        let slot = self.client.slot().await;
        if let Err(why) = self.budget.check() {
            if self.budget.first_refusal() {
                self.client.notify(&format!(
                    "stopping: {why}; the requests left are not sent and are recorded as failed"
                ));
            }
            return Err(LlmError::Budget(why));
        }
        let response = self.client.chat_in_slot(req, what).await?;
        drop(slot);
        self.budget.add(response.usage);
        if let Some(cache) = &self.cache
            && let Err(e) = cache.put(&key, &response)
        {
            // The answer is still good; only a rerun loses it.
            eprintln!("warning: {e:#}");
        }
        Ok(Answer { response, key, cached: false })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        let e = toml::from_str::<LlmConfig>(text).unwrap_err();
        config_error(text, &e)
    }

    #[test]
    fn config_errors_name_the_line_the_key_and_the_reason() {
        let base = "base_url = \"http://x/v1\"\nmodel = \"m\"\n";
        let e = error_of(&format!("{base}concurrency = \"sixty-four\"\n"));
        assert!(e.starts_with("line 3, key concurrency: invalid type: string \"sixty-four\""), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = error_of(&format!("{base}concurency = 4\n"));
        assert!(e.contains("line 3") && e.contains("unknown field `concurency`"), "{e}");
        let e = error_of("base_url = \"http://x/v1\"\n");
        assert!(e.contains("missing field `model`"), "{e}");
        let e = error_of(&format!("{base}timeout_seconds = = 3\n"));
        assert!(e.starts_with("line 3") && e.len() > "line 3, key timeout_seconds: ".len(), "{e}");
    }
}

//! The LLM a run talks to: its config file (`llm.toml`), and [`Llm`], the client behind the
//! response cache and the budget. Explainers and scorers only call [`Llm::ask`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::budget::Budget;
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
        let cfg: LlmConfig = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{} is not a valid LLM config: {e}", path.display()))?;
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
    #[error(transparent)]
    Client(#[from] ClientError),
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

    /// The cached answer to `req`, else the endpoint's (if the budget allows), cached.
    pub async fn ask(&self, req: &ChatRequest) -> Result<Answer, LlmError> {
        let key = request_key(&self.client.body(req));
        if let Some(response) = self.cache.as_ref().and_then(|c| c.get(&key)) {
            self.budget.add_cached();
            return Ok(Answer { response, key, cached: true });
        }
        // Checked once a slot is free, so at most `concurrency` requests overshoot the budget.
        let slot = self.client.slot().await;
        self.budget.check().map_err(LlmError::Budget)?;
        let response = self.client.chat_in_slot(req).await?;
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

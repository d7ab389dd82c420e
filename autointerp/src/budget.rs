//! Token and cost accounting, and the token budget (`--max-tokens-total`).
//!
//! Requests are checked against the budget when they get a request slot, just before they are
//! sent; answers read from the cache cost nothing. Requests already in flight when the budget
//! is reached still complete, so a run may overshoot by at most `concurrency` answers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::client::Usage;

/// Counters shared by every request of a run.
#[derive(Debug, Default)]
pub struct Budget {
    /// Prompt + completion tokens allowed (None: no limit).
    pub max_tokens_total: Option<u64>,
    /// Price per million prompt and completion tokens (for the report only).
    pub cost_per_1m_prompt: f64,
    pub cost_per_1m_completion: f64,
    prompt: AtomicU64,
    completion: AtomicU64,
    cached: AtomicU64,
    /// Whether a request was refused for the budget yet (the run says so once).
    refused: AtomicBool,
}

/// A snapshot of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Spent {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// HTTP requests sent to the endpoint (every attempt, failed ones included; filled in by
    /// [`crate::llm::Llm::spent`]), of them retries, and answers read from the cache.
    pub requests: u64,
    pub retries: u64,
    pub cached: u64,
    pub cost: f64,
}

impl Budget {
    pub fn new(
        max_tokens_total: Option<u64>,
        cost_per_1m_prompt: f64,
        cost_per_1m_completion: f64,
    ) -> Budget {
        Budget { max_tokens_total, cost_per_1m_prompt, cost_per_1m_completion, ..Budget::default() }
    }

    /// `Err` with the reason once the budget is spent.
    pub fn check(&self) -> Result<(), String> {
        let Some(max) = self.max_tokens_total else { return Ok(()) };
        let spent = self.prompt.load(Ordering::Relaxed) + self.completion.load(Ordering::Relaxed);
        if spent >= max {
            return Err(format!("token budget reached ({spent} of --max-tokens-total {max} spent)"));
        }
        Ok(())
    }

    /// Whether this is the first request refused for the budget (to say so once).
    pub fn first_refusal(&self) -> bool {
        !self.refused.swap(true, Ordering::Relaxed)
    }

    pub fn add(&self, usage: Usage) {
        self.prompt.fetch_add(usage.prompt_tokens, Ordering::Relaxed);
        self.completion.fetch_add(usage.completion_tokens, Ordering::Relaxed);
    }

    pub fn add_cached(&self) {
        self.cached.fetch_add(1, Ordering::Relaxed);
    }

    pub fn spent(&self) -> Spent {
        let (p, c) = (self.prompt.load(Ordering::Relaxed), self.completion.load(Ordering::Relaxed));
        Spent {
            prompt_tokens: p,
            completion_tokens: c,
            requests: 0,
            retries: 0,
            cached: self.cached.load(Ordering::Relaxed),
            cost: (p as f64 * self.cost_per_1m_prompt + c as f64 * self.cost_per_1m_completion) / 1e6,
        }
    }
}

//! Scorers: how well an explanation predicts where a feature fires.
//! - [`classify`]: detection and fuzzing (an LLM labels examples; balanced accuracy, F1, and
//!   AUROC from the probability of "1" when the endpoint returns log-probabilities);
//! - [`simulation`]: an LLM predicts each token's activation (0-10); Pearson r with the truth;
//! - [`embedding`]: cosine of MiniLM embeddings of explanation and examples; AUROC, no LLM;
//! - [`intervention`]: steer the model with the feature; does the explanation match what it
//!   promotes better than other features' effects? (AUROC, no LLM).

use crate::client::{ChatRequest, ChatResponse};
use crate::llm::{Llm, LlmError};

pub mod classify;
pub mod embedding;
pub mod intervention;
pub mod metrics;
pub mod simulation;

pub const DETECTION: &str = "detection";
pub const FUZZING: &str = "fuzzing";
pub const SIMULATION: &str = "simulation";
pub const EMBEDDING: &str = "embedding";
pub const INTERVENTION: &str = "intervention";
pub const SCORERS: [&str; 5] = [DETECTION, FUZZING, SIMULATION, EMBEDDING, INTERVENTION];

/// What a scorer measured (the provenance is added by the run).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Measured {
    pub score: Option<f32>,
    pub balanced_accuracy: Option<f32>,
    pub f1: Option<f32>,
    pub auroc: Option<f32>,
    pub pearson: Option<f32>,
    pub n_examples: u32,
    pub example_rows: Vec<u64>,
    /// Keys (SHA-256) of the requests, and tokens spent.
    pub request_keys: Vec<String>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub max_tokens: u32,
    /// Why it failed; the requests it sent and their tokens are kept all the same.
    pub failure: Option<String>,
}

impl Measured {
    fn failed(mut self, why: String) -> Measured {
        self.failure = Some(why);
        self
    }

    /// Send one of a scorer's requests (`what` names it in announced waits), counting its key
    /// and tokens. `Ok(None)`: this request failed for good (the first such reason is kept in
    /// `first_failure`) and the scorer goes on without it; `Err`: the run must stop asking (the
    /// budget is spent, or the run stopped sending).
    async fn ask(
        &mut self,
        llm: &Llm,
        req: &ChatRequest,
        first_failure: &mut Option<String>,
        what: &str,
    ) -> Result<Option<ChatResponse>, String> {
        self.max_tokens = req.max_tokens;
        match llm.ask(req, what).await {
            Ok(answer) => {
                self.request_keys.push(answer.key);
                self.prompt_tokens += answer.response.usage.prompt_tokens;
                self.completion_tokens += answer.response.usage.completion_tokens;
                Ok(Some(answer.response))
            }
            Err(LlmError::Client(e)) => {
                first_failure.get_or_insert_with(|| e.to_string());
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        }
    }
}

//! loupe-autointerp: explain and score features with an LLM, search the explanations.
//!
//! The pipeline stage after feature analysis: it reads `features/<dict>/` and writes
//! `explanations/<dict>/` (and the search index in `index/<dict>/`) through [`loupe_store`].
//! - [`client`]: the OpenAI-compatible Chat Completions client (concurrency limit, retries that
//!   honour `Retry-After`, log-probabilities, the API key kept out of everything but the
//!   Authorization header, the key redacted from all that comes back; [`breaker`] stops a run
//!   whose requests keep failing); [`cache`], [`budget`] and [`llm`] put the response cache and
//!   the token budget around it;
//! - [`examples`]: delphi's train and test example sets; [`explain`]: the `delphi` and `offline`
//!   explainers; [`score`]: detection, fuzzing, simulation and embedding scorers;
//! - [`explain_run`] / [`score_run`]: runs over many features with per-feature resume
//!   ([`journal`]); [`search`]: semantic search over explanations.

pub mod breaker;
pub mod budget;
pub mod cache;
pub mod client;
pub mod examples;
pub mod explain;
pub mod explain_run;
pub mod journal;
pub mod llm;
pub mod run;
pub mod score;
pub mod score_run;
pub mod search;

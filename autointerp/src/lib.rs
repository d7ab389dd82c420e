//! loupe-autointerp: explain and score features with an LLM.
//!
//! Built so far: [`client`], the OpenAI-compatible Chat Completions client (concurrency limit,
//! retries with backoff that honour `Retry-After`, log-probabilities, the API key kept out of
//! everything but the Authorization header). Still to come (issue 7): the response cache,
//! budgets and per-feature resume, the explainers (delphi-style prompt and an offline one), the
//! scorers (detection, fuzzing, simulation, embedding, intervention), semantic search and export.
//! It reads feature examples from and will write explanations to the store ([`loupe_store`]).

pub mod client;

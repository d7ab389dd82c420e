//! loupe-autointerp: explain and score features with an LLM (not implemented yet).
//!
//! It will own the OpenAI-compatible client (tokio + reqwest: concurrency, retries, cache, budget),
//! the explainers (delphi-style prompt and an offline one) and the scorers (detection, fuzzing,
//! simulation, embedding, intervention). It reads feature examples from and writes explanations to
//! the store ([`loupe_store`]). Nothing here exists yet; the README's status table says what works.

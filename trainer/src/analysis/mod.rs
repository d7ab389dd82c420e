//! Feature analysis: what each feature of a dictionary responds to, from one streaming pass of
//! its sparse codes over held-out activations.
//!
//! Built so far: the per-feature accumulators ([`accumulate`]) — firing counts, sums, maxima,
//! log-spaced histograms, and each feature's top-activating tokens — exact and independent of how
//! the rows are chunked. Still to come (issue 6): the pass over a store (capturing on the fly when
//! the hook is missing), example windows and quantile examples, logit effects, the similar-feature
//! index, and the tables under `<store>/features/<dict>/` that `loupe analyze` writes.

pub mod accumulate;

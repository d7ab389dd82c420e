//! loupe-analysis: what a model and its dictionaries do, read from captured activations and
//! written as store tables.
//!
//! - [`features`]: what each feature of a dictionary responds to (`loupe analyze`): stats,
//!   examples, logit effects, similar and co-occurring features.
//! - [`heads`]: what each attention head does (`loupe heads`, `loupe dfa`): detector scores,
//!   ablations, attention patterns, direct feature attribution.
//! - [`circuits`]: which heads and MLPs carry a task (`loupe circuit`): activation and
//!   attribution patching, discrete-SAE circuit discovery, their evaluation.
//! - [`graphs`]: attribution graphs through transcoders (`loupe graph`), as circuit-tracer
//!   defines them.
//! - [`experts`]: what each expert of a mixture handles (`loupe experts`): usage, routing
//!   entropy, co-activation, vocabulary and domain specialization.
//!
//! Like every stage, this crate reads and writes only through [`loupe_store`];
//! it runs the model through [`loupe_model`] and the dictionaries through [`loupe_dict`].

pub mod circuits;
pub mod experts;
pub mod features;
pub mod graphs;
pub mod heads;

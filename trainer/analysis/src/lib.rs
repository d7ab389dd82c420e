//! loupe-analysis: what a model and its dictionaries do, read from captured activations and
//! written as store tables.
//!
//! - [`features`]: what each feature of a dictionary responds to (`loupe analyze`): stats,
//!   examples, logit effects, similar and co-occurring features.
//!
//! The coming analyses get a module of their own beside it: `heads/` (attention-head patterns and
//! scores), `circuits/` (feature-to-feature attributions) and `experts/` (what each expert of a
//! mixture handles). Like every stage, this crate reads and writes only through [`loupe_store`];
//! it runs the model through [`loupe_model`] and the dictionaries through [`loupe_dict`].

pub mod features;

//! loupe-trainer: from a model to dictionaries and feature analysis.
//!
//! - [`model`]: Loupe's own hooked transformers (Gemma 3 from GGUF or HF safetensors, GPT-2 and
//!   BERT from HF folders), with TransformerLens hook points for caching, interventions and
//!   gradients.
//! - [`tokenizer`]: tokenizers from an HF `tokenizer.json` or rebuilt from a GGUF's vocabulary
//!   (Gemma 3's matches transformers id for id).
//! - [`corpus`]: text files, folders and JSONL as numbered documents.
//! - [`capture`]: corpus → contexts → activations (and loss gradients) at hooks → store, resumable.
//! - [`dict`]: sparse dictionaries (the SAE variants and Monet experts), their training jobs and
//!   evaluation.
//! - [`analysis`]: what each feature responds to (`loupe analyze`): stats, examples, logit
//!   effects, similar and co-occurring features.
//!
//! The crate talks to the other stages only through [`loupe_store`]; the README's status table
//! says what works.

pub mod analysis;
pub mod capture;
pub mod corpus;
pub mod dict;
pub mod model;
pub mod tokenizer;

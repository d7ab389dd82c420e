//! loupe-trainer: from a model to dictionaries and feature analysis (not implemented yet).
//!
//! It will own, in folders named after the pipeline: `model/` (hooked Gemma 3, GPT-2 and BERT in
//! candle, weight loading, tokenizers), `capture` (corpus → activations in the store), `dict/`
//! (TopK, Mutual/Feature Choice, g-SAE, JumpReLU, L1, Monet), the training loop and evaluation, and
//! `analysis/` (feature statistics, heads, circuits). It talks to the other stages only through
//! [`loupe_store`]. Nothing here exists yet; the README's status table says what works.

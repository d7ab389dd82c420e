//! Loupe's integration tests as one binary (as ripgrep does), so a build links once rather than
//! once a file: each module is one file of this folder and says in its first line what it checks.
//! Shared helpers (the `loupe` binary, fixtures, planted stores) live in the crate's `src/`.

mod analysis;
mod analyze;
mod analyze_gemma;
mod autointerp;
mod autointerp_client;
mod autointerp_hostile;
mod bad_input;
mod bert_parity;
mod capture;
mod circuits_eval;
mod cli_messages;
mod corpus_input;
mod corpus_read;
mod data_safety;
mod dfa;
mod export;
mod fetch;
mod fuzz_regressions;
mod gemma3_hf;
mod gemma3_parity;
mod gpt2_parity;
mod gui;
mod gui_heads;
mod heads;
mod heads_parity;
mod hook_shapes;
mod hooks;
mod import;
mod intervention;
mod kill_writer;
mod logit_effects;
mod monet;
mod old_spellings;
mod progress;
mod sae_train;
mod saelens_import;
mod saelens_parity;
mod splice;
mod store_roundtrip;
mod tokenize_cli;
mod tokenizer_parity;
mod train_monet;
mod train_sae;

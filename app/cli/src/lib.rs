//! loupe-cli: the `loupe` command's headless subcommands, one module each, and the pipeline
//! benchmarks (`loupe bench …`). The binary (`app/src/main.rs`) parses the command line and calls
//! them; the subcommands that open or drive the desktop app (`gui`, `demo`, `bench gui`) live
//! there, beside the GUI library.
//!
//! A crate of its own so that the GUI library does not depend on it and it does not depend on the
//! GUI: a change to either recompiles only that crate and the small binary (BENCHMARKS.md, "Build
//! and CI time"). Each module talks to the pipeline crates only through their public APIs and the
//! store; errors end as one `error: …` line (in `main.rs`).

pub mod analyze_cmd;
pub mod bench;
pub mod capture_cmd;
pub mod circuit_cmd;
pub mod circuit_eval_cmd;
pub mod dfa_cmd;
pub mod dict_args;
pub mod experts_cmd;
pub mod explain_cmd;
pub mod export_cmd;
pub mod feature_cmd;
pub mod fetch;
pub mod graph_cmd;
pub mod heads_cmd;
pub mod progress;
pub mod store_cmd;
pub mod tokenize;
pub mod train_clt_cmd;
pub mod train_job;
pub mod train_moex_cmd;
pub mod train_monet_cmd;
pub mod train_sae_cmd;

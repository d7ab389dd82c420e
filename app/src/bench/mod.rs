//! `loupe bench …`: benchmarks that print their headline last, on one line, as
//! `<name>: <value> <unit>, ratio <r> vs <reference>`, with the reference measured in the same run.
//!
//! - [`store`]: the shuffled sampler against a raw sequential read of the same shard files.
//! - [`capture`]: activation capture (optionally with loss gradients) against PyTorch, run by the
//!   committed reference script `benches/reference/capture_reference.py` on the same tokens.
//! - [`train_sae`]: TopK SAE training against PyTorch (dense SAELens-style and sparse
//!   sparsify-style), `benches/reference/train_sae_reference.py`, and the encoder-GEMM limit.

mod capture;
mod store;
mod train_sae;

use anyhow::Result;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Write ~1 GiB of f16 activations, then compare the shuffled sampler to a raw sequential read.
    Store(store::StoreArgs),
    /// Capture blocks.6.hook_resid_post of Gemma 3 270M on 8 × 256 tokens, against PyTorch.
    Capture(capture::Args),
    /// Train a TopK SAE (d 640, n 16384, k 32, batch 4096) against PyTorch dense and sparse.
    TrainSae(train_sae::Args),
}

pub fn run(command: &BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Store(args) => store::store(args),
        BenchCommand::Capture(args) => capture::run(args),
        BenchCommand::TrainSae(args) => train_sae::run(args),
    }
}

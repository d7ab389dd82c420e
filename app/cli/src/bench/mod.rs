//! `loupe bench …`: benchmarks that print their headline last, on one line, as
//! `<name>: <value> <unit>, ratio <r> vs <reference>`, with the reference measured in the same run.
//!
//! - [`store`]: the shuffled sampler against a raw sequential read of the same shard files.
//! - [`capture`]: activation capture (optionally with loss gradients) against PyTorch, run by the
//!   committed reference script `benches/reference/capture_reference.py` on the same tokens.
//! - [`train_sae`]: TopK SAE training against PyTorch (dense SAELens-style and sparse
//!   sparsify-style), `benches/reference/train_sae_reference.py`, and the encoder-GEMM limit.
//! - [`train_monet`]: Monet training against a TopK SAE of equal parameters; memory as E doubles.
//! - [`heads`]: `loupe heads`' detector scores and single-head ablations of Gemma 3 270M against
//!   PyTorch doing them the TransformerLens way, `benches/reference/heads.py`.
//! - [`circuit`]: `loupe circuit`'s activation patching of every head and MLP of Gemma 3 270M on
//!   40 IOI pairs against PyTorch doing it the TransformerLens way, `benches/reference/circuit.py`,
//!   and the fast methods' speed-up over patching.
//! - [`graph`]: `loupe graph` on 64-, 512- and 2,048-token prompts on Gemma 3 270M against
//!   circuit-tracer 0.5.0 on the CPU, `benches/reference/graph.py`: time and peak memory.
//! - [`analyze`]: feature analysis against the dictionary's plain encoding of the same rows.
//! - [`similar`]: the similar-feature hnsw index (build, query latency, recall) against brute force.
//! - [`client`]: the Chat Completions client's requests/s on loopback against a bare reqwest loop.
//! - `loupe bench gui` (in the `loupe` binary, `app/src/bench_gui.rs`, since it drives the GUI):
//!   the desktop app's frame time and open time on a [`synthetic_store`] of 1,000,000 features.

mod analyze;
mod capture;
mod circuit;
mod client;
mod graph;
mod heads;
mod similar;
mod store;
pub mod synthetic_store;
mod train_monet;
mod train_sae;

use std::path::{Path, PathBuf};
use std::process::Output;

use anyhow::{Context, Result, bail};
use serde_json::Value;

#[derive(clap::Subcommand)]
pub enum BenchCommand {
    /// Write ~1 GiB of f16 activations, then compare the shuffled sampler to a raw sequential read.
    Store(store::StoreArgs),
    /// Capture blocks.6.hook_resid_post of Gemma 3 270M on 8 × 256 tokens, against PyTorch.
    Capture(capture::Args),
    /// Train a TopK SAE (d 640, n 16384, k 32, batch 4096) against PyTorch dense and sparse.
    TrainSae(train_sae::Args),
    /// Analyse a TopK SAE (n 16384) on 65,536 synthetic tokens, against plain encoding of the same rows.
    Analyze(analyze::Args),
    /// The similar-feature index: hnsw build, query latency and recall@10 on 65,536 × 640, against brute force.
    Similar(similar::Args),
    /// Train Monet VD (E 256, H 4) against a TopK SAE of equal parameters; memory at E and 2E.
    TrainMonet(train_monet::Args),
    /// Detector scores and single-head zero ablations of all 72 heads of Gemma 3 270M, against PyTorch.
    Heads(heads::Args),
    /// Patching of all 72 heads and 18 MLPs of Gemma 3 270M on 40 IOI pairs against PyTorch; the fast methods' speed-up.
    Circuit(circuit::Args),
    /// Attribution graphs of 64-, 512- and 2,048-token prompts on Gemma 3 270M against circuit-tracer.
    Graph(graph::Args),
    /// The Chat Completions client's requests/s against a zero-latency loopback server, against bare reqwest.
    Client(client::Args),
}

pub fn run(command: &BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Store(args) => store::store(args),
        BenchCommand::Capture(args) => capture::run(args),
        BenchCommand::TrainSae(args) => train_sae::run(args),
        BenchCommand::TrainMonet(args) => train_monet::run(args),
        BenchCommand::Similar(args) => similar::run(args),
        BenchCommand::Analyze(args) => analyze::run(args),
        BenchCommand::Client(args) => client::run(args),
        BenchCommand::Heads(args) => heads::run(args),
        BenchCommand::Circuit(args) => circuit::run(args),
        BenchCommand::Graph(args) => graph::run(args),
    }
}

/// The Python that runs the reference scripts: `$LOUPE_PYTHON`, or the venv of
/// `benches/reference/setup-env.sh`.
fn reference_python() -> PathBuf {
    match std::env::var_os("LOUPE_PYTHON") {
        Some(path) => PathBuf::from(path),
        None => crate::fetch::cache_dir().join("pyenv").join("bin").join("python"),
    }
}

/// What the Gemma benches read: the model (`model`, else the fetched default), the fetched
/// Moby-Dick corpus and the reference Python, each checked to exist (the Python only when a
/// reference will run), with one error line naming what is missing.
fn gemma_inputs(model: Option<&Path>, no_reference: bool) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let defaults = crate::fetch::defaults();
    if let Some(model) = model
        && !model.exists()
    {
        anyhow::bail!("model not found: {} does not exist", model.display());
    }
    let model = model.map(Path::to_path_buf).unwrap_or(defaults.gemma_gguf);
    let corpus = defaults.corpus_dir.join("moby-dick").join("data.txt");
    for path in [&model, &corpus] {
        if !path.exists() {
            anyhow::bail!("{} not found: run `loupe fetch` first", path.display());
        }
    }
    let python = reference_python();
    if !no_reference && !python.exists() {
        anyhow::bail!(
            "no Python reference environment ({} is missing): run benches/reference/setup-env.sh \
             (or set LOUPE_PYTHON to a Python with torch and transformers)",
            python.display()
        );
    }
    Ok((model, corpus, python))
}

/// A reference script's one-line JSON report from its finished run.
fn reference_report(output: std::io::Result<Output>, python: &Path) -> Result<Value> {
    let output = output
        .with_context(|| format!("cannot run {}: run benches/reference/setup-env.sh", python.display()))?;
    if !output.status.success() {
        bail!("the PyTorch reference failed ({}); its messages are above", output.status);
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().context("the PyTorch reference printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("the PyTorch reference printed {line:?}, not JSON"))
}

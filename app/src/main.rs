//! `loupe`: the command-line entry point.
//!
//! The subcommands live in loupe-cli (`app/cli`), one module each; the ones that open or drive
//! the desktop app (`gui`, `demo`, `bench gui`) live here, beside the GUI library. Each talks to
//! the pipeline crates only through their public APIs and the store. Errors end as one
//! `error: …` line on stderr and a non-zero exit.

mod bench_gui;
mod demo;
mod gui_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use loupe_cli::{
    analyze_cmd, bench, capture_cmd, circuit_cmd, dfa_cmd, dict_args, experts_cmd, explain_cmd, export_cmd,
    feature_cmd, fetch, graph_cmd, heads_cmd, store_cmd, tokenize, train_clt_cmd, train_moex_cmd,
    train_monet_cmd, train_sae_cmd,
};

/// mimalloc instead of the system allocator: training allocates and frees tensors of tens of MiB
/// every step, which glibc serves with fresh mmaps (page faults and zeroing each time); mimalloc
/// reuses them (BENCHMARKS.md, Monet).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "loupe",
    version,
    about = "Look inside transformer language models through sparse dictionaries."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole pipeline on the embedded default model and corpus.
    Demo(demo::Args),
    /// Download the default model, embedding model and corpus into the cache (idempotent).
    Fetch(fetch::Args),
    /// Capture a model's activations (and loss gradients) on a corpus into a store.
    Capture(capture_cmd::Args),
    /// Fit an SAE (TopK, Mutual Choice, Feature Choice, g-SAE, JumpReLU, ReLU) to a hook's activations in a store.
    TrainSae(train_sae_cmd::Args),
    /// Fit Monet product-key experts (autoencoder on a hook, or transcoder between two hooks).
    TrainMonet(train_monet_cmd::Args),
    /// Fit a MoE-X layer: ReLU experts with a sparsity-aware router, each (expert, unit) a feature (autoencoder on a hook, or transcoder between two hooks).
    TrainMoex(train_moex_cmd::Args),
    /// Fit a cross-layer transcoder to every layer's MLP input and output in a store (needs both hooks of each layer captured: 46 KB/token in f16 for Gemma 3 270M).
    TrainClt(train_clt_cmd::Args),
    /// CE-loss recovered and KL with every MLP replaced at once by a transcoder set (one CLT, or one per-layer transcoder per layer).
    SpliceTranscoders(train_clt_cmd::SpliceArgs),
    /// Analyse a dictionary's features: stats, top and quantile examples, logit effects, neighbours and co-occurring features.
    Analyze(analyze_cmd::Args),
    /// Score every attention head L.H: induction, previous- and duplicate-token detectors, single-head ablations.
    Heads(heads_cmd::Args),
    /// Find the heads and MLPs that carry a task (clean/corrupt pairs): patching, attribution patching or discrete-SAE; `circuit eval` compares them.
    Circuit(circuit_cmd::Args),
    /// Attribution graph of a prompt through transcoders (circuit-tracer's definition): features, errors, tokens and logits with their direct effects; `graph export` writes circuit-tracer JSON.
    Graph(graph_cmd::Args),
    /// What each expert of a mixture handles (a dictionary with experts, or a router hook): usage, routing entropy, co-activation, vocabulary and domain specialization.
    Experts(experts_cmd::Args),
    /// Print one analysed feature: stats, examples, logit effects, neighbours and co-occurring features.
    Feature(feature_cmd::Args),
    /// Direct feature attribution: a feature's pre-activation on a prompt split into heads (and source tokens) or residual-stream components.
    Dfa(dfa_cmd::Args),
    /// Explain features with an LLM (delphi-style prompt) or offline from token statistics.
    Explain(explain_cmd::ExplainArgs),
    /// Score explanations: detection, fuzzing, simulation (LLM) and embedding (local MiniLM).
    Score(explain_cmd::ScoreArgs),
    /// Find features by what their explanations say (MiniLM embeddings in an hnsw index).
    Search(explain_cmd::SearchArgs),
    /// Export a dictionary's explanations and scores as Parquet and Neuronpedia-style JSONL.gz batches.
    Export(export_cmd::Args),
    /// Import an SAELens or sparsify dictionary folder into a store (named after the folder
    /// unless --dictionary is given).
    #[command(mut_arg("store", |a| a.required(true)))]
    Import {
        /// The dictionary folder (cfg.json + sae_weights.safetensors or sae.safetensors).
        path: PathBuf,
        #[command(flatten)]
        target: dict_args::DictArgs,
        /// The TransformerLens hook it reads (default: the checkpoint's metadata.hook_name).
        #[arg(long)]
        hook: Option<String>,
    },
    /// Open the desktop app on a store: feature list and pages, prompt lab.
    Gui(gui_cmd::Args),
    /// Inspect and check a store.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Show how a model's tokenizer splits a text (one `id<TAB>token` line per token).
    Tokenize(tokenize::Args),
    /// Benchmarks that print their ratio against a reference measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
}

/// The pipeline benchmarks (loupe-cli) and the GUI's (here, since it drives the app).
#[derive(Subcommand)]
enum BenchCommand {
    #[command(flatten)]
    Pipeline(bench::BenchCommand),
    /// The desktop app's frame time (scrolling the list, redrawing a page) and open time on 1,000,000 synthetic features.
    Gui(bench_gui::Args),
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Print what a store holds (and check that every listed file is present with its size).
    Info {
        /// The store folder.
        dir: PathBuf,
    },
    /// Check every shard: checksum, Arrow schema, width, row count.
    Verify {
        /// The store folder.
        dir: PathBuf,
    },
    /// Remove a dictionary (its manifest entry, then its folder).
    RemoveDictionary {
        /// The store folder.
        dir: PathBuf,
        /// The dictionary's name.
        name: String,
    },
}

fn main() -> ExitCode {
    tune_allocator();
    #[cfg(unix)]
    // SAFETY: restores the default action of SIGPIPE before any other thread exists, so that
    // `loupe store info … | head` ends quietly like other Unix tools instead of panicking in
    // println! (Rust ignores SIGPIPE by default). Store writes are atomic, so a kill loses nothing.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Fetch(args) => fetch::run(&args),
        Command::Capture(args) => capture_cmd::run(&args),
        Command::TrainSae(args) => train_sae_cmd::run(&args),
        Command::TrainMonet(args) => train_monet_cmd::run(&args),
        Command::TrainMoex(args) => train_moex_cmd::run(&args),
        Command::TrainClt(args) => train_clt_cmd::run(&args),
        Command::SpliceTranscoders(args) => train_clt_cmd::run_splice(&args),
        Command::Analyze(args) => analyze_cmd::run(&args),
        Command::Heads(args) => heads_cmd::run(&args),
        Command::Circuit(args) => circuit_cmd::run(&args),
        Command::Graph(args) => graph_cmd::run(&args),
        Command::Experts(args) => experts_cmd::run(&args),
        Command::Feature(args) => feature_cmd::run(&args),
        Command::Dfa(args) => dfa_cmd::run(&args),
        Command::Explain(args) => explain_cmd::run_explain(&args),
        Command::Score(args) => explain_cmd::run_score(&args),
        Command::Search(args) => explain_cmd::run_search(&args),
        Command::Export(args) => export_cmd::run(&args),
        Command::Gui(args) => gui_cmd::run(&args),
        Command::Import { path, target, hook } => target.store().and_then(|store| {
            loupe_dict::import::import(store, &path, target.dictionary.as_deref(), hook.as_deref()).map(
                |name| {
                    println!("imported {} into {} as dictionary {name}", path.display(), store.display());
                },
            )
        }),
        Command::Store(StoreCommand::Info { dir }) => store_cmd::info(&dir),
        Command::Store(StoreCommand::Verify { dir }) => store_cmd::verify(&dir),
        Command::Store(StoreCommand::RemoveDictionary { dir, name }) => {
            loupe_store::Store::open_rw(&dir).and_then(|s| s.remove_dictionary(&name))
        }
        Command::Tokenize(args) => tokenize::run(&args),
        Command::Bench(BenchCommand::Pipeline(command)) => bench::run(&command),
        Command::Bench(BenchCommand::Gui(args)) => bench_gui::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error chain on one line: causes joined with ": ", each cut at its first line (candle
/// appends a backtrace to its errors when RUST_BACKTRACE is set).
fn one_line(e: &anyhow::Error) -> String {
    let parts: Vec<String> =
        e.chain().map(|c| c.to_string().lines().next().unwrap_or("").to_string()).collect();
    let mut out: Vec<String> = Vec::new();
    for part in parts {
        // anyhow's context often repeats the inner message; keep each piece once.
        if !out.iter().any(|o| o.contains(&part)) {
            out.push(part);
        }
    }
    out.join(": ")
}

/// Keep freed tensor buffers in the heap for reuse. By default mimalloc returns freed memory to
/// the OS 10 ms later, so every forward pass page-faults (and the kernel zeroes) its activations
/// again: a fifth of a `capture --with-grads` batch (BENCHMARKS.md). Never purging keeps the
/// process at its peak footprint instead, which a batch reaches again anyway.
fn tune_allocator() {
    /// `mi_option_purge_delay` in mimalloc 3's `mi_option_t` (libmimalloc-sys exports no constant).
    const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: only sets an allocator option (the same as MIMALLOC_PURGE_DELAY=-1).
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

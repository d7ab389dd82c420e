//! `loupe`: the command-line entry point.
//!
//! Each subcommand lives in its own module and talks to the pipeline crates only through their
//! public APIs and the store. Errors end as one `error: …` line on stderr and a non-zero exit.

mod bench;
mod demo;
mod fetch;
mod store_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Inspect and check a store.
    #[command(subcommand)]
    Store(StoreCommand),
    /// Benchmarks that print their ratio against a reference measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
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
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Write ~1 GiB of f16 activations, then compare the shuffled sampler to a raw sequential read.
    Store(bench::StoreArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Fetch(args) => fetch::run(&args),
        Command::Store(StoreCommand::Info { dir }) => store_cmd::info(&dir),
        Command::Store(StoreCommand::Verify { dir }) => store_cmd::verify(&dir),
        Command::Bench(BenchCommand::Store(args)) => bench::store(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

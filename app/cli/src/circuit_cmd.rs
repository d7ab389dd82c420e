//! `loupe circuit`: find which heads and MLPs carry a task (a JSONL file of clean/corrupt pairs)
//! with one method — activation patching (the ground truth), attribution patching, or the
//! discrete-SAE method — into the store's `circuits/<name>/`; `loupe circuit eval`
//! (`circuit_eval_cmd`): the fast methods against the ground truth.

use std::path::PathBuf;

use anyhow::{Result, bail};

use crate::circuit_eval_cmd;

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Args {
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
    #[command(flatten)]
    pub(crate) run: RunArgs,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Compare attribution and discrete-SAE against patching on a task: node and edge ROC AUC,
    /// faithfulness (CPR, CMD) and wall times, into circuits/evals/<name>/.
    Eval(circuit_eval_cmd::Args),
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// The store folder.
    #[arg(long, required = true)]
    pub(crate) store: Option<PathBuf>,
    /// The model (default: the one the store records).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// The task: JSONL pairs {"clean", "corrupt", "answer", "wrong"} (or "answers"/"wrongs").
    #[arg(long, required = true)]
    pub(crate) task: Option<PathBuf>,
    /// patching (each node patched alone: the ground truth), attribution (attribution patching of
    /// nodes and edges) or discrete-sae (O'Neill & Bui).
    #[arg(long, default_value = "patching")]
    pub(crate) method: String,
    /// The circuit's name in the store (circuits/<name>/; default: <task stem>-<method>); a rerun
    /// replaces it.
    #[arg(long)]
    pub(crate) name: Option<String>,
}

pub fn run(args: &Args) -> Result<()> {
    match &args.command {
        Some(Command::Eval(eval)) => circuit_eval_cmd::run(eval),
        None => find(&args.run),
    }
}

/// `loupe circuit` itself.
fn find(args: &RunArgs) -> Result<()> {
    let _ = args;
    bail!("loupe circuit is not implemented yet")
}

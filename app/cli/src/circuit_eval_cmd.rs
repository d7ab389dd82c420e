//! `loupe circuit eval`: each fast method (attribution, discrete-sae) against the patching ground
//! truth on one task — node and edge ROC AUC (two definitions of a positive), faithfulness at
//! k ∈ {1, 2, 5, 10, 20, 50, 100} % of nodes, CPR, CMD and wall times — printed and written as
//! the store's `circuits/evals/<name>/`.

use std::path::PathBuf;

use anyhow::{Result, bail};

#[derive(clap::Args)]
pub struct Args {
    /// The store folder.
    #[arg(long)]
    pub(crate) store: PathBuf,
    /// The model (default: the one the store records).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// The task file.
    #[arg(long)]
    pub(crate) task: PathBuf,
    /// The evaluation's name in the store (default: the task file's stem).
    #[arg(long)]
    pub(crate) name: Option<String>,
}

pub fn run(args: &Args) -> Result<()> {
    let _ = args;
    bail!("loupe circuit eval is not implemented yet")
}

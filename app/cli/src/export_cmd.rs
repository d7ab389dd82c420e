//! `loupe export`: write a dictionary's explanations and scores as Parquet and as
//! Neuronpedia-style JSONL.gz batches (the layout is `loupe_store::export`'s), and print one
//! summary line.

use std::path::PathBuf;

use anyhow::Result;
use loupe_store::Store;
use loupe_store::export::{DEFAULT_BATCH_SIZE, ExportOptions, export};

use crate::dict_args::{self, DictArgs};

#[derive(clap::Args)]
#[command(mut_args(dict_args::required))]
pub struct Args {
    #[command(flatten)]
    pub(crate) target: DictArgs,
    /// The folder to write (created if missing).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Neuronpedia records per batch file.
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE)]
    pub(crate) batch_size: usize,
    /// The records' `modelId` (default: the store's model name).
    #[arg(long)]
    pub(crate) model_id: Option<String>,
    /// The records' `layer` (default: the dictionary's name).
    #[arg(long)]
    pub(crate) layer: Option<String>,
    /// Replace an earlier export in the folder.
    #[arg(long)]
    pub(crate) overwrite: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let store = Store::open(args.target.store()?)?;
    let opts = ExportOptions {
        batch_size: args.batch_size,
        model_id: args.model_id.clone(),
        layer: args.layer.clone(),
        overwrite: args.overwrite,
    };
    let s = export(&store, args.target.dictionary()?, &args.out, &opts)?;
    let batches = s.files.iter().filter(|f| f.ends_with(".jsonl.gz")).count();
    println!(
        "exported {} explanations ({} failed) and {} scores of {} to {}: 2 Parquet files, {} Neuronpedia records in {} batches",
        s.explanations,
        s.failed,
        s.scores,
        s.dictionary,
        args.out.display(),
        s.records,
        batches
    );
    Ok(())
}

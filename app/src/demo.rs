//! `loupe demo`: the whole pipeline on the embedded defaults.
//!
//! Today the pipeline ends after its first stage: fetch the defaults and create the demo store with
//! the model's identity. Capture, training, analysis, explanations and the app are not built yet;
//! the command says so instead of pretending.

use std::path::PathBuf;

use anyhow::Result;
use loupe_store::{ModelInfo, Store};

use crate::fetch;

#[derive(clap::Args)]
pub struct Args {
    /// The store the demo writes.
    #[arg(long, default_value = "loupe-demo")]
    store: PathBuf,
    /// Print a summary instead of opening the desktop app.
    #[arg(long)]
    headless: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let defaults = fetch::fetch(false)?;
    let store = Store::create(&args.store)?;
    store.set_model(
        ModelInfo {
            name: "gemma-3-270m".into(),
            architecture: "gemma3".into(),
            path: defaults.gemma_gguf.display().to_string(),
            sha256: fetch::GEMMA_SHA256.into(),
        },
        None,
    )?;
    println!("demo store: {} (model gemma-3-270m recorded)", args.store.display());
    println!("model:      {}", defaults.gemma_gguf.display());
    println!("embeddings: {}", defaults.minilm_dir.display());
    println!("corpus:     {}", defaults.corpus_dir.display());
    println!(
        "not built yet, so the demo stops here: capture, train-sae, train-monet, analyze, explain, score, export{}",
        if args.headless { "" } else { ", gui" }
    );
    Ok(())
}

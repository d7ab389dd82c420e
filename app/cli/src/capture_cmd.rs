//! `loupe capture`: activations (and loss gradients) of a model on a corpus, into a store.

use std::path::PathBuf;

use anyhow::Result;
use loupe_model::capture::{CaptureConfig, capture};
use loupe_store::DType;

use crate::progress::Bar;

#[derive(clap::Args)]
pub struct Args {
    /// Model: a GGUF file or an HF directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Corpus: a UTF-8 text file, a folder of them, or JSONL with a "text" field.
    #[arg(long)]
    pub corpus: PathBuf,
    /// The store to write (created if missing; resumed if it holds this capture unfinished).
    #[arg(long)]
    pub store: PathBuf,
    /// Hook points to capture (TransformerLens names), e.g. blocks.6.hook_resid_post.
    #[arg(long = "hook", required = true)]
    pub hooks: Vec<String>,
    /// Tokens per context, BOS included.
    #[arg(long, default_value_t = 256)]
    pub context: usize,
    /// Tokens between context starts (default: contexts do not overlap).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Do not put a BOS token at the start of each context.
    #[arg(long)]
    pub no_bos: bool,
    /// Element type stored: f32 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: DType,
    /// Also store the gradient of the next-token loss at each hook.
    #[arg(long)]
    pub with_grads: bool,
    /// Contexts per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Stop after about this many stored tokens.
    #[arg(long)]
    pub max_tokens: Option<u64>,
    /// Rows per shard (default: ~128 MiB shards).
    #[arg(long)]
    pub shard_rows: Option<usize>,
}

pub fn run(args: &Args) -> Result<()> {
    let cfg = CaptureConfig {
        model: args.model.clone(),
        corpus: args.corpus.clone(),
        store: args.store.clone(),
        hooks: args.hooks.clone(),
        context: args.context,
        stride: args.stride,
        bos: !args.no_bos,
        dtype: args.dtype,
        grads: args.with_grads,
        batch: args.batch,
        shard_rows: args.shard_rows,
        max_tokens: args.max_tokens,
    };
    let bar = Bar::new("{prefix} {bar:30} {percent}% of corpus  {msg}  [{elapsed} < {eta}]");
    let report = capture(&cfg, &bar)?;
    bar.indicatif().finish_and_clear();
    if report.already_complete {
        println!("capture already complete in {}: {} tokens", args.store.display(), report.tokens);
        return Ok(());
    }
    if let Some(at) = report.resumed_at {
        println!("resumed at {at} tokens");
    }
    if report.skipped.invalid_utf8 > 0 {
        eprintln!(
            "note: skipped {} documents that are not valid UTF-8 (first: {})",
            report.skipped.invalid_utf8,
            report.skipped.first.as_deref().unwrap_or("?")
        );
    }
    println!(
        "captured {} tokens in {} contexts into {} ({:.1} s)",
        report.tokens,
        report.contexts,
        args.store.display(),
        report.seconds
    );
    Ok(())
}

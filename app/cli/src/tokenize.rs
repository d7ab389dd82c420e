//! `loupe tokenize`: show how a model's tokenizer splits a text.
//!
//! The model is a GGUF file (tokenizer rebuilt from its metadata) or an HF directory with a
//! `tokenizer.json` (default: the fetched Gemma 3 270M GGUF). Prints one `id<TAB>token` line per
//! token, the token spelled as the vocabulary has it and quoted with Rust's `{:?}` so spaces (`▁`),
//! tabs and newlines stay visible; `--json` prints `{"ids": [...], "tokens": [...]}` instead. The
//! special tokens the model adds around a text (BOS for Gemma, `[CLS]`/`[SEP]` for BERT) are
//! included unless `--no-bos`. The text `-` means standard input, read as is (NUL bytes, texts
//! longer than a command line allows; a trailing newline is part of the text).

use std::path::PathBuf;

use std::io::Read;

use anyhow::{Context, Result, bail};
use loupe_model::tokenizer::Tokenizer;

use crate::fetch;

#[derive(clap::Args)]
pub struct Args {
    /// A GGUF file or an HF model directory with tokenizer.json [default: the fetched Gemma 3 270M].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Print {"ids": [...], "tokens": [...]} instead of one line per token.
    #[arg(long)]
    json: bool,
    /// Leave out the special tokens the model adds around a text (BOS, [CLS]/[SEP]).
    #[arg(long)]
    no_bos: bool,
    /// The text to tokenize; `-` reads it from standard input.
    text: String,
}

pub fn run(args: &Args) -> Result<()> {
    let model = match &args.model {
        Some(path) => path.clone(),
        None => {
            let path = fetch::defaults().gemma_gguf;
            if !path.is_file() {
                bail!("the default model {} is missing: run `loupe fetch` (or pass --model)", path.display());
            }
            path
        }
    };
    let tokenizer = Tokenizer::load(&model)?;
    let text = if args.text == "-" { stdin_text()? } else { args.text.clone() };
    let ids = tokenizer.encode(&text, !args.no_bos)?;
    let tokens = tokenizer.token_strings(&ids);
    if args.json {
        println!("{}", serde_json::json!({ "ids": ids, "tokens": tokens }));
    } else {
        for (id, token) in ids.iter().zip(&tokens) {
            println!("{id}\t{token:?}");
        }
    }
    Ok(())
}

/// Standard input, whole, as text.
fn stdin_text() -> Result<String> {
    let mut bytes = Vec::new();
    std::io::stdin().read_to_end(&mut bytes).context("cannot read standard input")?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "standard input is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        )
    })
}

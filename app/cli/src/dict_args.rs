//! `--store` and `--dictionary`: one struct, flattened into every command that names a dictionary
//! of a store, so that the two flags are spelled and explained the same everywhere. Commands that
//! need both mark them required (`#[command(mut_arg(...))]`); `train-sae`, `train-monet` and
//! `import` may leave them out (a TOML config or a default fills them in).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

#[derive(clap::Args, Serialize, Deserialize, Default, Debug, Clone)]
pub struct DictArgs {
    /// The store: the project folder that `loupe capture` made.
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// The dictionary's name in the store (train-sae, train-monet and import, which make one,
    /// give it a default name when this is left out).
    #[arg(long, alias = "name")]
    pub dictionary: Option<String>,
}

impl DictArgs {
    pub fn new(store: PathBuf, dictionary: String) -> DictArgs {
        DictArgs { store: Some(store), dictionary: Some(dictionary) }
    }

    pub fn store(&self) -> Result<&Path> {
        self.store.as_deref().context("no --store given")
    }

    pub fn dictionary(&self) -> Result<&str> {
        self.dictionary.as_deref().context("no --dictionary given")
    }
}

/// `--store` and `--dictionary` made required, for `#[command(mut_args(dict_args::required))]` on
/// a command that reads an existing dictionary.
pub fn required(arg: clap::Arg) -> clap::Arg {
    match arg.get_id().as_str() {
        "store" | "dictionary" => arg.required(true),
        _ => arg,
    }
}

//! `loupe graph`: the attribution graph of one prompt through a set of transcoders, into the
//! store's `circuits/graphs/<name>/`.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use loupe_store::{GraphEntry, GraphSettings, Progress};

/// What `loupe graph` is asked.
#[derive(Clone, Debug)]
pub struct GraphJob {
    pub store: PathBuf,
    /// The model (default: the one the store records).
    pub model: Option<PathBuf>,
    /// The transcoders replacing the MLPs: one per layer, or one CLT.
    pub transcoders: Vec<String>,
    pub prompt: String,
    /// The graph's name (default: derived from the prompt).
    pub name: Option<String>,
    /// Replace a graph of the same name (without it, an existing name is an error).
    pub overwrite: bool,
    pub settings: GraphSettings,
}

/// Build and write the graph; returns its name and manifest entry.
pub fn run(job: &GraphJob, progress: &dyn Progress) -> Result<(String, GraphEntry)> {
    let _ = progress;
    bail!("loupe graph is not built yet (store {}, transcoders {:?})", job.store.display(), job.transcoders)
}

/// The default name of a prompt's graph.
pub fn default_name(prompt: &str) -> String {
    let words: String = prompt
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect();
    let words: Vec<&str> = words.split('-').filter(|w| !w.is_empty()).take(6).collect();
    if words.is_empty() { "graph".to_string() } else { words.join("-") }
}

/// Where `loupe graph export` writes when no `--out` is given.
pub fn default_export_path(name: &str) -> PathBuf {
    Path::new(&format!("{name}.json")).to_path_buf()
}

//! `loupe gui`: open the desktop app on a store (read-only).

use std::path::PathBuf;

use anyhow::{Result, bail};
use loupe_app::gui::{self, Options};

#[derive(clap::Args)]
pub struct Args {
    /// The store to browse.
    pub(crate) store: PathBuf,
    /// The dictionary to show first (default: the first analysed one).
    #[arg(long)]
    pub(crate) dictionary: Option<String>,
    /// A feature to open at start.
    #[arg(long)]
    pub(crate) feature: Option<u32>,
    /// The model for the prompt lab (default: the model the store records).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// The MiniLM folder for semantic search (default: the fetched all-MiniLM-L6-v2).
    #[arg(long)]
    pub(crate) embedder: Option<PathBuf>,
    /// The view to show first.
    #[arg(long, value_enum)]
    pub(crate) view: Option<gui::Tab>,
    /// A prompt to run in the prompt lab as soon as the dictionary is loaded.
    #[arg(long)]
    pub(crate) prompt: Option<String>,
    /// A head `L.H` to open at start, in the Heads view (its attention pattern on the prompt).
    #[arg(long)]
    pub(crate) head: Option<String>,
    /// A circuit to show at start, in the Circuits view (a name under the store's circuits/).
    #[arg(long)]
    pub(crate) circuit: Option<String>,
    /// An attribution graph to show at start, in the Graph view (a name `loupe graph` wrote).
    #[arg(long)]
    pub(crate) graph: Option<String>,
    /// An experts entry to show at start, in the Experts view (a name `loupe experts` wrote).
    #[arg(long)]
    pub(crate) experts: Option<String>,
}

pub fn options(args: &Args) -> Result<Options> {
    // What the window would show as an error, checked first: one line, before any window opens.
    let store = loupe_store::Store::open(&args.store)?;
    let analysed = store.manifest().features;
    if let Some(d) = &args.dictionary {
        let Some(entry) = analysed.get(d) else {
            let names: Vec<&str> = analysed.keys().map(String::as_str).collect();
            let listed = if names.is_empty() { "none".to_string() } else { names.join(", ") };
            bail!(
                "{} has no analysis of {d:?} (analysed: {listed}); run `loupe analyze` first",
                args.store.display()
            );
        };
        if let Some(f) = args.feature.filter(|&f| f >= entry.n_features) {
            bail!("feature {f} does not exist ({d} has {} features)", entry.n_features);
        }
    }
    // A head is checked against the store's heads table when it has one (else its form only;
    // the model says the rest when the pattern runs).
    let head = match &args.head {
        None => None,
        Some(text) => {
            let manifest = store.manifest();
            let (layers, heads) = manifest
                .heads
                .values()
                .next()
                .map_or((usize::MAX, usize::MAX), |e| (e.n_layers as usize, e.n_heads as usize));
            Some(loupe_analysis::heads::parse_head(text, layers, heads)?)
        }
    };
    if let Some(c) = args.circuit.as_ref().filter(|c| !store.manifest().circuits.contains_key(*c)) {
        let names: Vec<String> = store.circuit_names();
        let listed =
            if names.is_empty() { "none; run `loupe circuit` first".to_string() } else { names.join(", ") };
        bail!("{} has no circuit {c:?} (circuits: {listed})", args.store.display());
    }
    if let Some(g) = args.graph.as_ref().filter(|g| !store.manifest().graphs.contains_key(*g)) {
        let names = store.graph_names();
        let listed =
            if names.is_empty() { "none; run `loupe graph` first".to_string() } else { names.join(", ") };
        bail!("{} has no attribution graph {g:?} (graphs: {listed})", args.store.display());
    }
    if let Some(x) = args.experts.as_ref().filter(|x| !store.manifest().experts.contains_key(*x)) {
        let names = store.experts_names();
        let listed =
            if names.is_empty() { "none; run `loupe experts` first".to_string() } else { names.join(", ") };
        bail!("{} has no expert tables {x:?} (experts: {listed})", args.store.display());
    }
    if let Some(m) = args.model.as_ref().filter(|m| !m.exists()) {
        bail!("model not found: {} does not exist", m.display());
    }
    let embedder = match &args.embedder {
        Some(dir) if !dir.join("config.json").is_file() => {
            bail!("{} is not a MiniLM folder (no config.json)", dir.display())
        }
        Some(dir) => Some(dir.clone()),
        None => Some(loupe_cli::fetch::defaults().minilm_dir).filter(|d| d.join("config.json").is_file()),
    };
    Ok(Options {
        store: args.store.clone(),
        dictionary: args.dictionary.clone(),
        feature: args.feature,
        model: args.model.clone(),
        embedder,
        view: args.view,
        prompt: args.prompt.clone(),
        head,
        circuit: args.circuit.clone(),
        graph: args.graph.clone(),
        experts: args.experts.clone(),
    })
}

pub fn run(args: &Args) -> Result<()> {
    gui::run(options(args)?)
}

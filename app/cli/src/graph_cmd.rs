//! `loupe graph`: the attribution graph of one prompt through a set of transcoders, into the
//! store's `circuits/graphs/<name>/`; `loupe graph export`: a stored graph as circuit-tracer's
//! JSON.

use std::path::PathBuf;

use anyhow::{Context, Result};
use loupe_analysis::graphs::{export, paths, run};
use loupe_store::{GraphSettings, Store};

use crate::progress::Bar;

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
    /// Write a stored graph as circuit-tracer's JSON (nodes, links, metadata).
    Export(ExportArgs),
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// The store folder.
    #[arg(long, required = true)]
    pub(crate) store: Option<PathBuf>,
    /// The model (default: the one the store records).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// The transcoders that replace the MLPs: one dictionary per layer (comma-separated, any
    /// order) or one cross-layer transcoder.
    #[arg(long, required = true, value_delimiter = ',')]
    pub(crate) transcoders: Vec<String>,
    /// The prompt (BOS is prepended).
    #[arg(long, required = true)]
    pub(crate) prompt: Option<String>,
    /// The graph's name in the store (circuits/graphs/<name>/; default: from the prompt).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Replace a graph of the same name.
    #[arg(long)]
    pub(crate) overwrite: bool,
    /// At most this many logits (the most probable, until --logit-probability).
    #[arg(long, default_value_t = 10)]
    pub(crate) max_logits: u32,
    /// Cumulative probability of the logits kept.
    #[arg(long, default_value_t = 0.95)]
    pub(crate) logit_probability: f32,
    /// Feature nodes whose incoming edges are computed (the most influential first).
    #[arg(long, default_value_t = 7500)]
    pub(crate) max_feature_nodes: u32,
    /// Keep nodes until this share of the influence on the logits.
    #[arg(long, default_value_t = 0.8)]
    pub(crate) node_threshold: f32,
    /// Keep edges until this share of the edge influence.
    #[arg(long, default_value_t = 0.98)]
    pub(crate) edge_threshold: f32,
    /// Targets per backward batch.
    #[arg(long, default_value_t = 256)]
    pub(crate) batch: u32,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The store folder.
    #[arg(long)]
    pub(crate) store: PathBuf,
    /// The graph's name.
    #[arg(long)]
    pub(crate) name: String,
    /// The JSON file to write (default: <name>.json).
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
}

pub fn run(args: &Args) -> Result<()> {
    match &args.command {
        Some(Command::Export(e)) => export_graph(e),
        None => build(&args.run),
    }
}

fn build(args: &RunArgs) -> Result<()> {
    let settings = GraphSettings {
        max_logits: args.max_logits,
        logit_probability: args.logit_probability,
        max_feature_nodes: args.max_feature_nodes,
        node_threshold: args.node_threshold,
        edge_threshold: args.edge_threshold,
        batch: args.batch,
    };
    let job = run::GraphJob {
        store: args.store.clone().context("--store is required")?,
        model: args.model.clone(),
        transcoders: args.transcoders.clone(),
        prompt: args.prompt.clone().context("--prompt is required")?,
        name: args.name.clone(),
        overwrite: args.overwrite,
        settings,
    };
    let bar = Bar::new("{prefix:24} {bar:30} {pos}/{len}  [{elapsed}]");
    let (name, entry) = run::run(&job, &bar)?;
    bar.indicatif().finish_and_clear();
    println!(
        "graph {name}: {} tokens, {} active features, {} nodes and {} edges kept",
        entry.tokens.len(),
        entry.active_features,
        entry.n_nodes,
        entry.n_edges
    );
    println!(
        "replacement score {:.3} (unpruned {:.3}), completeness score {:.3} (unpruned {:.3})",
        entry.replacement_score,
        entry.replacement_score_unpruned,
        entry.completeness_score,
        entry.completeness_score_unpruned
    );
    let store = Store::open(&job.store)?;
    let graph = store.read_graph(&name)?.context("the graph just written is not listed")?;
    if let Some(top) = graph.nodes.iter().find(|n| n.kind == "logit") {
        let model = loupe_model::Session::require(&store.manifest(), job.model.as_deref(), None)?;
        let tokenizer = loupe_model::tokenizer::Tokenizer::load(&model)?;
        let texts = run::token_texts(&tokenizer, &[top.feature]);
        println!(
            "top logit: {:?} (p = {:.3}), node {}",
            texts[0],
            top.probability.unwrap_or(0.0),
            top.node_id
        );
        match paths::strongest_path(&graph.nodes, &graph.edges, top.node) {
            Some((path, product)) => {
                let ids: Vec<&str> = path.iter().map(|&i| graph.nodes[i as usize].node_id.as_str()).collect();
                println!(
                    "strongest path into it (product of edge shares {product:.3e}): {}",
                    ids.join(" → ")
                );
            }
            None => println!("no path from the tokens reaches it in the pruned graph"),
        }
    }
    println!("wall time {:.1} s", entry.wall_s);
    println!("wrote circuits/graphs/{name} in {}", job.store.display());
    Ok(())
}

fn export_graph(args: &ExportArgs) -> Result<()> {
    let store = Store::open(&args.store)?;
    let out = args.out.clone().unwrap_or_else(|| run::default_export_path(&args.name));
    let (nodes, links) = export::export(&store, &args.name, &out)?;
    println!("wrote {} ({nodes} nodes, {links} links)", out.display());
    Ok(())
}

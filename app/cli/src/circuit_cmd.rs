//! `loupe circuit`: find which heads and MLPs carry a task (a JSONL file of clean/corrupt pairs)
//! with one method — activation patching (the ground truth), attribution patching, or the
//! discrete-SAE method — into the store's `circuits/<name>/`; `loupe circuit eval`
//! (`circuit_eval_cmd`): the fast methods against the ground truth.

use std::path::PathBuf;

use anyhow::{Context, Result};
use loupe_analysis::circuits::run::{self, Method, default_name};
use loupe_model::Session;
use loupe_store::Store;

use crate::circuit_eval_cmd;
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
    let store_dir = args.store.as_ref().context("--store is required")?;
    let task = args.task.as_ref().context("--task is required")?;
    let method: Method = args.method.parse()?;
    let file =
        task.file_name().map_or_else(|| task.display().to_string(), |f| f.to_string_lossy().into_owned());
    let name = args.name.clone().unwrap_or_else(|| default_name(&file, method));
    loupe_store::circuits::check_circuit_name(&name)?;
    let manifest = Store::open(store_dir)?.manifest();
    let session = Session::open(&manifest, args.model.as_deref(), Some("pass --model"))?;
    let store = Store::open_rw(store_dir)?;
    let bar = Bar::new("{prefix:24} {bar:30} {pos}/{len}  [{elapsed}]");
    let report = run::run(&store, &session, task, method, &name, &bar)?;
    bar.indicatif().finish_and_clear();

    let e = &report.entry;
    let t = &e.task;
    println!(
        "{} on {} ({} pairs, {}) with {}: {} nodes, {} edges",
        e.method,
        t.file,
        t.pairs,
        t.metric,
        e.model,
        report.nodes.len(),
        report.edges.len()
    );
    println!(
        "metric clean {:.4}, corrupt {:.4}; accuracy {:.1} % (clean metric > 0)",
        t.metric_clean,
        t.metric_corrupt,
        100.0 * t.accuracy
    );
    let mut nodes: Vec<_> = report.nodes.iter().collect();
    nodes.sort_by(|a, b| b.score.abs().total_cmp(&a.score.abs()));
    let list: Vec<String> = nodes.iter().take(10).map(|n| format!("{} {:.4}", n.node, n.score)).collect();
    println!("top nodes by |score|: {}", list.join(", "));
    if !report.edges.is_empty() {
        let mut edges: Vec<_> = report.edges.iter().collect();
        edges.sort_by(|a, b| b.score.abs().total_cmp(&a.score.abs()));
        let list: Vec<String> =
            edges.iter().take(10).map(|e| format!("{}→{} {:.4}", e.source, e.target, e.score)).collect();
        println!("top edges by |score|: {}", list.join(", "));
    }
    println!("wall time {:.2} s", e.wall_s);
    println!("wrote circuits/{} in {}", report.name, store_dir.display());
    Ok(())
}

//! The demo's model-analysis stages: induction heads, the IOI circuit by three methods with
//! their evaluation, per-layer transcoders with the attribution graph of one prompt (and its
//! circuit-tracer export), and the explanations export.

use std::path::PathBuf;

use anyhow::{Context, Result};
use loupe_cli::{circuit_cmd, export_cmd, graph_cmd, heads_cmd, train_sae_cmd};
use loupe_store::heads::DEFAULT_HEADS_NAME;

use super::stages_dict::{LAYERS, TOPK};
use super::{Ctx, Stage, parse};
use crate::words;

/// The IOI task, embedded so an installed binary needs no checkout.
const IOI: &str = include_str!("../../../assets/tasks/ioi.jsonl");
/// The circuits `loupe circuit` names after the task file (`ioi.jsonl`), and the evaluation.
pub const CIRCUITS: [&str; 3] = ["ioi-patching", "ioi-attribution", "ioi-discrete-sae"];
pub const METHODS: [&str; 3] = ["patching", "attribution", "discrete-sae"];
pub const EVAL: &str = "ioi";
/// The graph's prompt and name.
pub const PROMPT: &str = "When Mary and John went to the store, John gave a drink to";
pub const GRAPH: &str = "demo-ioi";

/// Per-layer transcoder `l`'s name.
pub fn transcoder(l: usize) -> String {
    format!("demo-transcoder-{l}")
}

/// Where the graph's circuit-tracer JSON and the explanations export go.
pub fn graph_json(ctx: &Ctx) -> PathBuf {
    ctx.exports().join(format!("{GRAPH}.json"))
}
pub fn export_dir(ctx: &Ctx) -> PathBuf {
    ctx.exports().join(TOPK)
}

pub fn stages(ctx: &Ctx) -> Vec<Stage> {
    let b = &ctx.budget;
    vec![
        Stage {
            title: format!(
                "find the induction heads (loupe heads: {} repeated and {} natural-text sequences, single-head ablations)",
                b.head_sequences, b.head_sequences
            ),
            done: |ctx| Ok(ctx.open()?.manifest().heads.contains_key(DEFAULT_HEADS_NAME)),
            run: heads,
        },
        Stage {
            title: format!(
                "discover the IOI circuit ({} pairs) by activation patching, attribution patching and the \
                 discrete-SAE method, then loupe circuit eval",
                b.ioi_pairs
            ),
            done: |ctx| {
                let m = ctx.open()?.manifest();
                Ok(CIRCUITS.iter().all(|c| m.circuits.contains_key(*c)) && m.circuit_evals.contains_key(EVAL))
            },
            run: circuits,
        },
        Stage {
            title: format!(
                "train {LAYERS} per-layer skip transcoders ({} features, k {}, {} tokens each), build the \
                 attribution graph of {PROMPT:?} and export it as circuit-tracer JSON",
                b.tc_features, b.tc_k, b.tc_tokens
            ),
            done: |ctx| {
                let store = ctx.open()?;
                Ok((0..LAYERS).all(|l| store.dictionary(&transcoder(l)).is_some_and(|d| d.is_done()))
                    && store.manifest().graphs.contains_key(GRAPH)
                    && graph_json(ctx).is_file())
            },
            run: graph,
        },
        Stage {
            title: format!("export {TOPK}'s explanations (Parquet and Neuronpedia JSONL)"),
            done: |ctx| Ok(export_dir(ctx).join(loupe_store::export::EXPLANATIONS_PARQUET).is_file()),
            run: |ctx| {
                let out = export_dir(ctx);
                let line = words!["--store", ctx.store_arg(), "--dictionary", TOPK, "--out", out.display()];
                export_cmd::run(&parse::<export_cmd::Args>(&line)?)
            },
        },
    ]
}

fn heads(ctx: &Ctx) -> Result<()> {
    let n = ctx.budget.head_sequences;
    let line = words!["--store", ctx.store_arg(), "--sequences", n, "--text-sequences", n];
    heads_cmd::run(&parse::<heads_cmd::Args>(&line)?)
}

/// The first `ioi_pairs` pairs of the IOI task, written as `ioi.jsonl` in the scratch folder
/// (the circuits are named after the file; its sha256 ties them to the evaluation).
fn ioi_task(ctx: &Ctx) -> Result<PathBuf> {
    let path = ctx.scratch.path().join("ioi.jsonl");
    let lines: Vec<&str> = IOI.lines().filter(|l| !l.trim().is_empty()).take(ctx.budget.ioi_pairs).collect();
    std::fs::write(&path, lines.join("\n") + "\n")
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

fn circuits(ctx: &Ctx) -> Result<()> {
    let task = ioi_task(ctx)?;
    for (name, method) in CIRCUITS.iter().zip(METHODS) {
        if ctx.open()?.manifest().circuits.contains_key(*name) {
            println!("{name}: already done");
            continue;
        }
        let line = words!["--store", ctx.store_arg(), "--task", task.display(), "--method", method];
        circuit_cmd::run(&parse::<circuit_cmd::Args>(&line)?)?;
    }
    let line = words!["eval", "--store", ctx.store_arg(), "--task", task.display(), "--name", EVAL];
    circuit_cmd::run(&parse::<circuit_cmd::Args>(&line)?)
}

fn graph(ctx: &Ctx) -> Result<()> {
    let b = &ctx.budget;
    for l in 0..LAYERS {
        let name = transcoder(l);
        if ctx.open()?.dictionary(&name).is_some_and(|d| d.is_done()) {
            continue;
        }
        println!("transcoder {} of {LAYERS}: {name}", l + 1);
        let line = words![
            "--store",
            ctx.store_arg(),
            "--dictionary",
            name,
            "--hook",
            format!("blocks.{l}.hook_mlp_out"),
            "--input-hook",
            format!("blocks.{l}.ln2.hook_normalized"),
            "--skip",
            "--n-features",
            b.tc_features,
            "--k",
            b.tc_k,
            "--lr",
            "1e-3",
            "--tokens",
            b.tc_tokens,
            "--batch",
            b.tc_batch,
            "--checkpoint-every",
            0,
            "--eval-contexts",
            0
        ];
        train_sae_cmd::run(&parse::<train_sae_cmd::Args>(&line)?)?;
    }
    if !ctx.open()?.manifest().graphs.contains_key(GRAPH) {
        let transcoders: Vec<String> = (0..LAYERS).map(transcoder).collect();
        let line = words![
            "--store",
            ctx.store_arg(),
            "--transcoders",
            transcoders.join(","),
            "--prompt",
            PROMPT,
            "--name",
            GRAPH,
            "--max-feature-nodes",
            b.graph_feature_nodes
        ];
        graph_cmd::run(&parse::<graph_cmd::Args>(&line)?)?;
    }
    let out = graph_json(ctx);
    std::fs::create_dir_all(ctx.exports())?;
    let line = words!["export", "--store", ctx.store_arg(), "--name", GRAPH, "--out", out.display()];
    graph_cmd::run(&parse::<graph_cmd::Args>(&line)?)
}

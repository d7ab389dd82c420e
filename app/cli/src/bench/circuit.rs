//! `loupe bench circuit`: the work of `loupe circuit --method patching` on Gemma 3 270M — every
//! head (72) and MLP (18) patched alone from the corrupt run into the clean one on the first 40
//! pairs of `assets/tasks/ioi.jsonl` — against PyTorch doing the same work the way a
//! TransformerLens user does it (the batched clean and corrupt runs with a cache, then one full
//! forward per node with a patching hook and full logits), measured in the same run by
//! `benches/reference/circuit.py` (embedded in the binary, run with the Python of
//! `benches/reference/setup-env.sh`). Both sides get the same tokens; the bench prints how far
//! their metrics and effects are apart, then the wall time of the fast methods (attribution,
//! discrete-sae) and their speed-up over patching, then the headline: patching's seconds (the
//! shared runs included) and the ratio PyTorch time / Loupe time. `--naive` also times Loupe's
//! plain path (a full forward per node, `Runs::patched_metric`). Each side runs once.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use loupe_analysis::circuits::discrete_sae::DiscreteSaeConfig;
use loupe_analysis::circuits::patch::{Runs, mean};
use loupe_analysis::circuits::patching::patching;
use loupe_analysis::circuits::run::{Method, compute};
use loupe_analysis::circuits::{Metric, Task, nodes};
use loupe_model::tokenizer::Tokenizer;
use loupe_model::{self as model, HookedModel};
use serde_json::Value;

const REFERENCE_SCRIPT: &str = include_str!("../../../../benches/reference/circuit.py");
const IOI: &str = include_str!("../../../../assets/tasks/ioi.jsonl");

#[derive(clap::Args)]
pub struct Args {
    /// Pairs of the task to patch on (its first ones).
    #[arg(long, default_value_t = 40)]
    pairs: usize,
    /// Task file with answer/wrong pairs (default: the shipped assets/tasks/ioi.jsonl).
    #[arg(long)]
    task: Option<PathBuf>,
    /// Model: a GGUF file or an HF directory (default: the fetched Gemma 3 270M GGUF).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Skip the PyTorch reference: time Loupe's side only (for profiling; no ratio).
    #[arg(long)]
    no_reference: bool,
    /// Also time Loupe's plain path: a full forward per node (`Runs::patched_metric`).
    #[arg(long)]
    naive: bool,
}

pub fn run(args: &Args) -> Result<()> {
    if args.pairs == 0 {
        bail!("bench circuit: --pairs must be at least 1");
    }
    if let Some(task) = &args.task
        && !task.exists()
    {
        bail!("task file not found: {} does not exist", task.display());
    }
    let (model_path, _, python) = super::gemma_inputs(args.model.as_deref(), args.no_reference)?;
    let model = model::load(&model_path)?;
    let tokenizer = Tokenizer::load(&model_path)?;
    let task = load_task(args.task.as_deref(), &tokenizer, args.pairs)?;
    let c = model.config().clone();
    let all = nodes(&c);
    let name = model_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    println!(
        "model {name}: {} nodes ({} layers × ({} heads + MLP)); task {}: {} pairs, up to {} tokens",
        all.len(),
        c.n_layers,
        c.n_heads,
        task.file,
        task.pairs.len(),
        task.max_len()
    );

    let torch = if args.no_reference {
        None
    } else {
        let torch = run_reference(&python, &model_path, &task)?;
        println!(
            "PyTorch {} (transformers {}, {} attention, {} threads), one pass each side:",
            text_field(&torch, "torch")?,
            text_field(&torch, "transformers")?,
            text_field(&torch, "attn_implementation")?,
            num(&torch, "/threads")?,
        );
        Some(torch)
    };

    eprintln!("timing Loupe: clean and corrupt runs");
    let start = Instant::now();
    let runs = Runs::new(model.as_ref(), &task)?;
    let runs_s = start.elapsed().as_secs_f64();
    let naive = if args.naive {
        eprintln!("timing Loupe: naive patching, a full forward per node");
        let start = Instant::now();
        let effects = naive_patching(model.as_ref(), &task, &runs)?;
        Some((effects, start.elapsed().as_secs_f64()))
    } else {
        None
    };
    eprintln!("timing Loupe: patching ({runs_s:.1} s for the runs)");
    let start = Instant::now();
    let effects = patching(model.as_ref(), &task, &runs, &());
    let patching_s = runs_s + start.elapsed().as_secs_f64();

    if let Some(torch) = &torch {
        println!("  check, max |Loupe − PyTorch|:");
        let clean: Vec<f64> = runs.metric_clean.iter().map(|&v| f64::from(v)).collect();
        let corrupt: Vec<f64> = runs.metric_corrupt.iter().map(|&v| f64::from(v)).collect();
        let mut worst = max_diff(&clean, &numbers(torch, "/metric_clean")?)?;
        worst = worst.max(max_diff(&corrupt, &numbers(torch, "/metric_corrupt")?)?);
        println!(
            "    clean/corrupt metric   {worst:.1e} (Loupe mean logit diff {:.3} / {:.3})",
            mean(&runs.metric_clean),
            mean(&runs.metric_corrupt)
        );
        let theirs = numbers(torch, "/effects")?;
        let mut compared = Vec::new();
        if let Some((naive, _)) = &naive {
            compared.push(("naive effects", naive.clone()));
        }
        if let Ok(effects) = &effects {
            compared.push(("patching effects", effects.clone()));
        }
        for (what, ours) in compared {
            let ours: Vec<f64> = ours.iter().map(|&v| f64::from(v)).collect();
            let diff = max_diff(&ours, &theirs)?;
            worst = worst.max(diff);
            println!("    {what:<22} {diff:.1e}");
        }
        if worst > 1e-3 {
            println!("    MISMATCH: the two sides did not compute the same values");
        }
    }
    let torch_s = match &torch {
        Some(torch) => {
            let (runs, patching) = (num(torch, "/runs_s")?, num(torch, "/patching_s")?);
            println!(
                "  PyTorch runs {runs:8.2} s   patching {patching:8.2} s   total {:8.2} s",
                runs + patching
            );
            Some(runs + patching)
        }
        None => None,
    };
    if let Some((_, naive_s)) = naive {
        let s = runs_s + naive_s;
        let ratio = torch_s.map_or(String::new(), |t| format!(", ratio {:.2} vs PyTorch", t / s.max(1e-9)));
        println!("  Loupe naive patching (a full forward per node): {s:.2} s{ratio}");
    }
    let effects = effects.context("Loupe's patching failed")?;
    let top = top_nodes(&all, &effects, 5);
    println!("  top |effect|: {top}");

    for method in [Method::Attribution, Method::DiscreteSae] {
        let start = Instant::now();
        match compute(model.as_ref(), &task, &runs, method, &DiscreteSaeConfig::default(), &()) {
            Ok(_) => {
                let s = runs_s + start.elapsed().as_secs_f64();
                println!(
                    "  {:<12} {s:8.2} s, {:.1}× faster than patching",
                    method.name(),
                    patching_s / s.max(1e-9)
                );
            }
            Err(e) => println!("  {:<12} not measured: {e:#}", method.name()),
        }
    }

    println!(
        "  Loupe   runs {runs_s:8.2} s   patching {:8.2} s   total {patching_s:8.2} s",
        patching_s - runs_s
    );
    match torch_s {
        Some(torch_s) => println!(
            "circuit patching: {patching_s:.2} s, ratio {:.2} vs PyTorch",
            torch_s / patching_s.max(1e-9)
        ),
        None => println!("circuit patching: {patching_s:.2} s (no reference run, so no ratio)"),
    }
    Ok(())
}

/// The task's first `pairs` pairs (the shipped IOI task unless `path` is given); it must give
/// single answer/wrong tokens (the reference computes the logit difference).
fn load_task(path: Option<&Path>, tokenizer: &Tokenizer, pairs: usize) -> Result<Task> {
    let mut task = match path {
        Some(path) => Task::load(path, tokenizer)?,
        None => {
            let dir = tempfile::Builder::new().prefix("loupe-bench-circuit").tempdir()?;
            let file = dir.path().join("ioi.jsonl");
            std::fs::write(&file, IOI)?;
            Task::load(&file, tokenizer)?
        }
    };
    if task.metric != Metric::LogitDiff {
        bail!("bench circuit needs a task with one answer and one wrong token per pair (a logit difference)");
    }
    if task.pairs.len() < pairs {
        bail!("{} has {} pairs; --pairs asks for {pairs}", task.file, task.pairs.len());
    }
    task.pairs.truncate(pairs);
    Ok(task)
}

/// Each node patched alone with a full forward of the clean batch: its normalised effect.
fn naive_patching(model: &dyn HookedModel, task: &Task, runs: &Runs) -> Result<Vec<f32>> {
    let (clean, corrupt) = (mean(&runs.metric_clean), mean(&runs.metric_corrupt));
    nodes(model.config())
        .iter()
        .map(|n| Ok((runs.patched_metric(model, task, &[*n])? - clean) / (corrupt - clean)))
        .collect()
}

fn top_nodes(all: &[loupe_analysis::circuits::Node], effects: &[f32], k: usize) -> String {
    let mut order: Vec<usize> = (0..effects.len().min(all.len())).collect();
    order.sort_by(|&a, &b| effects[b].abs().total_cmp(&effects[a].abs()));
    order.iter().take(k).map(|&i| format!("{} {:+.3}", all[i], effects[i])).collect::<Vec<_>>().join(", ")
}

/// Run the PyTorch reference on the same tokens and return its JSON report.
fn run_reference(python: &Path, model: &Path, task: &Task) -> Result<Value> {
    let dir = tempfile::Builder::new().prefix("loupe-bench-circuit").tempdir()?;
    let script = dir.path().join("circuit.py");
    let ids = dir.path().join("tokens.json");
    std::fs::write(&script, REFERENCE_SCRIPT)?;
    let pairs: Vec<Value> = task
        .pairs
        .iter()
        .map(|p| {
            serde_json::json!({
                "clean": p.clean, "corrupt": p.corrupt, "answer": p.answers[0], "wrong": p.wrongs[0]
            })
        })
        .collect();
    std::fs::write(&ids, serde_json::to_vec(&serde_json::json!({ "pairs": pairs }))?)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("running the PyTorch reference ({threads} threads); its progress goes to stderr");
    let output = Command::new(python)
        .arg(&script)
        .arg("--model")
        .arg(model)
        .arg("--tokens")
        .arg(&ids)
        .args(["--threads", &threads.to_string()])
        .stderr(Stdio::inherit())
        .output();
    super::reference_report(output, python)
}

fn max_diff(ours: &[f64], theirs: &[f64]) -> Result<f64> {
    if ours.len() != theirs.len() {
        bail!("Loupe has {} values, the PyTorch reference {}", ours.len(), theirs.len());
    }
    // NaN compares false, so a NaN on either side shows as NaN.
    Ok(ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, |m, d| if d > m || d.is_nan() { d } else { m }))
}

fn numbers(v: &Value, pointer: &str) -> Result<Vec<f64>> {
    let list = v.pointer(pointer).and_then(Value::as_array);
    let list = list.with_context(|| format!("the PyTorch reference report has no {pointer}"))?;
    list.iter().map(|x| x.as_f64().with_context(|| format!("{pointer} holds a non-number"))).collect()
}

fn num(v: &Value, pointer: &str) -> Result<f64> {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .with_context(|| format!("the PyTorch reference report has no {pointer}"))
}

fn text_field<'a>(v: &'a Value, key: &str) -> Result<&'a str> {
    v.get(key).and_then(Value::as_str).with_context(|| format!("the PyTorch reference report has no {key}"))
}

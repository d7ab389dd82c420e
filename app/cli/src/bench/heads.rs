//! `loupe bench heads`: the work of `loupe heads` on Gemma 3 270M — detector scores of every head
//! on 16 sequences [BOS] + R + R (|R| = 50) and 16 natural-text sequences (BOS + 127 tokens of
//! Moby-Dick), and single-head zero ablations of all 72 heads on the repeated half — against
//! PyTorch doing the same work the way a TransformerLens user does it (full forwards with hooks:
//! the patterns of one forward, then one forward per ablated head with full logits), measured in
//! the same run by `benches/reference/heads.py` (embedded in the binary, run with the Python of
//! `benches/reference/setup-env.sh`). Both sides get the same tokens; the bench prints how far
//! their scores and loss deltas are apart, then the headline: total seconds and the ratio
//! PyTorch time / Loupe time. Each side runs once (the job is itself 150+ forward passes).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use loupe_analysis::heads::HeadsConfig;
use loupe_analysis::heads::ablation::ablations;
use loupe_analysis::heads::detectors::{DetectorScores, detector_scores, repeated_sequences};
use loupe_model::tokenizer::Tokenizer;
use loupe_model::{self as model};
use serde_json::Value;

const REFERENCE_SCRIPT: &str = include_str!("../../../../benches/reference/heads.py");

#[derive(clap::Args)]
pub struct Args {
    /// Repeated sequences (and natural-text sequences) to score and ablate on.
    #[arg(long, default_value_t = 16)]
    sequences: usize,
    /// Model: a GGUF file or an HF directory (default: the fetched Gemma 3 270M GGUF).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Skip the PyTorch reference: time Loupe's side only (for profiling; no ratio).
    #[arg(long)]
    no_reference: bool,
}

pub fn run(args: &Args) -> Result<()> {
    if args.sequences == 0 {
        bail!("bench heads: --sequences must be at least 1");
    }
    let (model_path, corpus, python) = super::gemma_inputs(args.model.as_deref(), args.no_reference)?;

    let model = model::load(&model_path)?;
    let tokenizer = Tokenizer::load(&model_path)?;
    let bos = tokenizer.bos_id().context("the tokenizer has no BOS token")?;
    let c = model.config().clone();
    let settings =
        HeadsConfig { sequences: args.sequences, text_sequences: args.sequences, ..HeadsConfig::default() };
    let repeat_len = settings.repeat_len;
    let repeated = repeated_sequences(settings.seed, settings.sequences, repeat_len, c.vocab_size, bos);
    let text = text_sequences(&tokenizer, &corpus, settings.text_sequences, settings.text_len)?;
    let name = model_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    println!(
        "model {name}: {} heads ({} layers × {}); {} sequences [BOS] + R + R (|R| = {repeat_len}), \
         {} of BOS + {} tokens of Moby-Dick",
        c.n_layers * c.n_heads,
        c.n_layers,
        c.n_heads,
        repeated.len(),
        text.len(),
        settings.text_len - 1
    );

    let torch = if args.no_reference {
        None
    } else {
        let torch = run_reference(&python, &model_path, repeat_len, &repeated, &text)?;
        println!(
            "PyTorch {} (transformers {}, {} attention, {} threads), one pass each side:",
            text_field(&torch, "torch")?,
            text_field(&torch, "transformers")?,
            text_field(&torch, "attn_implementation")?,
            num(&torch, "/threads")?,
        );
        Some(torch)
    };

    eprintln!("timing Loupe: detector scores");
    let start = Instant::now();
    let scores = detector_scores(model.as_ref(), &repeated, repeat_len, &text, &())?;
    let detectors_s = start.elapsed().as_secs_f64();
    eprintln!("timing Loupe: single-head zero ablations ({detectors_s:.1} s for the detectors)");
    let start = Instant::now();
    let found = ablations(model.as_ref(), &repeated, repeat_len, false, &())?;
    let ablations_s = start.elapsed().as_secs_f64();
    let loupe_s = detectors_s + ablations_s;

    let Some(torch) = torch else {
        println!("  Loupe detectors {detectors_s:.2} s, ablations {ablations_s:.2} s");
        println!("heads: {loupe_s:.2} s (no reference run, so no ratio)");
        return Ok(());
    };
    let (torch_det, torch_abl) = (num(&torch, "/detectors_s")?, num(&torch, "/ablations_s")?);
    let torch_s = torch_det + torch_abl;

    println!("  check, max |Loupe − PyTorch| over the heads:");
    let mut worst_score = 0f64;
    for name in DetectorScores::NAMES {
        let ours: Vec<f64> = scores.iter().map(|s| f64::from(s.get(name))).collect();
        let diff = max_diff(&ours, &numbers(&torch, &format!("/scores/{name}"))?)?;
        worst_score = worst_score.max(diff);
        println!("    {name:<22} {diff:.1e}");
    }
    let clean_diff = (f64::from(found.clean_loss) - num(&torch, "/clean_loss")?).abs();
    let zero: Vec<f64> = found.zero.iter().map(|&v| f64::from(v)).collect();
    let zero_diff = max_diff(&zero, &numbers(&torch, "/zero")?)?;
    println!("    clean loss             {clean_diff:.1e} (Loupe {:.4} nats)", found.clean_loss);
    println!("    zero-ablation Δloss    {zero_diff:.1e}");
    if worst_score > 1e-3 || zero_diff > 1e-3 || clean_diff > 1e-3 {
        println!("    MISMATCH: the two sides did not compute the same values");
    }
    println!(
        "  Loupe   detectors {detectors_s:8.2} s   ablations {ablations_s:8.2} s   total {loupe_s:8.2} s"
    );
    println!("  PyTorch detectors {torch_det:8.2} s   ablations {torch_abl:8.2} s   total {torch_s:8.2} s");
    println!(
        "  ratio: detectors {:.2}, ablations {:.2}",
        torch_det / detectors_s.max(1e-9),
        torch_abl / ablations_s.max(1e-9)
    );
    println!("heads: {loupe_s:.2} s, ratio {:.2} vs PyTorch", torch_s / loupe_s.max(1e-9));
    Ok(())
}

/// `n` sequences of BOS + `len - 1` consecutive tokens from the start of the corpus.
fn text_sequences(tokenizer: &Tokenizer, corpus: &Path, n: usize, len: usize) -> Result<Vec<Vec<u32>>> {
    let text =
        std::fs::read_to_string(corpus).with_context(|| format!("cannot read {}", corpus.display()))?;
    // About four characters a token; twice what is needed.
    let end = text.char_indices().nth(8 * n * len).map_or(text.len(), |(i, _)| i);
    let ids = tokenizer.encode(&text[..end], false)?;
    let bos = tokenizer.bos_id().context("the tokenizer has no BOS token")?;
    let per = len - 1;
    if ids.len() < n * per {
        bail!("{} gives only {} tokens; the benchmark needs {}", corpus.display(), ids.len(), n * per);
    }
    Ok(ids.chunks(per).take(n).map(|chunk| [&[bos], chunk].concat()).collect())
}

/// Run the PyTorch reference on the same tokens and return its JSON report.
fn run_reference(
    python: &Path,
    model: &Path,
    repeat_len: usize,
    repeated: &[Vec<u32>],
    text: &[Vec<u32>],
) -> Result<Value> {
    let dir = tempfile::Builder::new().prefix("loupe-bench-heads").tempdir()?;
    let script = dir.path().join("heads.py");
    let ids = dir.path().join("tokens.json");
    std::fs::write(&script, REFERENCE_SCRIPT)?;
    let tokens = serde_json::json!({ "repeat_len": repeat_len, "repeated": repeated, "text": text });
    std::fs::write(&ids, serde_json::to_vec(&tokens)?)?;
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
        bail!("Loupe has {} heads, the PyTorch reference {}", ours.len(), theirs.len());
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

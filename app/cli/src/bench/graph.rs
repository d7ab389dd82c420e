//! `loupe bench graph`: the attribution graph of a 64-, 512- and 2,048-token prompt (Moby-Dick,
//! BOS first) on Gemma 3 270M through per-layer transcoders of a store (default `plt-0` …
//! `plt-17`), `loupe graph` against circuit-tracer 0.5.0 doing the same on the CPU
//! (`benches/reference/graph.py`, embedded in the binary, run with the Python of
//! `benches/reference/setup-ct-env.sh`), with the same tokens, the same transcoders (exported here
//! in circuit-tracer's `SingleLayerTranscoder` layout) and the same settings (batch, max feature
//! nodes, logits, pruning thresholds).
//!
//! Each side runs as a child process, one per prompt, once: wall time from spawn to exit, peak
//! memory the child's peak RSS from `wait4`. circuit-tracer's time is `attribute` plus
//! `prune_graph` and its scores, loading excluded; the headline compares it with the graph's own
//! time as `loupe graph` records it (attribution and pruning, `GraphEntry::wall_s`), and also
//! prints the whole `loupe graph` command (model and transcoder loading and writing included). The reference
//! runs under an address-space cap (`--reference-memory-gib`, RLIMIT_AS) so that it can never take
//! the machine's memory; a prompt that does not fit is reported as "out of memory". The headline
//! is the 512-token prompt's (or the longest measured with a reference).
//!
//! `--random-transcoders N` replaces the store's transcoders by seeded random TopK skip
//! transcoders of N features per layer (k `--random-k`), the same on both sides; Loupe's side is
//! then `loupe_analysis::graphs::attribute::attribute` in a child `loupe bench graph` (no store,
//! no pruning), compared with circuit-tracer's `attribute` alone. For measuring before trained
//! transcoders exist.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use loupe_dict::transcoder::{Activation, TranscoderSet};
use loupe_model::tokenizer::Tokenizer;
use loupe_store::Store;
use serde_json::Value;

const REFERENCE_SCRIPT: &str = include_str!("../../../../benches/reference/graph.py");
/// Where in Moby-Dick the prompts start (past the front matter).
const CORPUS_OFFSET: usize = 30_000;

#[derive(clap::Args)]
pub struct Args {
    /// The store with the transcoders (the graphs are written into it too).
    #[arg(long, required_unless_present = "random_transcoders")]
    store: Option<PathBuf>,
    /// Per-layer transcoders, one per layer (comma-separated; default plt-0 … plt-<n_layers − 1>).
    #[arg(long, value_delimiter = ',')]
    transcoders: Vec<String>,
    /// Model: a GGUF file or an HF directory (default: the fetched Gemma 3 270M GGUF).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Prompt lengths in tokens, BOS included (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "64,512,2048")]
    tokens: Vec<usize>,
    /// Targets per backward batch (both sides).
    #[arg(long, default_value_t = 32)]
    batch: u32,
    /// Feature nodes whose incoming edges are computed (both sides).
    #[arg(long, default_value_t = 1024)]
    max_feature_nodes: u32,
    /// At most this many logits (both sides).
    #[arg(long, default_value_t = 10)]
    max_logits: u32,
    /// Cumulative probability of the logits kept (both sides).
    #[arg(long, default_value_t = 0.95)]
    logit_probability: f32,
    /// Pruning: node threshold (both sides).
    #[arg(long, default_value_t = 0.8)]
    node_threshold: f32,
    /// Pruning: edge threshold (both sides).
    #[arg(long, default_value_t = 0.98)]
    edge_threshold: f32,
    /// The graphs' names in the store: <prefix>-<tokens> (replaced if they exist).
    #[arg(long, default_value = "bench-graph")]
    name_prefix: String,
    /// The reference's address-space cap in GiB (RLIMIT_AS); past it, it is out of memory.
    #[arg(long, default_value_t = 16)]
    reference_memory_gib: u64,
    /// Skip circuit-tracer at prompts longer than this many tokens (0: never skip).
    #[arg(long, default_value_t = 0)]
    reference_max_tokens: usize,
    /// Skip circuit-tracer: time Loupe's side only (no ratio).
    #[arg(long)]
    no_reference: bool,
    /// Seeded random TopK skip transcoders of this many features per layer instead of the store's.
    #[arg(long)]
    random_transcoders: Option<usize>,
    /// k of the random transcoders.
    #[arg(long, default_value_t = 32)]
    random_k: usize,
    /// (Internal) run Loupe's attribution of the token file given, as the measured child.
    #[arg(long, hide = true)]
    child_tokens: Option<PathBuf>,
}

/// One side's run of one prompt.
struct Measured {
    wall_s: f64,
    /// Loupe's graph time without loading (the store's `wall_s`), where known.
    graph_s: Option<f64>,
    peak_rss_gib: f64,
    /// The child's stdout (circuit-tracer: its JSON report last) or what went wrong.
    outcome: Result<String, String>,
}

pub fn run(args: &Args) -> Result<()> {
    if args.tokens.iter().any(|&n| n < 2) {
        bail!("bench graph: --tokens lengths must be at least 2 (BOS and one token)");
    }
    let (model_path, corpus, _) = super::gemma_inputs(args.model.as_deref(), true)?;
    if let Some(tokens) = &args.child_tokens {
        return attribute_child(args, &model_path, tokens);
    }
    let python = reference_python();
    if !args.no_reference && !python.exists() {
        bail!(
            "no circuit-tracer environment ({} is missing): run benches/reference/setup-ct-env.sh \
             (or set LOUPE_CT_PYTHON to a Python with circuit-tracer 0.5.0)",
            python.display()
        );
    }
    if let Some(store) = &args.store
        && !store.exists()
    {
        bail!("store not found: {} does not exist", store.display());
    }
    let (n_layers, d_model) = {
        let model = loupe_model::load(&model_path)?;
        (model.config().n_layers, model.config().d_model)
    };
    let names = if let Some(n) = args.random_transcoders {
        (0..n_layers).map(|l| format!("random-{n}-k{}-{l}", args.random_k)).collect()
    } else if args.transcoders.is_empty() {
        (0..n_layers).map(|l| format!("plt-{l}")).collect()
    } else {
        args.transcoders.clone()
    };
    let tokenizer = Tokenizer::load(&model_path)?;
    let text =
        std::fs::read_to_string(&corpus).with_context(|| format!("cannot read {}", corpus.display()))?;
    let prompts: Vec<(String, Vec<u32>)> =
        args.tokens.iter().map(|&n| prompt_of(&tokenizer, &text, n)).collect::<Result<_>>()?;

    let dir = tempfile::Builder::new().prefix("loupe-bench-graph").tempdir()?;
    if !args.no_reference {
        let set = match (args.random_transcoders, &args.store) {
            (Some(n), _) => random_transcoders(n_layers, d_model, n, args.random_k),
            (None, Some(store)) => TranscoderSet::from_store(&Store::open(store)?, &names, n_layers)?,
            (None, None) => bail!("bench graph needs --store or --random-transcoders"),
        };
        export_transcoders(&set, dir.path())?;
        // The set is dropped here: the children are forked from a small process.
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "model {}: {n_layers} layers; transcoders {} … {} of {}; batch {}, max feature nodes {}, \
         {} logits up to p {}, thresholds node {} edge {}; {threads} threads",
        model_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        names[0],
        names[names.len() - 1],
        args.store.as_ref().map_or("(random)".to_string(), |s| s.display().to_string()),
        args.batch,
        args.max_feature_nodes,
        args.max_logits,
        args.logit_probability,
        args.node_threshold,
        args.edge_threshold
    );

    if !args.no_reference {
        // Dequantize the GGUF once into the folder the measured runs load from (not measured).
        eprintln!("circuit-tracer: preparing the model");
        let tokens_file = dir.path().join("tokens-prepare.json");
        std::fs::write(&tokens_file, b"{\"tokens\": [2]}")?;
        let mut command = reference_command(args, &python, &model_path, dir.path(), &tokens_file, threads)?;
        command.arg("--prepare");
        if let Err(e) = measure(command, None)?.outcome {
            bail!("circuit-tracer could not load the model ({e}); its messages are above");
        }
    }
    let mut rows = Vec::new();
    for (text, ids) in &prompts {
        let n = ids.len();
        let name = format!("{}-{n}", args.name_prefix);
        let tokens_file = dir.path().join(format!("tokens-{n}.json"));
        std::fs::write(&tokens_file, serde_json::to_vec(&serde_json::json!({ "tokens": ids }))?)?;
        eprintln!("Loupe: {n} tokens");
        let command = match &args.store {
            Some(store) if args.random_transcoders.is_none() => {
                loupe_command(args, store, &model_path, &names, text, &name)?
            }
            _ => child_command(args, &model_path, &tokens_file)?,
        };
        let mut loupe = measure(command, None)?;
        // The graph's own time (attribution and pruning, as the store records it): what the
        // reference's timing covers, loading excluded on both sides.
        if let (Some(store), None, Ok(_)) = (&args.store, args.random_transcoders, &loupe.outcome) {
            loupe.graph_s = loupe_store::Store::open(store)?.manifest().graphs.get(&name).map(|e| e.wall_s);
        }
        let line = match &loupe.outcome {
            // `loupe graph`'s summary ("graph NAME: … tokens, … active features, …") or the child's.
            Ok(out) => out
                .lines()
                .filter(|l| {
                    l.starts_with("graph ") || l.starts_with("wall time") || l.starts_with("attribute ")
                })
                .collect::<Vec<_>>()
                .join("; "),
            Err(e) => bail!("loupe graph failed on the {n}-token prompt: {e}"),
        };
        let reference = if args.no_reference {
            None
        } else if args.reference_max_tokens > 0 && n > args.reference_max_tokens {
            println!(
                "  circuit-tracer at {n} tokens: skipped (--reference-max-tokens {})",
                args.reference_max_tokens
            );
            None
        } else {
            eprintln!(
                "circuit-tracer: {n} tokens (address space capped at {} GiB)",
                args.reference_memory_gib
            );
            let tokens_file = dir.path().join(format!("tokens-{n}.json"));
            std::fs::write(&tokens_file, serde_json::to_vec(&serde_json::json!({ "tokens": ids }))?)?;
            let command = reference_command(args, &python, &model_path, dir.path(), &tokens_file, threads)?;
            Some(measure(command, Some(args.reference_memory_gib << 30))?)
        };
        report(
            n,
            &loupe,
            &line,
            reference.as_ref(),
            args.reference_memory_gib,
            args.random_transcoders.is_none(),
        );
        rows.push((n, loupe, reference));
    }

    let measured: Vec<(usize, f64, Option<f64>, f64)> = rows
        .iter()
        .filter_map(|(n, loupe, reference)| {
            let report: Value =
                serde_json::from_str(last_line(reference.as_ref()?.outcome.as_ref().ok()?)).ok()?;
            let prune = if args.random_transcoders.is_some() { 0.0 } else { report["prune_s"].as_f64()? };
            let theirs = report["attribute_s"].as_f64()? + prune;
            Some((*n, loupe.wall_s, loupe.graph_s, theirs))
        })
        .collect();
    let headline = measured.iter().find(|m| m.0 == 512).or(measured.last());
    match headline {
        Some((n, ours, Some(graph), theirs)) => {
            println!(
                "  (whole `loupe graph` command at {n} tokens, loading included: {ours:.2} s, ratio {:.2})",
                theirs / ours.max(1e-9)
            );
            println!(
                "graph {n} tokens: {graph:.2} s, ratio {:.2} vs circuit-tracer (attribution + pruning, loading excluded on both sides)",
                theirs / graph.max(1e-9)
            )
        }
        Some((n, ours, None, theirs)) => {
            println!("graph {n} tokens: {ours:.2} s, ratio {:.2} vs circuit-tracer", theirs / ours.max(1e-9))
        }
        None => {
            let (n, loupe, _) =
                rows.iter().find(|r| r.0 == 512).or(rows.last()).context("no prompt measured")?;
            println!("graph {n} tokens: {:.2} s (no reference run finished, so no ratio)", loupe.wall_s)
        }
    }
    Ok(())
}

/// The Python of circuit-tracer's venv: `$LOUPE_CT_PYTHON`, or the one setup-ct-env.sh makes.
fn reference_python() -> PathBuf {
    match std::env::var_os("LOUPE_CT_PYTHON") {
        Some(path) => PathBuf::from(path),
        None => crate::fetch::cache_dir().join("ctenv").join("bin").join("python"),
    }
}

/// A prompt of exactly `n` tokens (BOS first) from the corpus, and its text: the text of the
/// first tokens after `CORPUS_OFFSET`, the count nudged until the text encodes to `n` tokens.
fn prompt_of(tokenizer: &Tokenizer, corpus: &str, n: usize) -> Result<(String, Vec<u32>)> {
    let start =
        (0..=CORPUS_OFFSET.min(corpus.len())).rev().find(|&i| corpus.is_char_boundary(i)).unwrap_or(0);
    let chunk: String = corpus[start..].chars().take(n * 16 + 64).collect();
    let ids = tokenizer.encode(&chunk, false)?;
    for m in [n - 1, n, n - 2, n + 1, n - 3, n + 2] {
        if m == 0 || m > ids.len() {
            continue;
        }
        let text = tokenizer.decode(&ids[..m])?;
        let text = text.trim_start().to_string();
        let again = tokenizer.encode(&text, true)?;
        if again.len() == n {
            return Ok((text, again));
        }
    }
    bail!(
        "no {n}-token prompt found in the corpus at offset {CORPUS_OFFSET} (the text does not re-encode to {n} tokens)"
    )
}

/// The transcoders in circuit-tracer's layout: `layer_{L}.safetensors` and `transcoders.json`.
fn export_transcoders(set: &TranscoderSet, dir: &Path) -> Result<()> {
    if set.kind != "plt" {
        bail!("bench graph compares per-layer transcoders; {} is a {}", set.names.join(","), set.kind);
    }
    let d = set.d_model;
    let mut layers = Vec::new();
    for l in &set.layers {
        let n = l.n_features;
        let t = |v: &[f32], shape: &[usize]| Tensor::from_slice(v, shape, &Device::Cpu);
        let mut tensors: HashMap<String, Tensor> = HashMap::from([
            ("W_enc".to_string(), t(&l.w_enc, &[n, d])?),
            ("W_dec".to_string(), t(&l.w_dec[0], &[n, d])?),
            ("b_enc".to_string(), t(&l.b_enc, &[n])?),
            ("b_dec".to_string(), t(&l.b_dec, &[d])?),
        ]);
        if let Some(w_skip) = &l.w_skip {
            tensors.insert("W_skip".into(), t(w_skip, &[d, d])?);
        }
        let (activation, k) = match &l.activation {
            Activation::TopK { k } => ("topk", *k),
            Activation::JumpRelu { threshold } => {
                tensors.insert("threshold".into(), t(threshold, &[n])?);
                ("jumprelu", 0)
            }
            Activation::Relu => ("relu", 0),
        };
        let file = format!("layer_{}.safetensors", l.layer);
        candle_core::safetensors::save(&tensors, dir.join(&file))?;
        layers.push(serde_json::json!({ "file": file, "activation": activation, "k": k }));
    }
    std::fs::write(
        dir.join("transcoders.json"),
        serde_json::to_vec(&serde_json::json!({ "layers": layers }))?,
    )?;
    Ok(())
}

fn loupe_command(
    args: &Args,
    store: &Path,
    model: &Path,
    names: &[String],
    prompt: &str,
    name: &str,
) -> Result<Command> {
    let mut command = Command::new(std::env::current_exe().context("cannot find the loupe binary")?);
    command
        .arg("graph")
        .arg("--store")
        .arg(store)
        .arg("--model")
        .arg(model)
        .arg("--transcoders")
        .arg(names.join(","))
        .arg("--prompt")
        .arg(prompt)
        .args(["--name", name, "--overwrite"])
        .args(settings(args));
    Ok(command)
}

fn reference_command(
    args: &Args,
    python: &Path,
    model: &Path,
    dir: &Path,
    tokens: &Path,
    threads: usize,
) -> Result<Command> {
    let script = dir.join("graph.py");
    std::fs::write(&script, REFERENCE_SCRIPT)?;
    let mut command = Command::new(python);
    command
        .arg(&script)
        .arg("--model")
        .arg(model)
        .arg("--transcoders")
        .arg(dir)
        .arg("--tokens")
        .arg(tokens)
        // The first run keeps the dequantized model here, the later ones load it (faster).
        .arg("--model-cache")
        .arg(dir.join("model-hf"))
        .args(["--threads", &threads.to_string()])
        .args(settings(args));
    Ok(command)
}

/// This bench as the measured child of `--random-transcoders`: Loupe's attribution of a token file.
fn child_command(args: &Args, model: &Path, tokens: &Path) -> Result<Command> {
    let mut command = Command::new(std::env::current_exe().context("cannot find the loupe binary")?);
    command
        .args(["bench", "graph", "--model"])
        .arg(model)
        .arg("--child-tokens")
        .arg(tokens)
        .args(["--random-transcoders", &args.random_transcoders.unwrap_or(0).to_string()])
        .args(["--random-k", &args.random_k.to_string()])
        .args(settings(args));
    Ok(command)
}

/// The child of `--random-transcoders`: load the model, build the random set, attribute.
fn attribute_child(args: &Args, model_path: &Path, tokens: &Path) -> Result<()> {
    let n = args.random_transcoders.context("--child-tokens needs --random-transcoders")?;
    let value: Value = serde_json::from_slice(&std::fs::read(tokens)?)?;
    let ids: Vec<u32> = serde_json::from_value(value["tokens"].clone())?;
    let model = loupe_model::load(model_path)?;
    let c = model.config();
    let set = random_transcoders(c.n_layers, c.d_model, n, args.random_k);
    let settings = loupe_store::GraphSettings {
        max_logits: args.max_logits,
        logit_probability: args.logit_probability,
        max_feature_nodes: args.max_feature_nodes,
        node_threshold: args.node_threshold,
        edge_threshold: args.edge_threshold,
        batch: args.batch,
    };
    let start = Instant::now();
    let graph = loupe_analysis::graphs::attribute::attribute(model.as_ref(), &set, &ids, &settings, &())?;
    println!(
        "attribute {:.2} s: {} active features, {} targets, {} nodes",
        start.elapsed().as_secs_f64(),
        graph.active_features,
        graph.targets.len(),
        graph.nodes.len()
    );
    Ok(())
}

/// Seeded random TopK skip transcoders (the same for the same arguments): encoders N(0, 1/d),
/// decoders N(0, 0.02²), skips N(0, 0.01²), zero biases.
fn random_transcoders(n_layers: usize, d: usize, n: usize, k: usize) -> TranscoderSet {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    let mut normal = |len: usize, std: f32| -> Vec<f32> {
        (0..len).map(|_| rng.sample::<f32, _>(rand_distr::StandardNormal) * std).collect()
    };
    let layers = (0..n_layers)
        .map(|layer| loupe_dict::transcoder::TranscoderLayer {
            layer,
            n_features: n,
            w_enc: normal(n * d, 1.0 / (d as f32).sqrt()),
            b_enc: vec![0.0; n],
            activation: Activation::TopK { k },
            w_dec: vec![normal(n * d, 0.02)],
            b_dec: vec![0.0; d],
            w_skip: Some(normal(d * d, 0.01)),
        })
        .collect();
    TranscoderSet {
        kind: "plt".into(),
        names: (0..n_layers).map(|l| format!("random-{l}")).collect(),
        d_model: d,
        layers,
    }
}

/// The graph settings, spelled the same on both command lines.
fn settings(args: &Args) -> Vec<String> {
    [
        ("--batch", args.batch.to_string()),
        ("--max-feature-nodes", args.max_feature_nodes.to_string()),
        ("--max-logits", args.max_logits.to_string()),
        ("--logit-probability", args.logit_probability.to_string()),
        ("--node-threshold", args.node_threshold.to_string()),
        ("--edge-threshold", args.edge_threshold.to_string()),
    ]
    .into_iter()
    .flat_map(|(flag, value)| [flag.to_string(), value])
    .collect()
}

/// Run `command` (stderr inherited) under an optional address-space cap; its wall time, peak RSS
/// and last stdout line.
fn measure(mut command: Command, cap_bytes: Option<u64>) -> Result<Measured> {
    command.stdout(Stdio::piped()).stderr(Stdio::inherit());
    // SAFETY: the closure runs in the forked child before exec and only calls setrlimit, which is
    // async-signal-safe. Having a pre_exec hook also makes std fork (not vfork/posix_spawn), so
    // the child's peak RSS starts from this process's current RSS, not from its peak.
    unsafe {
        command.pre_exec(move || {
            if let Some(cap) = cap_bytes {
                let limit = libc::rlimit { rlim_cur: cap, rlim_max: cap };
                if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = command.spawn().with_context(|| format!("cannot run {:?}", command.get_program()))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let pid = child.id() as libc::pid_t;
    // SAFETY: wait4 writes only into `status` and `usage`; the child is ours and not yet reaped.
    let (status, usage) = unsafe {
        let mut status = 0;
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::wait4(pid, &mut status, 0, &mut usage) != pid {
            bail!("wait4 on the child failed: {}", std::io::Error::last_os_error());
        }
        (status, usage)
    };
    let wall_s = start.elapsed().as_secs_f64();
    let stdout = reader.join().unwrap_or_default();
    let peak_rss_gib = usage.ru_maxrss as f64 / (1u64 << 20) as f64;
    let outcome = if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(stdout)
    } else if libc::WIFSIGNALED(status) {
        Err(format!("killed by signal {}", libc::WTERMSIG(status)))
    } else {
        Err(format!("exit status {}", libc::WEXITSTATUS(status)))
    };
    Ok(Measured { wall_s, graph_s: None, peak_rss_gib, outcome })
}

fn last_line(out: &str) -> &str {
    out.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("")
}

/// One prompt's lines; circuit-tracer's time counts its pruning when `with_prune` (Loupe's side
/// prunes too).
fn report(
    n: usize,
    loupe: &Measured,
    line: &str,
    reference: Option<&Measured>,
    cap_gib: u64,
    with_prune: bool,
) {
    let graph = loupe.graph_s.map_or(String::new(), |g| format!(", graph {g:.2} s without loading"));
    println!(
        "  {n:>5} tokens  Loupe          {:8.2} s  peak {:6.2} GiB   ({line}{graph})",
        loupe.wall_s, loupe.peak_rss_gib
    );
    let Some(reference) = reference else { return };
    match &reference.outcome {
        Ok(out) => match serde_json::from_str::<Value>(last_line(out)) {
            Ok(r) => {
                let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
                let theirs = f("attribute_s") + if with_prune { f("prune_s") } else { 0.0 };
                println!(
                    "  {n:>5} tokens  circuit-tracer {theirs:8.2} s  peak {:6.2} GiB   (attribute {:.2} s, prune {:.2} s, \
                     load {:.1} s excluded; {} active features, {} feature nodes, {} logits, {} nodes and {} edges \
                     kept; ratio {:.2})",
                    reference.peak_rss_gib,
                    f("attribute_s"),
                    f("prune_s"),
                    f("load_s"),
                    r["active_features"],
                    r["feature_nodes"],
                    r["logit_tokens"].as_array().map_or(0, Vec::len),
                    r["nodes_kept"],
                    r["edges_kept"],
                    theirs / loupe.wall_s.max(1e-9)
                );
            }
            Err(_) => {
                println!("  {n:>5} tokens  circuit-tracer: printed {:?}, not its JSON report", last_line(out))
            }
        },
        Err(e) => {
            // Under the cap, running out of address space is what ends the reference early: a
            // Python MemoryError / torch allocation error (non-zero exit) or an abort.
            println!(
                "  {n:>5} tokens  circuit-tracer: out of memory or failed under the {cap_gib} GiB address-space cap \
                 ({e}, after {:.1} s, peak {:.2} GiB; its messages are above)",
                reference.wall_s, reference.peak_rss_gib
            );
        }
    }
}

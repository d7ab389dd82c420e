//! `loupe bench capture [--with-grads]`: Loupe's capture of `blocks.6.hook_resid_post` from Gemma 3
//! 270M on 8 contexts of 256 tokens (BOS + 255 tokens of Moby-Dick) against PyTorch on the same
//! tokens, measured in the same run by `benches/reference/capture_reference.py` (embedded in the
//! binary, run with the Python of `benches/reference/setup-env.sh`).
//!
//! Without `--with-grads`, Loupe does what `loupe capture` does with one batch: a forward pass that
//! stops after block 6, then the activations copied to host memory. The reference is PyTorch
//! running the embedding and the same first 7 blocks under `inference_mode`; PyTorch's speed on the
//! whole model is printed for information. With `--with-grads`, Loupe also takes the gradient of the
//! summed next-token loss at the hook (forward through every block and the logits, backward, the
//! gradient to host memory); the reference is a naive PyTorch forward+backward, which also computes
//! every weight gradient. Each side: one warm-up, then the best of `--repeats` passes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use loupe_model::tokenizer::Tokenizer;
use loupe_model::{self as model, HookedModel, Hooks, loss_gradients};
use serde_json::Value;

const HOOK: &str = "blocks.6.hook_resid_post";
const LAYER: usize = 6;
const CONTEXTS: usize = 8;
const CONTEXT: usize = 256;
const REFERENCE_SCRIPT: &str = include_str!("../../../../benches/reference/capture_reference.py");

#[derive(clap::Args)]
pub struct Args {
    /// Also take the loss gradient at the hook (reference: a naive PyTorch forward+backward).
    #[arg(long)]
    with_grads: bool,
    /// Model: a GGUF file or an HF directory (default: the fetched Gemma 3 270M GGUF).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Timed passes on each side, after one warm-up; the best one counts.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Skip the PyTorch reference: time Loupe's side only (for profiling; no ratio).
    #[arg(long)]
    no_reference: bool,
}

pub fn run(args: &Args) -> Result<()> {
    if args.repeats == 0 {
        bail!("bench capture: --repeats must be at least 1");
    }
    let (model_path, corpus, python) = super::gemma_inputs(args.model.as_deref(), args.no_reference)?;

    let model = model::load(&model_path)?;
    let contexts = contexts(&Tokenizer::load(&model_path)?, &corpus)?;
    let flat: Vec<u32> = contexts.concat();
    let tokens = Tensor::from_vec(flat, (CONTEXTS, CONTEXT), &Device::Cpu)?;
    let n_tokens = (CONTEXTS * CONTEXT) as f64;
    let name = model_path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    println!(
        "tokens: {CONTEXTS} contexts × {CONTEXT} (BOS + {} tokens of Moby-Dick); model {name}",
        CONTEXT - 1
    );

    let mode = if args.with_grads { "grads" } else { "capture" };
    let torch = if args.no_reference {
        None
    } else {
        let torch = run_reference(&python, &model_path, &contexts, mode, args.repeats)?;
        println!(
            "PyTorch {} (transformers {}, {} attention, {} threads); best of {} passes after a warm-up, each side:",
            text(&torch, "torch")?,
            text(&torch, "transformers")?,
            text(&torch, "attn_implementation")?,
            num(&torch, "/threads")?,
            args.repeats
        );
        Some(torch)
    };

    eprintln!("timing Loupe ({} passes after a warm-up)", args.repeats);
    let mut last = None;
    let (loupe_best, loupe_mean) = time(args.repeats, || {
        last = Some(capture_batch(model.as_ref(), &tokens, args.with_grads)?);
        Ok(())
    })?;
    let (act, grad) = last.context("no pass ran")?;
    let loupe = n_tokens / loupe_best;
    let per_batch = format!("{loupe_best:.2} s per batch, mean {loupe_mean:.2} s");
    eprintln!("timing the f32 GEMM floor (the batch's dense matmuls alone)");
    let floor = gemm_floor(model.config(), args.with_grads)?;
    let Some(torch) = torch else {
        let what = if args.with_grads { "capture --with-grads" } else { "capture" };
        println!("  {}", floor.describe(n_tokens));
        println!("bench {what}: {loupe:.0} tokens/s ({per_batch}; no reference run, so no ratio)");
        return Ok(());
    };

    println!("  check, mean |x| at the hook over positions 1..:");
    print_check(mean_abs_after_bos(&act), num(&torch, "/check/resid_abs_mean")?);
    if args.with_grads {
        // Loupe's loss is the sum over targets, PyTorch's the mean: scale Loupe's gradient down.
        let grad = grad.context("the capture pass returned no gradient")?;
        let targets = (CONTEXTS * (CONTEXT - 1)) as f64;
        println!("  check, mean |dL/dx| (mean loss) at the hook over positions 1..:");
        print_check(mean_abs_after_bos(&grad) / targets, num(&torch, "/check/grad_abs_mean")?);
        let torch = num(&torch, "/grads/tokens_per_s")?;
        println!("  Loupe capture with loss gradients   {loupe:8.0} tokens/s ({per_batch})");
        println!("  PyTorch naive forward+backward      {torch:8.0} tokens/s (weight gradients included)");
        floor.print(n_tokens, torch);
        println!(
            "bench capture --with-grads: {loupe:.0} tokens/s, ratio {:.2} vs naive PyTorch forward+backward \
             ({CONTEXTS} × {CONTEXT} tokens, gradient at {HOOK})",
            loupe / torch
        );
    } else {
        let (first7, full) = (num(&torch, "/first7/tokens_per_s")?, num(&torch, "/full/tokens_per_s")?);
        println!("  Loupe capture, stop after block 6   {loupe:8.0} tokens/s ({per_batch})");
        println!("  PyTorch first 7 blocks              {first7:8.0} tokens/s (inference_mode)");
        println!(
            "  PyTorch whole model                 {full:8.0} tokens/s (every block + logits; information)"
        );
        floor.print(n_tokens, first7);
        println!(
            "bench capture: {loupe:.0} tokens/s, ratio {:.2} vs PyTorch first 7 blocks \
             ({CONTEXTS} × {CONTEXT} tokens, {HOOK})",
            loupe / first7
        );
    }
    Ok(())
}

/// One batch as `loupe capture` runs it (`Runner::flush_batch` in trainer/model/src/capture.rs; keep the
/// two in step): the activations at [`HOOK`] and, with `grads`, the gradient there of the summed
/// next-token loss (by [`loss_gradients`], as capture does), both copied to host memory.
fn capture_batch(
    model: &dyn HookedModel,
    tokens: &Tensor,
    grads: bool,
) -> Result<(Vec<f32>, Option<Vec<f32>>)> {
    let mut hooks = if grads { Hooks::new().grad(HOOK) } else { Hooks::new().capture(HOOK) };
    let store = if grads {
        Some(loss_gradients(model, tokens, &mut hooks)?.1)
    } else {
        hooks = hooks.stop_after_layer(LAYER);
        model.forward(tokens, &mut hooks)?;
        None
    };
    let act = hooks.get(HOOK)?;
    let n = act.elem_count();
    let act_host: Vec<f32> = act.reshape((n,))?.to_vec1()?;
    let grad_host = match store {
        Some(store) => {
            let var = hooks.var(HOOK).context("gradient target missing")?;
            let grad = store.get(var.as_tensor()).context("no gradient reached the hook")?;
            Some(grad.reshape((n,))?.to_vec1::<f32>()?)
        }
        None => None,
    };
    Ok((act_host, grad_host))
}

/// The dense matmuls of one batch timed alone with Loupe's f32 GEMM: the time no implementation
/// of the same f32 computation on this machine can go below (at the GEMM's rate), and so the
/// highest ratio against the reference that f32 arithmetic allows.
struct GemmFloor {
    flop: f64,
    seconds: f64,
}

impl GemmFloor {
    fn describe(&self, n_tokens: f64) -> String {
        format!(
            "f32 GEMM floor: the batch's {:.0} GFLOP of dense matmuls alone take {:.2} s with Loupe's GEMM \
             here ({:.0} GFLOP/s): at most {:.0} tokens/s",
            self.flop / 1e9,
            self.seconds,
            self.flop / self.seconds / 1e9,
            n_tokens / self.seconds
        )
    }

    fn print(&self, n_tokens: f64, reference: f64) {
        println!(
            "  {}, a ratio of at most {:.2}",
            self.describe(n_tokens),
            n_tokens / self.seconds / reference
        );
    }
}

/// Time the dense matmuls of one batch, shape by shape (random data, best of 2 after a warm-up):
/// the projections of blocks 0..=LAYER; with `grads` those of every block, their input-gradient
/// products in blocks LAYER+1.. (backward), and the loss head's two vocabulary-wide products.
/// Attention's own score and value products are left out, so the floor is an underestimate.
fn gemm_floor(c: &model::ModelConfig, grads: bool) -> Result<GemmFloor> {
    let rows = CONTEXTS * CONTEXT;
    let (d, qkv, z, mlp) =
        (c.d_model, (c.n_heads + 2 * c.n_kv_heads) * c.d_head, c.n_heads * c.d_head, c.d_mlp);
    // (m, k, n, count): `count` products of [m, k] x [k, n].
    let block = [(rows, d, qkv), (rows, z, d), (rows, d, 2 * mlp), (rows, mlp, d)];
    let mut shapes: Vec<(usize, usize, usize, f64)> = Vec::new();
    let forward_blocks = if grads { c.n_layers } else { LAYER + 1 };
    shapes.extend(block.iter().map(|&(m, k, n)| (m, k, n, forward_blocks as f64)));
    if grads {
        let backward = c.n_layers.saturating_sub(LAYER + 1) as f64;
        shapes.extend(block.iter().map(|&(m, k, n)| (m, n, k, backward)));
        // Loss head, timed on one chunk of rows and scaled to the batch's rows with a target.
        let chunk = model::kernels::LOSS_ROWS;
        let chunks = (CONTEXTS * (CONTEXT - 1)) as f64 / chunk as f64;
        shapes.push((chunk, d, c.vocab_size, chunks));
        shapes.push((chunk, c.vocab_size, d, chunks));
    }
    let (mut flop, mut seconds) = (0.0, 0.0);
    for (m, k, n, count) in shapes {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let (best, _) = time(2, || {
            model::kernels::linear(&x, &w)?;
            Ok(())
        })?;
        flop += 2.0 * (m * k * n) as f64 * count;
        seconds += best * count;
    }
    Ok(GemmFloor { flop, seconds })
}

/// `CONTEXTS` contexts of BOS + `CONTEXT - 1` consecutive tokens from the start of the corpus.
fn contexts(tokenizer: &Tokenizer, corpus: &Path) -> Result<Vec<Vec<u32>>> {
    let text =
        std::fs::read_to_string(corpus).with_context(|| format!("cannot read {}", corpus.display()))?;
    // The first 60,000 characters give far more tokens than needed.
    let end = text.char_indices().nth(60_000).map_or(text.len(), |(i, _)| i);
    let ids = tokenizer.encode(&text[..end], false)?;
    let bos = tokenizer.bos_id().context("the tokenizer has no BOS token")?;
    let per = CONTEXT - 1;
    if ids.len() < CONTEXTS * per {
        bail!("{} gives only {} tokens; the benchmark needs {}", corpus.display(), ids.len(), CONTEXTS * per);
    }
    Ok(ids.chunks(per).take(CONTEXTS).map(|chunk| [&[bos], chunk].concat()).collect())
}

/// Run the PyTorch reference on the same tokens and return its JSON report.
fn run_reference(
    python: &Path,
    model: &Path,
    contexts: &[Vec<u32>],
    mode: &str,
    repeats: usize,
) -> Result<Value> {
    let dir = tempfile::Builder::new().prefix("loupe-bench-capture").tempdir()?;
    let script = dir.path().join("capture_reference.py");
    let ids = dir.path().join("tokens.json");
    std::fs::write(&script, REFERENCE_SCRIPT)?;
    std::fs::write(&ids, serde_json::to_vec(&serde_json::json!({ "tokens": contexts }))?)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("running the PyTorch reference ({mode}, {threads} threads); its progress goes to stderr");
    let output = Command::new(python)
        .arg(&script)
        .arg("--model")
        .arg(model)
        .arg("--tokens")
        .arg(&ids)
        .args(["--mode", mode, "--repeats", &repeats.to_string(), "--threads", &threads.to_string()])
        .stderr(Stdio::inherit())
        .output();
    super::reference_report(output, python)
}

/// One warm-up call of `pass`, then `repeats` timed calls: (best, mean) seconds.
fn time(repeats: usize, mut pass: impl FnMut() -> Result<()>) -> Result<(f64, f64)> {
    pass()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        pass()?;
        times.push(start.elapsed().as_secs_f64());
    }
    let best = times.iter().copied().fold(f64::MAX, f64::min);
    Ok((best, times.iter().sum::<f64>() / repeats as f64))
}

/// Mean |v| over every position but the first (BOS) of each context, as the reference computes it.
fn mean_abs_after_bos(values: &[f32]) -> f64 {
    let per_context = values.len() / CONTEXTS;
    let d = per_context / CONTEXT;
    let rows = values.chunks(per_context).flat_map(|c| &c[d..]);
    let (sum, n) = rows.fold((0.0, 0usize), |(s, n), v| (s + v.abs() as f64, n + 1));
    sum / n.max(1) as f64
}

/// The second line of a check that both sides computed the same values.
fn print_check(loupe: f64, torch: f64) {
    let rel = (loupe - torch).abs() / torch.abs().max(f64::MIN_POSITIVE);
    let flag = if rel > 1e-3 { "  MISMATCH: the two sides did not compute the same values" } else { "" };
    println!("    Loupe {loupe:.6e}, PyTorch {torch:.6e} (relative difference {rel:.1e}){flag}");
}

fn num(v: &Value, pointer: &str) -> Result<f64> {
    v.pointer(pointer)
        .and_then(Value::as_f64)
        .with_context(|| format!("the PyTorch reference report has no {pointer}"))
}

fn text<'a>(v: &'a Value, key: &str) -> Result<&'a str> {
    v.get(key).and_then(Value::as_str).with_context(|| format!("the PyTorch reference report has no {key}"))
}

//! `loupe bench train-sae`: TopK SAE training throughput against PyTorch, measured in the same run.
//!
//! Both sides train a TopK SAE (no auxiliary loss) on the same tokens in the same order from the
//! same initial weights (Loupe's tied init, handed to the reference as a file; b_dec from the
//! geometric median of the first batch on both sides): `--steps` batches, of which the first
//! `--warmup-steps` are untimed. The tokens are synthetic and have a known structure (each one a
//! sum of 32 of n planted unit directions with Zipf-distributed frequencies, plus noise and an
//! offset), so that FVU falls as on real activations. The reference is
//! `benches/reference/train_sae_reference.py` (embedded in the binary), run with the Python of
//! `benches/reference/setup-env.sh`: a dense SAELens-style TopK and a sparsify-style sparse one.
//! After training, each side reports FVU, L0 and dead features on held-out tokens.
//!
//! The limit set by the encoder GEMM is `rate / (2·d·n)` tokens/s, where `rate` is the FLOP/s of
//! Loupe's GEMM at the training shape (`[batch, d] × [d, n]`), measured in this run. Where TopK
//! selects on AMX (`loupe_dict::amx`), the f32 GEMM no longer bounds the step; the bench
//! then also measures the AMX bf16 products alone and reports the share of that limit.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Result, bail};
use loupe_dict::amx;
use loupe_dict::kernels::matmul_nt;
use loupe_dict::train::{default_lr, sq_dist, total_variance};
use loupe_dict::{Dictionary, TrainConfig, Trainer, Variant};
use rand::distr::Distribution;
use rand::distr::weighted::WeightedIndex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use serde_json::Value;

const REFERENCE_SCRIPT: &str = include_str!("../../../../benches/reference/train_sae_reference.py");

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 640)]
    d: usize,
    #[arg(long, default_value_t = 16384)]
    n: usize,
    #[arg(long, default_value_t = 32)]
    k: usize,
    #[arg(long, default_value_t = 4096)]
    batch: usize,
    /// Training steps on each side (the first --warmup-steps untimed).
    #[arg(long, default_value_t = 12)]
    steps: usize,
    #[arg(long, default_value_t = 2)]
    warmup_steps: usize,
    /// Held-out tokens for the evaluation.
    #[arg(long, default_value_t = 4096)]
    eval_tokens: usize,
    /// Adam learning rate (default 2e-4/√(n/2¹⁴)).
    #[arg(long)]
    lr: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip the PyTorch reference (Loupe's side and the GEMM limit only).
    #[arg(long)]
    no_reference: bool,
}

pub fn run(args: &Args) -> Result<()> {
    if args.steps <= args.warmup_steps {
        bail!("bench train-sae: --steps must exceed --warmup-steps");
    }
    if args.k == 0 || args.k > args.n || args.d == 0 || args.batch == 0 || args.eval_tokens == 0 {
        bail!("bench train-sae: need 1 <= k <= n and d, batch, eval-tokens >= 1");
    }
    let python = super::reference_python();
    let (d, n, k, batch) = (args.d, args.n, args.k, args.batch);
    let lr = args.lr.unwrap_or(default_lr(n));
    let train_rows = args.steps * batch;
    println!(
        "data: {train_rows} training + {} held-out synthetic tokens, d {d}; SAE n {n}, k {k}, batch {batch}, lr {lr:e}",
        args.eval_tokens
    );
    let data = synthetic(d, n, k, train_rows + args.eval_tokens, args.seed);
    let (train, eval) = data.split_at(train_rows * d);

    let threads = rayon::current_num_threads();
    let gemm = gemm_rate(d, n, batch);
    let limit = gemm / (2.0 * d as f64 * n as f64);
    println!(
        "encoder GEMM [{batch}, {d}] x [{d}, {n}]: {:.1} GFLOP/s ({threads} threads) → limit {limit:.0} tokens/s",
        gemm / 1e9
    );

    // Where TopK selects on AMX, its bf16 products bound the step instead of the f32 GEMM.
    let amx_limit = amx_rate(d, n, batch).map(|rate| {
        let limit = rate / (2.0 * d as f64 * n as f64);
        println!("AMX bf16 products, same shape: {:.1} GFLOP/s → limit {limit:.0} tokens/s", rate / 1e9);
        limit
    });

    let mut cfg = TrainConfig::new(Variant::Topk, d, n, k, batch);
    cfg.lr = lr;
    cfg.seed = args.seed;
    cfg.auxk_alpha = 0.0;
    let mut trainer = Trainer::new(cfg)?;

    let torch = if args.no_reference {
        None
    } else {
        Some(run_reference(&python, args, lr, train, eval, &trainer.sae.w_dec)?)
    };

    println!("timing Loupe ({} steps, {} untimed)", args.steps, args.warmup_steps);
    println!("  selection: {}", loupe_dict::amx::describe());
    let mut start = Instant::now();
    let mut last = Default::default();
    for (step, x) in train.chunks(batch * d).enumerate() {
        if step == args.warmup_steps {
            start = Instant::now();
        }
        last = trainer.step(x, None)?;
    }
    let seconds = start.elapsed().as_secs_f64();
    let loupe_tps = ((args.steps - args.warmup_steps) * batch) as f64 / seconds;
    let codes = trainer.sae.encode(eval);
    let mut xhat = vec![0.0; eval.len()];
    trainer.sae.decode(&codes, &mut xhat);
    let loupe_fvu = sq_dist(&xhat, eval) / total_variance(eval, d);
    let mut fired = vec![false; n];
    codes.feature.iter().for_each(|&f| fired[f as usize] = true);
    let dead = fired.iter().filter(|f| !**f).count() as f64 / n as f64;
    let l0 = codes.nnz() as f64 / args.eval_tokens as f64;

    println!("{:<34}{:>9} {:>10} {:>7} {:>7}", "", "tokens/s", "eval FVU", "L0", "dead");
    let row = |name: &str, tps: f64, fvu: f64, l0: f64, dead: f64| {
        println!("  {name:<32}{tps:>9.0} {fvu:>10.5} {l0:>7.2} {:>6.2}%", dead * 100.0)
    };
    row("Loupe (sparse, fused Adam)", loupe_tps, loupe_fvu, l0, dead);
    let _ = last;
    let mut reference = None;
    if let Some(torch) = &torch {
        for (key, name) in
            [("dense", "PyTorch dense (SAELens-style)"), ("sparse", "PyTorch sparse (sparsify-style)")]
        {
            let r = &torch["results"][key];
            let get = |f: &str| r[f].as_f64().unwrap_or(f64::NAN);
            row(name, get("tokens_per_s"), get("eval_fvu"), get("eval_l0"), get("dead_fraction"));
            if key == "sparse" {
                reference = Some((get("tokens_per_s"), get("eval_fvu")));
            }
        }
        let dense = torch["results"]["dense"]["tokens_per_s"].as_f64().unwrap_or(f64::NAN);
        println!("  ratio vs PyTorch dense: {:.2}", loupe_tps / dense);
        println!("  (PyTorch {}, {} threads)", torch["torch"].as_str().unwrap_or("?"), torch["threads"]);
    }
    println!(
        "  share of the encoder-GEMM limit: {:.2} ({loupe_tps:.0} of {limit:.0} tokens/s)",
        loupe_tps / limit
    );
    if let Some(amx) = amx_limit {
        println!(
            "  share of the AMX-products limit: {:.2} ({loupe_tps:.0} of {amx:.0} tokens/s)",
            loupe_tps / amx
        );
    }
    let shape = format!("d {d}, n {n}, k {k}, batch {batch}");
    match reference {
        Some((tps, fvu)) => {
            println!(
                "  eval FVU, Loupe vs sparsify-style: {loupe_fvu:.5} vs {fvu:.5} ({:+.2}%)",
                100.0 * (loupe_fvu / fvu - 1.0)
            );
            println!(
                "bench train-sae: {loupe_tps:.0} tokens/s, ratio {:.2} vs sparsify-style PyTorch ({shape})",
                loupe_tps / tps
            );
        }
        None => println!(
            "bench train-sae: {loupe_tps:.0} tokens/s, ratio {:.2} vs the encoder-GEMM limit ({shape})",
            loupe_tps / limit
        ),
    }
    Ok(())
}

/// Tokens that are sums of `k` of `n` planted unit directions (Zipf frequencies, magnitudes in
/// [0.5, 1.5]) plus Gaussian noise (σ 0.05 per dimension) and a fixed offset.
pub(super) fn synthetic(d: usize, n: usize, k: usize, rows: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x05ae_5eed);
    let mut atoms: Vec<f32> = (0..n * d).map(|_| StandardNormal.sample(&mut rng)).collect();
    for row in atoms.chunks_mut(d) {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v /= norm);
    }
    let offset: Vec<f32> = (0..d).map(|_| 0.5 * gauss(&mut rng)).collect();
    let zipf = WeightedIndex::new((0..n).map(|i| ((i + 1) as f64).powf(-0.5))).expect("weights are positive");
    let mut data = Vec::with_capacity(rows * d);
    for _ in 0..rows {
        let mut row: Vec<f32> = offset.iter().map(|o| o + 0.05 * gauss(&mut rng)).collect();
        for _ in 0..k {
            let a = zipf.sample(&mut rng);
            let c: f32 = rng.random_range(0.5..1.5);
            row.iter_mut().zip(&atoms[a * d..(a + 1) * d]).for_each(|(r, v)| *r += c * v);
        }
        data.extend(row);
    }
    data
}

fn gauss(rng: &mut StdRng) -> f32 {
    StandardNormal.sample(rng)
}

/// FLOP/s of `matmul_nt` at `[batch, d] × [n, d]ᵀ`, best of 3 after a warm-up.
fn gemm_rate(d: usize, n: usize, batch: usize) -> f64 {
    let a = vec![0.5f32; batch * d];
    let b = vec![0.25f32; n * d];
    let mut c = vec![0.0f32; batch * n];
    matmul_nt(&a, &b, &mut c, batch, n, d, false);
    let best = (0..3)
        .map(|_| {
            let start = Instant::now();
            matmul_nt(&a, &b, &mut c, batch, n, d, false);
            start.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min);
    2.0 * (batch * d * n) as f64 / best
}

/// The FLOP rate of the AMX bf16 products TopK's selection runs on (best of 3), or `None` where
/// training does not use them.
fn amx_rate(d: usize, n: usize, batch: usize) -> Option<f64> {
    if !amx::available() {
        return None;
    }
    // Random values, as in training (the rate is the same with constant ones here).
    let mut rng = StdRng::seed_from_u64(1);
    let mut fill = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
    let x = fill(batch * d);
    let mut packed = amx::PackedEncoder::default();
    packed.pack(&fill(n * d), n, d);
    amx::products_only(&x, &packed);
    let best = (0..3)
        .map(|_| {
            let start = Instant::now();
            amx::products_only(&x, &packed);
            start.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min);
    Some(2.0 * (batch * d * n) as f64 / best)
}

/// Write the data and the initial decoder to files, run the reference, return its JSON report.
fn run_reference(
    python: &Path,
    args: &Args,
    lr: f32,
    train: &[f32],
    eval: &[f32],
    w_dec: &[f32],
) -> Result<Value> {
    if !python.exists() {
        bail!(
            "no Python reference environment ({} is missing): run benches/reference/setup-env.sh \
             (or set LOUPE_PYTHON to a Python with torch, or pass --no-reference)",
            python.display()
        );
    }
    let dir = tempfile::Builder::new().prefix("loupe-bench-train-sae").tempdir()?;
    let script = dir.path().join("train_sae_reference.py");
    let data = dir.path().join("acts.f32");
    let init = dir.path().join("w_dec.f32");
    std::fs::write(&script, REFERENCE_SCRIPT)?;
    let bytes: Vec<u8> = train.iter().chain(eval).flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(&data, bytes)?;
    std::fs::write(&init, w_dec.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
    let threads = rayon::current_num_threads();
    println!(
        "running the PyTorch reference (dense and sparse, {threads} threads); its progress goes to stderr"
    );
    let output = Command::new(python)
        .arg(&script)
        .arg("--data")
        .arg(&data)
        .arg("--init-decoder")
        .arg(&init)
        .args(["--d", &args.d.to_string(), "--n", &args.n.to_string(), "--k", &args.k.to_string()])
        .args(["--batch", &args.batch.to_string(), "--train-rows", &(train.len() / args.d).to_string()])
        .args(["--eval-rows", &(eval.len() / args.d).to_string(), "--lr", &lr.to_string()])
        .args(["--threads", &threads.to_string(), "--seed", &args.seed.to_string()])
        .args(["--warmup-steps", &args.warmup_steps.to_string(), "--impl", "dense,sparse"])
        .stderr(Stdio::inherit())
        .output();
    super::reference_report(output, python)
}

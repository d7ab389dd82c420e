//! `loupe bench train-monet`: Monet training throughput against a TopK SAE with the same number
//! of parameters, trained in the same run on the same tokens, and Monet's memory as E doubles.
//! A MoE-X layer (`train-moex`) with the same number of parameters (E `--moex-experts`, top-k
//! `--moex-top-k`, the expert width that matches) is trained on the same tokens too, and printed
//! as its own line with its ratio to the same TopK SAE.
//!
//! Both train `--steps` batches (the first `--warmup-steps` untimed) of synthetic tokens (sums of
//! planted directions, as `bench train-sae`). The SAE gets n = parameters / (2·d) features (a
//! multiple of 64) and k 32. Memory: two child processes (`--memory-probe E`) each build a Monet
//! with E and E·2 sub-experts, train two steps, and report their peak resident memory (VmHWM);
//! Monet's parameters grow as √N, so doubling E (4× the experts) should roughly double it.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use loupe_dict::moex::MoexSpec;
use loupe_dict::moex::train::{MoexTrainConfig, MoexTrainer};
use loupe_dict::monet::train::{MonetTrainConfig, MonetTrainer};
use loupe_dict::monet::{Decomposition, MonetSpec};
use loupe_dict::{TrainConfig, Trainer, Variant};

use super::train_sae::synthetic;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 640)]
    d: usize,
    /// Sub-experts per side, E (E² experts).
    #[arg(long, default_value_t = 256)]
    experts: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 8)]
    topk: usize,
    #[arg(long, default_value_t = 16)]
    dim: usize,
    /// hd or vd.
    #[arg(long, default_value = "vd")]
    decomposition: Decomposition,
    #[arg(long, default_value_t = 4096)]
    batch: usize,
    #[arg(long, default_value_t = 6)]
    steps: usize,
    #[arg(long, default_value_t = 1)]
    warmup_steps: usize,
    /// MoE-X's number of experts (its expert width makes its parameters Monet's).
    #[arg(long, default_value_t = 16)]
    moex_experts: usize,
    /// MoE-X's experts per token.
    #[arg(long, default_value_t = 2)]
    moex_top_k: usize,
    /// Skip the memory comparison.
    #[arg(long)]
    no_memory: bool,
    /// (Internal) build a Monet with this E, train two steps, print the peak memory and exit.
    #[arg(long, hide = true)]
    memory_probe: Option<usize>,
}

/// One training step on a batch, returning its FVU.
type Step<'a> = dyn FnMut(&[f32]) -> Result<f32> + 'a;

fn spec(args: &Args, experts: usize) -> MonetSpec {
    MonetSpec {
        decomposition: args.decomposition,
        d_in: args.d,
        d_out: args.d,
        experts,
        heads: args.heads,
        topk: args.topk,
        dim: args.dim,
    }
}

pub fn run(args: &Args) -> Result<()> {
    if let Some(e) = args.memory_probe {
        return probe(args, e);
    }
    if args.steps <= args.warmup_steps {
        bail!("--steps must exceed --warmup-steps");
    }
    let (d, b) = (args.d, args.batch);
    let monet_spec = spec(args, args.experts);
    let params = monet_spec.parameters();
    let n = (params / (2 * d)).div_ceil(64) * 64;
    println!(
        "Monet {:?} E {} ({} experts), H {}, topk {}, dim {}: {} parameters; TopK SAE n {n}, k 32: {} parameters",
        args.decomposition,
        args.experts,
        monet_spec.n_experts(),
        args.heads,
        args.topk,
        args.dim,
        params,
        2 * n * d + n + d
    );
    let data = synthetic(d, 4096, 32, b * args.steps, 0);
    let batches: Vec<&[f32]> = data.chunks(b * d).collect();
    let timed = |mut step: Box<Step<'_>>| -> Result<(f64, f32)> {
        let mut fvu = 0.0;
        for x in &batches[..args.warmup_steps] {
            fvu = step(x)?;
        }
        let start = Instant::now();
        for x in &batches[args.warmup_steps..] {
            fvu = step(x)?;
        }
        let tokens = (b * (args.steps - args.warmup_steps)) as f64;
        Ok((tokens / start.elapsed().as_secs_f64(), fvu))
    };
    let mut cfg = MonetTrainConfig::new(monet_spec, b);
    cfg.dead_tokens = u64::MAX;
    let mut monet = MonetTrainer::new(cfg)?;
    let (monet_tps, monet_fvu) = timed(Box::new(|x| Ok(monet.train_step(x, None)?.fvu)))?;
    // MoE-X: E·m·(2d + 1) + d parameters; the width m that comes closest to Monet's.
    let e = args.moex_experts;
    let width = ((params.saturating_sub(d) as f64 / (e * (2 * d + 1)) as f64).round() as usize).max(1);
    let moex_spec = MoexSpec { d_in: d, d_out: d, experts: e, expert_width: width, top_k: args.moex_top_k };
    let mut mcfg = MoexTrainConfig::new(moex_spec.clone(), b);
    mcfg.dead_tokens = u64::MAX;
    let mut moex = MoexTrainer::new(mcfg)?;
    let (moex_tps, moex_fvu) = timed(Box::new(|x| Ok(moex.train_step(x, None)?.fvu)))?;
    let mut sae = Trainer::new(TrainConfig::new(Variant::Topk, d, n, 32, b))?;
    let (sae_tps, sae_fvu) = timed(Box::new(|x| Ok(sae.step(x, None)?.fvu)))?;
    println!("  {:<40}{:>10.0} tokens/s  (last batch FVU {monet_fvu:.4})", "Monet", monet_tps);
    println!(
        "  {:<40}{:>10.0} tokens/s  (last batch FVU {sae_fvu:.4})",
        "TopK SAE, equal parameters", sae_tps
    );
    println!(
        "  {:<40}{:>10.0} tokens/s  (last batch FVU {moex_fvu:.4})",
        format!("MoE-X E {e} × m {width}, top-k {}", args.moex_top_k),
        moex_tps
    );
    println!(
        "moex: {moex_tps:.0} tokens/s ({} parameters), ratio {:.2} vs topk-sae-equal-parameters",
        moex_spec.parameters(),
        moex_tps / sae_tps
    );
    if !args.no_memory {
        let (e1, e2) = (args.experts, 2 * args.experts);
        let (m1, m2) = (child_peak(args, e1)?, child_peak(args, e2)?);
        println!(
            "  peak memory training Monet: E {e1}: {:.0} MiB, E {e2}: {:.0} MiB → ×{:.2} for 4× the experts",
            m1 / 1024.0,
            m2 / 1024.0,
            m2 / m1
        );
    }
    println!(
        "train-monet: {monet_tps:.0} tokens/s, ratio {:.2} vs topk-sae-equal-parameters",
        monet_tps / sae_tps
    );
    Ok(())
}

/// Peak resident memory (KiB) of a child process training a Monet with `experts`.
fn child_peak(args: &Args, experts: usize) -> Result<f64> {
    let exe = std::env::current_exe().context("cannot find the loupe binary")?;
    let dec = if args.decomposition == Decomposition::Vertical { "vd" } else { "hd" };
    let out = Command::new(exe)
        .args(["bench", "train-monet", "--memory-probe", &experts.to_string(), "--decomposition", dec])
        .args([
            "--d",
            &args.d.to_string(),
            "--heads",
            &args.heads.to_string(),
            "--topk",
            &args.topk.to_string(),
        ])
        .args(["--dim", &args.dim.to_string(), "--batch", &args.batch.to_string()])
        .output()
        .context("cannot run the memory probe")?;
    if !out.status.success() {
        bail!("the memory probe for E {experts} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse::<f64>().with_context(|| format!("the memory probe printed {text:?}"))
}

fn probe(args: &Args, experts: usize) -> Result<()> {
    let d = args.d;
    let data = synthetic(d, 256, 8, args.batch * 2, 1);
    let mut trainer = MonetTrainer::new(MonetTrainConfig::new(spec(args, experts), args.batch))?;
    for x in data.chunks(args.batch * d) {
        trainer.train_step(x, None)?;
    }
    let status = std::fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    let hwm = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .context("no VmHWM in /proc/self/status")?;
    println!("{hwm}");
    Ok(())
}

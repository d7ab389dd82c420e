//! `loupe train-monet`: fit Monet product-key experts to a hook's activations (autoencoder), or
//! from an MLP's input hook to its output hook (transcoder, `--input-hook`), from flags or a TOML
//! config — the same job, checkpoints, resume and evaluation as `train-sae`.

use anyhow::Result;
use loupe_dict::job::Job;
use loupe_dict::monet::train::{MonetTrainConfig, MonetTrainer};
use loupe_dict::monet::{Decomposition, MonetSpec};
use serde::{Deserialize, Serialize};

use crate::train_job::JobFlags;

/// Every setting, as flags; the same keys (snake_case) may come from `--config file.toml`.
#[derive(clap::Args, Serialize, Deserialize, Default, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub(crate) job: JobFlags,
    /// Transcoder: the hook the experts read (e.g. blocks.6.ln2.hook_normalized), captured
    /// together with --hook. Without it, an autoencoder on --hook.
    #[arg(long)]
    pub(crate) input_hook: Option<String>,
    /// hd (horizontal) or vd (vertical, the default: better in the paper).
    #[arg(long)]
    pub(crate) decomposition: Option<Decomposition>,
    /// Sub-experts per side, E (E² experts; default 256).
    #[arg(long)]
    pub(crate) experts: Option<usize>,
    /// Router heads (default 4).
    #[arg(long)]
    pub(crate) heads: Option<usize>,
    /// Sub-experts a head keeps, through σ = Φ⁻¹(1 − topk/E) (default 8).
    #[arg(long)]
    pub(crate) topk: Option<usize>,
    /// Hidden width of an expert (default 16, the paper's).
    #[arg(long)]
    pub(crate) dim: Option<usize>,
    /// Adam learning rate (default 1e-3).
    #[arg(long)]
    pub(crate) lr: Option<f32>,
    /// Weight of the uniformity loss (default 0.01).
    #[arg(long)]
    pub(crate) uniformity_alpha: Option<f32>,
    /// Weight of the ambiguity loss (default 0.01).
    #[arg(long)]
    pub(crate) ambiguity_alpha: Option<f32>,
    /// Tokens without a non-zero gate after which an expert is dead (default min(1M, tokens/10)).
    #[arg(long)]
    pub(crate) dead_tokens: Option<u64>,
}

fn job_of(args: &Args) -> Result<Job<MonetTrainConfig>> {
    let flags = &args.job;
    let hook = flags.hook()?;
    let (d_out, rows) = flags.shape_of(&hook)?;
    let d_in = match &args.input_hook {
        Some(input) => flags.shape_of(input)?.0,
        None => d_out,
    };
    let decomposition = args.decomposition.unwrap_or(Decomposition::Vertical);
    let experts = args.experts.unwrap_or(256);
    let spec = MonetSpec {
        decomposition,
        d_in,
        d_out,
        experts,
        heads: args.heads.unwrap_or(4),
        topk: args.topk.unwrap_or(8),
        dim: args.dim.unwrap_or(16),
    };
    let (tokens, _) = flags.split(rows);
    let mut train = MonetTrainConfig::new(spec, flags.batch.unwrap_or(4096));
    if let Some(lr) = args.lr {
        train.lr = lr;
    }
    train.seed = flags.seed.unwrap_or(0);
    train.dead_tokens = args.dead_tokens.unwrap_or((tokens / 10).clamp(1, 1_000_000));
    if let Some(a) = args.uniformity_alpha {
        train.uniformity_alpha = a;
    }
    if let Some(a) = args.ambiguity_alpha {
        train.ambiguity_alpha = a;
    }
    train.validate()?;
    let kind = if decomposition == Decomposition::Vertical { "vd" } else { "hd" };
    flags.job(train, rows, args.input_hook.clone(), format!("{hook}-monet-{kind}-E{experts}"))
}

pub fn run(args: &Args) -> Result<()> {
    let job = job_of(&crate::train_job::merged(args, args.job.config.as_deref())?)?;
    let (t, s) = (&job.train, &job.train.spec);
    let reads = match &job.input_hook {
        Some(input) => format!("transcoder {input} → {}", job.hook),
        None => format!("autoencoder on {}", job.hook),
    };
    let banner = format!(
        "training {} (Monet {:?}, {} experts = {}², {} heads, topk {}, dim {}, {} parameters, batch {}, lr {:e}), \
         {reads} of {}: {} tokens, {} held out",
        job.name,
        s.decomposition,
        s.n_experts(),
        s.experts,
        s.heads,
        s.topk,
        s.dim,
        s.parameters(),
        t.batch,
        t.lr,
        job.store.display(),
        job.tokens,
        job.eval_tokens
    );
    crate::train_job::run::<MonetTrainer>(&job, banner)
}

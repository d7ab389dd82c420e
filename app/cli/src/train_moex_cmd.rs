//! `loupe train-moex`: fit a MoE-X layer (Yang et al. 2025: ReLU experts, sparsity-aware router,
//! one wide sparse MLP) to a hook's activations (autoencoder), or from an MLP's input hook to its
//! output hook (transcoder, `--input-hook`), from flags or a TOML config — the same job,
//! checkpoints, resume and evaluation as `train-sae`.

use anyhow::Result;
use loupe_dict::job::Job;
use loupe_dict::moex::MoexSpec;
use loupe_dict::moex::train::{MoexTrainConfig, MoexTrainer};
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
    /// Number of experts, E (default 16).
    #[arg(long)]
    pub(crate) experts: Option<usize>,
    /// Hidden units per expert, m (default 256); E·m features in all.
    #[arg(long)]
    pub(crate) expert_width: Option<usize>,
    /// Experts each token is routed to, k (default 2; below --experts).
    #[arg(long)]
    pub(crate) top_k: Option<usize>,
    /// Adam learning rate (default 2e-4 / √(E·m / 16384), as train-sae).
    #[arg(long)]
    pub(crate) lr: Option<f32>,
    /// Weight of the L1 on the gated hidden activations (default 0: ReLU and routing only).
    #[arg(long)]
    pub(crate) l1_coefficient: Option<f32>,
    /// Weight of the load-balancing term (Switch Transformer's α·E·Σ f_e·P_e over the router's
    /// softmax of every expert's score; default 0: off).
    #[arg(long)]
    pub(crate) balance_alpha: Option<f32>,
    /// Tokens without firing after which a feature is dead (default min(1M, tokens/10)).
    #[arg(long)]
    pub(crate) dead_tokens: Option<u64>,
}

fn job_of(args: &Args) -> Result<Job<MoexTrainConfig>> {
    let flags = &args.job;
    let hook = flags.hook()?;
    let (d_out, rows) = flags.shape_of(&hook)?;
    let d_in = match &args.input_hook {
        Some(input) => flags.shape_of(input)?.0,
        None => d_out,
    };
    let experts = args.experts.unwrap_or(16);
    let spec = MoexSpec {
        d_in,
        d_out,
        experts,
        expert_width: args.expert_width.unwrap_or(256),
        top_k: args.top_k.unwrap_or(2),
    };
    let (tokens, _) = flags.split(rows);
    let mut train = MoexTrainConfig::new(spec, flags.batch.unwrap_or(4096));
    if let Some(lr) = args.lr {
        train.lr = lr;
    }
    if let Some(l1) = args.l1_coefficient {
        train.l1_coefficient = l1;
    }
    if let Some(a) = args.balance_alpha {
        train.balance_alpha = a;
    }
    train.seed = flags.seed.unwrap_or(0);
    train.dead_tokens = args.dead_tokens.unwrap_or((tokens / 10).clamp(1, 1_000_000));
    train.validate()?;
    flags.job(train, rows, args.input_hook.clone(), format!("{hook}-moex-E{experts}"))
}

pub fn run(args: &Args) -> Result<()> {
    let job = job_of(&crate::train_job::merged(args, args.job.config.as_deref())?)?;
    let (t, s) = (&job.train, &job.train.spec);
    let reads = match &job.input_hook {
        Some(input) => format!("transcoder {input} → {}", job.hook),
        None => format!("autoencoder on {}", job.hook),
    };
    let banner = format!(
        "training {} (MoE-X, {} experts × {} units = {} features, top-k {}, {} parameters, batch {}, lr {:e}), \
         {reads} of {}: {} tokens, {} held out",
        job.name,
        s.experts,
        s.expert_width,
        s.n_features(),
        s.top_k,
        s.parameters(),
        t.batch,
        t.lr,
        job.store.display(),
        job.tokens,
        job.eval_tokens
    );
    crate::train_job::run::<MoexTrainer>(&job, banner)
}

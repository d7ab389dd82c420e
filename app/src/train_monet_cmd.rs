//! `loupe train-monet`: fit Monet product-key experts to a hook's activations (autoencoder), or
//! from an MLP's input hook to its output hook (transcoder, `--input-hook`), from flags or a TOML
//! config — the same job, checkpoints, resume and evaluation as `train-sae`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use loupe_store::Store;
use loupe_trainer::dict::job::Job;
use loupe_trainer::dict::monet::train::{MonetTrainConfig, MonetTrainer};
use loupe_trainer::dict::monet::{Decomposition, MonetSpec};
use serde::{Deserialize, Serialize};

/// Every setting, as flags; the same keys (snake_case) may come from `--config file.toml`.
#[derive(clap::Args, Serialize, Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// TOML file with any of these settings (keys as the flags, with '_' for '-').
    #[arg(long)]
    #[serde(skip)]
    pub(crate) config: Option<PathBuf>,
    /// The store holding the activations; the experts are written into it.
    #[arg(long)]
    pub(crate) store: Option<PathBuf>,
    /// The hook the experts reconstruct (and are spliced at), e.g. blocks.6.hook_resid_post, or a
    /// transcoder's output, blocks.6.hook_mlp_out.
    #[arg(long)]
    pub(crate) hook: Option<String>,
    /// Transcoder: the hook the experts read (e.g. blocks.6.ln2.hook_normalized), captured
    /// together with --hook. Without it, an autoencoder on --hook.
    #[arg(long)]
    pub(crate) input_hook: Option<String>,
    /// Dictionary name in the store (default: <hook>-monet-<hd|vd>-E<experts>).
    #[arg(long)]
    pub(crate) name: Option<String>,
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
    /// Training tokens (default: one pass over the training rows).
    #[arg(long)]
    pub(crate) tokens: Option<u64>,
    /// Tokens per step (default 4096).
    #[arg(long)]
    pub(crate) batch: Option<usize>,
    /// Seed of the initialisation and the shuffle (default 0).
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Steps between checkpoints (default 50; 0: only the final files).
    #[arg(long)]
    pub(crate) checkpoint_every: Option<u64>,
    /// Rows at the end of the hook held out for evaluation (default 16384, at most a tenth).
    #[arg(long)]
    pub(crate) eval_tokens: Option<u64>,
    /// Held-out contexts run through the model with the experts spliced in (default 8; 0 skips).
    #[arg(long)]
    pub(crate) eval_contexts: Option<usize>,
    /// Weight of the uniformity loss (default 0.01).
    #[arg(long)]
    pub(crate) uniformity_alpha: Option<f32>,
    /// Weight of the ambiguity loss (default 0.01).
    #[arg(long)]
    pub(crate) ambiguity_alpha: Option<f32>,
    /// Tokens without a non-zero gate after which an expert is dead (default min(1M, tokens/10)).
    #[arg(long)]
    pub(crate) dead_tokens: Option<u64>,
    /// Train on raw activations instead of ones scaled to mean norm √d.
    #[arg(long)]
    #[serde(default)]
    pub(crate) no_normalize: bool,
}

fn job_of(args: &Args) -> Result<Job<MonetTrainConfig>> {
    let store_path = args.store.clone().context("no --store given (flag or config)")?;
    let hook = args.hook.clone().context("no --hook given (flag or config)")?;
    let store = Store::open(&store_path)?;
    let manifest = store.manifest();
    let width = |name: &str| -> Result<(usize, u64)> {
        let Some(entry) = manifest.hooks.get(name) else {
            let known: Vec<&String> = manifest.hooks.keys().collect();
            bail!("store {} has no activations for hook {name} (it has: {known:?})", store_path.display());
        };
        Ok((entry.spec.d as usize, entry.rows()))
    };
    let (d_out, rows) = width(&hook)?;
    let d_in = match &args.input_hook {
        Some(input) => width(input)?.0,
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
    let eval_tokens = args.eval_tokens.unwrap_or((rows / 10).min(16384));
    let tokens = args.tokens.unwrap_or(rows.saturating_sub(eval_tokens));
    let mut train = MonetTrainConfig::new(spec, args.batch.unwrap_or(4096));
    if let Some(lr) = args.lr {
        train.lr = lr;
    }
    train.seed = args.seed.unwrap_or(0);
    train.dead_tokens = args.dead_tokens.unwrap_or((tokens / 10).clamp(1, 1_000_000));
    if let Some(a) = args.uniformity_alpha {
        train.uniformity_alpha = a;
    }
    if let Some(a) = args.ambiguity_alpha {
        train.ambiguity_alpha = a;
    }
    train.validate()?;
    let kind = if decomposition == Decomposition::Vertical { "vd" } else { "hd" };
    let name = args.name.clone().unwrap_or_else(|| format!("{hook}-monet-{kind}-E{experts}"));
    Ok(Job {
        store: store_path,
        hook,
        input_hook: args.input_hook.clone(),
        name,
        train,
        tokens,
        checkpoint_every: args.checkpoint_every.unwrap_or(50),
        eval_tokens,
        eval_contexts: args.eval_contexts.unwrap_or(8),
        normalize: !args.no_normalize,
    })
}

pub fn run(args: &Args) -> Result<()> {
    let job = job_of(&crate::train_job::merged(args, args.config.as_deref())?)?;
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
    crate::train_job::run::<MonetTrainer>(&job, banner, "experts/token")
}

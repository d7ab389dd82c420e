//! `loupe train-sae`: fit an SAE to a hook's activations in a store, from flags or a TOML config
//! (`--config`; a flag given on the command line wins over the file).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use loupe_store::Store;
use loupe_trainer::dict::job::Job;
use loupe_trainer::dict::jumprelu::L0Penalty;
use loupe_trainer::dict::{TrainConfig, Trainer, Variant};
use serde::{Deserialize, Serialize};

/// Every setting, as flags; the same keys (snake_case) may come from `--config file.toml`.
#[derive(clap::Args, Serialize, Deserialize, Default, Debug, Clone)]
#[serde(deny_unknown_fields)]
pub struct Args {
    /// TOML file with any of these settings (keys as the flags, with '_' for '-').
    #[arg(long)]
    #[serde(skip)]
    pub(crate) config: Option<PathBuf>,
    /// The store holding the activations; the dictionary is written into it.
    #[arg(long)]
    pub(crate) store: Option<PathBuf>,
    /// The hook to fit (e.g. blocks.6.hook_resid_post).
    #[arg(long)]
    pub(crate) hook: Option<String>,
    /// Dictionary name in the store (default: <hook>-<variant>-n<n>-k<k>).
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// topk, mutual_choice (batchtopk), feature_choice, gsae, jumprelu or relu.
    #[arg(long)]
    pub(crate) variant: Option<Variant>,
    /// Number of features (or give --expansion).
    #[arg(long)]
    pub(crate) n_features: Option<usize>,
    /// Features per activation dimension (default 32, sparsify's).
    #[arg(long)]
    pub(crate) expansion: Option<usize>,
    /// Active features per token (mean, for mutual and feature choice; JumpReLU's target with
    /// the quadratic penalty; unused by relu). Default 32.
    #[arg(long)]
    pub(crate) k: Option<usize>,
    /// Adam learning rate (default 2e-4/√(n/2¹⁴)).
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
    /// Held-out contexts run through the model with the SAE spliced in, for CE-loss recovered and
    /// KL (default 8; 0 skips it).
    #[arg(long)]
    pub(crate) eval_contexts: Option<usize>,
    /// Tokens without firing after which a feature is dead for AuxK (default min(10M, tokens/10)).
    #[arg(long)]
    pub(crate) dead_tokens: Option<u64>,
    /// Weight of AuxK / aux_zipf (default 1/32; 0 turns it off).
    #[arg(long)]
    pub(crate) auxk_alpha: Option<f32>,
    /// Features per token in the auxiliary reconstruction (default d/2).
    #[arg(long)]
    pub(crate) k_aux: Option<usize>,
    /// Add the FVU at 4k weighted 1/8 (TopK only).
    #[arg(long)]
    #[serde(default)]
    pub(crate) multi_topk: bool,
    /// Feature Choice: exponent of the Zipf capacities (default 0.5).
    #[arg(long)]
    pub(crate) zipf_exponent: Option<f32>,
    /// Mutual and Feature Choice: rank by raw pre-activations with absolute inference thresholds,
    /// as the papers (the result loads in SAELens as jumprelu), instead of Loupe's scale-free
    /// ranking by pre-activation / ‖x − b_dec‖ with relative thresholds.
    #[arg(long)]
    #[serde(default)]
    pub(crate) absolute_thresholds: bool,
    /// Train on raw activations instead of ones scaled to mean norm √d (the final files read raw
    /// activations either way).
    #[arg(long)]
    #[serde(default)]
    pub(crate) no_normalize: bool,
    /// g-SAE: weight of the gradient term (default 1).
    #[arg(long)]
    pub(crate) gsae_beta: Option<f32>,
    /// relu: weight of the L1 penalty; jumprelu: of the L0 penalty (SAELens' units; default 1).
    #[arg(long)]
    pub(crate) sparsity_coefficient: Option<f32>,
    /// jumprelu: bandwidth of the straight-through estimator (default 0.05).
    #[arg(long)]
    pub(crate) jumprelu_bandwidth: Option<f32>,
    /// jumprelu: initial threshold (default 0.01).
    #[arg(long)]
    pub(crate) jumprelu_init_threshold: Option<f32>,
    /// jumprelu: step (penalise L0) or quadratic (steer each token's L0 towards k). Default step.
    #[arg(long)]
    pub(crate) jumprelu_sparsity: Option<L0Penalty>,
}

/// Resolve the settings against the store into a job.
fn job_of(args: &Args) -> Result<Job<TrainConfig>> {
    let store_path = args.store.clone().context("no --store given (flag or config)")?;
    let hook = args.hook.clone().context("no --hook given (flag or config)")?;
    let variant = args.variant.unwrap_or(Variant::Topk);
    let store = Store::open(&store_path)?;
    let manifest = store.manifest();
    let Some(entry) = manifest.hooks.get(&hook) else {
        let known: Vec<&String> = manifest.hooks.keys().collect();
        bail!("store {} has no activations for hook {hook} (it has: {known:?})", store_path.display());
    };
    let d = entry.spec.d as usize;
    let rows = entry.rows();
    let n = match (args.n_features, args.expansion) {
        (Some(_), Some(_)) => bail!("give --n-features or --expansion, not both"),
        (Some(n), None) => n,
        (None, e) => e.unwrap_or(32) * d,
    };
    let k = args.k.unwrap_or(32);
    let batch = args.batch.unwrap_or(4096);
    let eval_tokens = args.eval_tokens.unwrap_or((rows / 10).min(16384));
    let tokens = args.tokens.unwrap_or(rows.saturating_sub(eval_tokens));
    let mut train = TrainConfig::new(variant, d, n, k, batch);
    if let Some(lr) = args.lr {
        train.lr = lr;
    }
    train.seed = args.seed.unwrap_or(0);
    train.dead_tokens = args.dead_tokens.unwrap_or((tokens / 10).clamp(1, 10_000_000));
    if let Some(a) = args.auxk_alpha {
        train.auxk_alpha = a;
    }
    if let Some(k_aux) = args.k_aux {
        train.k_aux = k_aux;
    }
    if args.multi_topk && variant != Variant::Topk {
        bail!("--multi-topk applies to the topk variant only");
    }
    train.multi_topk = args.multi_topk;
    if args.absolute_thresholds && !matches!(variant, Variant::MutualChoice | Variant::FeatureChoice) {
        bail!("--absolute-thresholds applies to mutual_choice and feature_choice only");
    }
    train.scale_free = !args.absolute_thresholds;
    if let Some(z) = args.zipf_exponent {
        train.zipf_exponent = z;
    }
    if let Some(b) = args.gsae_beta {
        train.gsae_beta = b;
    }
    if let Some(l) = args.sparsity_coefficient {
        train.sparsity_coefficient = l;
    }
    if let Some(e) = args.jumprelu_bandwidth {
        train.jumprelu_bandwidth = e;
    }
    if let Some(t) = args.jumprelu_init_threshold {
        train.jumprelu_init_threshold = t;
    }
    if let Some(p) = args.jumprelu_sparsity {
        train.jumprelu_sparsity = p;
    }
    train.validate()?;
    let name = args.name.clone().unwrap_or_else(|| format!("{hook}-{variant}-n{n}-k{k}"));
    Ok(Job {
        store: store_path,
        hook,
        input_hook: None,
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
    let t = &job.train;
    let banner = format!(
        "training {} ({} SAE, d {} → n {}, k {}, batch {}, lr {:e}) on {} of {}: {} tokens, {} held out",
        job.name,
        t.variant,
        t.d_in,
        t.n_features,
        t.k,
        t.batch,
        t.lr,
        job.hook,
        job.store.display(),
        job.tokens,
        job.eval_tokens
    );
    crate::train_job::run::<Trainer>(&job, banner, "L0")
}

//! `loupe train-sae`: fit an SAE to a hook's activations in a store, from flags or a TOML config
//! (`--config`; a flag given on the command line wins over the file).

use anyhow::{Result, bail};
use loupe_dict::job::Job;
use loupe_dict::jumprelu::L0Penalty;
use loupe_dict::{TrainConfig, Trainer, Variant};
use serde::{Deserialize, Serialize};

use crate::train_job::JobFlags;

/// Every setting, as flags; the same keys (snake_case) may come from `--config file.toml`.
#[derive(clap::Args, Serialize, Deserialize, Default, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub job: JobFlags,
    /// topk, mutual_choice (batchtopk), feature_choice, gsae, jumprelu or relu.
    #[arg(long)]
    pub variant: Option<Variant>,
    /// Number of features (or give --expansion).
    #[arg(long)]
    pub n_features: Option<usize>,
    /// Features per activation dimension (default 32, sparsify's).
    #[arg(long)]
    pub expansion: Option<usize>,
    /// Active features per token (mean, for mutual and feature choice; JumpReLU's target with
    /// the quadratic penalty; unused by relu). Default 32.
    #[arg(long)]
    pub k: Option<usize>,
    /// Adam learning rate (default 2e-4/√(n/2¹⁴)).
    #[arg(long)]
    pub lr: Option<f32>,
    /// Tokens without firing after which a feature is dead for AuxK (default min(10M, tokens/10)).
    #[arg(long)]
    pub dead_tokens: Option<u64>,
    /// Weight of AuxK / aux_zipf (default 1/32; 0 turns it off).
    #[arg(long)]
    pub auxk_alpha: Option<f32>,
    /// Features per token in the auxiliary reconstruction (default d/2).
    #[arg(long)]
    pub k_aux: Option<usize>,
    /// Add the FVU at 4k weighted 1/8 (TopK only).
    #[arg(long)]
    #[serde(default)]
    pub multi_topk: bool,
    /// Feature Choice: exponent of the Zipf capacities (default 0.5).
    #[arg(long)]
    pub zipf_exponent: Option<f32>,
    /// Mutual and Feature Choice: rank by raw pre-activations with absolute inference thresholds,
    /// as the papers (the result loads in SAELens as jumprelu), instead of Loupe's scale-free
    /// ranking by pre-activation / ‖x − b_dec‖ with relative thresholds.
    #[arg(long)]
    #[serde(default)]
    pub absolute_thresholds: bool,
    /// g-SAE: weight of the gradient term (default 1).
    #[arg(long)]
    pub gsae_beta: Option<f32>,
    /// relu: weight of the L1 penalty; jumprelu: of the L0 penalty (SAELens' units; default 1).
    #[arg(long)]
    pub sparsity_coefficient: Option<f32>,
    /// jumprelu: bandwidth of the straight-through estimator (default 0.05).
    #[arg(long)]
    pub jumprelu_bandwidth: Option<f32>,
    /// jumprelu: initial threshold (default 0.01).
    #[arg(long)]
    pub jumprelu_init_threshold: Option<f32>,
    /// jumprelu: step (penalise L0) or quadratic (steer each token's L0 towards k). Default step.
    #[arg(long)]
    pub jumprelu_sparsity: Option<L0Penalty>,
    /// Train a transcoder: read this hook (e.g. blocks.6.ln2.hook_normalized) and reconstruct
    /// --hook (e.g. blocks.6.hook_mlp_out); both captured together. topk, jumprelu or relu.
    #[arg(long)]
    pub input_hook: Option<String>,
    /// A skip transcoder: add a learned linear map of the input (W_skip, initialised to zero).
    #[arg(long)]
    #[serde(default)]
    pub skip: bool,
}

/// Resolve the settings against the store into a job.
fn job_of(args: &Args) -> Result<Job<TrainConfig>> {
    let flags = &args.job;
    let hook = flags.hook()?;
    let variant = args.variant.unwrap_or(Variant::Topk);
    let (d, rows) = flags.shape_of(&hook)?;
    if let Some(input) = &args.input_hook {
        if *input == hook {
            bail!("--input-hook is the same as --hook ({hook}); leave it out to train an SAE");
        }
        let (d_in, input_rows) = flags.shape_of(input)?;
        if d_in != d {
            bail!(
                "--input-hook {input} has width {d_in} and --hook {hook} width {d}: Loupe's transcoders \
                 write as wide as they read"
            );
        }
        if input_rows != rows {
            bail!(
                "hooks {input} ({input_rows} rows) and {hook} ({rows} rows) hold different rows: capture them together"
            );
        }
    } else if args.skip {
        bail!("--skip needs --input-hook (a skip connection belongs to a transcoder)");
    }
    let n = match (args.n_features, args.expansion) {
        (Some(_), Some(_)) => bail!("give --n-features or --expansion, not both"),
        (Some(n), None) => n,
        (None, e) => e.unwrap_or(32) * d,
    };
    let k = args.k.unwrap_or(32);
    let batch = flags.batch.unwrap_or(4096);
    let (tokens, _) = flags.split(rows);
    let mut train = TrainConfig::new(variant, d, n, k, batch);
    if let Some(lr) = args.lr {
        train.lr = lr;
    }
    train.seed = flags.seed.unwrap_or(0);
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
    train.transcoder = args.input_hook.is_some();
    train.skip = args.skip;
    train.validate()?;
    let kind = match (args.input_hook.is_some(), args.skip) {
        (false, _) => "",
        (true, false) => "-transcoder",
        (true, true) => "-skip-transcoder",
    };
    flags.job(train, rows, args.input_hook.clone(), format!("{hook}-{variant}{kind}-n{n}-k{k}"))
}

pub fn run(args: &Args) -> Result<()> {
    let job = job_of(&crate::train_job::merged(args, args.job.config.as_deref())?)?;
    let t = &job.train;
    let what = match (t.transcoder, t.skip) {
        (false, _) => "SAE",
        (true, false) => "transcoder",
        (true, true) => "skip transcoder",
    };
    let reads = job.input_hook.as_ref().map(|h| format!("{h} → ")).unwrap_or_default();
    let banner = format!(
        "training {} ({} {what}, d {} → n {}, k {}, batch {}, lr {:e}) on {reads}{} of {}: {} tokens, {} held out",
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
    let banner = match t.variant {
        Variant::Topk => format!("{banner}\nselection: {}", loupe_dict::amx::describe()),
        _ => banner,
    };
    crate::train_job::run::<Trainer>(&job, banner)
}

//! `loupe train-clt`: fit a cross-layer transcoder (Ameisen et al. 2025) to every covered layer's
//! MLP input (`blocks.L.ln2.hook_normalized`) and output (`blocks.L.hook_mlp_out`) in a store,
//! from flags or a TOML config; and `loupe splice-transcoders`: CE-loss recovered and KL with every
//! MLP replaced at once by a transcoder set (one CLT, or per-layer transcoders).
//!
//! Disk: the capture it trains on holds 2 × layers × d_model values per token (f16: 2 bytes each),
//! 46 KB per token for Gemma 3 270M (18 layers × 640), about 6.6 GB for 150k tokens. Capture both
//! hooks of every layer in one `loupe capture` run (the rows must match). Streaming activations
//! from the model without storing them is not built.

use anyhow::{Context, Result};
use loupe_dict::clt::job::{CltJob, held_out_contexts};
use loupe_dict::clt::parse_layers;
use loupe_dict::clt::train::CltConfig;
use loupe_dict::transcoder::TranscoderSet;
use loupe_model::Session;
use serde::{Deserialize, Serialize};

use crate::dict_args::DictArgs;
use crate::progress::Bar;

/// Every setting, as flags; the same keys (snake_case) may come from `--config file.toml`.
#[derive(clap::Args, Serialize, Deserialize, Default, Debug, Clone)]
pub struct Args {
    /// TOML file with any of these settings (keys as the flags, with '_' for '-').
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<std::path::PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub target: DictArgs,
    /// Layers covered: all (default), one layer (5), or a range (0-17). The store needs each
    /// one's ln2.hook_normalized and hook_mlp_out, captured together (f16: 2 × layers × d_model × 2
    /// bytes per token, 46 KB for Gemma 3 270M).
    #[arg(long)]
    pub layers: Option<String>,
    /// Features per layer (default 4096).
    #[arg(long)]
    pub n_features: Option<usize>,
    /// Active features per token and layer, TopK (default 32).
    #[arg(long)]
    pub k: Option<usize>,
    /// Training tokens (default: one pass over the training rows).
    #[arg(long)]
    pub tokens: Option<u64>,
    /// Tokens per step (default 4096).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Adam learning rate (default 2e-4 / √(features per layer / 2¹⁴)).
    #[arg(long)]
    pub lr: Option<f32>,
    /// Seed of the initialisation and the shuffle (default 0).
    #[arg(long)]
    pub seed: Option<u64>,
    /// AuxK's weight (default 1/32; 0 turns it off).
    #[arg(long)]
    pub auxk_alpha: Option<f32>,
    /// Tokens without firing after which a feature is dead (default min(1M, tokens / 10)).
    #[arg(long)]
    pub dead_tokens: Option<u64>,
    /// Rows at the end of the hooks held out for evaluation (default 16384, at most a tenth).
    #[arg(long)]
    pub eval_tokens: Option<u64>,
    /// Held-out contexts run through the model with every MLP replaced, for CE-loss recovered and
    /// KL (default 8; 0 skips it).
    #[arg(long)]
    pub eval_contexts: Option<usize>,
    /// Train on raw activations instead of ones scaled to mean norm √d (the final files read raw
    /// activations either way).
    #[arg(long)]
    #[serde(default)]
    pub no_normalize: bool,
}

/// The number of layers of the store's model (its config), or failing that, of the layers whose
/// MLP input the store holds.
fn model_layers(store: &loupe_store::Store) -> usize {
    let manifest = store.manifest();
    if let Ok(path) = Session::require(&manifest, None, None)
        && let Ok(session) = Session::load(&path)
    {
        return session.model().config().n_layers;
    }
    (0..).take_while(|l| manifest.hooks.contains_key(&format!("blocks.{l}.ln2.hook_normalized"))).count()
}

fn job_of(args: &Args) -> Result<CltJob> {
    let path = args.target.store.clone().context("no --store given (flag or config)")?;
    let store = loupe_store::Store::open(&path)?;
    let n_model = model_layers(&store);
    let (first, n_layers) = parse_layers(args.layers.as_deref().unwrap_or("all"), n_model)?;
    let first_input = format!("blocks.{first}.ln2.hook_normalized");
    let manifest = store.manifest();
    let Some(hook) = manifest.hooks.get(&first_input) else {
        anyhow::bail!(
            "store {} has no activations for hook {first_input}: capture every covered layer's \
             ln2.hook_normalized and hook_mlp_out together first",
            path.display()
        );
    };
    let (d, rows) = (hook.spec.d as usize, hook.rows());
    let eval_tokens = args.eval_tokens.unwrap_or((rows / 10).min(16384));
    if args.tokens == Some(0) {
        anyhow::bail!("--tokens 0 would train nothing; give at least 1 (or leave it out for one pass)");
    }
    let tokens = args.tokens.unwrap_or(rows.saturating_sub(eval_tokens));
    let n = args.n_features.unwrap_or(4096);
    let mut train = CltConfig::new(first, n_layers, d, n, args.k.unwrap_or(32), args.batch.unwrap_or(4096));
    if let Some(lr) = args.lr {
        train.lr = lr;
    }
    if let Some(a) = args.auxk_alpha {
        train.auxk_alpha = a;
    }
    train.seed = args.seed.unwrap_or(0);
    train.dead_tokens = args.dead_tokens.unwrap_or((tokens / 10).clamp(1, 1_000_000));
    train.validate()?;
    let name = args
        .target
        .dictionary
        .clone()
        .unwrap_or_else(|| format!("clt-L{first}-{}-n{n}-k{}", first + n_layers - 1, train.k));
    Ok(CltJob {
        store: path,
        name,
        train,
        tokens,
        eval_tokens,
        eval_contexts: args.eval_contexts.unwrap_or(8),
        normalize: !args.no_normalize,
    })
}

pub fn run(args: &Args) -> Result<()> {
    let job = job_of(&crate::train_job::merged(args, args.config.as_deref())?)?;
    let t = &job.train;
    let banner = format!(
        "training CLT {} on layers {}..={} of {}: {} features per layer, TopK k {}, batch {}, lr {:e}, \
         {} tokens, {} held out",
        job.name,
        t.first_layer,
        t.first_layer + t.n_layers - 1,
        job.store.display(),
        t.n_features,
        t.k,
        t.batch,
        t.lr,
        job.tokens,
        job.eval_tokens
    );
    let bar = Bar::new("{prefix} {bar:30} {pos}/{len} tokens {per_sec} ETA {eta} {msg}").with_banner(banner);
    let start = std::time::Instant::now();
    let outcome = loupe_dict::clt::job::run(&job, &bar)?;
    bar.indicatif().finish();
    let e = &outcome.eval;
    eprintln!(
        "done: {} steps, {} tokens in {:.0} s → {}\nheld-out ({} tokens): mean FVU {:.4}, L0/layer {:.2}, dead {:.2}%",
        outcome.steps,
        outcome.tokens,
        start.elapsed().as_secs_f64(),
        outcome.dir.display(),
        e.tokens,
        e.mean_fvu,
        e.mean_l0,
        100.0 * e.dead_fraction
    );
    for l in &e.layers {
        eprintln!(
            "  layer {:>2}: FVU {:.4}  L0 {:.2}  dead {:.2}%",
            l.layer,
            l.fvu,
            l.l0,
            100.0 * l.dead_fraction
        );
    }
    report_splice(&outcome.splice);
    Ok(())
}

fn report_splice(splice: &std::result::Result<loupe_dict::splice::SpliceStats, String>) {
    match splice {
        Ok(s) => eprintln!(
            "every MLP replaced ({} contexts, {} predictions): CE clean {:.4}, spliced {:.4}, all MLPs \
             zero-ablated {:.4} → CE-loss recovered {:.4}, KL {:.4}",
            s.contexts, s.tokens, s.ce_clean, s.ce_spliced, s.ce_zero_ablation, s.ce_loss_recovered, s.kl
        ),
        Err(why) => eprintln!("CE-loss recovered: not measured: {why}"),
    }
}

/// `loupe splice-transcoders`: every MLP replaced by a transcoder set.
#[derive(clap::Args, Debug, Clone)]
pub struct SpliceArgs {
    /// The store holding the transcoders (and the capture whose held-out rows give the contexts).
    #[arg(long)]
    pub store: std::path::PathBuf,
    /// One CLT, or one per-layer transcoder per layer (comma-separated, any order).
    #[arg(long, value_delimiter = ',', required = true)]
    pub transcoders: Vec<String>,
    /// Held-out contexts (default 8).
    #[arg(long, default_value_t = 8)]
    pub eval_contexts: usize,
    /// Rows at the end of the store's blocks.0.ln2.hook_normalized the contexts come from
    /// (default: the training jobs' default held-out split, min(rows / 10, 16384)).
    #[arg(long)]
    pub eval_tokens: Option<u64>,
}

pub fn run_splice(args: &SpliceArgs) -> Result<()> {
    let store = loupe_store::Store::open(&args.store)?;
    let manifest = store.manifest();
    let path = Session::require(&manifest, None, None)?;
    let session = Session::load(&path)?;
    let n_layers = session.model().config().n_layers;
    let set = TranscoderSet::from_store(&store, &args.transcoders, n_layers)?;
    let hook = "blocks.0.ln2.hook_normalized";
    let acts = store.activations(hook).with_context(|| format!("the contexts come from hook {hook}"))?;
    let rows = acts.rows();
    let eval_tokens = args.eval_tokens.unwrap_or((rows / 10).min(16384)).min(rows);
    let contexts = held_out_contexts(&store, &acts, rows - eval_tokens..rows, args.eval_contexts)?;
    let stats = loupe_dict::splice_all::eval_splice_all(session.model(), &set, &contexts)?;
    println!("{}", serde_json::to_string_pretty(&stats)?);
    report_splice(&Ok(stats));
    Ok(())
}

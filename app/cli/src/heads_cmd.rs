//! `loupe heads`: score every attention head `L.H` of the store's model — TransformerLens-style
//! detectors on repeated random sequences and natural text, single-head ablations — into the
//! store's `heads/<name>/` table, and print a short summary.

use std::path::PathBuf;

use anyhow::Result;
use loupe_analysis::heads::{self, HeadsConfig};
use loupe_model::Session;
use loupe_store::{HeadRow, Store};

use crate::progress::Bar;

#[derive(clap::Args)]
pub struct Args {
    /// The store folder.
    #[arg(long)]
    pub(crate) store: PathBuf,
    /// The model (default: the one the store records).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// Seed of the random repeated sequences.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Number of [BOS] + R + R sequences.
    #[arg(long, default_value_t = 16)]
    pub(crate) sequences: usize,
    /// |R|: random tokens in each half of a repeated sequence.
    #[arg(long, default_value_t = 50)]
    pub(crate) repeat_len: usize,
    /// Natural text for the previous- and duplicate-token scores (default: the store's captured
    /// tokens).
    #[arg(long)]
    pub(crate) text: Option<PathBuf>,
    /// Natural-text sequences, and tokens in each (BOS included).
    #[arg(long, default_value_t = 16)]
    pub(crate) text_sequences: usize,
    #[arg(long, default_value_t = 128)]
    pub(crate) text_len: usize,
    /// Also mean-ablate each head (its hook_z slice replaced by its mean over the repeated
    /// sequences).
    #[arg(long)]
    pub(crate) mean_ablation: bool,
    /// The name of the table in the store (heads/<name>/); a rerun replaces it.
    #[arg(long, default_value = loupe_store::heads::DEFAULT_HEADS_NAME)]
    pub(crate) name: String,
}

impl Args {
    fn config(&self) -> HeadsConfig {
        HeadsConfig {
            seed: self.seed,
            sequences: self.sequences,
            repeat_len: self.repeat_len,
            text_sequences: self.text_sequences,
            text_len: self.text_len,
            mean_ablation: self.mean_ablation,
        }
    }
}

pub fn run(args: &Args) -> Result<()> {
    let config = args.config();
    heads::check_settings(&args.name, &config)?;
    let manifest = Store::open(&args.store)?.manifest();
    let session = Session::open(&manifest, args.model.as_deref(), Some("pass --model"))?;
    let store = Store::open_rw(&args.store)?;
    let bar = Bar::new("{prefix:12} {bar:30} {pos}/{len}  [{elapsed}]");
    let report = heads::run(&store, &session, &args.name, &config, args.text.as_deref(), &bar)?;
    bar.indicatif().finish_and_clear();

    let s = &report.settings;
    println!(
        "scored {} heads ({} layers × {}) of {}: {} repeated sequences of [BOS] + 2 × {} tokens (seed {}), {} natural-text sequences ({})",
        report.rows.len(),
        report.n_layers,
        report.n_heads,
        s.model,
        s.sequences,
        s.repeat_len,
        s.seed,
        s.text_sequences,
        s.text_source
    );
    println!("clean loss on the repeated half: {:.4} nats", s.clean_loss);
    let top = |title: &str, column: &str| {
        let mut rows: Vec<&HeadRow> = report.rows.iter().filter(|r| r.score(column).is_finite()).collect();
        rows.sort_by(|a, b| b.score(column).total_cmp(&a.score(column)));
        let list: Vec<String> =
            rows.iter().take(5).map(|r| format!("{}.{} {:.3}", r.layer, r.head, r.score(column))).collect();
        println!("top {title}: {}", list.join(", "));
    };
    top("induction", "induction");
    top("previous-token", "previous_token");
    top("ablation Δloss (zero)", "ablation_zero");
    if s.mean_ablation {
        top("ablation Δloss (mean)", "ablation_mean");
    }
    println!("wrote heads/{} in {}", report.name, args.store.display());
    Ok(())
}

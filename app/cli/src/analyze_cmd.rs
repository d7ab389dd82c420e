//! `loupe analyze`: one pass of a dictionary over held-out activations → the feature tables of
//! `<store>/features/<dict>/` and the similarity index of `<store>/index/<dict>/`.

use std::path::PathBuf;

use anyhow::Result;
use loupe_analysis::features::{AnalyzeConfig, Rows, analyze};

use crate::dict_args::{self, DictArgs};
use crate::progress::Bar;

#[derive(clap::Args)]
#[command(mut_args(dict_args::required))]
pub struct Args {
    #[command(flatten)]
    pub(crate) target: DictArgs,
    /// Rows of the hook to analyse: held-out (the dictionary's, or all when it records none),
    /// all, or START..END.
    #[arg(long, default_value = "held-out")]
    pub(crate) rows: Rows,
    /// Analyse at most this many tokens (the first of those rows).
    #[arg(long)]
    pub(crate) max_tokens: Option<u64>,
    /// Top-activating examples per feature.
    #[arg(long, default_value_t = 20)]
    pub(crate) top: usize,
    /// Activation quantile buckets per feature.
    #[arg(long, default_value_t = 10)]
    pub(crate) quantiles: usize,
    /// Examples per quantile bucket.
    #[arg(long, default_value_t = 5)]
    pub(crate) per_quantile: usize,
    /// Tokens per example window.
    #[arg(long, default_value_t = 32)]
    pub(crate) window: usize,
    /// Neighbours (the features nearest by decoder direction) listed per feature.
    #[arg(long, default_value_t = 10)]
    pub(crate) neighbours: usize,
    /// Co-occurring features listed per feature.
    #[arg(long, default_value_t = 10)]
    pub(crate) cooccurring: usize,
    /// Promoted and suppressed output tokens listed per feature.
    #[arg(long, default_value_t = 10)]
    pub(crate) logit_tokens: usize,
    /// The model (default: the one the store records).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// Corpus for capturing on the fly when the store has no activations for the hook
    /// (default: the store's capture corpus).
    #[arg(long)]
    pub(crate) corpus: Option<PathBuf>,
    /// Tokens to capture on the fly in that case.
    #[arg(long, default_value_t = 65_536)]
    pub(crate) capture_tokens: u64,
    /// Skip the hnsw similarity index (minutes for 65k features on 2 cores); the neighbours
    /// table is exact and is still written.
    #[arg(long)]
    pub(crate) no_index: bool,
}

impl Args {
    /// The defaults, on every row of the store (for the demo).
    pub fn demo(store: PathBuf, dictionary: String) -> Args {
        let cfg = AnalyzeConfig::new(store.clone(), dictionary.clone());
        Args {
            target: DictArgs::new(store, dictionary),
            rows: Rows::All,
            max_tokens: None,
            top: cfg.top,
            quantiles: cfg.quantiles,
            per_quantile: cfg.per_quantile,
            window: cfg.window,
            neighbours: cfg.neighbours,
            cooccurring: cfg.cooccurring,
            logit_tokens: cfg.logit_tokens,
            model: None,
            corpus: None,
            capture_tokens: cfg.capture_tokens,
            no_index: false,
        }
    }

    pub(crate) fn config(&self) -> Result<AnalyzeConfig> {
        let mut cfg =
            AnalyzeConfig::new(self.target.store()?.to_path_buf(), self.target.dictionary()?.into());
        cfg.rows = self.rows.clone();
        cfg.max_tokens = self.max_tokens;
        cfg.top = self.top;
        cfg.quantiles = self.quantiles;
        cfg.per_quantile = self.per_quantile;
        cfg.window = self.window;
        cfg.neighbours = self.neighbours;
        cfg.cooccurring = self.cooccurring;
        cfg.logit_tokens = self.logit_tokens;
        cfg.model = self.model.clone();
        cfg.corpus = self.corpus.clone();
        cfg.capture_tokens = self.capture_tokens;
        cfg.build_index = !self.no_index;
        Ok(cfg)
    }
}

pub fn run(args: &Args) -> Result<()> {
    let bar = Bar::new("{prefix:16} {bar:30} {pos}/{len}  [{elapsed}]");
    let report = analyze(&args.config()?, &bar)?;
    bar.indicatif().finish_and_clear();
    let source = if report.captured_on_the_fly { " (captured on the fly)" } else { "" };
    println!(
        "analysed {} on {} tokens of {} (rows {}..{}{source}) at {:.0} tokens/s: {} dead, {} dense features",
        report.dictionary,
        report.tokens,
        report.hook,
        report.rows.start,
        report.rows.end,
        report.pass_tokens_per_second,
        report.dead,
        report.dense
    );
    for note in &report.notes {
        println!("note: {note}");
    }
    println!(
        "wrote {}/features/{}/ and index/{}/ ({:.1} s)",
        args.target.store()?.display(),
        report.dictionary,
        report.dictionary,
        report.seconds
    );
    Ok(())
}

//! `loupe heads`: score every attention head `L.H` of the store's model — TransformerLens-style
//! detectors on repeated random sequences and natural text, single-head ablations — into the
//! store's `heads/<name>/` table, and print a short summary.

use std::path::PathBuf;

use anyhow::{Context, Result};
use loupe_analysis::heads::detectors::repeated_sequences;
use loupe_analysis::heads::{self, HeadsConfig, group};
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
    /// Natural-text sequences.
    #[arg(long, default_value_t = 16)]
    pub(crate) text_sequences: usize,
    /// Tokens in each natural-text sequence (BOS included; at most the model's context).
    #[arg(long, default_value_t = 128)]
    pub(crate) text_len: usize,
    /// Also mean-ablate each head (its hook_z slice replaced by its mean over the repeated
    /// sequences).
    #[arg(long)]
    pub(crate) mean_ablation: bool,
    /// The name of the table in the store (heads/<name>/); a rerun replaces it.
    #[arg(long, default_value = loupe_store::heads::DEFAULT_HEADS_NAME)]
    pub(crate) name: String,
    /// Instead of scoring every head: zero these heads together (e.g. 5.1,11.2) and print the
    /// repeated-half loss against `--random-groups` random groups of as many heads; writes nothing.
    #[arg(long, value_delimiter = ',')]
    pub(crate) ablate: Vec<String>,
    /// Random groups to compare `--ablate` against.
    #[arg(long, default_value_t = 10)]
    pub(crate) random_groups: usize,
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
    if !args.ablate.is_empty() {
        return ablate_group(args, &session);
    }
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

/// `--ablate`: the listed heads zeroed together against random groups (heads::group).
fn ablate_group(args: &Args, session: &Session) -> Result<()> {
    let c = session.model().config();
    let group = args
        .ablate
        .iter()
        .map(|h| heads::parse_head(h, c.n_layers, c.n_heads))
        .collect::<Result<Vec<_>>>()?;
    let bos = session.tokenizer()?.bos_id().context("the model's tokenizer has no BOS token")?;
    let repeated = repeated_sequences(args.seed, args.sequences, args.repeat_len, c.vocab_size, bos);
    let found = group::compare_groups(
        session.model(),
        &repeated,
        args.repeat_len,
        &group,
        args.random_groups,
        args.seed,
    )?;
    let names =
        |g: &[(usize, usize)]| g.iter().map(|(l, h)| format!("{l}.{h}")).collect::<Vec<_>>().join(",");
    println!(
        "repeated-half loss on {} sequences [BOS] + 2 × {} (seed {}): clean {:.4} nats",
        args.sequences, args.repeat_len, args.seed, found.clean_loss
    );
    println!("{} zeroed together: {:.4} nats", names(&found.group), found.group_loss);
    for (g, loss) in &found.random {
        println!("  random {}: {loss:.4}", names(g));
    }
    println!(
        "{} random groups of {} heads (seed {}): mean {:.4} nats",
        found.random.len(),
        group.len(),
        args.seed,
        found.random_mean()
    );
    Ok(())
}

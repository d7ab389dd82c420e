//! `loupe dfa`: direct feature attribution of one feature on a prompt — per position, the
//! feature's pre-activation and the components it comes from (heads `L.H` of an attention-output
//! SAE at `blocks.L.attn.hook_z`; the embedding, earlier heads and MLPs of a residual-stream SAE),
//! and for attention-output SAEs the source tokens the top head read at one position.
//! `--json` prints the whole [`Dfa`] instead. Reads the store only; writes nothing.

use std::path::PathBuf;

use anyhow::{Result, bail};
use loupe_analysis::heads::dfa::{Dfa, dfa, hook_z_layer, unsupported};
use loupe_model::Session;
use loupe_model::residual::residual_point;
use loupe_store::Store;

use crate::dict_args::{self, DictArgs};

#[derive(clap::Args)]
#[command(mut_args(dict_args::required))]
pub struct Args {
    #[command(flatten)]
    pub(crate) target: DictArgs,
    /// The feature id.
    #[arg(long)]
    pub(crate) feature: u32,
    /// The prompt (the tokenizer adds BOS as the model expects).
    #[arg(long)]
    pub(crate) prompt: String,
    /// The model (default: the one the store records).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// The position whose source tokens are listed (attention-output SAEs; default: the position
    /// of the largest pre-activation after BOS).
    #[arg(long)]
    pub(crate) position: Option<usize>,
    /// Components (and source tokens) listed per position.
    #[arg(long, default_value_t = 5)]
    pub(crate) top: usize,
    /// Print the whole attribution as JSON (for scripts).
    #[arg(long)]
    pub(crate) json: bool,
}

/// Indices of the `n` largest |values|, largest first.
fn top_by_magnitude(values: &[f32], n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()).then(a.cmp(&b)));
    order.truncate(n);
    order
}

/// The position of the largest pre-activation, after BOS when there is more than one token.
fn default_position(d: &Dfa) -> usize {
    let first = usize::from(d.pre_activation.len() > 1);
    (first..d.pre_activation.len())
        .max_by(|&a, &b| d.pre_activation[a].total_cmp(&d.pre_activation[b]))
        .unwrap_or(0)
}

pub fn run(args: &Args) -> Result<()> {
    if args.prompt.trim().is_empty() {
        bail!("the prompt is empty");
    }
    let store = Store::open(args.target.store()?)?;
    let name = args.target.dictionary()?;
    let manifest = store.manifest();
    let (entry, _) = loupe_dict::open_in_store(&store, name)?;
    if entry.kind != "sae" {
        bail!(
            "dictionary {name} is a {} dictionary; direct feature attribution needs an SAE (at blocks.L.attn.hook_z or in the residual stream)",
            entry.kind
        );
    }
    if hook_z_layer(&entry.hook).is_none() && residual_point(&entry.hook, usize::MAX).is_none() {
        bail!("{}", unsupported(&entry.hook));
    }
    if args.feature >= entry.n_features {
        bail!("feature {} does not exist ({name} has {} features)", args.feature, entry.n_features);
    }
    let session = Session::open(&manifest, args.model.as_deref(), Some("pass --model"))?;
    let (sae, _) = loupe_dict::io::load_sae(&store.dictionary_dir(name))?;
    let tokenizer = session.tokenizer()?;
    let ids = tokenizer.encode(&args.prompt, true)?;
    if ids.is_empty() {
        bail!("the prompt is empty");
    }
    let limit = session.model().config().max_context;
    if ids.len() > limit {
        bail!("the prompt has {} tokens; the model takes at most {limit}", ids.len());
    }
    if let Some(p) = args.position.filter(|&p| p >= ids.len()) {
        bail!("--position {p} is beyond the prompt's {} tokens", ids.len());
    }
    let d = dfa(session.model(), &sae, &entry.hook, args.feature, &ids)?;
    if args.json {
        println!("{}", serde_json::to_string(&d)?);
        return Ok(());
    }
    let strings: Vec<String> =
        tokenizer.token_strings(&ids).into_iter().map(|s| s.replace('\n', "⏎")).collect();
    println!(
        "feature {} of {name} at {} on {} tokens: pre-activation = Σ components + bias ({:.4})",
        args.feature,
        entry.hook,
        ids.len(),
        d.bias
    );
    println!("{:>5}  {:<16} {:>10}  top components", "pos", "token", "pre-act");
    for (p, row) in d.contributions.iter().enumerate() {
        let list: Vec<String> = top_by_magnitude(row, args.top)
            .into_iter()
            .map(|c| format!("{} {:+.4}", d.components[c], row[c]))
            .collect();
        println!(
            "{p:>5}  {:<16} {:>10.4}  {}",
            format!("{:?}", strings[p]),
            d.pre_activation[p],
            list.join(", ")
        );
    }
    if let Some(per_source) = &d.per_source {
        let p = args.position.unwrap_or_else(|| default_position(&d));
        let head = top_by_magnitude(&d.contributions[p], 1)[0];
        let sources = &per_source[p][head];
        println!(
            "top source tokens of head {} at position {p} ({:?}; its share {:+.4}):",
            d.components[head], strings[p], d.contributions[p][head]
        );
        for s in top_by_magnitude(sources, args.top) {
            println!("{s:>5}  {:<16} {:+.4}", format!("{:?}", strings[s]), sources[s]);
        }
    }
    Ok(())
}

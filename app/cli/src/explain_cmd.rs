//! `loupe explain`, `loupe score` and `loupe search`: the auto-interp stage (loupe-autointerp)
//! from the command line — the LLM settings, the cache and budget flags, and the run summaries.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Result, bail};
use loupe_autointerp::cache::Cache;
use loupe_autointerp::examples::Sizes;
use loupe_autointerp::explain::{DELPHI, OFFLINE};
use loupe_autointerp::explain_run::{ExplainOptions, explain};
use loupe_autointerp::llm::{Llm, LlmConfig, default_cache_dir};
use loupe_autointerp::run::{RunSummary, parse_features};
use loupe_autointerp::score::embedding::Embedder;
use loupe_autointerp::score::{EMBEDDING, INTERVENTION, SCORERS};
use loupe_autointerp::score_run::{ScoreOptions, score_explanations};
use loupe_store::Store;

use crate::dict_args::{self, DictArgs};
use crate::progress::Bar;

/// The LLM and how much of it to use.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct LlmFlags {
    /// The LLM config (TOML: base_url, model, api_key_env, concurrency, cost_per_1m_prompt, ...).
    #[arg(long)]
    pub llm_config: Option<PathBuf>,
    /// An OpenAI-compatible endpoint (e.g. http://127.0.0.1:8080/v1), instead of a config file.
    #[arg(long, requires = "llm_model", conflicts_with = "llm_config")]
    pub base_url: Option<String>,
    /// The model name to ask the endpoint for (with --base-url).
    #[arg(long)]
    pub llm_model: Option<String>,
    /// Stop sending requests once this many prompt + completion tokens are spent.
    #[arg(long)]
    pub max_tokens_total: Option<u64>,
    /// The response cache (default ~/.cache/loupe/llm-cache).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Send every request, and remember no answer.
    #[arg(long, conflicts_with = "cache")]
    pub no_cache: bool,
}

impl LlmFlags {
    pub fn llm(&self) -> Result<Option<Llm>> {
        let cfg = match (&self.llm_config, &self.base_url, &self.llm_model) {
            (Some(path), _, _) => LlmConfig::load(path)?,
            (None, Some(url), Some(model)) => LlmConfig::new(url, model),
            _ => return Ok(None),
        };
        let cache = if self.no_cache {
            None
        } else {
            Some(Cache::open(&self.cache.clone().unwrap_or_else(default_cache_dir))?)
        };
        Ok(Some(Llm::new(&cfg, cache, self.max_tokens_total)?))
    }
}

/// Which features, which examples.
#[derive(clap::Args, Clone, Debug)]
#[command(mut_args(dict_args::required))]
pub struct RunFlags {
    #[command(flatten)]
    pub target: DictArgs,
    /// Features: `0..20`, `3,7,9` or a mix (default: every feature that is not dead).
    #[arg(long)]
    pub features: Option<String>,
    /// Examples an explainer sees, spread across the activation quantiles.
    #[arg(long, default_value_t = 40)]
    pub train_examples: usize,
    /// Activating test examples a scorer uses, and as many non-activating ones.
    #[arg(long, default_value_t = 50)]
    pub test_examples: usize,
    /// Seed of the example draws (explain and score must agree).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Redo features that are already done (otherwise they are skipped).
    #[arg(long)]
    pub redo: bool,
    /// The sentence-embedding model (default: the fetched all-MiniLM-L6-v2).
    #[arg(long)]
    pub embedder: Option<PathBuf>,
}

impl RunFlags {
    fn features(&self) -> Result<Option<Vec<std::ops::Range<u32>>>> {
        self.features.as_deref().map(parse_features).transpose()
    }
    fn sizes(&self) -> Result<Sizes> {
        if self.train_examples == 0 {
            bail!("--train-examples must be at least 1");
        }
        Ok(Sizes { train: self.train_examples, test: self.test_examples })
    }
    /// The embedder if its folder exists (an explicit --embedder must).
    fn embedder(&self) -> Result<Option<Embedder>> {
        match &self.embedder {
            Some(dir) => Ok(Some(Embedder::load(dir)?)),
            None => {
                let dir = crate::fetch::defaults().minilm_dir;
                Ok(if dir.join("config.json").is_file() { Some(Embedder::load(&dir)?) } else { None })
            }
        }
    }
}

#[derive(clap::Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub run: RunFlags,
    #[command(flatten)]
    pub llm: LlmFlags,
    /// `delphi` (an LLM) or `offline` (token statistics, no LLM); default delphi when an LLM is given.
    #[arg(long)]
    pub explainer: Option<String>,
    /// Show each example's activating tokens with their 0-10 strength in the prompt.
    #[arg(long)]
    pub activation_lines: bool,
}

#[derive(clap::Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub run: RunFlags,
    #[command(flatten)]
    pub llm: LlmFlags,
    /// Comma-separated: detection, fuzzing, simulation, embedding, intervention (default:
    /// detection, fuzzing, simulation and embedding with an LLM, embedding without).
    #[arg(long)]
    pub scorers: Option<String>,
    /// Whose explanations to score (default delphi when an LLM is given, else offline).
    #[arg(long)]
    pub explainer: Option<String>,
    /// Windows the simulation scorer predicts token by token, half of them activating.
    #[arg(long, default_value_t = 10)]
    pub simulation_windows: usize,
    /// The model the intervention scorer steers (default: the store's model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Steering strength of the intervention scorer, in units of each feature's maximum activation.
    #[arg(long, default_value_t = 4.0)]
    pub steer_scale: f32,
}

#[derive(clap::Args)]
#[command(mut_args(dict_args::required))]
pub struct SearchArgs {
    #[command(flatten)]
    pub target: DictArgs,
    /// What to look for, in words.
    pub query: String,
    /// Results to print.
    #[arg(short, long, default_value_t = 10)]
    pub k: usize,
    /// The sentence-embedding model (default: the fetched all-MiniLM-L6-v2).
    #[arg(long)]
    pub embedder: Option<PathBuf>,
}

fn progress_bar() -> Bar {
    Bar::new("{prefix} {bar:30} {pos}/{len} {elapsed}")
}

/// Say the client's waits and stops on stderr, above the progress bar.
fn notify_above(llm: &mut Option<Llm>, bar: &Bar) {
    if let Some(llm) = llm {
        let bar = bar.indicatif().clone();
        llm.client.set_notifier(Arc::new(move |line: &str| bar.suspend(|| eprintln!("{line}"))));
    }
}

fn report(what: &str, s: &RunSummary, llm: Option<&Llm>) {
    let mut line = format!(
        "{what}: {} finished ({} failed), {} already done, {} committed",
        s.finished, s.failed, s.skipped, s.committed
    );
    if llm.is_some() {
        let sp = s.spent;
        line.push_str(&format!(
            "; {} requests sent ({} of them retries), {} from the cache, {} prompt + {} completion tokens, cost {:.4}",
            sp.requests, sp.retries, sp.cached, sp.prompt_tokens, sp.completion_tokens, sp.cost
        ));
    }
    if let Some(index) = s.index {
        line.push_str(&format!(
            "; search index: {} explanations embedded, {} kept",
            index.embedded, index.reused
        ));
    }
    println!("{line}");
    for (f, why) in &s.failures {
        println!("  feature {f} failed: {why}");
    }
}

pub fn run_explain(args: &ExplainArgs) -> Result<()> {
    let mut llm = args.llm.llm()?;
    let explainer =
        args.explainer.clone().unwrap_or_else(|| if llm.is_some() { DELPHI } else { OFFLINE }.into());
    if explainer == DELPHI && llm.is_none() {
        bail!("the delphi explainer needs an LLM: pass --llm-config FILE or --base-url URL --llm-model NAME");
    }
    let opts = ExplainOptions {
        explainer,
        features: args.run.features()?,
        sizes: args.run.sizes()?,
        activation_lines: args.activation_lines,
        seed: args.run.seed,
        redo: args.run.redo,
    };
    let store = Store::open_rw(args.run.target.store()?)?;
    let embedder = args.run.embedder()?;
    if embedder.is_none() {
        eprintln!("note: no MiniLM model (run `loupe fetch`), so no semantic-search index is built");
    }
    let bar = progress_bar();
    notify_above(&mut llm, &bar);
    let dictionary = args.run.target.dictionary()?;
    let summary = explain(&store, dictionary, &opts, llm.as_ref(), embedder.as_ref(), &bar)?;
    bar.indicatif().finish_and_clear();
    report(&format!("explain ({})", opts.explainer), &summary, llm.as_ref());
    match summary.nothing_done("no feature could be explained") {
        Some(why) => bail!(why),
        None => Ok(()),
    }
}

pub fn run_score(args: &ScoreArgs) -> Result<()> {
    let mut llm = args.llm.llm()?;
    let scorers: Vec<String> = match &args.scorers {
        Some(list) => list.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        None if llm.is_some() => SCORERS[..4].iter().map(|s| s.to_string()).collect(),
        None => vec![EMBEDDING.to_string()],
    };
    let explainer =
        args.explainer.clone().unwrap_or_else(|| if llm.is_some() { DELPHI } else { OFFLINE }.into());
    let opts = ScoreOptions {
        scorers,
        explainer,
        features: args.run.features()?,
        sizes: args.run.sizes()?,
        seed: args.run.seed,
        simulation_windows: args.simulation_windows,
        model: args.model.clone(),
        steer_scale: args.steer_scale,
        redo: args.run.redo,
    };
    let store = Store::open_rw(args.run.target.store()?)?;
    let embedder = if opts.scorers.iter().any(|s| s == EMBEDDING || s == INTERVENTION) {
        args.run.embedder()?
    } else {
        None
    };
    let bar = progress_bar();
    notify_above(&mut llm, &bar);
    let dictionary = args.run.target.dictionary()?;
    let summary = score_explanations(&store, dictionary, &opts, llm.as_ref(), embedder.as_ref(), &bar)?;
    bar.indicatif().finish_and_clear();
    report(
        &format!("score ({} explanations; {})", opts.explainer, opts.scorers.join(", ")),
        &summary,
        llm.as_ref(),
    );
    match summary.nothing_done("no explanation could be scored") {
        Some(why) => bail!(why),
        None => Ok(()),
    }
}

pub fn run_search(args: &SearchArgs) -> Result<()> {
    let dir = args.embedder.clone().unwrap_or_else(|| crate::fetch::defaults().minilm_dir);
    let embedder = Embedder::load(&dir)?;
    let store = Store::open(args.target.store()?)?;
    let hits =
        loupe_autointerp::search::search(&store, args.target.dictionary()?, &embedder, &args.query, args.k)?;
    if hits.is_empty() {
        println!("no explanations match");
    }
    for (e, cos) in hits {
        println!(
            "{cos:.3}  feature {:>6}  [{}] {}",
            e.feature_id,
            e.explainer,
            e.explanation.unwrap_or_default()
        );
    }
    Ok(())
}

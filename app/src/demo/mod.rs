//! `loupe demo`: everything Loupe does, on the embedded defaults, into one store.
//!
//! Stages (each a [`Stage`]: a title, "is it already done in the store?", and the run, which calls
//! the `loupe_cli` command that does the work — the demo re-implements none of them):
//! fetch the defaults; capture Gemma 3 270M on the start of Moby-Dick (one capture: the SAEs'
//! `blocks.6.hook_resid_post` and every layer's MLP input and output for the transcoders — a
//! store holds one capture, so the hooks share its tokens and the transcoders train on fewer of
//! them with `--tokens`); a TopK and a Mutual Choice SAE on the same tokens; a MoE-X transcoder at
//! layer 6 and its experts; the SAEs' feature analyses; explanations (an LLM from `--llm-config`
//! or `<cache>/llm.toml` when there is one, else the offline explainer), embedding scores and the
//! search index; induction heads; the IOI circuit by patching, attribution and the discrete-SAE
//! method with `circuit eval`; per-layer transcoders and the attribution graph of one prompt with
//! its circuit-tracer export; the explanations export; then a summary (`summary.rs`) and the app,
//! unless `--headless`.
//!
//! Re-running skips every stage whose result the store already lists (and prints "already
//! done"), so a second run changes nothing. The sizes are one [`Budget`] (`budget.rs`): the full
//! one or `--quick`'s tiny one.

mod budget;
mod stages_analysis;
mod stages_dict;
mod summary;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use loupe_cli::fetch;
use loupe_store::Store;

pub use budget::Budget;

#[derive(clap::Args)]
pub struct Args {
    /// The store the demo writes (default: loupe-demo, or loupe-demo-quick with --quick).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Print the summary and stop, instead of opening the desktop app after it.
    #[arg(long)]
    headless: bool,
    /// The tiny budget (a few thousand tokens, small dictionaries, few task pairs): the whole
    /// pipeline in a few minutes, as a check rather than something worth browsing.
    #[arg(long)]
    quick: bool,
    /// An LLM config (llm.toml: base_url, model, …) for the explanations (default:
    /// <cache>/llm.toml when it exists; without one the offline explainer is used).
    #[arg(long)]
    llm_config: Option<PathBuf>,
}

/// What every stage reads: where the store is, the sizes, the fetched defaults.
pub struct Ctx {
    pub store: PathBuf,
    pub budget: Budget,
    pub defaults: fetch::Defaults,
    pub llm_config: Option<PathBuf>,
    /// A scratch folder (the IOI task's first pairs are written there).
    pub scratch: tempfile::TempDir,
}

impl Ctx {
    pub fn open(&self) -> Result<Store> {
        Store::open(&self.store)
    }
    /// The store, when it exists yet (the first stages run before it does).
    pub fn open_if_there(&self) -> Option<Store> {
        self.store.join("manifest.json").is_file().then(|| Store::open(&self.store).ok()).flatten()
    }
    pub fn store_arg(&self) -> String {
        self.store.display().to_string()
    }
    /// The exports' folder, beside the store's own tables.
    pub fn exports(&self) -> PathBuf {
        self.store.join("exports")
    }
}

/// One stage: its title, whether the store already holds its result, and the run.
pub struct Stage {
    pub title: String,
    pub done: fn(&Ctx) -> Result<bool>,
    pub run: fn(&Ctx) -> Result<()>,
}

/// A stage's outcome, for the summary.
pub struct Timed {
    pub title: String,
    pub seconds: f64,
    pub already_done: bool,
}

/// The sha256 of the default model, as `assets/defaults.sha256` pins it (a store records its
/// model's sha256).
fn default_model_sha256() -> &'static str {
    include_str!("../../../assets/defaults.sha256")
        .lines()
        .find(|l| l.ends_with("gemma-3-270m-q4_k_m.gguf"))
        .and_then(|l| l.split_whitespace().next())
        .expect("defaults.sha256 lists the default model")
}

/// Refuse a `--store` that is a file, or a store of another model, before anything is written.
fn check_store(store: &Path) -> Result<()> {
    if store.exists() && !store.is_dir() {
        bail!("--store {} is a file, not a store folder", store.display());
    }
    if !store.join("manifest.json").is_file() {
        return Ok(());
    }
    let manifest = Store::open(store)?.manifest();
    if let Some(model) = &manifest.model
        && model.sha256 != default_model_sha256()
    {
        bail!(
            "store {} holds activations of another model ({}, sha256 {}…); the demo runs the default \
             Gemma 3 270M: give a new --store",
            store.display(),
            model.name,
            &model.sha256[..model.sha256.len().min(12)]
        );
    }
    Ok(())
}

pub fn run(args: &Args) -> Result<()> {
    let budget = if args.quick { Budget::quick() } else { Budget::full() };
    let store = args
        .store
        .clone()
        .unwrap_or_else(|| PathBuf::from(if args.quick { "loupe-demo-quick" } else { "loupe-demo" }));
    check_store(&store)?;
    let llm_config = match &args.llm_config {
        Some(path) if !path.is_file() => bail!("--llm-config {} is not a file", path.display()),
        Some(path) => Some(path.clone()),
        None => Some(fetch::cache_dir().join("llm.toml")).filter(|p| p.is_file()),
    };
    let ctx = Ctx {
        store,
        budget,
        defaults: fetch::defaults(),
        llm_config,
        scratch: tempfile::tempdir().context("cannot create a temporary directory")?,
    };
    let mut stages = stages_dict::stages(&ctx);
    stages.extend(stages_analysis::stages(&ctx));
    let n = stages.len() + 1;
    println!("loupe demo ({} budget) into {}: {n} stages", ctx.budget.name, ctx.store.display());
    let mut timed = Vec::new();
    let total = Instant::now();
    for (i, stage) in stages.iter().enumerate() {
        println!("\n[{}/{n}] {}", i + 1, stage.title);
        let start = Instant::now();
        let already_done = (stage.done)(&ctx)?;
        if already_done {
            println!("already done");
        } else {
            (stage.run)(&ctx).with_context(|| format!("stage {} ({})", i + 1, stage.title))?;
        }
        let seconds = start.elapsed().as_secs_f64();
        println!("[{}/{n}] {:.1} s", i + 1, seconds);
        timed.push(Timed { title: stage.title.clone(), seconds, already_done });
    }
    println!("\n[{n}/{n}] summary\n");
    print!("{}", summary::summary(&ctx, &timed, total.elapsed().as_secs_f64())?);
    if args.headless {
        return Ok(());
    }
    if std::env::var_os("DISPLAY").is_none() && std::env::var_os("WAYLAND_DISPLAY").is_none() {
        bail!("no display to open the desktop app on (DISPLAY is not set); run with --headless");
    }
    println!("\nopening the desktop app");
    let gui = crate::gui_cmd::Args {
        store: ctx.store.clone(),
        dictionary: Some(stages_dict::TOPK.into()),
        feature: None,
        model: None,
        embedder: None,
        view: None,
        prompt: None,
        head: None,
        circuit: None,
        graph: None,
        experts: None,
    };
    crate::gui_cmd::run(&gui)
}

/// A `loupe_cli` command's arguments parsed from `words` exactly as the command line would be
/// (the command's own defaults apply to every flag not given).
pub fn parse<A: clap::Args>(words: &[String]) -> Result<A> {
    #[derive(clap::Parser)]
    struct Line<A: clap::Args> {
        #[command(flatten)]
        args: A,
    }
    let line = <Line<A> as clap::Parser>::try_parse_from(
        std::iter::once("loupe".to_string()).chain(words.iter().cloned()),
    )
    .map_err(|e| anyhow::anyhow!("the demo built a bad command line {words:?}: {e}"))?;
    Ok(line.args)
}

/// `words!["--store", x, …]`: a command line of anything that displays.
#[macro_export]
macro_rules! words {
    ($($w:expr),* $(,)?) => { vec![$($w.to_string()),*] };
}

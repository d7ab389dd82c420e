//! `loupe demo`: the whole pipeline on the embedded defaults.
//!
//! Built so far: fetch the defaults, capture `blocks.6.hook_resid_post` of Gemma 3 270M on the
//! start of Moby-Dick into the demo store, train a TopK SAE on it (with its held-out evaluation,
//! CE-loss recovered included), and analyse its features (on all the captured tokens: the
//! held-out tenth alone is too few for examples of 4,096 features). Every stage resumes or skips
//! what the store already holds, so a second run is quick. Then it explains every feature with
//! the offline explainer (no LLM needed), scores the first ones with the embedding scorer and
//! builds the semantic-search index. Last it opens the desktop app on the store (`loupe gui`),
//! unless `--headless`.

use std::path::PathBuf;

use anyhow::Result;
use loupe_store::{DType, Store};

use loupe_cli::dict_args::DictArgs;
use loupe_cli::{analyze_cmd, capture_cmd, explain_cmd, fetch, train_sae_cmd};

#[derive(clap::Args)]
pub struct Args {
    /// The store the demo writes.
    #[arg(long, default_value = "loupe-demo")]
    store: PathBuf,
    /// Print a summary instead of opening the desktop app.
    #[arg(long)]
    headless: bool,
}

/// The demo's hook, dictionary and sizes.
const HOOK: &str = "blocks.6.hook_resid_post";
const DICTIONARY: &str = "demo-topk";
const TOKENS: u64 = 60_000;
/// Features the demo scores by embedding (MiniLM embeds 100 windows a feature: ~1 s on 2 cores).
const SCORED: u32 = 50;

pub fn run(args: &Args) -> Result<()> {
    let defaults = fetch::fetch(false)?;
    println!("model:      {}", defaults.gemma_gguf.display());
    println!("embeddings: {}", defaults.minilm_dir.display());
    println!("corpus:     {}", defaults.corpus_dir.display());

    println!(
        "\n[1/4] capture {HOOK} on the start of Moby-Dick ({TOKENS} tokens) into {}",
        args.store.display()
    );
    capture_cmd::run(&capture_cmd::Args {
        model: defaults.gemma_gguf.clone(),
        corpus: defaults.corpus_dir.join("moby-dick").join("data.txt"),
        store: args.store.clone(),
        hooks: vec![HOOK.to_string()],
        context: 256,
        stride: None,
        no_bos: false,
        dtype: DType::F16,
        with_grads: false,
        batch: 8,
        max_tokens: Some(TOKENS),
        shard_rows: None,
    })?;

    println!("\n[2/4] train a TopK SAE ({DICTIONARY}: 4096 features, k 32) on it");
    let trained = Store::open(&args.store)?.dictionary(DICTIONARY).is_some_and(|d| d.is_done());
    if trained {
        println!("already trained: {}", args.store.join("dictionaries").join(DICTIONARY).display());
    } else {
        train_sae_cmd::run(&train_sae_cmd::Args {
            job: loupe_cli::train_job::JobFlags {
                target: DictArgs::new(args.store.clone(), DICTIONARY.to_string()),
                hook: Some(HOOK.to_string()),
                batch: Some(1024),
                eval_contexts: Some(4),
                ..Default::default()
            },
            n_features: Some(4096),
            k: Some(32),
            ..Default::default()
        })?;
    }
    println!(
        "\n[3/4] analyse its features (stats, examples, logit effects, neighbours and co-occurring features)"
    );
    if Store::open(&args.store)?.features(DICTIONARY).is_some() {
        println!("already analysed: {}", args.store.join("features").join(DICTIONARY).display());
    } else {
        analyze_cmd::run(&analyze_cmd::Args::demo(args.store.clone(), DICTIONARY.to_string()))?;
    }
    println!(
        "\n[4/4] explain every feature offline (token statistics, no LLM), score {SCORED} by embedding, index them"
    );
    let run = |features: Option<String>| explain_cmd::RunFlags {
        target: DictArgs::new(args.store.clone(), DICTIONARY.to_string()),
        features,
        train_examples: 40,
        test_examples: 50,
        seed: 0,
        redo: false,
        embedder: Some(defaults.minilm_dir.clone()),
    };
    explain_cmd::run_explain(&explain_cmd::ExplainArgs {
        run: run(None),
        llm: Default::default(),
        explainer: Some("offline".into()),
        activation_lines: false,
    })?;
    explain_cmd::run_score(&explain_cmd::ScoreArgs {
        run: run(Some(format!("0..{SCORED}"))),
        llm: Default::default(),
        scorers: Some("embedding".into()),
        explainer: Some("offline".into()),
        simulation_windows: 10,
        model: None,
        steer_scale: 4.0,
    })?;
    println!(
        "\nsearch the explanations:  loupe search --store {} --dictionary {DICTIONARY} \"whale\"",
        args.store.display()
    );
    println!(
        "LLM explanations:         loupe explain --store {} --dictionary {DICTIONARY} --base-url URL --llm-model NAME --features 0..20",
        args.store.display()
    );
    println!("browse:                   loupe gui {}", args.store.display());
    if args.headless {
        return Ok(());
    }
    if std::env::var_os("DISPLAY").is_none() && std::env::var_os("WAYLAND_DISPLAY").is_none() {
        anyhow::bail!("no display to open the desktop app on (DISPLAY is not set); run with --headless");
    }
    println!("\nopening the desktop app");
    let gui = crate::gui_cmd::Args {
        store: args.store.clone(),
        dictionary: Some(DICTIONARY.into()),
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

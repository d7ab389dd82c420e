//! `loupe bench analyze`: analysis throughput against the dictionary's plain encoding, measured
//! in the same run on the same rows.
//!
//! A temporary store gets `--tokens` synthetic activations (sums of k of n planted directions, as
//! in `bench train-sae`) in documents of 256 tokens, and a TopK SAE (d 640, n 16384, k 32 by
//! default; tied initialisation, whose encoding costs what a trained one's does) as its
//! dictionary. The reference reads the same shards in the same chunks and encodes them,
//! keeping nothing. The analysis is `loupe analyze` itself; its throughput counts everything
//! whose cost grows with the tokens — the pass with its bookkeeping, the example windows and
//! co-occurrence — and leaves out the per-feature similarity index (`bench similar`) and logit
//! effects (the store has no model).

use std::time::Instant;

use anyhow::{Result, bail};
use loupe_analysis::features::{AnalyzeConfig, Rows, analyze, pass};
use loupe_dict::io::{SaeMeta, save_sae};
use loupe_dict::sae::SaeSpec;
use loupe_dict::{Sae, Variant};
use loupe_store::{DType, DictEntry, HookSpec, Store};

const HOOK: &str = "blocks.6.hook_resid_post";

#[derive(clap::Args)]
pub struct Args {
    #[arg(long, default_value_t = 65_536)]
    tokens: usize,
    #[arg(long, default_value_t = 640)]
    d: usize,
    #[arg(long, default_value_t = 16_384)]
    n: usize,
    #[arg(long, default_value_t = 32)]
    k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

pub fn run(args: &Args) -> Result<()> {
    let (d, n, k) = (args.d, args.n, args.k);
    if args.tokens < 256 || k == 0 || k > n || d == 0 {
        bail!("bench analyze: need at least 256 tokens and 1 <= k <= n");
    }
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("store");
    let rows = args.tokens / 256 * 256;
    {
        let store = Store::create(&dir)?;
        let data = super::train_sae::synthetic(d, n, k, rows, args.seed);
        let spec = HookSpec { d: d as u32, dtype: DType::F32, grad: false };
        let mut writer = store.activation_writer(HOOK, spec)?;
        for (doc, act) in data.chunks(256 * d).enumerate() {
            let pos: Vec<u32> = (0..256).collect();
            let token: Vec<u32> = (0..256).map(|p| (doc as u32 * 7 + p * 13) % 50_000).collect();
            writer.append(&[doc as u32; 256], &pos, &token, act, None)?;
        }
        writer.finish()?;
        let sae = Sae::init(SaeSpec { variant: Variant::Topk, d_in: d, n_features: n, k }, args.seed);
        save_sae(&sae, &SaeMeta::default(), &store.dictionary_dir("sae"))?;
        let entry = DictEntry {
            hook: HOOK.into(),
            output_hook: None,
            kind: "sae".into(),
            variant: "topk".into(),
            d_in: d as u32,
            n_features: n as u32,
            status: "done".into(),
            step: 0,
            tokens: 0,
            files: Vec::new(),
        };
        store.commit_dictionary("sae", entry, &["cfg.json", "sae_weights.safetensors"])?;
    }
    println!(
        "{rows} synthetic tokens of width {d}; TopK SAE n {n}, k {k}; {} threads",
        rayon::current_num_threads()
    );

    let mut cfg = AnalyzeConfig::new(dir.clone(), "sae".into());
    cfg.rows = Rows::All;
    cfg.neighbours = 0; // the index is per feature, not per token: `bench similar`
    let store = Store::open(&dir)?;
    let (_, dict) = loupe_dict::open_in_store(&store, "sae")?;
    let acts = store.activations(HOOK)?;
    // Warm the page cache and the allocator once, untimed.
    pass::encode_only(&acts, 0..4096, dict.as_ref(), cfg.chunk)?;
    let (encode_seconds, nnz) = pass::encode_only(&acts, 0..rows as u64, dict.as_ref(), cfg.chunk)?;
    let encode_tps = rows as f64 / encode_seconds;
    println!("plain encoding: {encode_tps:.0} tokens/s ({nnz} codes)");
    drop(store);

    let started = Instant::now();
    let report = analyze(&cfg, &())?;
    let total = started.elapsed().as_secs_f64();
    let per_token: f64 = report.pass_seconds
        + report
            .phase_seconds
            .iter()
            .filter(|(p, _)| p == "examples and co-occurrence")
            .map(|(_, s)| s)
            .sum::<f64>();
    let analysis_tps = rows as f64 / per_token;
    println!(
        "analysis: pass {:.0} tokens/s ({:.2} s), examples and co-occurrence {:.2} s, whole run {total:.1} s",
        report.pass_tokens_per_second,
        report.pass_seconds,
        per_token - report.pass_seconds
    );
    for (phase, seconds) in &report.phase_seconds {
        println!("  {phase}: {seconds:.2} s");
    }
    println!("analyze: {analysis_tps:.0} tokens/s, ratio {:.2} vs plain encoding", analysis_tps / encode_tps);
    Ok(())
}

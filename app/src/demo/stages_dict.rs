//! The demo's dictionary stages: fetch, capture, the TopK and Mutual Choice SAEs, the MoE-X
//! transcoder and its experts, the SAEs' feature analyses, and their explanations, scores and
//! search index.

use anyhow::Result;
use loupe_cli::{analyze_cmd, capture_cmd, experts_cmd, explain_cmd, fetch, train_moex_cmd, train_sae_cmd};
use loupe_store::Store;

use super::{Ctx, Stage, parse};
use crate::words;

/// The SAEs' hook, and the dictionaries' names in the store.
pub const HOOK: &str = "blocks.6.hook_resid_post";
pub const TOPK: &str = "demo-topk";
pub const MUTUAL: &str = "demo-mutual-choice";
pub const MOEX: &str = "demo-moex";
/// The SAEs the analysis and explanation stages cover.
pub const SAES: [&str; 2] = [TOPK, MUTUAL];
/// Layers of the default model (Gemma 3 270M): every one gets a transcoder.
pub const LAYERS: usize = 18;

pub fn stages(ctx: &Ctx) -> Vec<Stage> {
    let b = &ctx.budget;
    vec![
        Stage {
            title: "fetch the defaults (Gemma 3 270M GGUF, all-MiniLM-L6-v2, corpus)".into(),
            done: |_| Ok(fetch::fetch(true).is_ok()),
            run: |_| fetch::fetch(false).map(|_| ()),
        },
        Stage {
            title: format!(
                "capture {HOOK} and every layer's ln2.hook_normalized and hook_mlp_out on the start of \
                 Moby-Dick ({} tokens, f16)",
                b.tokens
            ),
            done: |ctx| {
                let Some(store) = ctx.open_if_there() else { return Ok(false) };
                Ok(store.manifest().capture_state()?.is_some_and(|c| c.complete))
            },
            run: capture,
        },
        Stage {
            title: format!("train a TopK SAE ({TOPK}: {} features, k {}) on {HOOK}", b.sae_features, b.sae_k),
            done: |ctx| dictionary_done(ctx, TOPK),
            run: |ctx| train_sae(ctx, TOPK, "topk"),
        },
        Stage {
            title: format!(
                "train a Mutual Choice SAE ({MUTUAL}: {} features, mean k {}) on the same tokens, seed and order",
                b.sae_features, b.sae_k
            ),
            done: |ctx| dictionary_done(ctx, MUTUAL),
            run: |ctx| train_sae(ctx, MUTUAL, "mutual_choice"),
        },
        Stage {
            title: format!(
                "train a MoE-X transcoder ({MOEX}: {} experts × {} units, top-{}) from blocks.6.ln2.hook_normalized \
                 to blocks.6.hook_mlp_out, then what its experts handle (loupe experts)",
                b.moex_experts, b.moex_width, b.moex_top_k
            ),
            done: |ctx| Ok(dictionary_done(ctx, MOEX)? && ctx.open()?.manifest().experts.contains_key(MOEX)),
            run: moex,
        },
        Stage {
            title: format!(
                "analyse {TOPK} and {MUTUAL}: stats, examples, logit effects, neighbours, co-occurring features"
            ),
            done: |ctx| {
                let store = ctx.open()?;
                Ok(SAES.iter().all(|d| store.features(d).is_some()))
            },
            run: analyse,
        },
        Stage {
            title: format!(
                "explain {} of both SAEs ({}), score {} of each by embedding, build the search index",
                b.explained.map_or("every feature".to_string(), |n| format!("the first {n} features")),
                if ctx.llm_config.is_some() {
                    "with the LLM of the config, and offline"
                } else {
                    "offline: no LLM set"
                },
                b.scored
            ),
            done: |ctx| {
                let store = ctx.open()?;
                for d in SAES {
                    if store.explanations_entry(d).is_none() || store.explanations(d)?.scores.is_empty() {
                        return Ok(false);
                    }
                }
                Ok(true)
            },
            run: explain,
        },
    ]
}

fn dictionary_done(ctx: &Ctx, name: &str) -> Result<bool> {
    Ok(ctx.open_if_there().is_some_and(|s: Store| s.dictionary(name).is_some_and(|d| d.is_done())))
}

/// The hooks of the one capture: the SAEs' and each layer's MLP input and output.
pub fn hooks() -> Vec<String> {
    let mut hooks = vec![HOOK.to_string()];
    for l in 0..LAYERS {
        hooks.push(format!("blocks.{l}.ln2.hook_normalized"));
        hooks.push(format!("blocks.{l}.hook_mlp_out"));
    }
    hooks
}

fn capture(ctx: &Ctx) -> Result<()> {
    let b = &ctx.budget;
    let corpus = ctx.defaults.corpus_dir.join("moby-dick").join("data.txt");
    let mut line = words![
        "--model",
        ctx.defaults.gemma_gguf.display(),
        "--corpus",
        corpus.display(),
        "--store",
        ctx.store_arg(),
        "--context",
        b.context,
        "--dtype",
        "f16",
        "--max-tokens",
        b.tokens
    ];
    for hook in hooks() {
        line.extend(words!["--hook", hook]);
    }
    capture_cmd::run(&parse::<capture_cmd::Args>(&line)?)
}

/// The settings both SAEs share (so they see the same tokens in the same order).
fn sae_line(ctx: &Ctx, name: &str) -> Vec<String> {
    let b = &ctx.budget;
    let mut line = words![
        "--store",
        ctx.store_arg(),
        "--dictionary",
        name,
        "--hook",
        HOOK,
        "--n-features",
        b.sae_features,
        "--k",
        b.sae_k,
        "--batch",
        b.sae_batch,
        "--seed",
        0,
        "--eval-contexts",
        b.eval_contexts,
        "--checkpoint-every",
        0
    ];
    if let Some(lr) = b.sae_lr {
        line.extend(words!["--lr", lr]);
    }
    if let Some(tokens) = b.sae_tokens {
        line.extend(words!["--tokens", tokens]);
    }
    line
}

fn train_sae(ctx: &Ctx, name: &str, variant: &str) -> Result<()> {
    let mut line = sae_line(ctx, name);
    line.extend(words!["--variant", variant]);
    train_sae_cmd::run(&parse::<train_sae_cmd::Args>(&line)?)
}

fn moex(ctx: &Ctx) -> Result<()> {
    let b = &ctx.budget;
    if !dictionary_done(ctx, MOEX)? {
        let mut line = words![
            "--store",
            ctx.store_arg(),
            "--dictionary",
            MOEX,
            "--hook",
            "blocks.6.hook_mlp_out",
            "--input-hook",
            "blocks.6.ln2.hook_normalized",
            "--experts",
            b.moex_experts,
            "--expert-width",
            b.moex_width,
            "--top-k",
            b.moex_top_k,
            "--tokens",
            b.moex_tokens,
            "--batch",
            b.sae_batch,
            "--eval-contexts",
            b.eval_contexts,
            "--checkpoint-every",
            0
        ];
        if let Some(lr) = b.moex_lr {
            line.extend(words!["--lr", lr]);
        }
        if let Some(alpha) = b.moex_balance {
            line.extend(words!["--balance-alpha", alpha]);
        }
        train_moex_cmd::run(&parse::<train_moex_cmd::Args>(&line)?)?;
    }
    let line = words!["--store", ctx.store_arg(), "--dictionary", MOEX];
    experts_cmd::run(&parse::<experts_cmd::Args>(&line)?)
}

fn analyse(ctx: &Ctx) -> Result<()> {
    for d in SAES {
        if ctx.open()?.features(d).is_some() {
            println!("{d}: already analysed");
            continue;
        }
        println!("analysing {d}");
        analyze_cmd::run(&analyze_cmd::Args::demo(ctx.store.clone(), d.to_string()))?;
    }
    Ok(())
}

fn explain(ctx: &Ctx) -> Result<()> {
    let b = &ctx.budget;
    let llm = ctx.llm_config.as_ref().map(|p| words!["--llm-config", p.display()]).unwrap_or_default();
    let scored = format!("0..{}", b.scored);
    for d in SAES {
        let target = words!["--store", ctx.store_arg(), "--dictionary", d];
        // Offline explanations of every feature (they fill the search index), then, with an LLM,
        // its explanations of the features that get scored.
        let mut offline = [target.clone(), words!["--explainer", "offline"]].concat();
        if let Some(n) = b.explained {
            offline.extend(words!["--features", format!("0..{n}")]);
        }
        explain_cmd::run_explain(&parse::<explain_cmd::ExplainArgs>(&offline)?)?;
        let explainer = if llm.is_empty() {
            "offline"
        } else {
            let delphi = [target.clone(), llm.clone(), words!["--features", scored]].concat();
            explain_cmd::run_explain(&parse::<explain_cmd::ExplainArgs>(&delphi)?)?;
            "delphi"
        };
        let scorers = if llm.is_empty() { "embedding" } else { "detection,embedding" };
        let score = [
            target,
            llm.clone(),
            words!["--features", scored, "--explainer", explainer, "--scorers", scorers],
        ]
        .concat();
        explain_cmd::run_score(&parse::<explain_cmd::ScoreArgs>(&score)?)?;
    }
    Ok(())
}

//! `loupe experts`: what each expert of a mixture handles — a dictionary with experts (Monet,
//! MoE-X) or a captured router hook of a real MoE model — counted over the store's rows into the
//! tables of `<store>/experts/<name>/` (loupe_analysis::experts), with a short summary.

use std::path::PathBuf;

use anyhow::{Result, bail};
use loupe_analysis::experts::{self, ExpertsConfig, Source};
use loupe_store::ExpertRow;

use crate::progress::Bar;

#[derive(clap::Args)]
pub struct Args {
    /// The store folder.
    #[arg(long)]
    pub(crate) store: PathBuf,
    /// A dictionary with experts (Monet, MoE-X), routed over the activations of the hook it reads.
    #[arg(long, conflicts_with = "hook")]
    pub(crate) dictionary: Option<String>,
    /// A captured router hook: blocks.L.mlp.hook_expert_weights (chosen = non-zero entries), or
    /// blocks.L.mlp.hook_router_probs / hook_router_logits with --top-k.
    #[arg(long)]
    pub(crate) hook: Option<String>,
    /// The entry's name in the store (default: the dictionary's or the hook's); a rerun replaces it.
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// Experts chosen per token from hook_router_probs / hook_router_logits (the K largest).
    #[arg(long)]
    pub(crate) top_k: Option<usize>,
    /// The corpus the store was captured from (default: the one its capture records), for the
    /// domains; it must have the recorded hash.
    #[arg(long)]
    pub(crate) corpus: Option<PathBuf>,
    /// Count at most this many tokens (the first rows of the hook).
    #[arg(long)]
    pub(crate) max_tokens: Option<u64>,
    /// The heatmap's experts: every pair among this many most used experts is kept.
    #[arg(long, default_value_t = 64)]
    pub(crate) coactivation_experts: usize,
    /// Co-activation partners kept per expert.
    #[arg(long, default_value_t = 8)]
    pub(crate) coactivation_top: usize,
    /// Top token ids kept per expert.
    #[arg(long, default_value_t = 16)]
    pub(crate) vocab_top: usize,
}

pub fn run(args: &Args) -> Result<()> {
    let source = match (&args.dictionary, &args.hook) {
        (Some(d), None) => Source::Dictionary(d.clone()),
        (None, Some(h)) => Source::Hook(h.clone()),
        _ => bail!("pass --dictionary D (a dictionary with experts) or --hook H (a router hook)"),
    };
    let mut cfg = ExpertsConfig::new(args.store.clone(), source);
    cfg.name = args.name.clone();
    cfg.top_k = args.top_k;
    cfg.corpus = args.corpus.clone();
    cfg.max_tokens = args.max_tokens;
    cfg.coactivation_experts = args.coactivation_experts;
    cfg.coactivation_top = args.coactivation_top;
    cfg.vocab_top = args.vocab_top;
    let bar = Bar::new("{prefix:14} {bar:30} {pos}/{len}  [{elapsed}]");
    let report = experts::run(&cfg, &bar)?;
    bar.indicatif().finish_and_clear();

    let e = &report.entry;
    let s = &e.settings;
    let k = s.top_k.map_or(String::new(), |k| format!(" (top-{k})"));
    println!(
        "{} experts, {} tokens: {:.2} experts per token{k}, mean routing entropy {:.3} nats (chosen experts' gates){}",
        e.n_experts,
        s.tokens,
        e.mean_active,
        e.mean_entropy,
        e.mean_router_entropy
            .map_or(String::new(), |h| format!(", {h:.3} nats over the full router softmax")),
    );
    let mut used: Vec<&ExpertRow> = report.tables.experts.iter().filter(|r| r.tokens > 0).collect();
    println!("{} of {} experts used", used.len(), e.n_experts);
    used.sort_by(|a, b| b.tokens.cmp(&a.tokens).then(a.expert.cmp(&b.expert)));
    let list: Vec<String> =
        used.iter().take(5).map(|r| format!("{} {:.1}%", r.expert, 100.0 * r.usage)).collect();
    println!("most used: {}", list.join(", "));
    if report.tables.domains.iter().any(|r| r.specialization.is_some()) {
        // Specialization N_E(d) / N(d) grows with the expert's usage; ranked by how far above its
        // usage it is (1× = no preference), among experts with at least 20 tokens.
        let lift =
            |r: &ExpertRow| r.top_domain_specialization.unwrap_or(0.0) / r.usage.max(f32::MIN_POSITIVE);
        let mut by_domain: Vec<&&ExpertRow> = used.iter().filter(|r| r.tokens >= 20).collect();
        by_domain.sort_by(|a, b| lift(b).total_cmp(&lift(a)).then(a.expert.cmp(&b.expert)));
        let list: Vec<String> = by_domain
            .iter()
            .take(5)
            .map(|r| {
                format!(
                    "{} {:.1}% of {} ({:.2}× its usage)",
                    r.expert,
                    100.0 * r.top_domain_specialization.unwrap_or(0.0),
                    e.domains[r.top_domain as usize],
                    lift(r)
                )
            })
            .collect();
        println!("most domain-specialised (share of a domain's tokens, ≥ 20 tokens): {}", list.join(", "));
    } else if e.has_domains() {
        let with_tokens: Vec<&str> = e
            .domains
            .iter()
            .zip(&e.domain_tokens)
            .filter(|(_, n)| **n > 0)
            .map(|(d, _)| d.as_str())
            .collect();
        println!(
            "domain specialization: undefined (the tokens counted are from one domain: {}; of {})",
            with_tokens.join(", "),
            e.domains.join(", ")
        );
    } else {
        println!(
            "domain specialization: undefined (one domain: {})",
            e.domains.first().map_or("none", String::as_str)
        );
    }
    // Vocabulary: experts with at least 20 tokens, by the share of their tokens one id takes.
    let mut by_token: Vec<&&ExpertRow> = used.iter().filter(|r| r.tokens >= 20).collect();
    by_token.sort_by(|a, b| b.top_token_share.total_cmp(&a.top_token_share).then(a.expert.cmp(&b.expert)));
    let list: Vec<String> = by_token
        .iter()
        .take(5)
        .map(|r| format!("{} (token {} {:.0}%)", r.expert, r.top_token, 100.0 * r.top_token_share))
        .collect();
    if !list.is_empty() {
        println!("most token-specialised (≥ 20 tokens): {}", list.join(", "));
    }
    println!(
        "co-activation counted exactly for the {} most used of {} used experts; wrote experts/{} in {} ({:.1} s: routing {:.1} s, co-activation {:.1} s)",
        report.partner_experts,
        report.used_experts,
        report.name,
        args.store.display(),
        report.seconds,
        report.pass_seconds[0],
        report.pass_seconds[1]
    );
    Ok(())
}

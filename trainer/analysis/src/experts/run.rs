//! `loupe experts`, the run: resolve the routing source and the corpus, refuse bad input before
//! anything is written, count in two passes over the rows, and list the tables under the entry's
//! name in one manifest commit.
//!
//! Rows: every row of the source hook in storage order, the first `max_tokens` when given. The
//! routing of pass 1 is spilled to a temporary file in the system's temporary folder (8 bytes
//! per routing: 0.8 GB for 150k tokens of a Monet with ~670 experts per token) and read back by
//! pass 2, so the source is routed once.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use loupe_store::dictionaries::check_dictionary_name;
use loupe_store::{ExpertsEntry, ExpertsSettings, ExpertsSource, ExpertsTables, Progress, Store};
use rayon::prelude::*;

use super::count::{Counts, Pairs, partner_set};
use super::domains::{self, Domains};
use super::routing::{Routed, Routing};
use super::tables::{self, Keep};
use crate::features::codes_file::CodesWriter;
use crate::features::pass::for_each_chunk;
use loupe_dict::Codes;

/// What the experts are read from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    Dictionary(String),
    Hook(String),
}

/// What `loupe experts` does.
#[derive(Clone, Debug)]
pub struct ExpertsConfig {
    pub store: PathBuf,
    pub source: Source,
    /// The entry's name (default: the dictionary's or the hook's).
    pub name: Option<String>,
    /// Experts chosen per token from `hook_router_probs` / `hook_router_logits`.
    pub top_k: Option<usize>,
    /// The corpus the rows came from (default: the store's capture corpus).
    pub corpus: Option<PathBuf>,
    pub max_tokens: Option<u64>,
    /// The heatmap's experts (every pair among the most used), partners kept per expert, top
    /// token ids kept per expert.
    pub coactivation_experts: usize,
    pub coactivation_top: usize,
    pub vocab_top: usize,
    /// Budget of the exact co-activation rows: pair updates and bytes of counts.
    pub coactivation_work: f64,
    pub coactivation_memory: usize,
    /// Rows read at once, and rows per parallel piece.
    pub chunk: usize,
    pub piece: usize,
}

impl ExpertsConfig {
    pub fn new(store: PathBuf, source: Source) -> ExpertsConfig {
        ExpertsConfig {
            store,
            source,
            name: None,
            top_k: None,
            corpus: None,
            max_tokens: None,
            coactivation_experts: 64,
            coactivation_top: 8,
            vocab_top: 16,
            coactivation_work: 4e9,
            coactivation_memory: 512 << 20,
            chunk: 16_384,
            piece: 512,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct Report {
    pub name: String,
    pub entry: ExpertsEntry,
    pub tables: ExpertsTables,
    /// Experts whose co-activation partners were counted exactly (the most used), of those used.
    pub partner_experts: usize,
    pub used_experts: usize,
    pub seconds: f64,
    /// Seconds of pass 1 (routing and counting) and pass 2 (co-activation).
    pub pass_seconds: [f64; 2],
}

/// Run `loupe experts` and list its tables in the store.
pub fn run(cfg: &ExpertsConfig, progress: &dyn Progress) -> Result<Report> {
    let started = Instant::now();
    if cfg.chunk == 0 || cfg.piece == 0 || cfg.coactivation_experts == 0 {
        bail!("--chunk, --piece and the co-activation experts must be at least 1");
    }
    // Read-only until the tables are written: a refusal leaves the store as it was.
    let store = Store::open(&cfg.store)?;
    let manifest = store.manifest();
    let (name, routing, hook, source, features_per_expert) = match &cfg.source {
        Source::Dictionary(dict_name) => {
            if cfg.top_k.is_some() {
                bail!(
                    "--top-k is for router hooks (hook_router_probs, hook_router_logits), not dictionaries"
                );
            }
            let (entry, dict) = loupe_dict::open_in_store(&store, dict_name)?;
            let Some(layout) = dict.experts() else {
                bail!(
                    "dictionary {dict_name} is a {} {} without experts: `loupe experts` reads dictionaries with experts (monet, moex) or a router hook (blocks.L.mlp.hook_expert_weights, hook_router_probs, hook_router_logits)",
                    entry.kind,
                    entry.variant
                );
            };
            let source = ExpertsSource::Dictionary {
                name: dict_name.clone(),
                kind: entry.kind.clone(),
                hook: entry.hook.clone(),
            };
            let routing = Routing::Dictionary { dict, n_experts: layout.n_experts };
            (dict_name.clone(), routing, entry.hook, source, layout.features_per_expert as u32)
        }
        Source::Hook(hook) => {
            super::routing::RouterHook::parse(hook)?;
            let acts = store.activations(hook)?;
            let routing = Routing::hook(hook, acts.spec().d as usize, cfg.top_k)?;
            (hook.clone(), routing, hook.clone(), ExpertsSource::Hook { hook: hook.clone() }, 0)
        }
    };
    let name = cfg.name.clone().unwrap_or(name);
    check_dictionary_name(&name).map_err(|_| {
        anyhow::anyhow!("invalid entry name {name:?} (use letters, digits, '_', '-' and '.')")
    })?;
    let acts = store.activations(&hook)?;
    if let Routing::Dictionary { dict, .. } = &routing
        && dict.d_in() != acts.spec().d as usize
    {
        bail!("dictionary {name} reads d = {} but the store's {hook} has d = {}", dict.d_in(), acts.spec().d);
    }
    let domains = domains::open(&manifest, cfg.corpus.as_deref())?;
    let rows = 0..cfg.max_tokens.map_or(acts.rows(), |m| m.min(acts.rows()));
    if rows.is_empty() {
        bail!("no rows to count in {hook}");
    }
    let total = rows.end;
    let n_experts = routing.n_experts();

    // Pass 1: usage, gates, entropy, vocabulary, domains; the routing spills to a temporary file
    // (outside the store) so that pass 2 does not route again.
    progress.stage("routing");
    let spill = tempfile::Builder::new().prefix("loupe-experts-").tempdir()?;
    let mut codes_out = CodesWriter::create(&spill.path().join("codes"))?;
    let mut counts = Counts::new(n_experts, domains.names.len(), routing.has_full_distribution());
    let mut domain_of_row = Vec::new();
    for_each_chunk(&acts, rows.clone(), cfg.chunk, |c| {
        let pieces = route_pieces(&routing, c.act, acts.spec().d as usize, cfg.piece)?;
        domain_of_row.clear();
        for &doc in c.doc {
            domain_of_row.push(domains.of(doc)?);
        }
        counts.add(&pieces, c.token, &domain_of_row);
        for p in &pieces {
            codes_out.append(&p.codes)?;
        }
        progress.set(c.first + c.doc.len() as u64, total);
        Ok(())
    })?;
    let codes = codes_out.finish()?;
    let pass1 = started.elapsed().as_secs_f64();

    // Pass 2: exact co-activation rows of the most used experts, from the spilled routing.
    let members =
        partner_set(&counts, cfg.coactivation_experts, cfg.coactivation_work, cfg.coactivation_memory);
    progress.stage("co-activation");
    let mut pairs = Pairs::new(n_experts, members);
    let mut start = 0;
    while start < codes.rows() {
        let end = (start + cfg.chunk).min(codes.rows());
        let pieces: Vec<Routed> = (start..end)
            .step_by(cfg.piece)
            .map(|a| {
                let rows: Vec<Vec<(u32, f32)>> =
                    (a..(a + cfg.piece).min(end)).map(|r| codes.row(r).collect()).collect();
                Routed { codes: Codes::from_rows(rows.iter().map(Vec::as_slice)), full_entropy: None }
            })
            .collect();
        pairs.add(&pieces);
        progress.set(end as u64, total);
        start = end;
    }
    drop((codes, spill));
    let pass2 = started.elapsed().as_secs_f64() - pass1;

    progress.stage("writing");
    let keep = Keep {
        coactivation_experts: cfg.coactivation_experts,
        coactivation_top: cfg.coactivation_top,
        vocab_top: cfg.vocab_top,
    };
    let tables = tables::build(&counts, &pairs, keep);
    let entry = entry(&counts, &domains, source, features_per_expert, cfg, &manifest);
    let report = Report {
        name: name.clone(),
        entry: entry.clone(),
        tables: tables.clone(),
        partner_experts: pairs.members.len(),
        used_experts: counts.by_use().len(),
        seconds: 0.0,
        pass_seconds: [pass1, pass2],
    };
    drop(store);
    Store::open_rw(&cfg.store)?.write_experts(&name, &tables, entry)?;
    Ok(Report { seconds: started.elapsed().as_secs_f64(), ..report })
}

/// Route `x` (`[rows, d]`) in pieces of `piece` rows, in parallel, in row order.
fn route_pieces(routing: &Routing, x: &[f32], d: usize, piece: usize) -> Result<Vec<Routed>> {
    x.par_chunks(piece * d).map(|p| routing.route(p)).collect()
}

fn entry(
    counts: &Counts,
    domains: &Domains,
    source: ExpertsSource,
    features_per_expert: u32,
    cfg: &ExpertsConfig,
    manifest: &loupe_store::Manifest,
) -> ExpertsEntry {
    let tokens = counts.tokens.max(1) as f64;
    let (lo, hi) = counts.active_range;
    let model = manifest.model.as_ref();
    ExpertsEntry {
        source,
        n_experts: counts.n_experts as u32,
        features_per_expert,
        domains: domains.names.clone(),
        domain_tokens: counts.domain_tokens.clone(),
        mean_active: (counts.routed as f64 / tokens) as f32,
        mean_entropy: (counts.entropy_sum / tokens) as f32,
        mean_router_entropy: counts.full_entropy_sum.map(|s| (s / tokens) as f32),
        settings: ExpertsSettings {
            tokens: counts.tokens,
            // A dictionary applies its own floor inside `route` (not exposed by the trait); a
            // router hook's choice has none.
            gate_floor: None,
            top_k: (lo == hi).then_some(hi as u32),
            coactivation_top: cfg.coactivation_top as u32,
            coactivation_experts: cfg.coactivation_experts as u32,
            vocab_top: cfg.vocab_top as u32,
            model: model.map(|m| m.name.clone()).unwrap_or_default(),
            model_sha256: model.map(|m| m.sha256.clone()).unwrap_or_default(),
        },
        files: Vec::new(),
    }
}

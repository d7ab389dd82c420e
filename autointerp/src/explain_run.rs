//! `loupe explain`: explain many features, with per-feature resume (the journal), the response
//! cache and the budget, then commit the explanations (and rebuild the search index) in one
//! store update.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use anyhow::{Result, bail};
use loupe_store::{Explanation, FeatureTables, Progress, Provenance, Store};

use crate::cache::request_key;
use crate::examples::{self, Sizes};
use crate::explain::{self, DELPHI, OFFLINE};
use crate::journal::Journal;
use crate::llm::Llm;
use crate::run::{RunSummary, runtime, select_features};
use crate::score::embedding::Embedder;
use crate::search;

#[derive(Clone, Debug)]
pub struct ExplainOptions {
    /// `delphi` or `offline`.
    pub explainer: String,
    pub features: Option<Vec<std::ops::Range<u32>>>,
    pub sizes: Sizes,
    /// Show (token, 0-10) activation lines after each example.
    pub activation_lines: bool,
    pub seed: u64,
    /// Explain again features that already have an explanation by this explainer.
    pub redo: bool,
}

impl Default for ExplainOptions {
    fn default() -> Self {
        ExplainOptions {
            explainer: OFFLINE.into(),
            features: None,
            sizes: Sizes::default(),
            activation_lines: false,
            seed: 0,
            redo: false,
        }
    }
}

fn offline_record(tables: &FeatureTables, f: u32, opts: &ExplainOptions) -> Result<Explanation> {
    let sets = examples::sets(tables, f, opts.sizes, opts.seed, false)?;
    let rows: Vec<u64> = sets.train.iter().map(|w| w.row).collect();
    let inputs = serde_json::json!({"explainer": OFFLINE, "version": 1, "example_rows": rows});
    Ok(Explanation {
        feature_id: f,
        explainer: OFFLINE.into(),
        explanation: Some(explain::offline(tables, f, &sets.train)),
        failure: None,
        provenance: Provenance {
            model: OFFLINE.into(),
            prompt_hash: request_key(&inputs),
            example_rows: rows,
            ..Provenance::default()
        },
    })
}

async fn delphi_record(
    tables: &FeatureTables,
    f: u32,
    opts: &ExplainOptions,
    llm: &Llm,
) -> Result<Explanation> {
    let sets = examples::sets(tables, f, opts.sizes, opts.seed, false)?;
    let max = tables.stats(f)?.max_activation;
    let req = explain::delphi_request(llm, &sets.train, max, opts.activation_lines);
    let mut rec = Explanation {
        feature_id: f,
        explainer: DELPHI.into(),
        explanation: None,
        failure: None,
        provenance: Provenance {
            model: llm.model().to_string(),
            prompt_hash: request_key(&llm.client.body(&req)),
            temperature: req.temperature,
            max_tokens: req.max_tokens,
            example_rows: sets.train.iter().map(|w| w.row).collect(),
            ..Provenance::default()
        },
    };
    if sets.train.is_empty() {
        rec.failure = Some("the analysis has no examples of this feature".into());
        return Ok(rec);
    }
    match llm.ask(&req, &format!("feature {f}")).await {
        Ok(answer) => {
            rec.provenance.prompt_tokens = answer.response.usage.prompt_tokens;
            rec.provenance.completion_tokens = answer.response.usage.completion_tokens;
            let truncated = answer.response.finish_reason.as_deref() == Some("length");
            match explain::parse_explanation(&answer.response.text, truncated) {
                Ok(text) => rec.explanation = Some(text),
                Err(why) => rec.failure = Some(why),
            }
        }
        Err(e) => rec.failure = Some(e.to_string()),
    }
    Ok(rec)
}

/// Explain the chosen features of `dict` and commit. `llm` is needed by `delphi`; `embedder`
/// (MiniLM) builds the semantic-search index over all explanations of the dictionary (embedding
/// only new or changed ones). `progress` follows the stages `explain` and `embed`.
pub fn explain(
    store: &Store,
    dict: &str,
    opts: &ExplainOptions,
    llm: Option<&Llm>,
    embedder: Option<&Embedder>,
    progress: &dyn Progress,
) -> Result<RunSummary> {
    if opts.explainer != DELPHI && opts.explainer != OFFLINE {
        bail!("unknown explainer {:?} (choose {DELPHI} or {OFFLINE})", opts.explainer);
    }
    let tables = Arc::new(FeatureTables::open(store, dict)?);
    let features = select_features(&tables, opts.features.as_deref())?;
    let mut all = store.explanations(dict)?;
    let path = store.explanations_dir(dict).join(format!("explain-{}.journal.jsonl", opts.explainer));
    let (journal, logged) = Journal::open::<Explanation>(&path)?;
    let mut done: HashSet<u32> =
        logged.iter().filter(|e| e.failure.is_none()).map(|e| e.feature_id).collect();
    if !opts.redo {
        done.extend(
            all.explanations
                .iter()
                .filter(|e| e.explainer == opts.explainer && e.failure.is_none())
                .map(|e| e.feature_id),
        );
    }
    let todo: Vec<u32> = features.iter().copied().filter(|f| !done.contains(f)).collect();
    let mut summary = RunSummary { skipped: features.len() - todo.len(), ..RunSummary::default() };
    let total = todo.len();
    let journal = Arc::new(journal);
    progress.stage("explain");
    let fresh: Vec<Explanation> = if opts.explainer == OFFLINE {
        let mut out = Vec::with_capacity(total);
        for (i, &f) in todo.iter().enumerate() {
            let rec = offline_record(&tables, f, opts)?;
            journal.append(&rec)?;
            out.push(rec);
            progress.set(i as u64 + 1, total as u64);
        }
        out
    } else {
        let Some(llm) = llm else { bail!("the {DELPHI} explainer needs an LLM endpoint (--llm-config)") };
        runtime()?.block_on(async {
            // Build prompts only a little ahead of the requests.
            let ahead = Arc::new(tokio::sync::Semaphore::new(2 * llm.client.config().concurrency));
            let mut tasks = tokio::task::JoinSet::new();
            for &f in &todo {
                let (tables, llm, opts, journal, ahead) =
                    (tables.clone(), llm.clone(), opts.clone(), journal.clone(), ahead.clone());
                tasks.spawn(async move {
                    let _slot = ahead.acquire().await.expect("never closed");
                    let rec = delphi_record(&tables, f, &opts, &llm).await?;
                    journal.append(&rec)?;
                    anyhow::Ok(rec)
                });
            }
            let mut out = Vec::with_capacity(total);
            while let Some(r) = tasks.join_next().await {
                out.push(r??);
                progress.set(out.len() as u64, total as u64);
            }
            anyhow::Ok(out)
        })?
    };
    summary.finished = fresh.len();
    summary.spent = llm.map(Llm::spent).unwrap_or_default();
    for r in &fresh {
        if let Some(why) = &r.failure {
            summary.note_failure(r.feature_id, why);
        }
    }
    // The journal's records (an interrupted run's, then this run's): the last per feature wins.
    let mut records: BTreeMap<u32, Explanation> = BTreeMap::new();
    for r in logged.into_iter().chain(fresh) {
        records.insert(r.feature_id, r);
    }
    let replaced = |e: &Explanation| e.explainer == opts.explainer && records.contains_key(&e.feature_id);
    // Scores of an explanation that changed no longer apply.
    let changed: HashSet<u32> = all
        .explanations
        .iter()
        .filter(|e| replaced(e) && records[&e.feature_id].explanation != e.explanation)
        .map(|e| e.feature_id)
        .collect();
    all.scores.retain(|s| !(s.explainer == opts.explainer && changed.contains(&s.feature_id)));
    // Whether every explanation of the dictionary is one this run (re)made.
    let all_remade = all.explanations.iter().all(replaced);
    all.explanations.retain(|e| !replaced(e));
    summary.committed = records.len();
    all.explanations.extend(records.into_values());
    all.explanations.sort_by(|a, b| (a.feature_id, &a.explainer).cmp(&(b.feature_id, &b.explainer)));
    let report = search::commit_with_index(store, dict, &all, embedder, progress)?;
    summary.index = embedder.map(|_| report);
    if all_remade {
        store.mark_explanations_current(dict)?;
    }
    Arc::try_unwrap(journal).map_err(|_| anyhow::anyhow!("the journal is still in use"))?.remove()?;
    Ok(summary)
}

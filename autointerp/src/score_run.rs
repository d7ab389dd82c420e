//! `loupe score`: score the explanations of many features with the chosen scorers, with
//! per-feature resume (the journal), the cache and the budget, then commit in one store update.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use anyhow::{Result, bail};
use loupe_store::{Explanation, FeatureTables, Score, Store};

use crate::cache::request_key;
use crate::examples::{self, Sizes};
use crate::journal::Journal;
use crate::llm::Llm;
use crate::run::{RunSummary, runtime, select_features};
use crate::score::embedding::Embedder;
use crate::score::{self, EMBEDDING, INTERVENTION, Measured, SCORERS, SIMULATION};

#[derive(Clone, Debug)]
pub struct ScoreOptions {
    pub scorers: Vec<String>,
    /// Whose explanations to score.
    pub explainer: String,
    pub features: Option<Vec<u32>>,
    /// Must match the explain run's, so that test examples are not train examples.
    pub sizes: Sizes,
    pub seed: u64,
    /// Windows the simulation scorer predicts, half activating.
    pub simulation_windows: usize,
    pub redo: bool,
}

impl Default for ScoreOptions {
    fn default() -> Self {
        ScoreOptions {
            scorers: vec![EMBEDDING.into()],
            explainer: crate::explain::OFFLINE.into(),
            features: None,
            sizes: Sizes::default(),
            seed: 0,
            simulation_windows: 10,
            redo: false,
        }
    }
}

/// A score row from what a scorer measured (or why it failed).
fn record(e: &Explanation, scorer: &str, model: &str, temperature: f32, m: Measured) -> Score {
    let provenance = serde_json::json!({"scorer": scorer, "model": model, "requests": m.request_keys, "rows": m.example_rows});
    Score {
        feature_id: e.feature_id,
        explainer: e.explainer.clone(),
        scorer: scorer.to_string(),
        score: m.score,
        balanced_accuracy: m.balanced_accuracy,
        f1: m.f1,
        auroc: m.auroc,
        pearson: m.pearson,
        n_examples: m.n_examples,
        failure: m.failure,
        model: model.to_string(),
        prompt_hash: request_key(&provenance),
        temperature,
        max_tokens: m.max_tokens,
        example_rows: m.example_rows,
        prompt_tokens: m.prompt_tokens,
        completion_tokens: m.completion_tokens,
    }
}

async fn llm_score(
    tables: &FeatureTables,
    e: &Explanation,
    scorer: &str,
    opts: &ScoreOptions,
    llm: &Llm,
) -> Result<Score> {
    let sets = examples::sets(tables, e.feature_id, opts.sizes, opts.seed, true)?;
    let text = e.explanation.as_deref().unwrap_or_default();
    let seed = opts.seed ^ u64::from(e.feature_id);
    let result = match scorer {
        SIMULATION => score::simulation::score(llm, text, &sets, opts.simulation_windows).await,
        _ => score::classify::score(llm, scorer, text, &sets, seed).await,
    };
    Ok(record(e, scorer, llm.model(), llm.temperature, result))
}

/// Score the chosen features' explanations by `opts.explainer` and commit.
pub fn score_explanations(
    store: &Store,
    dict: &str,
    opts: &ScoreOptions,
    llm: Option<&Llm>,
    embedder: Option<&Embedder>,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<RunSummary> {
    for s in &opts.scorers {
        if s == INTERVENTION {
            bail!("the {INTERVENTION} scorer is not built yet; choose from {}", SCORERS.join(", "));
        }
        if !SCORERS.contains(&s.as_str()) {
            bail!("unknown scorer {s:?}; choose from {}", SCORERS.join(", "));
        }
        if s != EMBEDDING && llm.is_none() {
            bail!("the {s} scorer needs an LLM endpoint (--llm-config)");
        }
        if s == EMBEDDING && embedder.is_none() {
            bail!("the {EMBEDDING} scorer needs the MiniLM model (--embedder)");
        }
    }
    let tables = Arc::new(FeatureTables::open(store, dict)?);
    let features: HashSet<u32> = select_features(&tables, opts.features.as_deref())?.into_iter().collect();
    let mut all = store.explanations(dict)?;
    let explained: Vec<Explanation> = all
        .explanations
        .iter()
        .filter(|e| {
            e.explainer == opts.explainer && e.explanation.is_some() && features.contains(&e.feature_id)
        })
        .cloned()
        .collect();
    if explained.is_empty() {
        bail!(
            "{dict} has no {} explanations of the chosen features; run `loupe explain` first",
            opts.explainer
        );
    }
    let path = store.explanations_dir(dict).join(format!("score-{}.journal.jsonl", opts.explainer));
    let (journal, logged) = Journal::open::<Score>(&path)?;
    let key = |s: &Score| (s.feature_id, s.scorer.clone());
    let mut done: HashSet<(u32, String)> = logged.iter().filter(|s| s.failure.is_none()).map(key).collect();
    if !opts.redo {
        done.extend(
            all.scores.iter().filter(|s| s.explainer == opts.explainer && s.failure.is_none()).map(key),
        );
    }
    let todo: Vec<(Explanation, String)> = explained
        .iter()
        .flat_map(|e| opts.scorers.iter().map(move |s| (e.clone(), s.clone())))
        .filter(|(e, s)| !done.contains(&(e.feature_id, s.clone())))
        .collect();
    let mut summary =
        RunSummary { skipped: explained.len() * opts.scorers.len() - todo.len(), ..RunSummary::default() };
    let total = todo.len();
    let journal = Arc::new(journal);
    let mut fresh = Vec::with_capacity(total);
    // The embedding scorer runs here (CPU); the LLM scorers concurrently below.
    for (e, _) in todo.iter().filter(|(_, s)| s == EMBEDDING) {
        let embedder = embedder.expect("checked above");
        let sets = examples::sets(&tables, e.feature_id, opts.sizes, opts.seed, true)?;
        let measured = score::embedding::score(embedder, e.explanation.as_deref().unwrap_or_default(), &sets)
            .unwrap_or_else(|why| Measured { failure: Some(why), ..Measured::default() });
        let rec = record(e, EMBEDDING, &embedder.name, 0.0, measured);
        journal.append(&rec)?;
        fresh.push(rec);
        progress(fresh.len(), total);
    }
    let llm_todo: Vec<(Explanation, String)> = todo.into_iter().filter(|(_, s)| s != EMBEDDING).collect();
    if let (Some(llm), false) = (llm, llm_todo.is_empty()) {
        let done_before = fresh.len();
        let more = runtime()?.block_on(async {
            let ahead = Arc::new(tokio::sync::Semaphore::new(2 * llm.client.config().concurrency));
            let mut tasks = tokio::task::JoinSet::new();
            for (e, scorer) in llm_todo {
                let (tables, llm, opts, journal, ahead) =
                    (tables.clone(), llm.clone(), opts.clone(), journal.clone(), ahead.clone());
                tasks.spawn(async move {
                    let _slot = ahead.acquire().await.expect("never closed");
                    let rec = llm_score(&tables, &e, &scorer, &opts, &llm).await?;
                    journal.append(&rec)?;
                    anyhow::Ok(rec)
                });
            }
            let mut out = Vec::new();
            while let Some(r) = tasks.join_next().await {
                out.push(r??);
                progress(done_before + out.len(), total);
            }
            anyhow::Ok(out)
        })?;
        fresh.extend(more);
    }
    summary.finished = fresh.len();
    summary.spent = llm.map(|l| l.budget.spent()).unwrap_or_default();
    for r in &fresh {
        if let Some(why) = &r.failure {
            summary.note_failure(r.feature_id, &format!("{}: {why}", r.scorer));
        }
    }
    let mut records: BTreeMap<(u32, String), Score> = BTreeMap::new();
    for r in logged.into_iter().chain(fresh) {
        records.insert(key(&r), r);
    }
    all.scores.retain(|s| !(s.explainer == opts.explainer && records.contains_key(&key(s))));
    summary.committed = records.len();
    all.scores.extend(records.into_values());
    all.scores.sort_by(|a, b| {
        (a.feature_id, &a.explainer, &a.scorer).cmp(&(b.feature_id, &b.explainer, &b.scorer))
    });
    // The explanations did not change: keep their index as it is.
    let entry = store.explanations_entry(dict);
    let index: Option<(String, Vec<String>)> = entry.and_then(|e| {
        let files: Vec<String> = e
            .files
            .iter()
            .filter(|f| f.file.starts_with(loupe_store::features::INDEX_DIR))
            .filter_map(|f| f.file.rsplit('/').next().map(str::to_string))
            .collect();
        e.index_model.map(|m| (m, files))
    });
    store.commit_explanations(dict, &all, index.as_ref().map(|(m, f)| (m.as_str(), f.as_slice())))?;
    Arc::try_unwrap(journal).map_err(|_| anyhow::anyhow!("the journal is still in use"))?.remove()?;
    Ok(summary)
}

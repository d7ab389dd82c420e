//! `loupe score`: score the explanations of many features with the chosen scorers, with
//! per-feature resume (the journal), the cache and the budget, then commit in one store update.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use anyhow::{Result, bail};
use loupe_store::{Explanation, FeatureTables, Progress, Provenance, Score, Store};

use crate::cache::request_key;
use crate::examples::{self, Sizes};
use crate::journal::Journal;
use crate::llm::Llm;
use crate::run::{RunSummary, runtime, select_features};
use crate::score::embedding::Embedder;
use crate::score::intervention::Steering;
use crate::score::{self, EMBEDDING, INTERVENTION, Measured, SCORERS, SIMULATION};

#[derive(Clone, Debug)]
pub struct ScoreOptions {
    pub scorers: Vec<String>,
    /// Whose explanations to score.
    pub explainer: String,
    pub features: Option<Vec<std::ops::Range<u32>>>,
    /// Must match the explain run's, so that test examples are not train examples.
    pub sizes: Sizes,
    pub seed: u64,
    /// Windows the simulation scorer predicts, half activating.
    pub simulation_windows: usize,
    /// The model to steer (default: the store's) and the strength, in units of each feature's
    /// maximum activation (intervention scorer).
    pub model: Option<std::path::PathBuf>,
    pub steer_scale: f32,
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
            model: None,
            steer_scale: 4.0,
            redo: false,
        }
    }
}

/// A score row from what a scorer measured (or why it failed).
fn record(e: &Explanation, scorer: &str, model: &str, temperature: f32, m: Measured) -> Score {
    let inputs = serde_json::json!({"scorer": scorer, "model": model, "requests": m.request_keys, "rows": m.example_rows});
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
        provenance: Provenance {
            model: model.to_string(),
            prompt_hash: request_key(&inputs),
            temperature,
            max_tokens: m.max_tokens,
            example_rows: m.example_rows,
            prompt_tokens: m.prompt_tokens,
            completion_tokens: m.completion_tokens,
        },
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
    let what = format!("feature {} ({scorer})", e.feature_id);
    let result = match scorer {
        SIMULATION => score::simulation::score(llm, text, &sets, opts.simulation_windows, &what).await,
        _ => score::classify::score(llm, scorer, text, &sets, seed, &what).await,
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
    progress: &dyn Progress,
) -> Result<RunSummary> {
    for s in &opts.scorers {
        if !SCORERS.contains(&s.as_str()) {
            bail!("unknown scorer {s:?}; choose from {}", SCORERS.join(", "));
        }
        if s != EMBEDDING && s != INTERVENTION && llm.is_none() {
            bail!("the {s} scorer needs an LLM endpoint (--llm-config)");
        }
        if (s == EMBEDDING || s == INTERVENTION) && embedder.is_none() {
            bail!("the {s} scorer needs the MiniLM model (--embedder)");
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
    progress.stage("score");
    // The embedding scorer runs here (CPU); the LLM scorers concurrently below.
    for (e, _) in todo.iter().filter(|(_, s)| s == EMBEDDING) {
        let embedder = embedder.expect("checked above");
        let sets = examples::sets(&tables, e.feature_id, opts.sizes, opts.seed, true)?;
        let measured = score::embedding::score(embedder, e.explanation.as_deref().unwrap_or_default(), &sets)
            .unwrap_or_else(|why| Measured { failure: Some(why), ..Measured::default() });
        let rec = record(e, EMBEDDING, &embedder.name, 0.0, measured);
        journal.append(&rec)?;
        fresh.push(rec);
        progress.set(fresh.len() as u64, total as u64);
    }
    let steer: Vec<&Explanation> = todo.iter().filter(|(_, s)| s == INTERVENTION).map(|(e, _)| e).collect();
    if !steer.is_empty() {
        let embedder = embedder.expect("checked above");
        for rec in intervention_scores(store, dict, &tables, opts, embedder, &steer)? {
            journal.append(&rec)?;
            fresh.push(rec);
            progress.set(fresh.len() as u64, total as u64);
        }
    }
    let llm_todo: Vec<(Explanation, String)> =
        todo.into_iter().filter(|(_, s)| s != EMBEDDING && s != INTERVENTION).collect();
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
                progress.set((done_before + out.len()) as u64, total as u64);
            }
            anyhow::Ok(out)
        })?;
        fresh.extend(more);
    }
    summary.finished = fresh.len();
    summary.spent = llm.map(Llm::spent).unwrap_or_default();
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

/// Steer with each feature, then score every explanation against all the effects.
fn intervention_scores(
    store: &Store,
    dict: &str,
    tables: &FeatureTables,
    opts: &ScoreOptions,
    embedder: &Embedder,
    todo: &[&Explanation],
) -> Result<Vec<Score>> {
    let steering = Steering::load(store, dict, tables, opts.model.as_deref(), opts.steer_scale, opts.seed)?;
    let model = format!("{} + {}", steering.model_name, embedder.name);
    let mut out = Vec::new();
    let mut items = Vec::new();
    for e in todo {
        let max = tables.stats(e.feature_id)?.max_activation;
        let effect = if max > 0.0 {
            steering.effect(e.feature_id, opts.steer_scale * max)
        } else {
            Err(anyhow::anyhow!("the feature never fired in the analysis, so it has no steering strength"))
        };
        match effect {
            Ok(ids) => {
                let effect: Vec<String> = ids.iter().map(|&t| tables.token_string(t)).collect();
                items.push((*e, effect.join(" ")));
            }
            Err(why) => {
                let m = Measured { failure: Some(format!("{why:#}")), ..Measured::default() };
                out.push(record(e, INTERVENTION, &model, 0.0, m));
            }
        }
    }
    let triples: Vec<(u32, String, String)> = items
        .iter()
        .map(|(e, effect)| (e.feature_id, e.explanation.clone().unwrap_or_default(), effect.clone()))
        .collect();
    let measured = match score::intervention::score_all(embedder, &triples) {
        Ok(m) => m,
        Err(why) => vec![Measured { failure: Some(format!("{why:#}")), ..Measured::default() }; items.len()],
    };
    for ((e, _), mut m) in items.into_iter().zip(measured) {
        m.example_rows = steering.prompt_rows().to_vec();
        out.push(record(e, INTERVENTION, &model, 0.0, m));
    }
    Ok(out)
}

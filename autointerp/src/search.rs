//! Semantic search over explanations: MiniLM embeddings of every explanation of a dictionary in
//! an hnsw index (ids = rows of `explanations.arrow`), rebuilt whenever the explanations are
//! committed; `loupe search` embeds the query and looks it up. The files (the index dump, and the
//! embeddings kept beside it keyed by the SHA-256 of each text) are [`loupe_store::index`]'s;
//! what is embedded and when is decided here: a commit embeds only the explanations that are new
//! or changed.

use std::collections::{HashMap, HashSet};

use anyhow::{Result, anyhow, bail};
use loupe_store::index::{self, Index, IndexParams};
use loupe_store::{Explanation, Explanations, Progress, Store};
use sha2::{Digest, Sha256};

use crate::cache::hex;
use crate::score::embedding::Embedder;

/// Small indexes: denser links and a wide search keep recall near 1.
const PARAMS: IndexParams = IndexParams { connections: 16, ef_construction: 200, ef_search: 64 };
/// Texts embedded per call, and per step of progress.
const EMBED_CHUNK: usize = 32;

/// What building the index took.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexReport {
    /// Distinct explanation texts embedded now, and explanations whose embedding was kept.
    pub embedded: usize,
    pub reused: usize,
}

/// Commit `all` as the explanations of `dict`, with a fresh search index when `embedder` is
/// given (else the entry lists none), and delete the index files it replaced. Only texts the
/// previous index did not embed (with the same model) are embedded; `progress` follows them
/// (stage `embed`, with a note of how many there are).
pub fn commit_with_index(
    store: &Store,
    dict: &str,
    all: &Explanations,
    embedder: Option<&Embedder>,
    progress: &dyn Progress,
) -> Result<IndexReport> {
    let mut new_index = None;
    let mut report = IndexReport::default();
    if let Some(embedder) = embedder {
        let rows: Vec<(usize, String)> = all
            .explanations
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.explanation.as_deref().map(|t| (i, text_hash(t))))
            .collect();
        if !rows.is_empty() {
            let mut known = previous_vectors(store, dict, &embedder.name);
            report.reused = rows.iter().filter(|(_, h)| known.contains_key(h)).count();
            let mut seen = HashSet::new();
            let missing: Vec<(&str, &str)> = rows
                .iter()
                .filter(|(_, h)| !known.contains_key(h) && seen.insert(h.as_str()))
                .map(|(i, h)| (h.as_str(), all.explanations[*i].explanation.as_deref().expect("has text")))
                .collect();
            report.embedded = missing.len();
            progress.stage("embed");
            if !missing.is_empty() {
                progress.note(&format!(
                    "embedding {} new or changed explanations for the search index",
                    missing.len()
                ));
            }
            let total = missing.len() as u64;
            for (done, chunk) in missing.chunks(EMBED_CHUNK).enumerate() {
                progress.set((done * EMBED_CHUNK) as u64, total);
                let texts: Vec<String> = chunk.iter().map(|(_, t)| t.to_string()).collect();
                for ((h, _), v) in chunk.iter().zip(embedder.embed(&texts)?) {
                    known.insert(h.to_string(), v);
                }
            }
            progress.set(total, total);
            let d = known[&rows[0].1].len();
            if rows.iter().any(|(_, h)| known[h].len() != d) {
                bail!("the kept embeddings of {dict} do not all have {d} dimensions");
            }
            // Ids are table rows: rows without an explanation get a zero vector, never a match.
            let mut all_vectors = vec![vec![0f32; d]; all.explanations.len()];
            for (row, h) in &rows {
                all_vectors[*row] = known[h].clone();
            }
            let mut seen = HashSet::new();
            let kept: Vec<(&str, &[f32])> = rows
                .iter()
                .filter(|(_, h)| seen.insert(h.as_str()))
                .map(|(_, h)| (h.as_str(), known[h].as_slice()))
                .collect();
            let built = Index::build(&all_vectors, PARAMS);
            let files = index::write_explanations_index(store, dict, &built, &embedder.name, &kept)?;
            new_index = Some((embedder.name.clone(), files));
        }
    }
    store.commit_explanations(dict, all, new_index.as_ref().map(|(m, f)| (m.as_str(), f.as_slice())))?;
    index::remove_unlisted_explanations_index(store, dict, &new_index.map(|(_, f)| f).unwrap_or_default());
    Ok(report)
}

/// The hex SHA-256 of an explanation's text: the key of its kept embedding.
fn text_hash(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// The embeddings kept by the current index of `dict`, when `model` made them. A missing,
/// changed or unreadable file only costs embedding everything again (said on stderr).
fn previous_vectors(store: &Store, dict: &str, model: &str) -> HashMap<String, Vec<f32>> {
    index::kept_vectors(store, dict, model).unwrap_or_else(|e| {
        eprintln!("note: {e:#}; every explanation of {dict} is embedded again");
        HashMap::new()
    })
}

/// The search index of one dictionary's explanations, opened once for many queries.
pub struct Searcher {
    index: Index,
    explanations: Vec<Explanation>,
    /// The embedding model the index was built with (queries must use the same).
    pub model: String,
}

impl Searcher {
    /// Open the index of `dict`'s explanations.
    pub fn open(store: &Store, dict: &str) -> Result<Searcher> {
        let entry = store
            .explanations_entry(dict)
            .ok_or_else(|| anyhow!("{dict} has no explanations; run `loupe explain` first"))?;
        // The listed files are checked first (hnsw_rs panics on a truncated dump).
        let index = index::open_listed(store, &entry.files, PARAMS)?
            .ok_or_else(|| anyhow!("the explanations of {dict} have no search index (run `loupe explain` with the MiniLM model present)"))?;
        let explanations = store.explanations(dict)?.explanations;
        Ok(Searcher { index, explanations, model: entry.index_model.unwrap_or_default() })
    }

    /// The `k` explanations nearest `query`, with their cosine similarity.
    pub fn search(&self, embedder: &Embedder, query: &str, k: usize) -> Result<Vec<(Explanation, f32)>> {
        if self.model != embedder.name {
            bail!("the search index was built with {:?}, not {:?}", self.model, embedder.name);
        }
        let q = embedder.embed(&[query.to_string()])?.remove(0);
        Ok(self
            .index
            .search(&q, k)
            .into_iter()
            .filter_map(|(row, distance)| {
                let e = self.explanations.get(row)?;
                e.explanation.as_ref()?;
                Some((e.clone(), 1.0 - distance))
            })
            .collect())
    }
}

/// The `k` explanations of `dict` nearest `query`, with their cosine similarity (opens the index
/// for this one query; keep a [`Searcher`] for many).
pub fn search(
    store: &Store,
    dict: &str,
    embedder: &Embedder,
    query: &str,
    k: usize,
) -> Result<Vec<(Explanation, f32)>> {
    Searcher::open(store, dict)?.search(embedder, query, k).map_err(|e| anyhow!("{dict}: {e}"))
}

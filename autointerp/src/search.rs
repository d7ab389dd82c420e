//! Semantic search over explanations: MiniLM embeddings of every explanation of a dictionary in
//! an hnsw_rs index (`index/<dict>/explanations-<stamp>.hnsw.*`, ids = rows of
//! `explanations.arrow`), rebuilt whenever the explanations are committed; `loupe search`
//! embeds the query and looks it up.

use anyhow::{Result, anyhow, bail};
use loupe_store::explanations::EXPLANATIONS_INDEX;
use loupe_store::{Explanation, Explanations, Store};
use loupe_trainer::analysis::similar::{self, Index, IndexParams};

use crate::score::embedding::Embedder;

/// Small indexes: denser links and a wide search keep recall near 1.
const PARAMS: IndexParams = IndexParams { connections: 16, ef_construction: 200, ef_search: 64 };

/// Commit `all` as the explanations of `dict`, with a fresh search index when `embedder` is
/// given (else the entry lists none), and delete the index files it replaced.
pub fn commit_with_index(
    store: &Store,
    dict: &str,
    all: &Explanations,
    embedder: Option<&Embedder>,
) -> Result<()> {
    let dir = store.index_dir(dict);
    let mut index = None;
    if let Some(embedder) = embedder {
        let (rows, texts): (Vec<usize>, Vec<String>) = all
            .explanations
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.explanation.clone().map(|t| (i, t)))
            .unzip();
        if !texts.is_empty() {
            let vectors = embedder.embed(&texts)?;
            // Ids are table rows: rows without an explanation get a zero vector, never a match.
            let mut all_vectors = vec![vec![0f32; vectors[0].len()]; all.explanations.len()];
            for (row, v) in rows.into_iter().zip(vectors) {
                all_vectors[row] = v;
            }
            std::fs::create_dir_all(&dir).map_err(|e| anyhow!("cannot create {}: {e}", dir.display()))?;
            let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis();
            let basename = format!("{EXPLANATIONS_INDEX}-{stamp}");
            let files = Index::build(&all_vectors, PARAMS).dump(&dir, &basename)?;
            index = Some((embedder.name.clone(), files));
        }
    }
    store.commit_explanations(dict, all, index.as_ref().map(|(m, f)| (m.as_str(), f.as_slice())))?;
    // Unlisted now, so no reader trusts them: failing to delete them is harmless.
    let listed: Vec<String> = index.map(|(_, f)| f).unwrap_or_default();
    for file in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = file.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{EXPLANATIONS_INDEX}-")) && !listed.contains(&name) {
            let _ = std::fs::remove_file(file.path());
        }
    }
    Ok(())
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
        let graph = entry
            .files
            .iter()
            .find_map(|f| f.file.rsplit('/').next().and_then(|n| n.strip_suffix(".hnsw.graph")).map(str::to_string))
            .ok_or_else(|| anyhow!("the explanations of {dict} have no search index (run `loupe explain` with the MiniLM model present)"))?;
        // hnsw_rs panics on a truncated dump: check the files against their listing first.
        let index_files: Vec<&loupe_store::FileEntry> =
            entry.files.iter().filter(|f| f.file.contains(&format!("/{graph}.hnsw."))).collect();
        store.check_listed_files(store.root(), &index_files)?;
        let index = similar::load(&store.index_dir(dict), &graph, PARAMS)?;
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

//! Semantic search over explanations: MiniLM embeddings of every explanation of a dictionary in
//! an hnsw_rs index (`index/<dict>/explanations-<stamp>.hnsw.*`, ids = rows of
//! `explanations.arrow`), rebuilt whenever the explanations are committed; `loupe search`
//! embeds the query and looks it up.
//!
//! Beside the index, `explanations-<stamp>.vectors.arrow` keeps each explanation's embedding
//! keyed by the SHA-256 of its text (columns `text_sha256`, `vector`; the model in the schema
//! metadata), so a commit embeds only the explanations that are new or changed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use arrow_array::cast::AsArray;
use arrow_array::types::Float32Type;
use arrow_array::{Array, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use loupe_analysis::features::similar::{self, Index, IndexParams};
use loupe_store::explanations::EXPLANATIONS_INDEX;
use loupe_store::features::INDEX_DIR;
use loupe_store::{Explanation, Explanations, Progress, Store, fsutil};
use sha2::{Digest, Sha256};

use crate::cache::hex;
use crate::score::embedding::Embedder;

/// Small indexes: denser links and a wide search keep recall near 1.
const PARAMS: IndexParams = IndexParams { connections: 16, ef_construction: 200, ef_search: 64 };
/// Suffix of the embeddings kept beside the index.
pub const VECTORS_SUFFIX: &str = ".vectors.arrow";
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
    let dir = store.index_dir(dict);
    let mut index = None;
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
            std::fs::create_dir_all(&dir).map_err(|e| anyhow!("cannot create {}: {e}", dir.display()))?;
            let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis();
            let basename = format!("{EXPLANATIONS_INDEX}-{stamp}");
            let mut files = Index::build(&all_vectors, PARAMS).dump(&dir, &basename)?;
            let vectors = format!("{basename}{VECTORS_SUFFIX}");
            let mut seen = HashSet::new();
            let kept: Vec<(&str, &[f32])> = rows
                .iter()
                .filter(|(_, h)| seen.insert(h.as_str()))
                .map(|(_, h)| (h.as_str(), known[h].as_slice()))
                .collect();
            fsutil::write_atomic(&dir.join(&vectors), &vectors_file(&embedder.name, d, &kept)?)?;
            files.push(vectors);
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
    Ok(report)
}

/// The hex SHA-256 of an explanation's text: the key of its kept embedding.
fn text_hash(text: &str) -> String {
    hex(&Sha256::digest(text.as_bytes()))
}

/// The Arrow IPC file of `vectors` (hash, embedding) embedded by `model`.
fn vectors_file(model: &str, d: usize, vectors: &[(&str, &[f32])]) -> Result<Vec<u8>> {
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let schema = Schema::new(vec![
        Field::new("text_sha256", DataType::Utf8, false),
        Field::new("vector", DataType::FixedSizeList(item.clone(), d as i32), false),
    ])
    .with_metadata(HashMap::from([("model".to_string(), model.to_string())]));
    let hashes = StringArray::from_iter_values(vectors.iter().map(|(h, _)| *h));
    let flat = Float32Array::from_iter_values(vectors.iter().flat_map(|(_, v)| v.iter().copied()));
    let list = FixedSizeListArray::try_new(item, d as i32, Arc::new(flat), None)?;
    let batch = RecordBatch::try_new(Arc::new(schema), vec![Arc::new(hashes), Arc::new(list)])?;
    let mut bytes = Vec::new();
    let mut writer = arrow_ipc::writer::FileWriter::try_new(&mut bytes, &batch.schema())?;
    writer.write(&batch)?;
    writer.finish()?;
    drop(writer);
    Ok(bytes)
}

/// The embeddings kept by the current index of `dict`, when `model` made them. A missing,
/// changed or unreadable file only costs embedding everything again (said on stderr).
fn previous_vectors(store: &Store, dict: &str, model: &str) -> HashMap<String, Vec<f32>> {
    read_vectors(store, dict, model).unwrap_or_else(|e| {
        eprintln!("note: {e:#}; every explanation of {dict} is embedded again");
        HashMap::new()
    })
}

fn read_vectors(store: &Store, dict: &str, model: &str) -> Result<HashMap<String, Vec<f32>>> {
    let mut out = HashMap::new();
    let Some(entry) = store.explanations_entry(dict) else { return Ok(out) };
    let listed =
        entry.files.iter().find(|f| f.file.starts_with(INDEX_DIR) && f.file.ends_with(VECTORS_SUFFIX));
    let (Some(listed), true) = (listed, entry.index_model.as_deref() == Some(model)) else { return Ok(out) };
    let path = store.root().join(&listed.file);
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 != listed.bytes || fsutil::file_xxh3(&path)? != listed.xxh3 {
        bail!("{} does not match the manifest", path.display());
    }
    let bad = || anyhow!("{} is not a table of embeddings", path.display());
    let reader =
        arrow_ipc::reader::FileReader::try_new(std::io::Cursor::new(bytes), None).map_err(|_| bad())?;
    for batch in reader {
        let batch = batch.map_err(|_| bad())?;
        let hashes =
            batch.column_by_name("text_sha256").and_then(|c| c.as_string_opt::<i32>()).ok_or_else(bad)?;
        let list = batch.column_by_name("vector").and_then(|c| c.as_fixed_size_list_opt()).ok_or_else(bad)?;
        let values = list.values().as_primitive_opt::<Float32Type>().ok_or_else(bad)?;
        let d = list.value_length() as usize;
        if values.null_count() > 0 || hashes.null_count() > 0 || values.len() != d * hashes.len() {
            return Err(bad());
        }
        for (i, h) in hashes.iter().enumerate() {
            out.insert(h.unwrap_or_default().to_string(), values.values()[i * d..(i + 1) * d].to_vec());
        }
    }
    Ok(out)
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

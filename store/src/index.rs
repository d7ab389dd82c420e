//! ANN index files in `index/<dict>/`: hnsw_rs dumps of unit vectors, and the embeddings kept
//! beside the explanations' index. Analysis and auto-interp decide what gets indexed; this module
//! owns how it is held, searched, dumped and read back.
//!
//! - [`Index`]: an hnsw_rs graph over unit vectors (ids are row numbers), held in 16-bit fixed
//!   point and compared by 1 − dot ([`FixedCosine`], exact integer sums): a search is bound by
//!   fetching each visited vector from memory, and half the bytes make queries ~1.2x faster than
//!   f32 at the same recall (BENCHMARKS.md). hnsw_rs's own `DistCosine` renormalises f32 in f64 on
//!   every call and `DistDot` panics when rounding puts a unit-vector dot product above 1, so the
//!   distance is a few lines here. [`Index::dump`] writes `<basename>.hnsw.graph` and
//!   `<basename>.hnsw.data`; [`load`] reads them back. hnsw_rs checks a dump's distance by its
//!   type's last name only, so dumps written when this type lived in loupe-analysis still load.
//! - The decoder-direction index of an analysis: `index/<dict>/<generation>/decoder.hnsw.*`
//!   ([`DECODER_INDEX`]), listed with the analysis.
//! - The explanations' search index: `index/<dict>/explanations-<stamp>.hnsw.*` (ids = rows of
//!   `explanations.arrow`) with `explanations-<stamp>.vectors.arrow` beside it, which keeps each
//!   explanation's embedding keyed by the SHA-256 of its text (columns `text_sha256`, `vector`; the
//!   embedding model in the schema metadata), listed with the explanations
//!   ([`write_explanations_index`], [`kept_vectors`], [`open_listed`]).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use arrow_array::cast::AsArray;
use arrow_array::types::Float32Type;
use arrow_array::{Array, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use hnsw_rs::anndists::dist::Distance;
use hnsw_rs::api::AnnT;
use hnsw_rs::hnsw::Hnsw;
use hnsw_rs::hnswio::HnswIo;

use crate::dictionaries::FileEntry;
use crate::explanations::EXPLANATIONS_INDEX;
use crate::features::INDEX_DIR;
use crate::fsutil;
use crate::store::Store;

/// Basename of the decoder-direction index (`decoder.hnsw.graph`, `decoder.hnsw.data`).
pub const DECODER_INDEX: &str = "decoder";
/// Suffix of the embeddings kept beside the explanations' index.
pub const VECTORS_SUFFIX: &str = ".vectors.arrow";

/// Unit vectors in fixed point: component × 32767, rounded (|component| ≤ 1 for a unit vector).
pub const FIXED_ONE: f32 = 32767.0;

/// `v` (unit norm) in fixed point.
pub fn to_fixed(v: &[f32]) -> Vec<i16> {
    v.iter().map(|x| (x * FIXED_ONE).round().clamp(-FIXED_ONE, FIXED_ONE) as i16).collect()
}

/// Cosine distance between fixed-point unit vectors: 1 − a·b / 32767², the dot product summed
/// exactly in i32 lanes (|a·b| ≤ 32767² by Cauchy–Schwarz, so no lane overflows). The name is
/// part of every dump (hnsw_rs checks it at load): keep it.
#[derive(Clone, Copy, Debug, Default)]
pub struct FixedCosine;

impl Distance<i16> for FixedCosine {
    fn eval(&self, a: &[i16], b: &[i16]) -> f32 {
        (1.0 - fixed_dot(a, b) as f64 / (FIXED_ONE as f64 * FIXED_ONE as f64)).max(0.0) as f32
    }
}

/// `a · b` of i16 vectors in 32 i32 lanes (compiles to pairwise multiply-adds).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn fixed_dot(a: &[i16], b: &[i16]) -> i64 {
    let mut acc = [0i32; 32];
    let (ac, ar) = a.as_chunks::<32>();
    let (bc, br) = b.as_chunks::<32>();
    for (x, y) in ac.iter().zip(bc) {
        for l in 0..32 {
            acc[l] = acc[l].wrapping_add(i32::from(x[l]) * i32::from(y[l]));
        }
    }
    acc.iter().map(|&v| i64::from(v)).sum::<i64>()
        + ar.iter().zip(br).map(|(&x, &y)| i64::from(x) * i64::from(y)).sum::<i64>()
}

/// Index construction settings.
#[derive(Clone, Copy, Debug)]
pub struct IndexParams {
    /// Links per node (hnsw M).
    pub connections: usize,
    pub ef_construction: usize,
    /// Candidate list size when searching.
    pub ef_search: usize,
}

impl Default for IndexParams {
    fn default() -> Self {
        IndexParams { connections: 24, ef_construction: 600, ef_search: 16 }
    }
}

/// An index over unit vectors (ids are row numbers), held in fixed point.
pub struct Index {
    hnsw: Hnsw<'static, i16, FixedCosine>,
    pub params: IndexParams,
}

impl Index {
    /// Build from unit vectors, in parallel.
    pub fn build(vectors: &[Vec<f32>], params: IndexParams) -> Index {
        // hnsw_rs dumps only indexes built with its maximum number of layers (16).
        let hnsw = Hnsw::new(params.connections, vectors.len(), 16, params.ef_construction, FixedCosine);
        let fixed: Vec<Vec<i16>> = vectors.iter().map(|v| to_fixed(v)).collect();
        let data: Vec<(&Vec<i16>, usize)> = fixed.iter().zip(0..).collect();
        hnsw.parallel_insert(&data);
        let mut index = Index { hnsw, params };
        index.hnsw.set_searching_mode(true);
        index
    }

    /// The `k` nearest ids of unit vector `query` with their cosine distances, nearest first.
    pub fn search(&self, query: &[f32], k: usize) -> Vec<(usize, f32)> {
        self.hnsw
            .search(&to_fixed(query), k, self.params.ef_search.max(k))
            .into_iter()
            .map(|n| (n.d_id, n.distance))
            .collect()
    }

    /// Dump the graph and its vectors into `dir` as `<basename>.hnsw.graph` and
    /// `<basename>.hnsw.data` (fsynced); returns the file names. Existing files of that name are
    /// replaced.
    pub fn dump(&self, dir: &Path, basename: &str) -> Result<Vec<String>> {
        let files = [format!("{basename}.hnsw.graph"), format!("{basename}.hnsw.data")];
        for f in &files {
            // hnsw_rs never overwrites: it would pick another name.
            let _ = std::fs::remove_file(dir.join(f));
        }
        let used = self.hnsw.file_dump(dir, basename).map_err(|e| anyhow!("cannot dump the index: {e}"))?;
        if used != basename {
            bail!("hnsw_rs dumped the index as {used:?} instead of {basename:?}");
        }
        for f in &files {
            std::fs::File::open(dir.join(f))
                .and_then(|file| file.sync_all())
                .with_context(|| format!("cannot sync {}", dir.join(f).display()))?;
        }
        Ok(files.to_vec())
    }
}

/// Load an index dumped by [`Index::dump`]. hnsw_rs panics on a truncated dump: check listed
/// files first ([`open_listed`] does).
pub fn load(dir: &Path, basename: &str, params: IndexParams) -> Result<Index> {
    // hnsw_rs ties the loaded graph's lifetime to its loader, which only matters when it memory
    // maps the data (off by default: the vectors are copied). The loader is small; leaking it
    // once per load gives the graph a 'static lifetime.
    let io = Box::leak(Box::new(HnswIo::new(dir, basename)));
    let hnsw: Hnsw<'static, i16, FixedCosine> = io
        .load_hnsw()
        .map_err(|e| anyhow!("cannot load the index {}/{basename}.hnsw.*: {e}", dir.display()))?;
    Ok(Index { hnsw, params })
}

/// The index among `files` (paths relative to the store root, as a manifest entry lists them),
/// its files checked against their listing first; `None` when they list no index.
pub fn open_listed(store: &Store, files: &[FileEntry], params: IndexParams) -> Result<Option<Index>> {
    let Some(graph) = files.iter().find(|f| f.file.ends_with(".hnsw.graph")) else { return Ok(None) };
    let path = store.root().join(&graph.file);
    let (Some(dir), Some(basename)) = (
        path.parent(),
        path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".hnsw.graph")),
    ) else {
        bail!("the listed index {} has no folder", graph.file);
    };
    let prefix = graph.file.strip_suffix(".hnsw.graph").expect("checked above");
    let listed: Vec<&FileEntry> = files
        .iter()
        .filter(|f| f.file.strip_prefix(prefix).is_some_and(|s| s.starts_with(".hnsw.")))
        .collect();
    store.check_listed_files(store.root(), &listed)?;
    load(dir, basename, params).map(Some)
}

/// Write the explanations' search index of `dict` into `index/<dict>/` under a fresh
/// `explanations-<stamp>` basename: `index` dumped, and `kept` (text hash, embedding by `model`)
/// beside it. Returns the file names (inside `index/<dict>/`) to list with the explanations.
pub fn write_explanations_index(
    store: &Store,
    dict: &str,
    index: &Index,
    model: &str,
    kept: &[(&str, &[f32])],
) -> Result<Vec<String>> {
    let dir = store.index_dir(dict);
    std::fs::create_dir_all(&dir).map_err(|e| anyhow!("cannot create {}: {e}", dir.display()))?;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis();
    let basename = format!("{EXPLANATIONS_INDEX}-{stamp}");
    let mut files = index.dump(&dir, &basename)?;
    let vectors = format!("{basename}{VECTORS_SUFFIX}");
    let d = kept.first().map_or(0, |(_, v)| v.len());
    fsutil::write_atomic(&dir.join(&vectors), &vectors_file(model, d, kept)?)?;
    files.push(vectors);
    Ok(files)
}

/// After a commit: remove the explanations' index files of `dict` that `listed` (file names
/// inside `index/<dict>/`) does not name. They are unlisted, so no reader trusts them: failing to
/// delete one is harmless.
pub fn remove_unlisted_explanations_index(store: &Store, dict: &str, listed: &[String]) {
    let dir = store.index_dir(dict);
    for file in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let name = file.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{EXPLANATIONS_INDEX}-")) && !listed.contains(&name) {
            let _ = std::fs::remove_file(file.path());
        }
    }
}

/// The Arrow IPC file of `vectors` (hash, embedding of width `d`) embedded by `model`.
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

/// The embeddings (by text hash) kept beside the listed explanations' index of `dict`, when
/// `model` made them; empty when there is none or another model made them. A file that does not
/// match its listing or is not a table of embeddings is an error.
pub fn kept_vectors(store: &Store, dict: &str, model: &str) -> Result<HashMap<String, Vec<f32>>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectors of `tests/fixtures/hnsw-v1`: 12 unit vectors of width 8.
    fn fixture_vectors() -> Vec<Vec<f32>> {
        (0..12)
            .map(|i| {
                let v: Vec<f32> = (0..8).map(|j| ((i * 7 + j * 3) as f32).sin()).collect();
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                v.iter().map(|x| x / norm).collect()
            })
            .collect()
    }

    /// A dump written by loupe-analysis before the index moved here (its distance recorded as
    /// `loupe_analysis::features::similar::FixedCosine`) still loads and answers queries.
    #[test]
    fn dumps_written_before_the_move_still_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hnsw-v1");
        let graph = std::fs::read(dir.join("decoder.hnsw.graph")).unwrap();
        let old_name = b"loupe_analysis::features::similar::FixedCosine";
        assert!(graph.windows(old_name.len()).any(|w| w == old_name), "the fixture names the old type");
        let index = load(&dir, DECODER_INDEX, IndexParams::default()).unwrap();
        for (i, v) in fixture_vectors().iter().enumerate() {
            let found = index.search(v, 1);
            assert_eq!(found[0].0, i, "vector {i}");
            assert!(found[0].1 < 1e-3, "vector {i} at distance {}", found[0].1);
        }
    }

    #[test]
    fn an_index_dumped_and_loaded_answers_the_same() {
        let tmp = tempfile::tempdir().unwrap();
        let vectors = fixture_vectors();
        let index = Index::build(&vectors, IndexParams::default());
        let files = index.dump(tmp.path(), "probe").unwrap();
        assert_eq!(files, ["probe.hnsw.graph", "probe.hnsw.data"]);
        // Dumping again replaces the files under the same name.
        assert_eq!(index.dump(tmp.path(), "probe").unwrap(), files);
        let loaded = load(tmp.path(), "probe", IndexParams::default()).unwrap();
        for v in &vectors {
            assert_eq!(index.search(v, 3), loaded.search(v, 3));
        }
        assert!(load(tmp.path(), "absent", IndexParams::default()).is_err());
    }

    #[test]
    fn kept_vectors_round_trip_through_their_file() {
        let (a, b) = ([0.6f32, 0.8, 0.0], [0.0f32, 0.0, 1.0]);
        let bytes = vectors_file("minilm", 3, &[("aa", &a), ("bb", &b)]).unwrap();
        let reader = arrow_ipc::reader::FileReader::try_new(std::io::Cursor::new(bytes), None).unwrap();
        assert_eq!(reader.schema().metadata()["model"], "minilm");
        let batch = reader.into_iter().next().unwrap().unwrap();
        assert_eq!(batch.num_rows(), 2);
        let list = batch.column_by_name("vector").unwrap().as_fixed_size_list();
        assert_eq!(list.values().as_primitive::<Float32Type>().values(), &[0.6, 0.8, 0.0, 0.0, 0.0, 1.0]);
    }
}

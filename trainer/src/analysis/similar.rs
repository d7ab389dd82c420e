//! Similar features: an hnsw_rs index (cosine) over the features' directions, dumped into
//! `index/<dict>/`, and each feature's nearest neighbours from it.
//!
//! Directions are normalised once and compared by 1 − dot ([`UnitCosine`]): hnsw_rs's own
//! `DistCosine` renormalises in f64 on every call and `DistDot` panics when rounding puts a dot
//! product of unit vectors above 1, so the distance is a few lines here.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use hnsw_rs::anndists::dist::Distance;
use hnsw_rs::api::AnnT;
use hnsw_rs::hnsw::Hnsw;
use hnsw_rs::hnswio::HnswIo;
use loupe_store::Neighbour;

/// Basename of the decoder-direction index (`decoder.hnsw.graph`, `decoder.hnsw.data`).
pub const DECODER_INDEX: &str = "decoder";

/// Cosine distance between unit vectors: 1 − a·b, clamped at 0.
#[derive(Clone, Copy, Debug, Default)]
pub struct UnitCosine;

impl Distance<f32> for UnitCosine {
    fn eval(&self, a: &[f32], b: &[f32]) -> f32 {
        (1.0 - dot(a, b)).max(0.0)
    }
}

/// `a · b` in 32 lanes: four independent vector accumulators, so the loop runs at the FMA
/// throughput instead of the latency of one chain (3.5x faster than 8 lanes at d = 640).
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 32];
    let (ac, ar) = a.as_chunks::<32>();
    let (bc, br) = b.as_chunks::<32>();
    for (x, y) in ac.iter().zip(bc) {
        for l in 0..32 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + ar.iter().zip(br).map(|(x, y)| x * y).sum::<f32>()
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
        IndexParams { connections: 32, ef_construction: 200, ef_search: 24 }
    }
}

/// `rows` (`[n, d]`) scaled to unit norm; zero rows stay zero.
pub fn normalised(rows: &[f32], d: usize) -> Vec<Vec<f32>> {
    rows.chunks(d)
        .map(|r| {
            let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt();
            let s = if norm > 0.0 { 1.0 / norm } else { 0.0 };
            r.iter().map(|v| v * s).collect()
        })
        .collect()
}

/// An index over unit vectors (ids are row numbers).
pub struct Index {
    hnsw: Hnsw<'static, f32, UnitCosine>,
    pub params: IndexParams,
}

impl Index {
    /// Build from unit vectors, in parallel.
    pub fn build(vectors: &[Vec<f32>], params: IndexParams) -> Index {
        // hnsw_rs dumps only indexes built with its maximum number of layers (16).
        let hnsw = Hnsw::new(params.connections, vectors.len(), 16, params.ef_construction, UnitCosine);
        let data: Vec<(&Vec<f32>, usize)> = vectors.iter().zip(0..).collect();
        hnsw.parallel_insert(&data);
        let mut index = Index { hnsw, params };
        index.hnsw.set_searching_mode(true);
        index
    }

    /// The `k` nearest ids of unit vector `query` with their cosine distances, nearest first.
    pub fn search(&self, query: &[f32], k: usize) -> Vec<(usize, f32)> {
        self.hnsw
            .search(query, k, self.params.ef_search.max(k))
            .into_iter()
            .map(|n| (n.d_id, n.distance))
            .collect()
    }

    /// Dump the graph and its vectors into `dir` as `<basename>.hnsw.graph` and
    /// `<basename>.hnsw.data`; returns the file names. Existing files of that name are replaced.
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

/// Load an index dumped by [`Index::dump`].
pub fn load(dir: &Path, basename: &str, params: IndexParams) -> Result<Index> {
    // hnsw_rs ties the loaded graph's lifetime to its loader, which only matters when it memory
    // maps the data (off by default: the vectors are copied). The loader is small; leaking it
    // once per load gives the graph a 'static lifetime.
    let io = Box::leak(Box::new(HnswIo::new(dir, basename)));
    let hnsw: Hnsw<'static, f32, UnitCosine> = io
        .load_hnsw()
        .map_err(|e| anyhow!("cannot load the index {}/{basename}.hnsw.*: {e}", dir.display()))?;
    Ok(Index { hnsw, params })
}

/// The `k` nearest other features of every feature (by the index), sorted by feature, then rank.
/// Features with a zero direction get none.
pub fn neighbours(index: &Index, vectors: &[Vec<f32>], k: usize) -> Vec<Neighbour> {
    use rayon::prelude::*;
    vectors
        .par_iter()
        .enumerate()
        .flat_map_iter(|(f, v)| {
            let found = if v.iter().all(|&x| x == 0.0) { Vec::new() } else { index.search(v, k + 1) };
            found
                .into_iter()
                .filter(|&(id, _)| id != f)
                .take(k)
                .enumerate()
                .map(|(rank, (id, dist))| Neighbour {
                    feature_id: f as u32,
                    rank: rank as u8,
                    neighbour: id as u32,
                    cosine: 1.0 - dist,
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Exact nearest neighbours by brute force (the reference for recall).
pub fn brute_force(vectors: &[Vec<f32>], query: &[f32], k: usize) -> Vec<usize> {
    let mut all: Vec<(f32, usize)> =
        vectors.iter().enumerate().map(|(i, v)| (UnitCosine.eval(v, query), i)).collect();
    let k = k.min(all.len());
    if k == 0 {
        return Vec::new();
    }
    all.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    all.truncate(k);
    all.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    all.into_iter().map(|e| e.1).collect()
}

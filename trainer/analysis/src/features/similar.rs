//! Similar features: an hnsw_rs index (cosine) over the features' directions, dumped into
//! `index/<dict>/` for queries by any direction, and each feature's nearest neighbours — computed
//! exactly ([`exact_neighbours`]), since listing them for every feature costs about as much as
//! querying the index for every feature.
//!
//! The index holds the unit directions in 16-bit fixed point and compares them by 1 − dot
//! ([`FixedCosine`], exact integer sums): a search is bound by fetching each visited vector from
//! memory, and half the bytes make queries ~1.2x faster than f32 at the same recall
//! (BENCHMARKS.md). hnsw_rs's own `DistCosine` renormalises f32 in f64 on every call and
//! `DistDot` panics when rounding puts a unit-vector dot product above 1, so the distances are a
//! few lines here. High `ef_construction` with few links per node gave the best latency at
//! recall ≥ 0.95 on trained decoders (decoder directions are spread out on purpose, which makes
//! them a hard case for graph search).

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

/// Unit vectors in fixed point: component × 32767, rounded (|component| ≤ 1 for a unit vector).
pub const FIXED_ONE: f32 = 32767.0;

/// `v` (unit norm) in fixed point.
pub fn to_fixed(v: &[f32]) -> Vec<i16> {
    v.iter().map(|x| (x * FIXED_ONE).round().clamp(-FIXED_ONE, FIXED_ONE) as i16).collect()
}

/// Cosine distance between fixed-point unit vectors: 1 − a·b / 32767², the dot product summed
/// exactly in i32 lanes (|a·b| ≤ 32767² by Cauchy–Schwarz, so no lane overflows).
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

/// `rows` (`[n, d]`) scaled to unit norm; zero rows stay zero.
pub fn normalised(rows: &[f32], d: usize) -> Vec<Vec<f32>> {
    rows.chunks(d)
        .map(|r| {
            let mut v = r.to_vec();
            loupe_dict::sae::normalize(&mut v);
            v
        })
        .collect()
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
    let hnsw: Hnsw<'static, i16, FixedCosine> = io
        .load_hnsw()
        .map_err(|e| anyhow!("cannot load the index {}/{basename}.hnsw.*: {e}", dir.display()))?;
    Ok(Index { hnsw, params })
}

/// The `k` most similar other features of every feature, exactly: all cosines by blocked GEMM
/// (n²·d FLOP: ~2 s for 16,384 × 640 here, and the same order as querying the index for every
/// feature, which would only approximate it). Sorted by feature, then rank; zero directions get
/// no neighbours.
pub fn exact_neighbours(vectors: &[Vec<f32>], k: usize) -> Vec<Neighbour> {
    use rayon::prelude::*;
    let n = vectors.len();
    if n == 0 || k == 0 {
        return Vec::new();
    }
    let d = vectors[0].len();
    let flat: Vec<f32> = vectors.iter().flatten().copied().collect();
    let zero: Vec<bool> = vectors.iter().map(|v| v.iter().all(|&x| x == 0.0)).collect();
    const BLOCK: usize = 512;
    let mut out = Vec::with_capacity(n * k);
    let mut cos = vec![0.0f32; BLOCK * n];
    for start in (0..n).step_by(BLOCK) {
        let end = (start + BLOCK).min(n);
        let c = &mut cos[..(end - start) * n];
        loupe_dict::kernels::matmul_nt(&flat[start * d..end * d], &flat, c, end - start, n, d, false);
        let rows: Vec<Vec<Neighbour>> = c
            .par_chunks(n)
            .enumerate()
            .map(|(i, row)| {
                let f = start + i;
                if zero[f] {
                    return Vec::new();
                }
                let mut ids: Vec<u32> =
                    (0..n as u32).filter(|&g| g as usize != f && !zero[g as usize]).collect();
                let kk = k.min(ids.len());
                if kk == 0 {
                    return Vec::new();
                }
                let by = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
                ids.select_nth_unstable_by(kk - 1, by);
                ids.truncate(kk);
                ids.sort_unstable_by(by);
                ids.iter()
                    .enumerate()
                    .map(|(rank, &g)| Neighbour {
                        feature_id: f as u32,
                        rank: rank as u8,
                        neighbour: g,
                        cosine: row[g as usize],
                    })
                    .collect()
            })
            .collect();
        out.extend(rows.into_iter().flatten());
    }
    out
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

//! Similar features: each feature's nearest neighbours by direction, computed exactly
//! ([`exact_neighbours`]), since listing them for every feature costs about as much as querying
//! an index for every feature; the hnsw index over the unit directions, for queries by any
//! direction, is built and dumped into `index/<dict>/` by [`loupe_store::index`] (the store owns
//! its files). High `ef_construction` with few links per node gave the best latency at recall ≥
//! 0.95 on trained decoders (decoder directions are spread out on purpose, which makes them a
//! hard case for graph search): [`loupe_store::index::IndexParams::default`].

use loupe_store::Neighbour;

/// Cosine distance between unit vectors: 1 − a·b, clamped at 0.
pub fn unit_cosine_distance(a: &[f32], b: &[f32]) -> f32 {
    (1.0 - dot(a, b)).max(0.0)
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
        vectors.iter().enumerate().map(|(i, v)| (unit_cosine_distance(v, query), i)).collect();
    let k = k.min(all.len());
    if k == 0 {
        return Vec::new();
    }
    all.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    all.truncate(k);
    all.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    all.into_iter().map(|e| e.1).collect()
}

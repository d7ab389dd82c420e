//! The numeric kernels of dictionary training, on plain `f32` slices.
//!
//! Hand-written because candle 0.11 has no top-k and no sparse ops, and its autograd would
//! materialise the dense `[batch, n_features]` gradients a TopK SAE must avoid:
//! - [`matmul_nt`]: the one dense GEMM (`C = A·Bᵀ`, through `model::kernels::matmul`);
//! - [`topk_row`]: a partial-selection top-k of one row (two streaming passes, no sort);
//! - [`kth_largest`]: the exact k-th largest value of a whole matrix (BatchTopK's global budget);
//! - [`Codes`]: sparse codes in CSR form (per token: feature ids and values), their decode and
//!   their transpose to feature-major order for the per-feature gradient pass.
//!
//! Parallel loops split work into fixed ranges and combine partial sums in a fixed order, so a
//! run is bit-for-bit reproducible for a given thread count (resume relies on it).

use multiversion::multiversion;
use rayon::prelude::*;

/// `c[m, n] = a[m, k] · b[n, k]ᵀ` (row-major, `c` overwritten), or with `c_transposed` written as
/// `c[n, m]`. Uses every rayon thread.
pub fn matmul_nt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, n: usize, k: usize, c_transposed: bool) {
    assert_eq!(a.len(), m * k, "matmul_nt: lhs is not [m, k]");
    assert_eq!(b.len(), n * k, "matmul_nt: rhs is not [n, k]");
    assert_eq!(c.len(), m * n, "matmul_nt: dst is not [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    let c_strides = if c_transposed { (1, m) } else { (n, 1) };
    loupe_model::kernels::matmul(a, (k, 1), b, (1, k), c, c_strides, m, n, k);
}

/// Elements per block whose maximum bounds the top-k threshold from below.
const BLOCK: usize = 64;

/// The `k` largest entries of `row + bias` that are > 0, appended to `out` as `(feature, value)`
/// in descending value order (ties: lower feature first). Fewer than `k` when fewer are positive.
#[inline]
pub fn topk_row(
    row: &[f32],
    bias: Option<&[f32]>,
    k: usize,
    out: &mut Vec<(u32, f32)>,
    scratch: &mut Vec<f32>,
) {
    topk_row_above(row, bias, 0.0, k, out, scratch)
}

/// The `k` largest entries of `row + bias` that are > `floor` (`f32::NEG_INFINITY`: any value),
/// appended as [`topk_row`] does.
///
/// One streaming pass instead of a sort: the maxima of blocks of 64 give a lower bound of the
/// k-th largest value (k blocks reach it); then only the few blocks whose maximum reaches the
/// bound are scanned for candidates, and the k best candidates are selected.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub fn topk_row_above(
    row: &[f32],
    bias: Option<&[f32]>,
    floor: f32,
    k: usize,
    out: &mut Vec<(u32, f32)>,
    scratch: &mut Vec<f32>,
) {
    let start = out.len();
    if k == 0 {
        return;
    }
    let blocks = row.len().div_ceil(BLOCK);
    scratch.clear();
    for (bi, chunk) in row.chunks(BLOCK).enumerate() {
        let b = bias.map(|b| &b[bi * BLOCK..bi * BLOCK + chunk.len()]);
        scratch.push(block_max(chunk, b));
    }
    let mut bound = floor;
    if blocks > k {
        scratch.extend_from_within(..blocks);
        let (_, kth, _) = scratch[blocks..].select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        bound = bound.max(*kth);
    }
    for (bi, &max) in scratch[..blocks].iter().enumerate() {
        if !(max > floor && max >= bound) {
            continue;
        }
        let base = bi * BLOCK;
        for j in base..(base + BLOCK).min(row.len()) {
            let v = row[j] + bias.map_or(0.0, |b| b[j]);
            if v > floor && v >= bound {
                out.push((j as u32, v));
            }
        }
    }
    let cands = &mut out[start..];
    let by_value = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    if cands.len() > k {
        cands.select_nth_unstable_by(k - 1, by_value);
        out.truncate(start + k);
    }
    out[start..].sort_unstable_by(by_value);
}

/// max(x + b) over a block, in 16 lanes (compiles to vector max instructions).
#[inline(always)]
fn block_max(x: &[f32], b: Option<&[f32]>) -> f32 {
    let mut m = [f32::NEG_INFINITY; 16];
    let (xc, xr) = x.as_chunks::<16>();
    match b {
        Some(b) => {
            let (bc, br) = b.as_chunks::<16>();
            for (xs, bs) in xc.iter().zip(bc) {
                for l in 0..16 {
                    let v = xs[l] + bs[l];
                    m[l] = if v > m[l] { v } else { m[l] };
                }
            }
            for (l, (x, b)) in xr.iter().zip(br).enumerate() {
                let v = x + b;
                m[l] = if v > m[l] { v } else { m[l] };
            }
        }
        None => {
            for xs in xc {
                for l in 0..16 {
                    m[l] = if xs[l] > m[l] { xs[l] } else { m[l] };
                }
            }
            for (l, &x) in xr.iter().enumerate() {
                m[l] = if x > m[l] { x } else { m[l] };
            }
        }
    }
    m.into_iter().fold(f32::NEG_INFINITY, |a, v| if v > a { v } else { a })
}

/// The `rank`-th largest (1-based) positive value of `values`, or 0 when fewer than `rank` are
/// positive. Exact: a histogram over the top 16 bits of the (positive, hence order-preserving)
/// IEEE bit patterns finds the bucket that holds it, then that bucket alone is selected.
pub fn kth_largest(values: &[f32], rank: usize) -> f32 {
    if rank == 0 {
        return f32::INFINITY;
    }
    const BUCKETS: usize = 1 << 16;
    let part = values.len().div_ceil(rayon::current_num_threads().max(1) * 4).max(1 << 14);
    let hist = values
        .par_chunks(part)
        .map(|chunk| {
            let mut h = vec![0u32; BUCKETS];
            for &v in chunk {
                if v > 0.0 {
                    h[(v.to_bits() >> 16) as usize] += 1;
                }
            }
            h
        })
        .reduce(
            || vec![0u32; BUCKETS],
            |mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            },
        );
    let mut seen = 0usize;
    let mut bucket = None;
    for (i, &count) in hist.iter().enumerate().rev() {
        if seen + count as usize >= rank {
            bucket = Some(i as u32);
            break;
        }
        seen += count as usize;
    }
    let Some(bucket) = bucket else { return 0.0 };
    let mut inside: Vec<f32> = values
        .par_chunks(part)
        .flat_map_iter(|chunk| {
            chunk.iter().copied().filter(move |v| *v > 0.0 && (v.to_bits() >> 16) == bucket)
        })
        .collect();
    let idx = rank - seen - 1;
    let (_, kth, _) = inside.select_nth_unstable_by(idx, |a, b| b.total_cmp(a));
    *kth
}

/// Sparse codes of a batch in CSR form: token `t` has the entries `offsets[t]..offsets[t + 1]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Codes {
    pub offsets: Vec<u32>,
    pub feature: Vec<u32>,
    pub value: Vec<f32>,
}

impl Codes {
    pub fn tokens(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn nnz(&self) -> usize {
        self.feature.len()
    }

    pub fn clear(&mut self) {
        self.offsets.clear();
        self.feature.clear();
        self.value.clear();
    }

    /// Codes from per-token entry lists, in token order.
    pub fn from_rows<'a>(rows: impl IntoIterator<Item = &'a [(u32, f32)]>) -> Codes {
        let mut codes = Codes { offsets: vec![0], ..Codes::default() };
        for row in rows {
            codes.push_row(row);
        }
        codes
    }

    pub fn push_row(&mut self, row: &[(u32, f32)]) {
        if self.offsets.is_empty() {
            self.offsets.push(0);
        }
        for &(f, v) in row {
            self.feature.push(f);
            self.value.push(v);
        }
        self.offsets.push(self.feature.len() as u32);
    }

    pub fn row(&self, t: usize) -> (&[u32], &[f32]) {
        let r = self.offsets[t] as usize..self.offsets[t + 1] as usize;
        (&self.feature[r.clone()], &self.value[r])
    }

    /// `out[t] = bias + Σ value · dictionary[feature]` for every token (`out` is `[tokens, d]`).
    pub fn decode_into(&self, dictionary: &[f32], d: usize, bias: Option<&[f32]>, out: &mut [f32]) {
        assert_eq!(out.len(), self.tokens() * d);
        out.par_chunks_mut(d).enumerate().for_each(|(t, o)| {
            let (fs, vs) = self.row(t);
            decode_row(fs, vs, dictionary, d, bias, o);
        });
    }

    /// [`Codes::decode_into`] walking the pairs feature by feature (`starts`/`order` from
    /// [`Codes::by_feature`], `entry_tokens` from [`Codes::entry_tokens`]): each dictionary row is
    /// read once and the output rows, which stay in cache, are scattered to. The features are cut
    /// into `parts` fixed ranges summed into separate buffers (in parallel), then added in order,
    /// so the result does not depend on the thread count. `scratch` holds the buffers.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_by_feature(
        &self,
        starts: &[u32],
        order: &[u32],
        entry_tokens: &[u32],
        dictionary: &[f32],
        d: usize,
        bias: &[f32],
        out: &mut [f32],
        parts: usize,
        scratch: &mut Vec<f32>,
    ) {
        let tokens = self.tokens();
        let n = starts.len() - 1;
        assert_eq!(out.len(), tokens * d);
        scratch.clear();
        scratch.resize(parts * tokens * d, 0.0);
        let per = n.div_ceil(parts);
        scratch.par_chunks_mut(tokens * d).enumerate().for_each(|(p, buf)| {
            for f in p * per..((p + 1) * per).min(n) {
                let row = &dictionary[f * d..(f + 1) * d];
                for &e in &order[starts[f] as usize..starts[f + 1] as usize] {
                    let t = entry_tokens[e as usize] as usize;
                    axpy_mv(self.value[e as usize], row, &mut buf[t * d..(t + 1) * d]);
                }
            }
        });
        out.par_chunks_mut(d).enumerate().for_each(|(t, o)| {
            o.copy_from_slice(bias);
            for p in 0..parts {
                let b = &scratch[p * tokens * d + t * d..p * tokens * d + (t + 1) * d];
                o.iter_mut().zip(b).for_each(|(o, v)| *o += v);
            }
        });
    }

    /// Feature-major order of the entries: `(starts, order)` where the entries of feature `f` are
    /// `order[starts[f]..starts[f + 1]]` (indices into `feature`/`value`), in token order.
    pub fn by_feature(&self, n_features: usize) -> (Vec<u32>, Vec<u32>) {
        let mut starts = vec![0u32; n_features + 1];
        for &f in &self.feature {
            starts[f as usize + 1] += 1;
        }
        for i in 0..n_features {
            starts[i + 1] += starts[i];
        }
        let mut fill = starts.clone();
        let mut order = vec![0u32; self.nnz()];
        for (e, &f) in self.feature.iter().enumerate() {
            let slot = &mut fill[f as usize];
            order[*slot as usize] = e as u32;
            *slot += 1;
        }
        (starts, order)
    }

    /// The token of every entry.
    pub fn entry_tokens(&self) -> Vec<u32> {
        let mut tokens = vec![0u32; self.nnz()];
        for t in 0..self.tokens() {
            tokens[self.offsets[t] as usize..self.offsets[t + 1] as usize].fill(t as u32);
        }
        tokens
    }
}

/// `out = bias + Σ v · dictionary[f]` over one token's pairs.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn decode_row(fs: &[u32], vs: &[f32], dictionary: &[f32], d: usize, bias: Option<&[f32]>, out: &mut [f32]) {
    match bias {
        Some(b) => out.copy_from_slice(b),
        None => out.fill(0.0),
    }
    for (&f, &v) in fs.iter().zip(vs) {
        axpy(v, &dictionary[f as usize * d..(f as usize + 1) * d], out);
    }
}

/// [`axpy`], compiled for the best SIMD the CPU has.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn axpy_mv(a: f32, x: &[f32], y: &mut [f32]) {
    axpy(a, x, y)
}

/// `y += a · x`.
#[inline(always)]
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `x · y`, summed in 8 lanes (vectorises; a fixed order, so reproducible).
#[inline(always)]
pub fn dot(x: &[f32], y: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (xc, xr) = x.as_chunks::<8>();
    let (yc, yr) = y.as_chunks::<8>();
    for (a, b) in xc.iter().zip(yc) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (a, b) in xr.iter().zip(yr) {
        sum += a * b;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn brute_topk(row: &[f32], bias: &[f32], k: usize) -> Vec<(u32, f32)> {
        let mut all: Vec<(u32, f32)> = row
            .iter()
            .zip(bias)
            .enumerate()
            .map(|(j, (x, b))| (j as u32, x + b))
            .filter(|e| e.1 > 0.0)
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(k);
        all
    }

    #[test]
    fn topk_row_equals_a_full_sort() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut scratch = Vec::new();
        for &(n, k) in &[(1usize, 1usize), (10, 3), (64, 64), (1000, 32), (16384, 32), (4096, 200), (300, 0)]
        {
            for trial in 0..20 {
                let shift = if trial % 3 == 0 { -2.0 } else { 0.0 };
                let row: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 2.0 - 1.0 + shift).collect();
                // Ties: a few repeated values.
                let mut row = row;
                if n > 4 {
                    row[1] = row[0];
                    row[3] = row[0];
                }
                let bias: Vec<f32> = (0..n).map(|_| rng.random::<f32>() * 0.1).collect();
                let mut out = Vec::new();
                topk_row(&row, Some(&bias), k, &mut out, &mut scratch);
                assert_eq!(out, brute_topk(&row, &bias, k), "n {n} k {k}");
            }
        }
    }

    #[test]
    fn topk_row_above_a_floor_keeps_negative_values() {
        let row = [-3.0f32, -1.0, -2.0, -0.5, -4.0];
        let mut out = Vec::new();
        topk_row_above(&row, None, f32::NEG_INFINITY, 2, &mut out, &mut Vec::new());
        assert_eq!(out, vec![(3, -0.5), (1, -1.0)]);
        out.clear();
        topk_row(&row, None, 2, &mut out, &mut Vec::new());
        assert!(out.is_empty());
        let long: Vec<f32> = (0..1000).map(|i| -(i as f32)).collect();
        out.clear();
        topk_row_above(&long, None, f32::NEG_INFINITY, 3, &mut out, &mut Vec::new());
        assert_eq!(out, vec![(0, 0.0), (1, -1.0), (2, -2.0)]);
    }

    #[test]
    fn kth_largest_is_exact() {
        let mut rng = StdRng::seed_from_u64(2);
        let values: Vec<f32> = (0..100_000).map(|_| rng.random::<f32>() * 4.0 - 1.0).collect();
        let mut sorted: Vec<f32> = values.iter().copied().filter(|v| *v > 0.0).collect();
        sorted.sort_by(|a, b| b.total_cmp(a));
        for rank in [1, 2, 100, 4096, 50_000, sorted.len()] {
            assert_eq!(kth_largest(&values, rank), sorted[rank - 1]);
        }
        assert_eq!(kth_largest(&values, sorted.len() + 1), 0.0);
    }

    #[test]
    fn matmul_matches_naive() {
        let mut rng = StdRng::seed_from_u64(3);
        let (m, n, k) = (37, 53, 19);
        let a: Vec<f32> = (0..m * k).map(|_| rng.random()).collect();
        let b: Vec<f32> = (0..n * k).map(|_| rng.random()).collect();
        let mut c = vec![0.0; m * n];
        let mut ct = vec![0.0; m * n];
        matmul_nt(&a, &b, &mut c, m, n, k, false);
        matmul_nt(&a, &b, &mut ct, m, n, k, true);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|l| a[i * k + l] * b[j * k + l]).sum();
                assert!((c[i * n + j] - want).abs() < 1e-4);
                assert!((ct[j * m + i] - want).abs() < 1e-4);
            }
        }
    }

    #[test]
    fn codes_transpose_and_decode() {
        let codes = Codes::from_rows([&[(2u32, 1.0f32), (0, 2.0)][..], &[][..], &[(2, 3.0)][..]]);
        let (starts, order) = codes.by_feature(3);
        assert_eq!(starts, vec![0, 1, 1, 3]);
        assert_eq!(order, vec![1, 0, 2]);
        assert_eq!(codes.entry_tokens(), vec![0, 0, 2]);
        let dict = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]; // 3 features, d = 2
        let mut out = vec![0.0; 6];
        codes.decode_into(&dict, 2, Some(&[0.5, 0.5]), &mut out);
        assert_eq!(out, vec![3.5, 1.5, 0.5, 0.5, 3.5, 3.5]);
    }
}

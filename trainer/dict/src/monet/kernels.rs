//! The inner loops of the sparse Monet passes: [`gemm_seq`], one small single-threaded GEMM on
//! rows gathered sub-expert by sub-expert (the output blocks, forward and backward), and 16-lane loops
//! (one AVX-512 register) on groups of entries that share a weight row, so that each row loaded
//! from cache serves several tokens. The loops are hand-written where a gathered copy costs about
//! what the work does: the hidden units and their gradients read 640-wide rows of x for only k = 8
//! values each, and there `gemm` on gathered rows measured slower (BENCHMARKS.md, train-monet);
//! candle's ops would materialise every gathered matrix. They are inlined into the
//! `multiversion` callers.

/// A matrix view for [`gemm_seq`]: the slice and its (row, column) strides.
pub type View<'a> = (&'a [f32], usize, usize);

/// `c = a · b` for `a` `[m, k]`, `b` `[k, n]` and `c` `[m, n]` given by their strides (so any may be
/// a transposed view), `c` overwritten (zeroed when k is 0), on the calling thread:
/// [`loupe_model::kernels::matmul_seq`], since the callers run one GEMM per sub-expert in parallel.
/// Its blocking depends on the shapes only, so the sums run in a fixed order at any thread count.
pub fn gemm_seq(a: View, b: View, c: (&mut [f32], usize, usize), m: usize, n: usize, k: usize) {
    let ((a, a_rs, a_cs), (b, b_rs, b_cs), (c, c_rs, c_cs)) = (a, b, c);
    loupe_model::kernels::matmul_seq(a, (a_rs, a_cs), b, (b_rs, b_cs), c, (c_rs, c_cs), m, n, k);
}

/// Lanes per chunk.
const L: usize = 16;

/// `y += Σ_g c_g·x_g`, accumulating in registers.
#[inline(always)]
pub fn axpys<const G: usize>(c: [f32; G], xs: [&[f32]; G], y: &mut [f32]) {
    let n = y.len() / L * L;
    let (yc, yr) = y.as_chunks_mut::<L>();
    for (j, y) in yc.iter_mut().enumerate() {
        let mut acc = *y;
        for g in 0..G {
            let x: &[f32; L] = xs[g][j * L..j * L + L].try_into().expect("16 lanes");
            for l in 0..L {
                acc[l] += c[g] * x[l];
            }
        }
        *y = acc;
    }
    for (i, y) in yr.iter_mut().enumerate() {
        for g in 0..G {
            *y += c[g] * xs[g][n + i];
        }
    }
}

/// `[a·x_g for g]`: G dot products sharing `a` (read from L1 again for each).
#[inline(always)]
pub fn dots<const G: usize>(a: &[f32], xs: [&[f32]; G]) -> [f32; G] {
    // A plain loop: `array::map`'s closure may not be inlined into the caller's SIMD version.
    let mut out = [0.0f32; G];
    for g in 0..G {
        out[g] = dot16(a, xs[g]);
    }
    out
}

/// `a·x` in 16 lanes.
#[inline(always)]
fn dot16(a: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0.0f32; L];
    let (ac, ar) = a.as_chunks::<L>();
    let (xc, xr) = x[..a.len()].as_chunks::<L>();
    for (a, x) in ac.iter().zip(xc) {
        for l in 0..L {
            acc[l] += a[l] * x[l];
        }
    }
    acc.iter().sum::<f32>() + ar.iter().zip(xr).map(|(a, x)| a * x).sum::<f32>()
}

//! Fused CPU kernels for the models, on plain `f32` slices and wrapped as candle custom ops: the
//! no-gradient path's fused ops, and the differentiable path's ops with hand-written backwards.
//!
//! Hand-written because candle's CPU versions of these make one pass (and one allocation) per
//! basic op, call libm's scalar `expf`/`tanhf` per element, and (matmul) compute a gradient for
//! every operand, weights included:
//! - [`elementwise`]: GeGLU (also on one fused gate/up projection), RMSNorm, and the differentiable
//!   GeGLU, RMSNorm and softmax with one-pass backwards;
//! - [`attention`]: QK-norm + RoPE on one fused q/k/v projection, and causal (sliding-window)
//!   attention per block of 64 queries that skips the masked key blocks;
//! - [`linear`]: `x·wᵀ` whose backward gives the weight no gradient, and the chunked next-token
//!   loss head with its gradient at the final hidden state.
//!
//! Every kernel is checked against candle's own ops (and their autograd) in its module's tests.

mod attention;
mod elementwise;
mod linear;

pub use attention::{causal_attention, qkv_norm_rope, rope_diff};
pub use elementwise::{geglu, geglu_diff, geglu_fused, rms_norm, softmax_diff};
pub use linear::{LOSS_ROWS, linear, loss_head, loss_rows};

use candle_core::{CpuStorage, Layout, Tensor};
use multiversion::multiversion;

/// Elements per parallel task of the element-wise kernels.
const CHUNK: usize = 1 << 14;

/// e^y for y ≤ 88 (0 below -87), relative error ~1e-7: y = n ln2 + f with n rounded
/// by the 1.5·2²³ trick (no libm call, so it vectorizes), e^f by its degree-6 Taylor polynomial.
#[inline(always)]
pub fn fast_exp(y: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let underflow = y < -87.0;
    let y = y.max(-87.0);
    let t = y * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    // ln 2 in two parts (Cody-Waite), so f stays exact for large |n|.
    let f = (y - n * 0.693_359_4) + n * 2.121_944_4e-4;
    let p = 1.0
        + f * (1.0 + f * (0.5 + f * (1.0 / 6.0 + f * (1.0 / 24.0 + f * (1.0 / 120.0 + f * (1.0 / 720.0))))));
    let e = p * f32::from_bits(((ni + 127) << 23) as u32);
    if underflow { 0.0 } else { e }
}

/// `c[m, n] = a · b` on every rayon thread (the `gemm` crate, which candle also uses), for `a`
/// `[m, k]`, `b` `[k, n]` and `c` given by their row and column strides (so any may be a
/// transposed view); `c` is overwritten. Also the dictionary trainer's one dense GEMM.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
    c: &mut [f32],
    c_strides: (usize, usize),
    m: usize,
    n: usize,
    k: usize,
) {
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    matmul_with(a, a_strides, b, b_strides, c, c_strides, m, n, k, parallelism);
}

/// [`matmul`] on the calling thread only, for callers that already run one small GEMM per task
/// in parallel (Monet's sub-experts). `gemm`'s blocking depends on the shapes only, so the sums
/// run in a fixed order whatever the thread count.
#[allow(clippy::too_many_arguments)]
pub fn matmul_seq(
    a: &[f32],
    a_strides: (usize, usize),
    b: &[f32],
    b_strides: (usize, usize),
    c: &mut [f32],
    c_strides: (usize, usize),
    m: usize,
    n: usize,
    k: usize,
) {
    matmul_with(a, a_strides, b, b_strides, c, c_strides, m, n, k, gemm::Parallelism::None);
}

#[allow(clippy::too_many_arguments)]
fn matmul_with(
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    c: &mut [f32],
    (c_rs, c_cs): (usize, usize),
    m: usize,
    n: usize,
    k: usize,
    parallelism: gemm::Parallelism,
) {
    let last = |rs: usize, cs: usize, rows: usize, cols: usize| {
        if rows == 0 || cols == 0 { 0 } else { (rows - 1) * rs + (cols - 1) * cs + 1 }
    };
    assert!(a.len() >= last(a_rs, a_cs, m, k) && b.len() >= last(b_rs, b_cs, k, n));
    assert!(c.len() >= last(c_rs, c_cs, m, n));
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty product: c is zero (not left to the `gemm` crate).
        for i in 0..m {
            for j in 0..n {
                c[i * c_rs + j * c_cs] = 0.0;
            }
        }
        return;
    }
    // SAFETY: the asserts keep every element the strides address inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_cs as isize,
            c_rs as isize,
            false,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Replace `row` by `softmax(row)`; returns the row's max and `Σ exp(x − max)`.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512dq+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn exp_in_place(row: &mut [f32]) -> (f32, f32) {
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = l.max(x);
        }
    }
    let max = lanes.iter().copied().fold(rest, f32::max);
    for x in row.iter_mut() {
        *x = fast_exp(*x - max);
    }
    let mut lanes = [0f32; 8];
    let chunks = row.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    let sum = lanes.iter().sum::<f32>() + rest;
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
    (max, sum)
}

/// Call `f` with the values of an f32 CPU tensor (made contiguous first if it is not).
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("this kernel runs on CPU tensors only");
    };
    Ok(f(f32_slice(cpu, layout, "kernel")?))
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512dq+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn sum_squares(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v * v;
        }
    }
    lanes.iter().sum::<f32>() + rest
}

/// A raw pointer that rayon tasks writing disjoint ranges may share.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);

// SAFETY: used only for writes to disjoint ranges, one task each.
unsafe impl Send for SendPtr {}

unsafe impl Sync for SendPtr {}

impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{op}: f32 only");
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: inputs must be contiguous");
    };
    Ok(&data[start..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        for i in -8700..=8800 {
            let y = i as f32 / 100.0;
            let (a, b) = (fast_exp(y), y.exp());
            assert!((a - b).abs() <= 3e-7 * b, "e^{y}: {a} vs {b}");
        }
        assert_eq!(fast_exp(-87.5), 0.0);
        assert_eq!(fast_exp(-1e30), 0.0);
    }
}

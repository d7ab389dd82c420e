//! Fused CPU kernels for the models, on plain `f32` slices and wrapped as candle custom ops: the
//! no-gradient path's fused ops, and the differentiable path's ops with hand-written backwards.
//!
//! Hand-written because candle's CPU versions of these make one pass (and one allocation) per
//! basic op and call libm's scalar `expf`/`tanhf` per element:
//! - [`geglu`]: `gelu_tanh(gate) * up` in one threaded, vectorized pass;
//! - [`linear`], [`geglu_diff`], [`rms_norm_diff`], [`softmax_diff`]: ops of the differentiable
//!   path with one-pass backwards that give weights no gradient;
//! - [`loss_head`]: the chunked next-token loss and its gradient at the final hidden state;
//! - [`causal_attention`]: scores, scale, causal (and sliding-window) mask, softmax and the
//!   value product per block of 64 queries, skipping the masked key blocks, with grouped KV heads.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

/// Elements per parallel task of the element-wise kernels.
const CHUNK: usize = 1 << 14;
/// Queries per attention task.
const QUERY_BLOCK: usize = 64;

/// `gelu_tanh(gate) * up` for contiguous f32 tensors of one shape.
pub fn geglu(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.contiguous()?.apply_op2_no_bwd(&up.contiguous()?, &Geglu)
}

struct Geglu;

impl CustomOp2 for Geglu {
    fn name(&self) -> &'static str {
        "fused-geglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (f32_slice(s1, l1, "fused-geglu")?, f32_slice(s2, l2, "fused-geglu")?);
        if l1.shape() != l2.shape() {
            candle_core::bail!("fused-geglu: shapes differ");
        }
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
            .for_each(|(o, (g, u))| geglu_chunk(g, u, o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let d_gate = gate.apply_op3_no_bwd(up, &grad, &GegluGateGrad)?;
        let d_up = gate.apply_op2_no_bwd(&grad, &Geglu)?;
        Ok((Some(d_gate), Some(d_up)))
    }
}

/// `gelu_tanh(gate) * up` for `gate_up` `[.., 2·m]` holding each row's gate, then its up values
/// (the output of one fused projection); returns `[.., m]`.
pub fn geglu_fused(gate_up: &Tensor) -> candle_core::Result<Tensor> {
    gate_up.contiguous()?.apply_op1_no_bwd(&GegluFused)
}

struct GegluFused;

impl CustomOp1 for GegluFused {
    fn name(&self) -> &'static str {
        "fused-geglu-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "fused-geglu-rows")?;
        let mut dims = l.shape().dims().to_vec();
        let width = *dims.last().unwrap_or(&0);
        if !width.is_multiple_of(2) {
            candle_core::bail!("fused-geglu-rows: odd last dim {width}");
        }
        let m = width / 2;
        let rows_per_task = (CHUNK / m.max(1)).max(1);
        let mut out = vec![0f32; x.len() / 2];
        out.par_chunks_mut(rows_per_task * m).zip(x.par_chunks(rows_per_task * width)).for_each(|(o, x)| {
            for (o, x) in o.chunks_exact_mut(m).zip(x.chunks_exact(width)) {
                geglu_chunk(&x[..m], &x[m..], o);
            }
        });
        *dims.last_mut().expect("checked") = m;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512dq+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn geglu_chunk(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, &x), &u) in out.iter_mut().zip(g).zip(u) {
        *o = gelu_tanh(x) * u;
    }
}

/// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))` with a branch-free exp, so loops vectorize.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    let z = (0.797_884_6 * (x + 0.044_715 * x * x * x)).clamp(-15.0, 15.0);
    // 1 + tanh(z) = 2 - 2 / (1 + e^{2z}) = 2 e^{2z} / (1 + e^{2z})
    let e = fast_exp(2.0 * z);
    x * e / (1.0 + e)
}

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

/// Causal self-attention `softmax(q·kᵀ·scale + mask)·v` on `qkv` `[batch, seq, heads + 2·kv_heads, d]`
/// (the rotated queries, then keys, then values, as [`qkv_norm_rope`] returns them); query head `h`
/// reads KV head `h / (heads / kv_heads)`. With `window`, query `i` sees keys `j` with
/// `i - window < j ≤ i`. Returns `z` `[batch, seq, heads, d]`, the layout the output projection reads.
pub fn causal_attention(
    qkv: &Tensor,
    heads: usize,
    kv_heads: usize,
    scale: f32,
    window: Option<usize>,
) -> candle_core::Result<Tensor> {
    qkv.contiguous()?.apply_op1_no_bwd(&Attention { heads, kv_heads, scale, window })
}

struct Attention {
    heads: usize,
    kv_heads: usize,
    scale: f32,
    window: Option<usize>,
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "causal-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "causal-attention")?;
        let (batch, seq, all, d) = l.shape().dims4()?;
        let (heads, kv_heads) = (self.heads, self.kv_heads);
        if all != heads + 2 * kv_heads || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
            candle_core::bail!("causal-attention: {:?} does not hold {heads}+2×{kv_heads} heads", l.shape());
        }
        let group = heads / kv_heads;
        let blocks = seq.div_ceil(QUERY_BLOCK);
        let row = (all * d) as isize; // stride between positions
        let mut z = vec![0f32; batch * seq * heads * d];
        // One task per (batch, head, query block); each writes its own rows of z.
        let tasks: Vec<(usize, usize, usize)> = (0..batch)
            .flat_map(|b| (0..heads).flat_map(move |h| (0..blocks).map(move |qb| (b, h, qb))))
            .collect();
        let z_ptr = SendPtr(z.as_mut_ptr());
        tasks.par_iter().for_each_init(Vec::new, |scores, &(b, h, qb)| {
            let i0 = qb * QUERY_BLOCK;
            let i1 = (i0 + QUERY_BLOCK).min(seq);
            // Keys any query of the block may see.
            let j0 = self.window.map_or(0, |w| (i0 + 1).saturating_sub(w));
            let (rows, keys) = (i1 - i0, i1 - j0);
            let at = |pos: usize, head: usize| ((b * seq + pos) * all + head) * d;
            let kv = h / group;
            let (qh, kh, vh) = (at(i0, h), at(j0, heads + kv), at(j0, heads + kv_heads + kv));
            scores.resize(rows * keys, 0.0);
            // SAFETY: every (position, head) row addressed lies inside `x`; `scores` holds
            // rows × keys values.
            unsafe {
                gemm::gemm(
                    rows,
                    keys,
                    d,
                    scores.as_mut_ptr(),
                    1,
                    keys as isize,
                    false,
                    x.as_ptr().add(qh),
                    1,
                    row,
                    x.as_ptr().add(kh),
                    row,
                    1,
                    0.0,
                    self.scale,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (r, srow) in scores.chunks_mut(keys).enumerate() {
                let i = i0 + r;
                // Visible keys of query i, as offsets from j0.
                let lo = self.window.map_or(0, |w| (i + 1).saturating_sub(w)) - j0;
                let hi = i + 1 - j0;
                srow[..lo].fill(0.0);
                exp_in_place(&mut srow[lo..hi]);
                srow[hi..].fill(0.0);
            }
            // SAFETY: this task alone writes rows i0..i1 of head h of batch b: z[b, i, h, :].
            unsafe {
                let dst = z_ptr.get().add(((b * seq + i0) * heads + h) * d);
                gemm::gemm(
                    rows,
                    d,
                    keys,
                    dst,
                    1,
                    (heads * d) as isize,
                    false,
                    scores.as_ptr(),
                    1,
                    keys as isize,
                    x.as_ptr().add(vh),
                    1,
                    row,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
        Ok((CpuStorage::F32(z), Shape::from((batch, seq, heads, d))))
    }
}

/// `x · wᵀ` for `x` `[rows, in]` and `w` `[out, in]`, whose backward gives `x` its gradient
/// (`∂y · w`) and `w` none: candle's matmul backward always computes the right operand's gradient
/// too, a second GEMM per layer wasted when weights are not trained.
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, Linear)
}

struct Linear;

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (f32_slice(s1, l1, "linear")?, f32_slice(s2, l2, "linear")?);
        let (rows, k) = l1.shape().dims2()?;
        let (n, wk) = l2.shape().dims2()?;
        if wk != k {
            candle_core::bail!("linear: x {:?} and w {:?} do not fit", l1.shape(), l2.shape());
        }
        let mut y = vec![0f32; rows * n];
        matmul(x, k, 1, w, 1, k, &mut y, rows, n, k);
        Ok((CpuStorage::F32(y), Shape::from((rows, n))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), None))
    }
}

/// `c[m, n] = a · b` on every rayon thread, for `a` `[m, k]` and `b` `[k, n]` given by their row
/// and column strides (so either may be a transposed view); `c` is row-major and overwritten.
#[allow(clippy::too_many_arguments)]
fn matmul(
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    b_cs: usize,
    c: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
) {
    let last = |rs: usize, cs: usize, rows: usize, cols: usize| {
        if rows == 0 || cols == 0 { 0 } else { (rows - 1) * rs + (cols - 1) * cs + 1 }
    };
    assert!(a.len() >= last(a_rs, a_cs, m, k) && b.len() >= last(b_rs, b_cs, k, n) && c.len() >= m * n);
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the assert keeps every element the strides address inside the slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
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

/// Rows of logits the loss head computes at once (256 × 262,144 f32 = 256 MiB for Gemma 3).
const LOSS_ROWS: usize = 256;

/// The next-token loss head on `h` `[rows, d]` (final normalized hidden states) with the
/// unembedding `w` `[vocab, d]` and one target per row: the summed cross-entropy
/// `Σ logsumexp(h·wᵀ) − logit[target]` and its gradient `∂L/∂h = softmax(h·wᵀ)·w − w[target]`
/// `[rows, d]`. Runs `LOSS_ROWS` rows at a time in one reused buffer: a GEMM for the logits, one
/// pass per row for max, exp, sum and the loss, a GEMM for the gradient; the `[rows, vocab]`
/// logits of a whole batch never exist.
pub fn loss_head(h: &Tensor, w: &Tensor, targets: &[u32]) -> candle_core::Result<(f64, Tensor)> {
    let (rows, d) = h.dims2()?;
    let (vocab, wd) = w.dims2()?;
    if wd != d || targets.len() != rows {
        candle_core::bail!(
            "loss head: h {:?}, w {:?}, {} targets do not fit",
            h.dims(),
            w.dims(),
            targets.len()
        );
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("loss head: target {t} is outside the vocabulary of {vocab}");
    }
    let (loss, grad) = with_f32(h, |h| {
        with_f32(w, |w| {
            let mut logits = vec![0f32; LOSS_ROWS.min(rows) * vocab];
            let mut grad = vec![0f32; rows * d];
            let mut loss = 0f64;
            for start in (0..rows).step_by(LOSS_ROWS) {
                let n = LOSS_ROWS.min(rows - start);
                let hc = &h[start * d..(start + n) * d];
                let logits = &mut logits[..n * vocab];
                matmul(hc, d, 1, w, 1, d, logits, n, vocab, d);
                let tc = &targets[start..start + n];
                loss += logits
                    .par_chunks_mut(vocab)
                    .zip(tc.par_iter())
                    .map(|(row, &t)| {
                        let target = row[t as usize];
                        let (max, sum) = exp_in_place(row);
                        f64::from(sum.ln() + max - target)
                    })
                    .collect::<Vec<f64>>()
                    .iter()
                    .sum::<f64>();
                let gc = &mut grad[start * d..(start + n) * d];
                matmul(logits, vocab, 1, w, d, 1, gc, n, d, vocab);
                for (g, &t) in gc.chunks_exact_mut(d).zip(tc) {
                    for (g, &wt) in g.iter_mut().zip(&w[t as usize * d..(t as usize + 1) * d]) {
                        *g -= wt;
                    }
                }
            }
            (loss, grad)
        })
    })??;
    Ok((loss, Tensor::from_vec(grad, (rows, d), h.device())?))
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

/// [`geglu`] with a backward (both inputs' gradients from one fused pass each), for the
/// differentiable path: candle's GELU backward makes ten passes with scalar `powf` and `tanhf`.
pub fn geglu_diff(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, Geglu)
}

/// `∂L/∂gate = ∂L/∂y · up · gelu_tanh'(gate)` for contiguous f32 inputs of one shape.
struct GegluGateGrad;

impl CustomOp3 for GegluGateGrad {
    fn name(&self) -> &'static str {
        "geglu-gate-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = "geglu-gate-grad";
        let (g, u, dy) = (f32_slice(s1, l1, name)?, f32_slice(s2, l2, name)?, f32_slice(s3, l3, name)?);
        if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
            candle_core::bail!("{name}: shapes differ");
        }
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK)))
            .for_each(|(o, ((g, u), dy))| gate_grad_chunk(g, u, dy, o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512dq+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn gate_grad_chunk(g: &[f32], u: &[f32], dy: &[f32], out: &mut [f32]) {
    const C: f32 = 0.797_884_6; // √(2/π)
    for (((o, &x), &u), &dy) in out.iter_mut().zip(g).zip(u).zip(dy) {
        let z = (C * (x + 0.044_715 * x * x * x)).clamp(-15.0, 15.0);
        let e = fast_exp(2.0 * z);
        let t = (e - 1.0) / (e + 1.0); // tanh z
        let d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044_715 * x * x);
        *o = dy * u * d;
    }
}

/// RMSNorm over the last dim, `x / √(mean(x²) + eps) · scale`, with a backward for `x` only (the
/// scale is a weight): `∂x = r·(g − x̂·mean(g·x̂))` with `g = ∂y·scale`, `r = 1/√(mean(x²) + eps)`
/// and `x̂ = x·r`. One pass each way instead of candle's six basic ops.
pub fn rms_norm_diff(x: &Tensor, scale: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(&scale.contiguous()?, RmsNorm { eps })
}

#[derive(Clone, Copy)]
struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, scale) = (f32_slice(s1, l1, "rms-norm")?, f32_slice(s2, l2, "rms-norm")?);
        let d = scale.len();
        if l1.shape().dims().last() != Some(&d) {
            candle_core::bail!("rms-norm: x {:?} and scale {:?} do not fit", l1.shape(), l2.shape());
        }
        let mut out = vec![0f32; x.len()];
        let rows = (CHUNK / d.max(1)).max(1);
        out.par_chunks_mut(rows * d).zip(x.par_chunks(rows * d)).for_each(|(o, x)| {
            for (o, x) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                let r = 1.0 / (sum_squares(x) / d as f32 + self.eps).sqrt();
                scale_row(x, r, scale, o);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(scale, &grad.contiguous()?, &RmsNormGrad { eps: self.eps })?;
        Ok((Some(dx), None))
    }
}

struct RmsNormGrad {
    eps: f32,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = "rms-norm-grad";
        let (x, scale, dy) = (f32_slice(s1, l1, name)?, f32_slice(s2, l2, name)?, f32_slice(s3, l3, name)?);
        let d = scale.len();
        if l1.shape() != l3.shape() || l1.shape().dims().last() != Some(&d) {
            candle_core::bail!("{name}: shapes do not fit");
        }
        let mut out = vec![0f32; x.len()];
        let rows = (CHUNK / d.max(1)).max(1);
        out.par_chunks_mut(rows * d).zip(x.par_chunks(rows * d).zip(dy.par_chunks(rows * d))).for_each(
            |(o, (x, dy))| {
                for ((o, x), dy) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)).zip(dy.chunks_exact(d)) {
                    rms_grad_row(x, scale, dy, self.eps, o);
                }
            },
        );
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
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

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512dq+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn scale_row(x: &[f32], r: f32, scale: &[f32], out: &mut [f32]) {
    for ((o, &x), &s) in out.iter_mut().zip(x).zip(scale) {
        *o = x * r * s;
    }
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512dq+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn rms_grad_row(x: &[f32], scale: &[f32], dy: &[f32], eps: f32, out: &mut [f32]) {
    let d = x.len() as f32;
    let r = 1.0 / (sum_squares(x) / d + eps).sqrt();
    // mean(g · x̂) with g = dy · scale, x̂ = x · r
    let mut lanes = [0f32; 8];
    let n8 = x.len() / 8 * 8;
    for i in (0..n8).step_by(8) {
        for j in 0..8 {
            lanes[j] += dy[i + j] * scale[i + j] * x[i + j];
        }
    }
    let rest: f32 = (n8..x.len()).map(|i| dy[i] * scale[i] * x[i]).sum();
    let m = (lanes.iter().sum::<f32>() + rest) * r / d;
    for (((o, &x), &s), &dy) in out.iter_mut().zip(x).zip(scale).zip(dy) {
        *o = r * (dy * s - x * r * m);
    }
}

/// Softmax over the last dim with a backward (`∂x = y ⊙ (∂y − Σ ∂y ⊙ y)`), one pass each way.
pub fn softmax_diff(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "softmax")?;
        let d = *l.shape().dims().last().unwrap_or(&1);
        let mut out = x.to_vec();
        out.par_chunks_mut(d).for_each(|row| {
            exp_in_place(row);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(y.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?))
    }
}

struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, dy) = (f32_slice(s1, l1, "softmax-grad")?, f32_slice(s2, l2, "softmax-grad")?);
        if l1.shape() != l2.shape() {
            candle_core::bail!("softmax-grad: shapes differ");
        }
        let d = *l1.shape().dims().last().unwrap_or(&1);
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(d).zip(y.par_chunks(d).zip(dy.par_chunks(d))).for_each(|(o, (y, dy))| {
            softmax_grad_row(y, dy, o);
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512dq+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn softmax_grad_row(y: &[f32], dy: &[f32], out: &mut [f32]) {
    let mut lanes = [0f32; 8];
    let n8 = y.len() / 8 * 8;
    for i in (0..n8).step_by(8) {
        for j in 0..8 {
            lanes[j] += y[i + j] * dy[i + j];
        }
    }
    let dot = lanes.iter().sum::<f32>() + (n8..y.len()).map(|i| y[i] * dy[i]).sum::<f32>();
    for ((o, &y), &dy) in out.iter_mut().zip(y).zip(dy) {
        *o = y * (dy - dot);
    }
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

/// The attention inputs from the fused projection `qkv` `[batch, seq, (heads + 2·kv_heads)·d]`
/// (queries, then keys, then values), as `[batch, seq, heads + 2·kv_heads, d]`: queries and keys
/// RMS-normalized per head (`x / √(mean(x²) + eps) · scale`) and rotated by RoPE (rotate-half
/// convention, `cos`/`sin` `[seq, d / 2]`), values as they are.
#[allow(clippy::too_many_arguments)]
pub fn qkv_norm_rope(
    qkv: &Tensor,
    heads: usize,
    kv_heads: usize,
    q_scale: &Tensor,
    k_scale: &Tensor,
    eps: f32,
    cos: &Tensor,
    sin: &Tensor,
) -> candle_core::Result<Tensor> {
    let (_, seq, width) = qkv.dims3()?;
    let d = q_scale.dim(0)?;
    if width != (heads + 2 * kv_heads) * d || k_scale.dim(0)? != d || cos.dims() != [seq, d / 2] {
        candle_core::bail!(
            "qkv-norm-rope: qkv {:?} does not fit {heads}+2×{kv_heads} heads of {d}",
            qkv.dims()
        );
    }
    let values = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    let op = QkvNormRope {
        heads,
        kv_heads,
        d,
        q_scale: values(q_scale)?,
        k_scale: values(k_scale)?,
        eps,
        cos: values(cos)?,
        sin: values(sin)?,
    };
    qkv.contiguous()?.apply_op1_no_bwd(&op)
}

struct QkvNormRope {
    heads: usize,
    kv_heads: usize,
    d: usize,
    q_scale: Vec<f32>,
    k_scale: Vec<f32>,
    eps: f32,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl CustomOp1 for QkvNormRope {
    fn name(&self) -> &'static str {
        "qkv-norm-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "qkv-norm-rope")?;
        let (batch, seq, width) = l.shape().dims3()?;
        let (d, heads, kv_heads) = (self.d, self.heads, self.kv_heads);
        let half = d / 2;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(width).zip(x.par_chunks(width)).enumerate().for_each(|(t, (dst, src))| {
            let p = t % seq;
            let (c, s) = (&self.cos[p * half..(p + 1) * half], &self.sin[p * half..(p + 1) * half]);
            for (j, (src, dst)) in src.chunks_exact(d).zip(dst.chunks_exact_mut(d)).enumerate() {
                if j < heads {
                    norm_rope_head(src, &self.q_scale, self.eps, c, s, dst);
                } else if j < heads + kv_heads {
                    norm_rope_head(src, &self.k_scale, self.eps, c, s, dst);
                } else {
                    dst.copy_from_slice(src);
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((batch, seq, heads + 2 * kv_heads, d))))
    }
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx512dq+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn norm_rope_head(x: &[f32], scale: &[f32], eps: f32, cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let mut lanes = [0f32; 8];
    for c in x.chunks_exact(8) {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += v * v;
        }
    }
    let sum: f32 =
        lanes.iter().sum::<f32>() + x.chunks_exact(8).remainder().iter().map(|v| v * v).sum::<f32>();
    let inv = 1.0 / (sum / x.len() as f32 + eps).sqrt();
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (s1, s2) = scale.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    for i in 0..half {
        let a = x1[i] * inv * s1[i];
        let b = x2[i] * inv * s2[i];
        o1[i] = a * cos[i] - b * sin[i];
        o2[i] = a * sin[i] + b * cos[i];
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::model::ops::{causal_mask, rms_norm, rope, rope_tables, softmax};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn fused_geglu_matches_candle() {
        let dev = Device::Cpu;
        let gate = Tensor::randn(0f32, 3.0, (7, 3000), &dev).unwrap();
        let up = Tensor::randn(0f32, 1.0, (7, 3000), &dev).unwrap();
        let slow = (gate.gelu().unwrap() * &up).unwrap();
        assert!(max_diff(&geglu(&gate, &up).unwrap(), &slow) < 1e-5);
        let rows = geglu_fused(&Tensor::cat(&[&gate, &up], 1).unwrap()).unwrap();
        assert!(max_diff(&rows, &slow) < 1e-5);
        let big = Tensor::new(&[-100f32, -30.0, -8.0, 0.0, 1e-4, 8.0, 30.0, 100.0], &dev).unwrap();
        let ones = big.ones_like().unwrap();
        let fast: Vec<f32> = geglu(&big, &ones).unwrap().to_vec1().unwrap();
        let slow: Vec<f32> = big.gelu().unwrap().to_vec1().unwrap();
        for (a, b) in fast.iter().zip(&slow) {
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

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

    /// The fused QK-norm + RoPE and attention against the unfused candle ops, with grouped KV
    /// heads, a sequence that is not a multiple of the query block, and a sliding window.
    #[test]
    fn fused_attention_matches_candle_ops() {
        let dev = Device::Cpu;
        let (batch, seq, heads, kv, d) = (2, 150, 4, 2, 16);
        let qkv = Tensor::randn(0f32, 1.0, (batch, seq, (heads + 2 * kv) * d), &dev).unwrap();
        let q_scale = Tensor::randn(1f32, 0.3, d, &dev).unwrap();
        let k_scale = Tensor::randn(1f32, 0.3, d, &dev).unwrap();
        let (cos, sin) = rope_tables(seq, d, 10_000.0, &dev).unwrap();
        let eps = 1e-6;
        let fused = qkv_norm_rope(&qkv, heads, kv, &q_scale, &k_scale, eps as f32, &cos, &sin).unwrap();
        let part = |from: usize, n: usize| {
            qkv.narrow(2, from * d, n * d).unwrap().reshape((batch, seq, n, d)).unwrap()
        };
        let rot = |x: Tensor, scale: &Tensor| {
            let x = rms_norm(&x, scale, eps, false).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
            rope(&x, &cos, &sin, false).unwrap() // [b, h, s, d]
        };
        let q = rot(part(0, heads), &q_scale);
        let k = rot(part(heads, kv), &k_scale);
        let v = part(heads + kv, kv).transpose(1, 2).unwrap().contiguous().unwrap();
        let as_bhsd = |from: usize, n: usize| fused.narrow(2, from, n).unwrap().transpose(1, 2).unwrap();
        assert!(max_diff(&as_bhsd(0, heads), &q) < 1e-5);
        assert!(max_diff(&as_bhsd(heads, kv), &k) < 1e-5);
        for window in [None, Some(40)] {
            let scale = 0.3f32;
            let z = causal_attention(&fused, heads, kv, scale, window).unwrap();
            let mask = causal_mask(seq, window, &dev).unwrap();
            let group = heads / kv;
            let expand = |t: &Tensor| {
                let t = t.unsqueeze(2).unwrap().expand((batch, kv, group, seq, d)).unwrap();
                t.reshape((batch, heads, seq, d)).unwrap()
            };
            let scores = (q.matmul(&expand(&k).t().unwrap()).unwrap() * scale as f64).unwrap();
            let p = softmax(&scores.broadcast_add(&mask).unwrap(), false).unwrap();
            let want = p.matmul(&expand(&v)).unwrap().transpose(1, 2).unwrap();
            assert!(max_diff(&z, &want) < 1e-5, "window {window:?}: {}", max_diff(&z, &want));
        }
    }

    /// The fused differentiable ops' gradients against candle's basic-op autograd.
    #[test]
    fn fused_backwards_match_candle_autograd() {
        use candle_core::{D, Var};
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (6, 40), &dev).unwrap()).unwrap();
        let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 40), &dev).unwrap()).unwrap();
        let s = Tensor::randn(1f32, 0.3, 40, &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (6, 40), &dev).unwrap(); // weights of the test loss
        let check = |fused: Tensor, plain: Tensor, what: &str| {
            let (gf, gp) =
                ((fused * &w).unwrap().sum_all().unwrap(), (plain * &w).unwrap().sum_all().unwrap());
            let (gf, gp) = (gf.backward().unwrap(), gp.backward().unwrap());
            for var in [&x, &u] {
                match (gf.get(var.as_tensor()), gp.get(var.as_tensor())) {
                    (Some(a), Some(b)) => assert!(max_diff(a, b) < 2e-5, "{what}: {}", max_diff(a, b)),
                    (None, None) => {}
                    _ => panic!("{what}: gradients reach different inputs"),
                }
            }
        };
        let (xt, ut) = (x.as_tensor(), u.as_tensor());
        check(geglu_diff(xt, ut).unwrap(), (xt.gelu().unwrap() * ut).unwrap(), "geglu");
        let ms = xt.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let plain =
            xt.broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&s).unwrap();
        check(rms_norm_diff(xt, &s, 1e-6).unwrap(), plain, "rms norm");
        check(softmax_diff(xt).unwrap(), candle_nn::ops::softmax(xt, D::Minus1).unwrap(), "softmax");
        let wl = Tensor::randn(0f32, 1.0, (40, 40), &dev).unwrap();
        let plain = xt.matmul(&wl.t().unwrap()).unwrap();
        check(linear(xt, &wl).unwrap(), plain, "linear");
    }
}

//! Attention kernels of the no-gradient path: QK-norm + RoPE on the fused q/k/v projection, and
//! causal (sliding-window) attention that skips masked key blocks.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

use super::{SendPtr, exp_in_place, f32_slice};

/// Queries per attention task.
const QUERY_BLOCK: usize = 64;

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

/// RoPE (rotate-half convention) on `x` `[batch, head, seq, d]` with `cos`/`sin` `[seq, d / 2]`,
/// with a backward (the inverse rotation of the gradient), for the differentiable path.
pub fn rope_diff(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, seq, d) = x.dims4()?;
    if cos.dims() != [seq, d / 2] || sin.dims() != [seq, d / 2] {
        candle_core::bail!("rope: x {:?} and tables {:?} do not fit", x.dims(), cos.dims());
    }
    let values = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
    let op = Rope { cos: values(cos)?, sin: values(sin)?, inverse: false };
    x.contiguous()?.apply_op1(op)
}

#[derive(Clone)]
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// Rotate by −θ (the backward).
    inverse: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "rope")?;
        let (_, _, seq, d) = l.shape().dims4()?;
        let half = d / 2;
        let sign = if self.inverse { -1.0 } else { 1.0 };
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(seq * d).zip(x.par_chunks(seq * d)).for_each(|(o, x)| {
            for (p, (o, x)) in o.chunks_exact_mut(d).zip(x.chunks_exact(d)).enumerate() {
                let (c, s) = (&self.cos[p * half..(p + 1) * half], &self.sin[p * half..(p + 1) * half]);
                let (x1, x2) = x.split_at(half);
                let (o1, o2) = o.split_at_mut(half);
                rotate(x1, x2, c, s, sign, o1, o2);
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let inverse = Rope { inverse: !self.inverse, ..self.clone() };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

/// `(o1, o2) = (x1·cos − sign·x2·sin, sign·x1·sin + x2·cos)`.
#[multiversion(targets("x86_64+avx512f+avx512bw+avx512dq+avx512vl", "x86_64+avx2+fma", "aarch64+neon"))]
fn rotate(x1: &[f32], x2: &[f32], cos: &[f32], sin: &[f32], sign: f32, o1: &mut [f32], o2: &mut [f32]) {
    for i in 0..x1.len() {
        let s = sign * sin[i];
        o1[i] = x1[i] * cos[i] - x2[i] * s;
        o2[i] = x1[i] * s + x2[i] * cos[i];
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
    use crate::ops::{causal_mask, rope, rope_tables, softmax};
    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
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
            let x = candle_nn::ops::rms_norm(&x.contiguous().unwrap(), scale, eps as f32)
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap();
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

    #[test]
    fn rope_and_its_backward_match_candle_ops() {
        use candle_core::Var;
        let dev = Device::Cpu;
        let (seq, d) = (9, 8);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, seq, d), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (2, 3, seq, d), &dev).unwrap();
        let (cos, sin) = rope_tables(seq, d, 10_000.0, &dev).unwrap();
        let fused = rope_diff(x.as_tensor(), &cos, &sin).unwrap();
        let plain = crate::ops::rope_basic(x.as_tensor(), &cos, &sin).unwrap();
        assert!(max_diff(&fused, &plain) < 1e-6);
        let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gp = (plain * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (gf, gp) = (gf.get(x.as_tensor()).unwrap(), gp.get(x.as_tensor()).unwrap());
        assert!(max_diff(gf, gp) < 1e-6, "{}", max_diff(gf, gp));
    }
}

//! Element-wise and per-row kernels: GeGLU, and the differentiable GeGLU, RMSNorm and softmax.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use multiversion::multiversion;
use rayon::prelude::*;

use super::{CHUNK, exp_in_place, f32_slice, fast_exp, sum_squares};

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
fn gelu_tanh(x: f32) -> f32 {
    let z = (0.797_884_6 * (x + 0.044_715 * x * x * x)).clamp(-15.0, 15.0);
    // 1 + tanh(z) = 2 - 2 / (1 + e^{2z}) = 2 e^{2z} / (1 + e^{2z})
    let e = fast_exp(2.0 * z);
    x * e / (1.0 + e)
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
/// and `x̂ = x·r`. One pass each way instead of candle's six basic ops (or, without a gradient,
/// candle's fused op, which divides every element).
pub fn rms_norm(x: &Tensor, scale: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
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

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;
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
        check(rms_norm(xt, &s, 1e-6).unwrap(), plain, "rms norm");
        check(softmax_diff(xt).unwrap(), candle_nn::ops::softmax(xt, D::Minus1).unwrap(), "softmax");
        let wl = Tensor::randn(0f32, 1.0, (40, 40), &dev).unwrap();
        let plain = xt.matmul(&wl.t().unwrap()).unwrap();
        check(super::super::linear(xt, &wl).unwrap(), plain, "linear");
    }
}

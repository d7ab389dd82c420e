//! Monet's router: two sub-routers w1, w2 (d → H × E). Per sub-router, the logits z pass a
//! BatchNorm without affine parameters, one per head, over every (token, sub-expert) entry of the
//! batch (running statistics at inference, momentum 0.1 as PyTorch's); a sub-expert is kept where
//! its normalised logit reaches min(row max, σ) with σ = Φ⁻¹(1 − topk/E) (so about `topk` are
//! kept under a Gaussian logit distribution, and always at least the best one); the gates are the
//! softmax of the kept *raw* logits. The selection carries no gradient; the softmax does.
//! Training and inference run the same rule on plain slices ([`super::sparse::select`]); this
//! candle version is the reference the tests compare it with.

use anyhow::Result;
use candle_core::{D, Device, Tensor, Var};
use rand::rngs::StdRng;
use statrs::distribution::{ContinuousCDF, Normal};

use super::randn;

const BN_EPS: f64 = 1e-5;

/// Both sub-routers and their BatchNorm running statistics (`[H]` each).
pub struct Router {
    pub w: [Var; 2],
    pub running_mean: [Vec<f32>; 2],
    pub running_var: [Vec<f32>; 2],
    pub heads: usize,
    pub experts: usize,
    /// Φ⁻¹(1 − topk/E).
    pub sigma: f32,
}

impl Router {
    pub fn init(d: usize, heads: usize, experts: usize, topk: usize, rng: &mut StdRng) -> Result<Router> {
        let std = 1.0 / (d as f64).sqrt();
        let w = [randn(rng, &[d, heads * experts], std)?, randn(rng, &[d, heads * experts], std)?];
        let sigma = Normal::standard().inverse_cdf(1.0 - topk as f64 / experts as f64) as f32;
        Ok(Router {
            w,
            running_mean: [vec![0.0; heads], vec![0.0; heads]],
            running_var: [vec![1.0; heads], vec![1.0; heads]],
            heads,
            experts,
            sigma,
        })
    }

    pub fn vars(&self) -> Vec<Var> {
        self.w.to_vec()
    }

    /// The gate factors g1, g2 (`[B, H, E]`) of `x` (`[B, d]`). With `train`, BatchNorm uses the
    /// batch's statistics (the trainer moves the running ones, [`super::train`]).
    pub fn route(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let g1 = self.route_one(x, 0, train)?;
        let g2 = self.route_one(x, 1, train)?;
        Ok((g1, g2))
    }

    /// Raw logits `[B, H, E]` of sub-router `r`.
    pub fn logits(&self, x: &Tensor, r: usize) -> Result<Tensor> {
        Ok(x.matmul(self.w[r].as_tensor())?.reshape((x.dim(0)?, self.heads, self.experts))?)
    }

    fn route_one(&self, x: &Tensor, r: usize, train: bool) -> Result<Tensor> {
        let z = self.logits(x, r)?;
        let (mean, var) = if train {
            let (m, v) = head_stats(&z.detach())?;
            (m, v)
        } else {
            (self.running_mean[r].clone(), self.running_var[r].clone())
        };
        // Selection on the normalised logits, without gradient.
        let zd = z.detach();
        let dev = &Device::Cpu;
        let mean_t = Tensor::from_vec(mean, (1, self.heads, 1), dev)?;
        let inv_std: Vec<f32> = var.iter().map(|v| 1.0 / ((*v as f64 + BN_EPS).sqrt() as f32)).collect();
        let inv_std_t = Tensor::from_vec(inv_std, (1, self.heads, 1), dev)?;
        let zn = zd.broadcast_sub(&mean_t)?.broadcast_mul(&inv_std_t)?;
        let cut = zn.max_keepdim(D::Minus1)?.clamp(f32::NEG_INFINITY, self.sigma)?;
        let keep = zn.broadcast_ge(&cut)?.to_dtype(candle_core::DType::F32)?;
        // Softmax over the kept raw logits: exp(z − max) on kept entries, normalised.
        let zmax = zd.max_keepdim(D::Minus1)?;
        let e = z.broadcast_sub(&zmax)?.exp()?.mul(&keep)?;
        Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
    }
}

/// Per head, the mean and biased variance over all tokens and sub-experts of `z` (`[B, H, E]`).
fn head_stats(z: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
    let (b, h, e) = z.dims3()?;
    let per_head = z.transpose(0, 1)?.contiguous()?.reshape((h, b * e))?;
    let mean = per_head.mean_keepdim(1)?;
    let var = per_head.broadcast_sub(&mean)?.sqr()?.mean(1)?;
    Ok((mean.flatten_all()?.to_vec1()?, var.to_vec1()?))
}

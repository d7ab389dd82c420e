//! MoE-X's sparsity-aware router: experts are ranked by how sparse their hidden activation is
//! estimated to be, without computing it.
//!
//! The paper's idea (Sec. "sparsity-aware routing"): the best expert for a token is the one whose
//! ReLU hidden layer has the fewest active units, but computing every expert's hidden layer is what
//! a mixture avoids; so the count is estimated by treating the entries of expert e's encoder as
//! Gaussian, which makes each pre-activation `h_ej = w_ej·x + b_ej` Gaussian, and its probability
//! of being positive `Φ(μ/σ)`. What we implement (per expert e, over its m hidden units j):
//!
//! - column statistics of the encoder: `M_e[i] = mean_j W_e[j,i]`, `S_e[i] = var_j W_e[j,i]`
//!   (population variance), and of its bias `β_e = mean_j b_e[j]`, `V_e = var_j b_e[j]`;
//! - for a token x: `μ_e(x) = Σ_i M_e[i]·x_i + β_e`, `σ_e(x)² = Σ_i S_e[i]·x_i² + V_e` (entries
//!   independent), `r_e = μ_e/σ_e`, and the expected fraction of active units `Φ(r_e)`;
//! - score `s_e = −Φ(r_e)` (fewer active units, higher score); the token goes to its `top_k`
//!   highest-scoring experts (lowest r; ties to the lower id), listed by ascending id;
//! - gates: softmax of the scores over the chosen experts, `g_e = exp(s_e) / Σ_{c chosen} exp(s_c)`
//!   (so a gate lies between 1/(1 + (k−1)·e) and e/(e + k − 1): never negligible);
//! - optional load balancing (`balance_alpha`, Switch Transformer's form, default 0):
//!   `α·E·Σ_e f_e·P_e` with `f_e` the batch's share of routing slots of expert e (a constant) and
//!   `P_e` the batch mean of `softmax_e(s)` over *all* experts — its gradient reaches the experts no
//!   token chose too ([`balance`]).
//!
//! What the paper leaves open (as far as we can reconstruct it without its code, which is not
//! public) and what we chose: whether the Gaussian's mean and variance are one scalar per expert
//! or per input dimension — we use per-input-dimension column statistics (the per-expert scalar is
//! the special case of constant columns, and gives every token the same expert ranking up to the
//! sign of Σx); whether the bias enters the estimate — it does, as one more independent Gaussian
//! term; the exact gate — a softmax over the chosen experts of the negative expected *fraction*
//! (no temperature; a softmax of the expected *count* m·Φ made the gates one-hot in practice, with
//! the other chosen expert's units active at gates of 1e-10, which would count as active features);
//! the load-balancing term — none is described that we know of, so it is optional (on Gemma 3
//! without it, 7 of 16 experts were never chosen). The router has no weights of its own:
//! gradients reach the encoders through M, S, β and V ([`backward`], [`balance`],
//! [`weight_grads`]), so the estimate is differentiated exactly.

use rayon::prelude::*;

use super::{Moex, gemm};

/// σ² below this is treated as this (an expert whose units all have the same weights).
const TINY_VAR: f64 = 1e-30;

/// Column statistics of every expert's encoder.
pub struct Stats {
    /// `[E, d_in]`.
    pub mean: Vec<f32>,
    /// `[E, d_in]`.
    pub var: Vec<f32>,
    /// `[E]`.
    pub b_mean: Vec<f32>,
    /// `[E]`.
    pub b_var: Vec<f32>,
}

/// Which experts each token goes to: slots `t·k … t·k + k − 1` are token t's chosen experts
/// (ascending id) with their gates, and what the backward needs (μ, σ, r per slot).
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    pub k: usize,
    pub expert: Vec<u32>,
    pub gate: Vec<f32>,
    pub mu: Vec<f64>,
    pub sigma: Vec<f64>,
    /// Every expert's estimate, `[B, E]` (what load balancing differentiates).
    pub all_mu: Vec<f64>,
    pub all_sigma: Vec<f64>,
}

impl Routing {
    pub fn token_slots(&self, t: usize) -> std::ops::Range<usize> {
        t * self.k..(t + 1) * self.k
    }
}

/// Φ, the standard normal CDF.
pub fn phi_cdf(r: f64) -> f64 {
    0.5 * statrs::function::erf::erfc(-r / std::f64::consts::SQRT_2)
}

/// φ, the standard normal density.
fn phi_pdf(r: f64) -> f64 {
    (-0.5 * r * r).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// Mean and population variance of `m` rows of width `w` (column-wise), in f64.
fn column_stats(rows: &[f32], m: usize, w: usize) -> (Vec<f32>, Vec<f32>) {
    let mut mean = vec![0f64; w];
    for row in rows.chunks(w) {
        mean.iter_mut().zip(row).for_each(|(a, v)| *a += *v as f64);
    }
    mean.iter_mut().for_each(|a| *a /= m as f64);
    let mut var = vec![0f64; w];
    for row in rows.chunks(w) {
        var.iter_mut().zip(row).zip(&mean).for_each(|((a, v), mu)| *a += (*v as f64 - mu).powi(2));
    }
    (mean.iter().map(|v| *v as f32).collect(), var.iter().map(|v| (*v / m as f64) as f32).collect())
}

/// The router's statistics of `moex`'s encoders.
pub fn stats(moex: &Moex) -> Stats {
    let (d, m, e_n) = (moex.spec.d_in, moex.spec.expert_width, moex.spec.experts);
    let per: Vec<_> = (0..e_n)
        .into_par_iter()
        .map(|e| {
            (
                column_stats(moex.rows(&moex.w_enc, e, d), m, d),
                column_stats(moex.rows(&moex.b_enc, e, 1), m, 1),
            )
        })
        .collect();
    let mut s = Stats { mean: Vec::new(), var: Vec::new(), b_mean: Vec::new(), b_var: Vec::new() };
    for ((mean, var), (bm, bv)) in per {
        s.mean.extend(mean);
        s.var.extend(var);
        s.b_mean.push(bm[0]);
        s.b_var.push(bv[0]);
    }
    s
}

/// One expert's estimate for a token: (r, expert, μ, σ).
type Estimate = (f64, u32, f64, f64);
/// A chosen expert of a token: (expert, gate, μ, σ).
type Slot = (u32, f32, f64, f64);

/// Route every token of `x` (`[B, d_in]`).
pub fn route(moex: &Moex, x: &[f32]) -> Routing {
    route_with(moex, &stats(moex), x)
}

/// [`route`] with the statistics given.
pub fn route_with(moex: &Moex, st: &Stats, x: &[f32]) -> Routing {
    let (d, e_n, k) = (moex.spec.d_in, moex.spec.experts, moex.spec.top_k);
    let b = x.len() / d;
    let mut mu = vec![0f32; b * e_n];
    gemm(x, false, &st.mean, true, &mut mu, b, e_n, d);
    let x2: Vec<f32> = x.iter().map(|v| v * v).collect();
    let mut var = vec![0f32; b * e_n];
    gemm(&x2, false, &st.var, true, &mut var, b, e_n, d);
    let rows: Vec<(Vec<Slot>, Vec<Estimate>)> = mu
        .par_chunks(e_n)
        .zip(var.par_chunks(e_n))
        .map(|(mu_t, var_t)| {
            let every: Vec<Estimate> = (0..e_n)
                .map(|e| {
                    let mu = mu_t[e] as f64 + st.b_mean[e] as f64;
                    let sigma = (var_t[e] as f64 + st.b_var[e] as f64).max(TINY_VAR).sqrt();
                    (mu / sigma, e as u32, mu, sigma)
                })
                .collect();
            let mut all = every.clone();
            // Lowest r first (fewest expected active units), ties to the lower id.
            all.select_nth_unstable_by(k - 1, |a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let mut chosen: Vec<Estimate> = all[..k].to_vec();
            chosen.sort_by_key(|c| c.1);
            let gates = softmax(&chosen.iter().map(|c| -phi_cdf(c.0)).collect::<Vec<_>>());
            let row = chosen.iter().zip(&gates).map(|(c, g)| (c.1, *g as f32, c.2, c.3)).collect();
            (row, every)
        })
        .collect();
    let mut r = Routing {
        k,
        expert: Vec::new(),
        gate: Vec::new(),
        mu: Vec::new(),
        sigma: Vec::new(),
        all_mu: Vec::with_capacity(b * e_n),
        all_sigma: Vec::with_capacity(b * e_n),
    };
    for (row, every) in rows {
        for (e, g, mu, sigma) in row {
            r.expert.push(e);
            r.gate.push(g);
            r.mu.push(mu);
            r.sigma.push(sigma);
        }
        for (_, _, mu, sigma) in every {
            r.all_mu.push(mu);
            r.all_sigma.push(sigma);
        }
    }
    r
}

fn softmax(s: &[f64]) -> Vec<f64> {
    let top = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = s.iter().map(|v| (v - top).exp()).collect();
    let sum: f64 = exps.iter().sum();
    exps.iter().map(|x| x / sum).collect()
}

/// From `∂loss/∂s` of one estimate to `(∂loss/∂μ, ∂loss/∂σ²)`, through `s = −Φ(μ/σ)`.
fn through_estimate(ds: f64, mu: f64, sigma: f64) -> (f64, f64) {
    let r = mu / sigma;
    let dr = -ds * phi_pdf(r);
    // σ clamped at √TINY_VAR: no gradient through it.
    let dvar = if sigma * sigma > TINY_VAR { -dr * r / sigma / (2.0 * sigma) } else { 0.0 };
    (dr / sigma, dvar)
}

/// Switch Transformer's load-balancing loss `α·E·Σ_e f_e·P_e` of a batch's routing, and its
/// gradient `(∂/∂μ, ∂/∂σ²)` for every (token, expert), `[B, E]`.
pub fn balance(routing: &Routing, experts: usize, alpha: f64) -> (f64, Vec<f64>, Vec<f64>) {
    let tokens = routing.all_mu.len() / experts;
    let mut share = vec![0f64; experts];
    routing.expert.iter().for_each(|&e| share[e as usize] += 1.0 / routing.expert.len() as f64);
    let (mut loss, mut dmu, mut dvar) = (0f64, vec![0f64; tokens * experts], vec![0f64; tokens * experts]);
    let scale = alpha * experts as f64 / tokens as f64;
    for t in 0..tokens {
        let at = t * experts..(t + 1) * experts;
        let (mu, sigma) = (&routing.all_mu[at.clone()], &routing.all_sigma[at.clone()]);
        let q = softmax(&mu.iter().zip(sigma).map(|(m, s)| -phi_cdf(m / s)).collect::<Vec<_>>());
        let dq: Vec<f64> = share.iter().map(|f| scale * f).collect();
        let dot: f64 = q.iter().zip(&dq).map(|(a, b)| a * b).sum();
        for e in 0..experts {
            loss += dq[e] * q[e];
            let (a, b) = through_estimate(q[e] * (dq[e] - dot), mu[e], sigma[e]);
            dmu[t * experts + e] = a;
            dvar[t * experts + e] = b;
        }
    }
    (loss, dmu, dvar)
}

/// From `∂loss/∂g` per slot to `(∂loss/∂μ, ∂loss/∂σ²)` per slot, through the softmax over the
/// chosen experts, `s = −Φ(μ/σ)` and `σ = √σ²`.
pub fn backward(routing: &Routing, dgate: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let k = routing.k;
    let mut dmu = vec![0f64; dgate.len()];
    let mut dvar = vec![0f64; dgate.len()];
    for t in 0..dgate.len() / k {
        let sl = routing.token_slots(t);
        let dot: f64 = sl.clone().map(|s| routing.gate[s] as f64 * dgate[s] as f64).sum();
        for s in sl {
            let ds = routing.gate[s] as f64 * (dgate[s] as f64 - dot);
            (dmu[s], dvar[s]) = through_estimate(ds, routing.mu[s], routing.sigma[s]);
        }
    }
    (dmu, dvar)
}

/// Add the router's gradient to expert `e`'s encoder gradients `gw` (`[m, d_in]`) and `gb`
/// (`[m]`), given `Σ_t ∂loss/∂μ_t·x_t` (`dm`, `[d_in]`), `Σ_t ∂loss/∂σ²_t·x_t²` (`ds`), and their
/// bias terms: `∂M[i]/∂W[j,i] = 1/m`, `∂S[i]/∂W[j,i] = 2(W[j,i] − M[i])/m`.
#[allow(clippy::too_many_arguments)]
pub fn weight_grads(
    moex: &Moex,
    st: &Stats,
    e: usize,
    dm: &[f64],
    ds: &[f64],
    (dbm, dbv): (f64, f64),
    gw: &mut [f32],
    gb: &mut [f32],
) {
    let (d, m) = (moex.spec.d_in, moex.spec.expert_width);
    let inv = 1.0 / m as f64;
    let mean = &st.mean[e * d..(e + 1) * d];
    let w = moex.rows(&moex.w_enc, e, d);
    for (row, g) in w.chunks(d).zip(gw.chunks_mut(d)) {
        for i in 0..d {
            g[i] += (dm[i] * inv + ds[i] * 2.0 * (row[i] - mean[i]) as f64 * inv) as f32;
        }
    }
    let b = moex.rows(&moex.b_enc, e, 1);
    for (bj, g) in b.iter().zip(gb.iter_mut()) {
        *g += (dbm * inv + dbv * 2.0 * (bj - st.b_mean[e]) as f64 * inv) as f32;
    }
}

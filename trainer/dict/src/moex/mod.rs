//! MoE-X (Yang et al. 2025, arXiv 2503.07639, "Mixture of Experts Made Intrinsically
//! Interpretable") fitted to captured activations: a mixture of E ReLU experts that is one wide,
//! sparse MLP.
//!
//! Expert e is a two-layer MLP with m hidden units:
//! `expert_e(x) = W_dec_eᵀ · ReLU(W_enc_e x + b_enc_e)`, and the layer's output is
//! `y = Σ_{e chosen} g_e(x) · expert_e(x) + b_dec`. The router ([`router`]) is the paper's
//! sparsity-aware router: it has no weights of its own, it scores each expert by (a Gaussian
//! estimate of) how many of its hidden units would be positive, keeps the `top_k` sparsest, and
//! gates them by a softmax over the chosen experts' scores (formulas and choices in [`router`]).
//!
//! Each (expert e, hidden unit j) is a **feature** with id `e·m + j`: its activation on a token is
//! `g_e(x)·ReLU(h_ej)` (0 when e is not chosen) and its decoder direction is row `e·m + j` of
//! `w_dec`, so the layer is exactly the wide MLP with one `[E·m, d_in]` encoder, one gate per unit
//! from the routing, and one `[E·m, d_out]` decoder ([`explicit`] computes it that way for the
//! tests). [`Moex::forward`] computes only the chosen experts' rows: per expert, one GEMM over the
//! tokens routed to it.
//!
//! Sparsity: hidden units are sparse by ReLU and by the routing (k of E experts). The paper adds no
//! other sparsity pressure that we know of; an optional L1 on the gated hidden activations, each
//! weighted by its decoder row's norm (so that it cannot be escaped by scaling), is available
//! ([`train`], `l1_coefficient`, default 0).
//!
//! Two modes: an autoencoder on one hook (d_out = d_in), or a transcoder from an MLP's input to
//! its output (the job's `input_hook`). [`train`] fits it (sparse, hand-written backward), [`io`]
//! stores it (`cfg.json` + `sae_weights.safetensors`).

pub mod explicit;
pub mod io;
pub mod router;
pub mod train;

use anyhow::{Result, bail};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::kernels::Codes;
pub use router::Routing;

/// The shape of a MoE-X layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MoexSpec {
    pub d_in: usize,
    pub d_out: usize,
    /// Number of experts, E.
    pub experts: usize,
    /// Hidden units per expert, m.
    pub expert_width: usize,
    /// Experts each token is routed to, k.
    pub top_k: usize,
}

impl MoexSpec {
    pub fn validate(&self) -> Result<()> {
        let s = self;
        if s.d_in == 0 || s.d_out == 0 || s.expert_width == 0 {
            bail!("MoE-X needs d_in, d_out and an expert width of at least 1");
        }
        if s.experts < 2 {
            bail!("MoE-X needs at least 2 experts (got {})", s.experts);
        }
        if s.top_k == 0 || s.top_k >= s.experts {
            bail!("--top-k {} must be between 1 and experts − 1 = {}", s.top_k, s.experts - 1);
        }
        if s.experts.saturating_mul(s.expert_width) > u32::MAX as usize / 2 {
            bail!("experts × expert width must fit in 31 bits");
        }
        Ok(())
    }

    /// Number of features, E·m.
    pub fn n_features(&self) -> usize {
        self.experts * self.expert_width
    }

    /// Trainable parameters (the router has none of its own).
    pub fn parameters(&self) -> usize {
        self.n_features() * (self.d_in + 1 + self.d_out) + self.d_out
    }
}

/// A MoE-X layer (row-major `f32`): expert e's rows are `e·m … e·m + m − 1` of each matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Moex {
    pub spec: MoexSpec,
    /// `[E·m, d_in]`: row `e·m + j` is unit j of expert e's encoder.
    pub w_enc: Vec<f32>,
    /// `[E·m]`.
    pub b_enc: Vec<f32>,
    /// `[E·m, d_out]`: row `e·m + j` is feature `e·m + j`'s decoder direction.
    pub w_dec: Vec<f32>,
    /// `[d_out]`.
    pub b_dec: Vec<f32>,
}

/// `c[m, n] = a · b` where `a` is `[m, k]` (or stored `[k, m]` when `a_t`) and `b` is `[k, n]` (or
/// stored `[n, k]` when `b_t`), all row-major; `c` is overwritten.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(a: &[f32], a_t: bool, b: &[f32], b_t: bool, c: &mut [f32], m: usize, n: usize, k: usize) {
    assert_eq!(a.len(), m * k, "gemm: lhs size");
    assert_eq!(b.len(), k * n, "gemm: rhs size");
    assert_eq!(c.len(), m * n, "gemm: dst size");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    let a_s = if a_t { (1, m) } else { (k, 1) };
    let b_s = if b_t { (1, k) } else { (n, 1) };
    loupe_model::kernels::matmul(a, a_s, b, b_s, c, (n, 1), m, n, k);
}

/// The tokens routed to each expert: `slots[starts[e]..starts[e + 1]]` are the routing slots
/// (`t·k + c`, token t's c-th chosen expert) of expert e, in token order; `row[slot]` is the slot's
/// row within its expert's group.
pub struct Groups {
    pub starts: Vec<usize>,
    pub slots: Vec<u32>,
    pub row: Vec<u32>,
}

impl Groups {
    pub fn of(routing: &Routing, experts: usize) -> Groups {
        let mut starts = vec![0usize; experts + 1];
        routing.expert.iter().for_each(|&e| starts[e as usize + 1] += 1);
        for e in 0..experts {
            starts[e + 1] += starts[e];
        }
        let mut fill = starts.clone();
        let mut slots = vec![0u32; routing.expert.len()];
        let mut row = vec![0u32; routing.expert.len()];
        for (s, &e) in routing.expert.iter().enumerate() {
            let at = &mut fill[e as usize];
            slots[*at] = s as u32;
            row[s] = (*at - starts[e as usize]) as u32;
            *at += 1;
        }
        Groups { starts, slots, row }
    }

    pub fn len(&self, e: usize) -> usize {
        self.starts[e + 1] - self.starts[e]
    }

    pub fn slots(&self, e: usize) -> &[u32] {
        &self.slots[self.starts[e]..self.starts[e + 1]]
    }
}

/// A forward pass over a batch: the routing, the groups, each expert's pre-activations
/// (`[tokens routed to it, m]`) and the output.
pub struct Forward {
    pub routing: Routing,
    pub groups: Groups,
    pub pre: Vec<Vec<f32>>,
    pub y: Vec<f32>,
}

impl Moex {
    /// Encoder rows uniform in ±1/√d_in, decoder rows random with unit norm, biases 0.
    pub fn init(spec: MoexSpec, seed: u64) -> Result<Moex> {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        spec.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let (n, d, o) = (spec.n_features(), spec.d_in, spec.d_out);
        let bound = 1.0 / (d as f32).sqrt();
        let w_enc = (0..n * d).map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound).collect();
        let mut w_dec: Vec<f32> = (0..n * o).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        w_dec.chunks_mut(o).for_each(super::sae::normalize);
        Ok(Moex { w_enc, b_enc: vec![0.0; n], w_dec, b_dec: vec![0.0; o], spec })
    }

    /// Expert e's slice of a `[E·m, width]` matrix.
    pub fn rows<'a>(&self, w: &'a [f32], e: usize, width: usize) -> &'a [f32] {
        let m = self.spec.expert_width;
        &w[e * m * width..(e + 1) * m * width]
    }

    /// Route `x` (`[B, d_in]`) and compute the output `[B, d_out]`, only the chosen experts' rows.
    pub fn forward(&self, x: &[f32]) -> Forward {
        let routing = router::route(self, x);
        self.forward_routed(x, routing)
    }

    /// [`Self::forward`] with the routing given.
    pub fn forward_routed(&self, x: &[f32], routing: Routing) -> Forward {
        let (d, o, m, e_n, k) =
            (self.spec.d_in, self.spec.d_out, self.spec.expert_width, self.spec.experts, self.spec.top_k);
        let tokens = x.len() / d;
        let groups = Groups::of(&routing, e_n);
        // Per expert: gather its tokens, h = X·W_encᵀ + b, out = (g·ReLU(h))·W_dec.
        let per: Vec<(Vec<f32>, Vec<f32>)> = (0..e_n)
            .into_par_iter()
            .map(|e| {
                let n = groups.len(e);
                let xs = gather(x, d, groups.slots(e), k);
                let mut h = vec![0f32; n * m];
                gemm(&xs, false, self.rows(&self.w_enc, e, d), true, &mut h, n, m, d);
                let b = self.rows(&self.b_enc, e, 1);
                let mut f = vec![0f32; n * m];
                for (r, (hr, fr)) in h.chunks_mut(m).zip(f.chunks_mut(m)).enumerate() {
                    let g = routing.gate[groups.slots(e)[r] as usize];
                    for ((h, f), b) in hr.iter_mut().zip(fr.iter_mut()).zip(b) {
                        *h += b;
                        *f = g * h.max(0.0);
                    }
                }
                let mut out = vec![0f32; n * o];
                gemm(&f, false, self.rows(&self.w_dec, e, o), false, &mut out, n, o, m);
                (h, out)
            })
            .collect();
        // Each token sums its experts' outputs in its slot order (a fixed order).
        let mut y = vec![0f32; tokens * o];
        y.par_chunks_mut(o).enumerate().for_each(|(t, yt)| {
            yt.copy_from_slice(&self.b_dec);
            for s in t * k..(t + 1) * k {
                let (e, r) = (routing.expert[s] as usize, groups.row[s] as usize);
                yt.iter_mut().zip(&per[e].1[r * o..(r + 1) * o]).for_each(|(y, v)| *y += v);
            }
        });
        let pre = per.into_iter().map(|(h, _)| h).collect();
        Forward { routing, groups, pre, y }
    }

    /// Sparse codes over the E·m features: per token, feature `e·m + j` with value
    /// `g_e·ReLU(h_ej)` for its chosen experts (ascending feature id), zeros left out.
    pub fn codes(&self, fw: &Forward) -> Codes {
        let (m, k) = (self.spec.expert_width, self.spec.top_k);
        let tokens = fw.routing.expert.len() / k;
        let mut codes = Codes { offsets: vec![0], ..Codes::default() };
        let mut row = Vec::new();
        for t in 0..tokens {
            row.clear();
            for s in fw.routing.token_slots(t) {
                let (e, r) = (fw.routing.expert[s] as usize, fw.groups.row[s] as usize);
                let g = fw.routing.gate[s];
                for (j, &h) in fw.pre[e][r * m..(r + 1) * m].iter().enumerate() {
                    let v = g * h.max(0.0);
                    if v > 0.0 {
                        row.push(((e * m + j) as u32, v));
                    }
                }
            }
            codes.push_row(&row);
        }
        codes
    }

    /// The same layer for inputs `input` times smaller and outputs `output` times smaller than
    /// the ones it was trained on: `W_enc·input` (the router's estimates scale with it, so the
    /// routing is unchanged), `W_dec / output`, `b_dec / output`.
    pub fn folded(&self, input: f32, output: f32) -> Moex {
        let mut raw = self.clone();
        raw.w_enc.iter_mut().for_each(|w| *w *= input);
        raw.w_dec.iter_mut().for_each(|w| *w /= output);
        raw.b_dec.iter_mut().for_each(|w| *w /= output);
        raw
    }
}

/// The rows of `x` (`[tokens, d]`) of the given slots (`t·k + c` → token t), in order.
pub(crate) fn gather(x: &[f32], d: usize, slots: &[u32], k: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(slots.len() * d);
    for &s in slots {
        let t = s as usize / k;
        out.extend_from_slice(&x[t * d..(t + 1) * d]);
    }
    out
}

/// Tokens per forward at inference (bounds the per-expert buffers).
const ENCODE_CHUNK: usize = 2048;

impl super::Dictionary for Moex {
    fn d_in(&self) -> usize {
        self.spec.d_in
    }

    fn d_out(&self) -> usize {
        self.spec.d_out
    }

    fn n_features(&self) -> usize {
        self.spec.n_features()
    }

    fn encode(&self, x: &[f32]) -> Codes {
        self.reconstruct(x).0
    }

    fn reconstruct(&self, x: &[f32]) -> (Codes, Vec<f32>) {
        let d = self.spec.d_in;
        let mut codes = Codes { offsets: vec![0], ..Codes::default() };
        let mut out = Vec::with_capacity(x.len() / d * self.spec.d_out);
        for chunk in x.chunks(ENCODE_CHUNK * d) {
            let fw = self.forward(chunk);
            let c = self.codes(&fw);
            for t in 0..c.tokens() {
                let (f, v) = c.row(t);
                let row: Vec<(u32, f32)> = f.iter().copied().zip(v.iter().copied()).collect();
                codes.push_row(&row);
            }
            out.extend(fw.y);
        }
        (codes, out)
    }

    fn save(&self, dir: &std::path::Path) -> Result<()> {
        io::save(self, &super::io::SaeMeta::default(), None, dir)
    }

    fn decoder_directions(&self) -> Option<&[f32]> {
        Some(&self.w_dec)
    }

    fn experts(&self) -> Option<super::ExpertLayout> {
        Some(super::ExpertLayout {
            n_experts: self.spec.experts,
            features_per_expert: self.spec.expert_width,
        })
    }

    /// The k chosen experts of each token with their gates (ascending expert id).
    fn route(&self, x: &[f32]) -> Option<Codes> {
        let k = self.spec.top_k;
        let mut codes = Codes { offsets: vec![0], ..Codes::default() };
        for chunk in x.chunks(ENCODE_CHUNK * self.spec.d_in) {
            let r = router::route(self, chunk);
            for t in 0..r.expert.len() / k {
                let row: Vec<(u32, f32)> =
                    r.token_slots(t).map(|s| (r.expert[s], r.gate[s])).filter(|(_, g)| *g > 0.0).collect();
                codes.push_row(&row);
            }
        }
        Some(codes)
    }
}

#[cfg(test)]
mod tests;

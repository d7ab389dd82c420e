//! The per-feature pass of a training step: for a block of features, each feature's gradients
//! from its (token, feature) pairs (feature-major order), then Adam, the decoder-row projection and
//! renormalisation, firing counters and densities — while the feature's rows are in cache. See
//! [`super::train`] for the formulas.

use multiversion::multiversion;
use rayon::prelude::*;

use super::Variant;
use super::kernels::{axpy, dot};
use super::loss::sum_rows_into;
use super::sae::normalize;
use super::train::{Gradients, Source, Trainer};

const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;
/// Features per block of the per-feature pass.
pub(super) const BLOCK_FEATURES: usize = 64;

/// The pairs of one source in feature-major order.
pub(super) struct Order<'a> {
    pub(super) src: &'a Source,
    pub(super) starts: Vec<u32>,
    pub(super) order: Vec<u32>,
    pub(super) token: Vec<u32>,
}

pub(super) type Pair<'a> = (&'a mut [f32], &'a mut [f32]);

/// JumpReLU's band pairs (|v − θ_f| < ε/2) in feature-major order, and what their threshold
/// pseudo-gradients need (see [`super::jumprelu`]).
pub(super) struct Band<'a> {
    pub(super) starts: Vec<u32>,
    pub(super) order: Vec<u32>,
    pub(super) token: Vec<u32>,
    /// The main reconstruction's upstream gradient `[tokens, d]`.
    pub(super) dx: &'a [f32],
    pub(super) eps: f32,
    /// ∂loss/∂H of the L0 term, per token.
    pub(super) l0_weight: Vec<f32>,
}

/// A block's JumpReLU thresholds θ_f, their Adam moments, and (for gradient checks) where to put
/// ∂loss/∂θ_f instead of applying it.
pub(super) struct Theta<'a> {
    pub(super) theta: &'a mut [f32],
    pub(super) moments: Pair<'a>,
    pub(super) capture: Option<&'a mut [f32]>,
}

/// The rows of one block of features: weights, Adam moments, counters, and (for gradient checks)
/// where to put the gradients instead of applying them.
pub(super) struct Block<'a> {
    pub(super) first: usize,
    pub(super) w_enc: &'a mut [f32],
    pub(super) w_dec: &'a mut [f32],
    pub(super) me: Pair<'a>,
    pub(super) md: Pair<'a>,
    pub(super) b_enc: &'a mut [f32],
    pub(super) mb: Pair<'a>,
    pub(super) since: &'a mut [u64],
    pub(super) density: &'a mut [f32],
    pub(super) capture: Option<(Pair<'a>, &'a mut [f32])>,
    pub(super) theta: Option<Theta<'a>>,
}

/// What every block reads.
pub(super) struct RowCtx<'a> {
    pub(super) orders: &'a [Order<'a>],
    pub(super) band: Option<&'a Band<'a>>,
    pub(super) xc: &'a [f32],
    pub(super) d: usize,
    pub(super) adam: &'a AdamStep,
    pub(super) decay: f32,
    pub(super) tokens: usize,
}

/// Gradients of each feature row of `b` from its pairs, then Adam, decoder projection and
/// renormalisation, firing counters and densities. Returns Σ_f ∂b_enc[f]·W_enc[f] over the block
/// (with the weights before the update): the encoder path's share of b_dec's gradient.
#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub(super) fn update_block(b: Block, ctx: &RowCtx) -> Vec<f32> {
    let d = ctx.d;
    let mut g_enc = vec![0.0f32; d];
    let mut g_dec = vec![0.0f32; d];
    let mut bdec_part = vec![0.0f32; d];
    let Block { first, w_enc, w_dec, me, md, b_enc, mb, since, density, mut capture, mut theta } = b;
    for r in 0..b_enc.len() {
        let f = first + r;
        g_enc.fill(0.0);
        g_dec.fill(0.0);
        let mut g_b = 0.0f32;
        let mut fired = 0u32;
        let rr = r * d..(r + 1) * d;
        let w_dec_row = &w_dec[rr.clone()];
        for o in ctx.orders {
            for &e in &o.order[o.starts[f] as usize..o.starts[f + 1] as usize] {
                let e = e as usize;
                let tok = o.token[e] as usize;
                let dx = &o.src.dx[tok * d..(tok + 1) * d];
                let dz = dot_and_axpy(dx, w_dec_row, o.src.codes.value[e], &mut g_dec) + o.src.dz_extra;
                axpy(dz, &ctx.xc[tok * d..(tok + 1) * d], &mut g_enc);
                g_b += dz;
                if o.src.fires {
                    fired += 1;
                }
            }
        }
        axpy(g_b, &w_enc[rr.clone()], &mut bdec_part);
        // JumpReLU: the threshold's pseudo-gradient from the band pairs, then Adam (θ ≥ 0).
        if let (Some(band), Some(th)) = (ctx.band, theta.as_mut()) {
            let t = th.theta[r];
            let mut g_t = 0.0f32;
            for &e in &band.order[band.starts[f] as usize..band.starts[f + 1] as usize] {
                let tok = band.token[e as usize] as usize;
                let dz = dot(&band.dx[tok * d..(tok + 1) * d], w_dec_row);
                g_t -= (t * dz + band.l0_weight[tok]) / band.eps;
            }
            match th.capture.as_mut() {
                Some(c) => c[r] = g_t,
                None => {
                    let (m, v) = (&mut th.moments.0[r..r + 1], &mut th.moments.1[r..r + 1]);
                    ctx.adam.apply(&mut th.theta[r..r + 1], &[g_t], m, v);
                    th.theta[r] = th.theta[r].max(0.0);
                }
            }
        }
        if let Some(((ge, gd), gb)) = capture.as_mut() {
            ge[rr.clone()].copy_from_slice(&g_enc);
            gd[rr.clone()].copy_from_slice(&g_dec);
            gb[r] = g_b;
            continue;
        }
        let adam = ctx.adam;
        let w = &mut w_dec[rr.clone()];
        let parallel = dot(&g_dec, w);
        axpy(-parallel, w, &mut g_dec);
        adam.apply(w, &g_dec, &mut md.0[rr.clone()], &mut md.1[rr.clone()]);
        normalize(w);
        adam.apply(&mut w_enc[rr.clone()], &g_enc, &mut me.0[rr.clone()], &mut me.1[rr]);
        adam.apply(&mut b_enc[r..r + 1], &[g_b], &mut mb.0[r..r + 1], &mut mb.1[r..r + 1]);
        since[r] = if fired > 0 { 0 } else { since[r] + ctx.tokens as u64 };
        density[r] = ctx.decay * density[r] + (1.0 - ctx.decay) * fired as f32 / ctx.tokens as f32;
    }
    bdec_part
}

/// `x · w` (8 lanes, fixed order), and `g += a · x` in the same pass over `x`.
#[inline(always)]
fn dot_and_axpy(x: &[f32], w: &[f32], a: f32, g: &mut [f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (xc, xr) = x.as_chunks::<8>();
    let (wc, wr) = w.as_chunks::<8>();
    let (gc, gr) = g.as_chunks_mut::<8>();
    for ((xs, ws), gs) in xc.iter().zip(wc).zip(gc) {
        for l in 0..8 {
            acc[l] += xs[l] * ws[l];
            gs[l] += a * xs[l];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for ((x, w), g) in xr.iter().zip(wr).zip(gr) {
        sum += x * w;
        *g += a * x;
    }
    sum
}

/// Adam's per-step constants (PyTorch's formulation).
pub(super) struct AdamStep {
    step_size: f32,
    inv_sqrt_bc2: f32,
}

impl AdamStep {
    pub(super) fn new(lr: f32, t: i32) -> AdamStep {
        let bc1 = 1.0 - BETA1.powi(t);
        let bc2 = 1.0 - BETA2.powi(t);
        AdamStep { step_size: lr / bc1, inv_sqrt_bc2: 1.0 / bc2.sqrt() }
    }

    #[inline(always)]
    pub(super) fn apply(&self, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]) {
        for (((w, g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            *m = BETA1 * *m + (1.0 - BETA1) * g;
            *v = BETA2 * *v + (1.0 - BETA2) * g * g;
            *w -= self.step_size * *m / (v.sqrt() * self.inv_sqrt_bc2 + EPS);
        }
    }
}

/// The step's update, in this module with the per-feature pass it drives.
impl Trainer {
    /// The per-feature pass: gradients of every feature row from its pairs, Adam, decoder
    /// renormalisation, firing counters and densities. Then b_dec.
    pub(super) fn update(&mut self, tokens: usize, capture: Option<&mut Gradients>) {
        let (n, d) = (self.cfg.n_features, self.cfg.d_in);
        let t = (self.state.step + 1) as i32;
        let adam = AdamStep::new(self.cfg.lr, t);
        let decay = self.cfg.ema_decay;
        let s = &self.scratch;
        let orders: Vec<Order> = s
            .sources
            .iter()
            .filter(|s| s.active)
            .map(|src| {
                let (starts, order) = src.codes.by_feature(n);
                Order { src, starts, order, token: src.codes.entry_tokens() }
            })
            .collect();
        let xc = &s.xc;
        let st = &mut self.state;
        let sae = &mut self.sae;
        let rows = BLOCK_FEATURES * d;
        let (capture, capture_bdec, capture_theta, capture_skip) = match capture {
            Some(g) => (
                Some((&mut g.w_enc, &mut g.w_dec, &mut g.b_enc)),
                Some(&mut g.b_dec),
                Some(&mut g.threshold),
                Some(&mut g.w_skip),
            ),
            None => (None, None, None, None),
        };
        let band = (self.cfg.variant == Variant::Jumprelu).then(|| {
            let (starts, order) = s.band.by_feature(n);
            let token = s.band.entry_tokens();
            let (dx, eps, l0_weight) =
                (&s.sources[0].dx[..], self.cfg.jumprelu_bandwidth, s.l0_weight.clone());
            Band { starts, order, token, dx, eps, l0_weight }
        });
        // JumpReLU's thresholds, their moments, and where a gradient check wants their gradients.
        let blocks_n = n.div_ceil(BLOCK_FEATURES);
        let mut thetas: Vec<Option<Theta>> = match sae.threshold.as_mut().filter(|_| band.is_some()) {
            Some(th) => th
                .chunks_mut(BLOCK_FEATURES)
                .zip(st.threshold.m.chunks_mut(BLOCK_FEATURES).zip(st.threshold.v.chunks_mut(BLOCK_FEATURES)))
                .map(|(theta, moments)| Some(Theta { theta, moments, capture: None }))
                .collect(),
            None => (0..blocks_n).map(|_| None).collect(),
        };
        if let (Some(g), true) = (capture_theta, band.is_some()) {
            for (t, c) in thetas.iter_mut().zip(g.chunks_mut(BLOCK_FEATURES)) {
                if let Some(t) = t {
                    t.capture = Some(c);
                }
            }
        }
        let captured = capture.map(|(w_enc, w_dec, b_enc)| {
            w_enc
                .chunks_mut(rows)
                .zip(w_dec.chunks_mut(rows))
                .zip(b_enc.chunks_mut(BLOCK_FEATURES))
                .collect::<Vec<_>>()
        });
        let mut captured = captured.map(|v| v.into_iter().map(Some).collect::<Vec<_>>()).unwrap_or_default();
        captured.resize_with(blocks_n, || None);
        let blocks = sae
            .w_enc
            .chunks_mut(rows)
            .zip(sae.w_dec.chunks_mut(rows))
            .zip(st.w_enc.m.chunks_mut(rows).zip(st.w_enc.v.chunks_mut(rows)))
            .zip(st.w_dec.m.chunks_mut(rows).zip(st.w_dec.v.chunks_mut(rows)))
            .zip(sae.b_enc.chunks_mut(BLOCK_FEATURES))
            .zip(st.b_enc.m.chunks_mut(BLOCK_FEATURES).zip(st.b_enc.v.chunks_mut(BLOCK_FEATURES)))
            .zip(st.since_fired.chunks_mut(BLOCK_FEATURES).zip(st.density.chunks_mut(BLOCK_FEATURES)))
            .zip(captured.into_iter().zip(thetas))
            .enumerate()
            .map(|(bi, (((((((w_enc, w_dec), me), md), b_enc), mb), (since, density)), (capture, theta)))| {
                Block {
                    first: bi * BLOCK_FEATURES,
                    w_enc,
                    w_dec,
                    me,
                    md,
                    b_enc,
                    mb,
                    since,
                    density,
                    capture,
                    theta,
                }
            })
            .collect::<Vec<_>>();
        let ctx = RowCtx { orders: &orders, band: band.as_ref(), xc, d, adam: &adam, decay, tokens };
        let partials: Vec<Vec<f32>> = blocks.into_par_iter().map(|block| update_block(block, &ctx)).collect();
        // b_dec: Σ dX over reconstructions with the bias, minus Σ_f ∂b_enc[f]·W_enc[f] (an SAE's
        // encoder reads x − b_dec; a transcoder's reads x).
        let mut g_bdec = vec![0.0f32; d];
        for src in s.sources.iter().filter(|s| s.active && s.with_bias) {
            sum_rows_into(&src.dx, d, 1.0, &mut g_bdec);
        }
        if !self.cfg.transcoder {
            for p in partials {
                g_bdec.iter_mut().zip(p).for_each(|(g, v)| *g -= v);
            }
        }
        // W_skip: Σ_t dX_t ⊗ x_t over the same reconstructions (x is `xc` for a transcoder).
        if let Some(skip) = self.skip.as_mut() {
            let dxs: Vec<&[f32]> =
                s.sources.iter().filter(|s| s.active && s.with_bias).map(|s| &s.dx[..]).collect();
            let g = super::transcode::skip_gradient(&dxs, xc, d, d);
            match capture_skip {
                Some(out) => out.copy_from_slice(&g),
                None => adam.apply(&mut skip.w, &g, &mut skip.moments.m, &mut skip.moments.v),
            }
        }
        match capture_bdec {
            Some(out) => out.copy_from_slice(&g_bdec),
            None => adam.apply(&mut sae.b_dec, &g_bdec, &mut st.b_dec.m, &mut st.b_dec.v),
        }
        debug_assert_eq!(sae.b_enc.len(), n);
    }
}

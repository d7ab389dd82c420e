//! The per-feature pass of a training step: for a block of features, each feature's gradients
//! from its (token, feature) pairs (feature-major order), then Adam, the decoder-row projection and
//! renormalisation, firing counters and densities — while the feature's rows are in cache. See
//! [`super::train`] for the formulas.

use multiversion::multiversion;

use super::kernels::{axpy, dot};
use super::sae::normalize;
use super::train::Source;

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

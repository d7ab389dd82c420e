//! The gradients of Monet's training loss, by hand, over the sparse forward of [`super::sparse`]:
//! loss = FVU + α_u·uniformity + α_a·ambiguity ([`super::aux`], each averaged over the two
//! sub-routers), with the selection held fixed (it carries no gradient) as in candle's autograd
//! before.
//!
//! With dy = ∂loss/∂y = 2(y − target)/Σ‖target − mean‖², per output half and entry e of its side,
//! a[e] = block_e·dy_half (one value per coefficient) and ∂block_e = Σ_tokens coef[e] ⊗ dy_half;
//! then per token (ds: ∂/∂s, dh: ∂/∂h, dP: ∂/∂P, dg: ∂/∂g on each kept (head, sub-expert)):
//! - an Own part: dh[e] += s[e]·a_part, ds[e] += h[e]·a_part;
//! - a Cross part: dP_other[h] += g[h,e]·a_part, dg[h,e] += a_part·P_other[h];
//! - the bias: ds[e] += a_bias;
//! - pooling P_r[h] = Σ g·h_r: dh_r[e] += g[h,e]·dP_r[h], dg[h,e] += h_r[e]·dP_r[h];
//! - s = Σ_h g: dg[h,e] += ds[e]; the auxiliary losses add α_u·E·p_e/(B·H) (uniformity, p_e the
//!   side's mean gate) and −α_a/(2·B·H) on each head's largest gate (ambiguity);
//! - the softmax over the kept logits: dz = g·(dg − Σ_kept g·dg); ∂w_router[h·E+e] = Σ dz·x;
//! - ψ = ReLU²: dpre = 2·ReLU(pre)·dh; ∂u_e = Σ dpre ⊗ x, ∂c_e = Σ dpre.
//!
//! Weight gradients are summed sub-expert by sub-expert (and router column by column) over the
//! tokens in order, so they do not depend on the thread count.

use multiversion::multiversion;
use rayon::prelude::*;

use super::kernels::{axpys, gemm_seq};
use super::phases;
use super::sparse::{Forward, Layout, Params, Part, split_rows, token_hidden};
use crate::kernels::{axpy, dot};

/// The loss of a batch, its parts as the trainer reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Loss {
    pub fvu: f64,
    /// Uniformity and ambiguity, each averaged over the two sub-routers (unweighted).
    pub uniformity: f64,
    pub ambiguity: f64,
    /// α_u·uniformity + α_a·ambiguity.
    pub aux: f64,
}

impl Loss {
    pub fn total(&self) -> f64 {
        self.fvu + self.aux
    }
}

/// Buffers of the backward pass, kept between steps.
#[derive(Default)]
pub struct Scratch {
    dy: Vec<f32>,
    /// a per output side, expert-major `[entries, cw]`.
    a: [Vec<f32>; 2],
    /// ∂/∂pre per hidden side, token-major `[entries, k]`.
    dpre: [Vec<f32>; 2],
    /// ∂loss/∂z per route entry.
    dz: Vec<f32>,
}

/// Weights of the auxiliary losses.
#[derive(Clone, Copy, Debug)]
pub struct Alphas {
    pub uniformity: f32,
    pub ambiguity: f32,
}

/// The loss of the forward `f` with output `y` against `target` (`[B, o]`; `denom` the FVU's
/// denominator), and every weight's gradient into `g` (overwritten).
#[allow(clippy::too_many_arguments)]
pub fn gradients(
    p: &Params,
    lay: &Layout,
    x: &[f32],
    target: &[f32],
    denom: f64,
    alphas: Alphas,
    f: &Forward,
    y: &[f32],
    g: &mut Params,
    s: &mut Scratch,
) -> Loss {
    let (o, e, heads) = (lay.o, lay.e, lay.heads);
    let tokens = f.routes.tokens();
    // FVU and dy.
    s.dy.resize(tokens * o, 0.0);
    let scale = (2.0 / denom) as f32;
    let err: Vec<f64> =
        s.dy.par_chunks_mut(o)
            .zip(y.par_chunks(o).zip(target.par_chunks(o)))
            .map(|(dy, (y, t))| {
                let mut sum = 0.0f64;
                for ((d, y), t) in dy.iter_mut().zip(y).zip(t) {
                    let r = y - t;
                    sum += (r as f64) * (r as f64);
                    *d = scale * r;
                }
                sum
            })
            .collect();
    let fvu = err.iter().sum::<f64>() / denom;
    phases::mark("dy");

    // Auxiliary losses: each side's mean gate per sub-expert, and each head's largest gate.
    let bh = (tokens * heads) as f64;
    let mut mean_gate = [vec![0.0f64; e], vec![0.0f64; e]];
    let (mut uniformity, mut ambiguity) = (0.0, 0.0);
    for (r, p) in mean_gate.iter_mut().enumerate() {
        let mut max_sum = 0.0f64;
        for t in 0..tokens {
            for h in 0..heads {
                let mut max = 0.0f32;
                for l in f.routes.list(t, r, h) {
                    p[f.routes.id[l] as usize] += f.routes.gate[l] as f64;
                    max = max.max(f.routes.gate[l]);
                }
                max_sum += max as f64;
            }
        }
        p.iter_mut().for_each(|v| *v /= bh);
        uniformity += 0.5 * (e as f64 * p.iter().map(|v| v * v).sum::<f64>() - 1.0);
        ambiguity += 0.5 * (1.0 - max_sum / bh);
    }
    let aux = alphas.uniformity as f64 * uniformity + alphas.ambiguity as f64 * ambiguity;
    // ∂aux/∂g per side and sub-expert (uniformity), and on a head's largest gate (ambiguity).
    let d_uniform: [Vec<f32>; 2] = std::array::from_fn(|r| {
        mean_gate[r].iter().map(|p| (alphas.uniformity as f64 * e as f64 * p / bh) as f32).collect()
    });
    let d_max = (-0.5 * alphas.ambiguity as f64 / bh) as f32;

    // a and the output blocks' gradients, sub-expert by sub-expert.
    for r in 0..2 {
        let Some((q, out)) = &lay.out[r] else { continue };
        let side = &f.sides[r];
        let (cw, w) = (out.cw, out.width);
        s.a[r].resize(side.id.len() * cw, 0.0);
        let a = split_rows(&mut s.a[r], &side.starts, cw);
        let (dy, coef) = (&s.dy, &f.coef[r]);
        a.into_par_iter()
            .zip(g.out[*q].par_chunks_mut(cw * w))
            .zip(p.out[*q].par_chunks(cw * w))
            .enumerate()
            .for_each_init(Vec::new, |buf, (i, ((a, gb), wb))| {
                let order = &side.order[side.starts[i] as usize..side.starts[i + 1] as usize];
                out_block(wb, gb, a, order, &side.token, coef, dy, o, out.col, cw, w, buf);
            });
    }

    phases::mark("out-blocks");
    // Per token: back through the cross terms, the pooling, s and the softmax.
    s.dz.resize(f.routes.id.len(), 0.0);
    let token_starts: Vec<u32> = f.routes.offsets.iter().step_by(2 * heads).copied().collect();
    let dz = split_rows(&mut s.dz, &token_starts, 1);
    let [dp0, dp1] = &mut s.dpre;
    for (r, dp) in [(0, &mut *dp0), (1, &mut *dp1)] {
        dp.resize(if lay.hidden[r].is_some() { f.sides[r].id.len() * lay.k } else { 0 }, 0.0);
    }
    let k_of = |r: usize| if lay.hidden[r].is_some() { lay.k } else { 0 };
    let dp0 = split_rows(dp0, &f.sides[0].offsets, k_of(0));
    let dp1 = split_rows(dp1, &f.sides[1].offsets, k_of(1));
    let a = &s.a;
    dz.into_par_iter().zip(dp0.into_par_iter().zip(dp1)).enumerate().for_each_init(
        TokenScratch::default,
        |ts, (t, (dz, (dp0, dp1)))| {
            token_backward(lay, f, a, &d_uniform, d_max, t, ts, dz, [dp0, dp1]);
        },
    );

    phases::mark("token-backward");
    // Hidden weights, sub-expert by sub-expert.
    for r in 0..2 {
        let Some(hs) = lay.hidden[r] else { continue };
        let (side, k, d) = (&f.sides[r], lay.k, lay.d);
        let dpre = &s.dpre[r];
        g.ut[hs].par_chunks_mut(k * d).zip(g.c[hs].par_chunks_mut(k)).enumerate().for_each(
            |(i, (gu, gc))| {
                let order = &side.order[side.starts[i] as usize..side.starts[i + 1] as usize];
                hidden_grad(gu, gc, order, &side.token, dpre, x, d);
            },
        );
    }

    phases::mark("hidden-grad");
    // Router, column (head, sub-expert) by column.
    for r in 0..2 {
        let (cols, order, token) = router_order(lay, f, r);
        let dz = &s.dz;
        g.router[r].par_chunks_mut(lay.d).enumerate().for_each(|(col, gw)| {
            let entries = &order[cols[col] as usize..cols[col + 1] as usize];
            router_grad(gw, entries, &token, dz, x, lay.d);
        });
    }
    phases::mark("router-grad");
    Loss { fvu, uniformity, ambiguity, aux }
}

/// Side `r`'s route entries by router column h·E + e (`starts`, `order`), and each route entry's
/// token (indexed by route entry).
fn router_order(lay: &Layout, f: &Forward, r: usize) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let (e, heads) = (lay.e, lay.heads);
    let routes = &f.routes;
    let mut token = vec![0u32; routes.id.len()];
    let mut starts = vec![0u32; heads * e + 1];
    for t in 0..routes.tokens() {
        token[routes.token(t)].fill(t as u32);
        for h in 0..heads {
            for l in routes.list(t, r, h) {
                starts[h * e + routes.id[l] as usize + 1] += 1;
            }
        }
    }
    for c in 0..heads * e {
        starts[c + 1] += starts[c];
    }
    let mut fill = starts.clone();
    let mut order = vec![0u32; starts[heads * e] as usize];
    for t in 0..routes.tokens() {
        for h in 0..heads {
            for l in routes.list(t, r, h) {
                let slot = &mut fill[h * e + routes.id[l] as usize];
                order[*slot as usize] = l as u32;
                *slot += 1;
            }
        }
    }
    (starts, order, token)
}

/// Sub-expert i's output block: its entries' dy halves and coefficients gathered into `buf`
/// (`[n, w]` then `[n, cw]`), then two GEMMs: a = dy·blockᵀ and ∂block = coefᵀ·dy.
#[allow(clippy::too_many_arguments)]
fn out_block(
    wb: &[f32],
    gb: &mut [f32],
    a: &mut [f32],
    order: &[u32],
    token: &[u32],
    coef: &[f32],
    dy: &[f32],
    o: usize,
    col: usize,
    cw: usize,
    w: usize,
    buf: &mut Vec<f32>,
) {
    let n = order.len();
    buf.clear();
    for &e in order {
        let t = token[e as usize] as usize;
        buf.extend_from_slice(&dy[t * o + col..t * o + col + w]);
    }
    for &e in order {
        buf.extend_from_slice(&coef[e as usize * cw..(e as usize + 1) * cw]);
    }
    let (dyg, cg) = buf.split_at(n * w);
    gemm_seq((dyg, w, 1), (wb, 1, w), (a, cw, 1), n, cw, w);
    gemm_seq((cg, 1, cw), (dyg, w, 1), (gb, w, 1), cw, w, n);
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn hidden_grad(
    gu: &mut [f32],
    gc: &mut [f32],
    order: &[u32],
    token: &[u32],
    dpre: &[f32],
    x: &[f32],
    d: usize,
) {
    let k = gc.len();
    gu.fill(0.0);
    gc.fill(0.0);
    let xrow = |n: u32| {
        let t = token[n as usize] as usize;
        &x[t * d..(t + 1) * d]
    };
    let dp = |n: u32, a: usize| dpre[n as usize * k + a];
    for ns in order.chunks(4) {
        if let [n0, n1, n2, n3] = *ns {
            let xs = [xrow(n0), xrow(n1), xrow(n2), xrow(n3)];
            for (a, (gr, gc)) in gu.chunks_mut(d).zip(gc.iter_mut()).enumerate() {
                let c = [dp(n0, a), dp(n1, a), dp(n2, a), dp(n3, a)];
                axpys(c, xs, gr);
                *gc += c.iter().sum::<f32>();
            }
        } else {
            for &n in ns {
                for (a, (gr, gc)) in gu.chunks_mut(d).zip(gc.iter_mut()).enumerate() {
                    axpys([dp(n, a)], [xrow(n)], gr);
                    *gc += dp(n, a);
                }
            }
        }
    }
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn router_grad(gw: &mut [f32], entries: &[u32], token: &[u32], dz: &[f32], x: &[f32], d: usize) {
    gw.fill(0.0);
    let xrow = |l: u32| {
        let t = token[l as usize] as usize;
        &x[t * d..(t + 1) * d]
    };
    for ls in entries.chunks(4) {
        if let [l0, l1, l2, l3] = *ls {
            let c = [dz[l0 as usize], dz[l1 as usize], dz[l2 as usize], dz[l3 as usize]];
            axpys(c, [xrow(l0), xrow(l1), xrow(l2), xrow(l3)], gw);
        } else {
            for &l in ls {
                axpys([dz[l as usize]], [xrow(l)], gw);
            }
        }
    }
}

/// Per-token buffers of [`token_backward`].
#[derive(Default)]
struct TokenScratch {
    h: Vec<f32>,
    dh: Vec<f32>,
    ds: Vec<f32>,
    dpool: Vec<f32>,
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
#[allow(clippy::too_many_arguments)]
fn token_backward(
    lay: &Layout,
    f: &Forward,
    a: &[Vec<f32>; 2],
    d_uniform: &[Vec<f32>; 2],
    d_max: f32,
    t: usize,
    ts: &mut TokenScratch,
    dz: &mut [f32],
    dpre: [&mut [f32]; 2],
) {
    let (k, heads) = (lay.k, lay.heads);
    let routes = &f.routes;
    let base = routes.token(t).start;
    let split = token_hidden(lay, f, t, &mut ts.h);
    let first = [f.sides[0].offsets[t] as usize, f.sides[1].offsets[t] as usize];
    let count =
        [f.sides[0].offsets[t + 1] as usize - first[0], f.sides[1].offsets[t + 1] as usize - first[1]];
    // Per side: h, dh (token-major, k per entry where the side has hidden units) and ds.
    let hoff = [0, split];
    ts.dh.clear();
    ts.dh.resize(ts.h.len(), 0.0);
    ts.ds.clear();
    ts.ds.resize(count[0] + count[1], 0.0);
    ts.dpool.clear();
    ts.dpool.resize(2 * heads * k, 0.0);
    let pooled = &f.pooled[t * 2 * heads * k..(t + 1) * 2 * heads * k];
    let dg = &mut *dz; // ∂/∂g first, turned into ∂/∂z at the end
    dg.fill(0.0);
    let (h_all, dh_all, ds_all, dpool) = (&ts.h, &mut ts.dh, &mut ts.ds, &mut ts.dpool);
    let ds_off = [0, count[0]];

    // The output halves' coefficients.
    for r in 0..2 {
        let Some((_, out)) = &lay.out[r] else { continue };
        let side = &f.sides[r];
        let cw = out.cw;
        let other = 1 - r;
        for u in 0..count[r] {
            let row = &a[r][side.pos[first[r] + u] as usize * cw..(side.pos[first[r] + u] as usize + 1) * cw];
            let mut ds = row[cw - 1];
            for (pi, part) in out.parts.iter().enumerate() {
                if *part == Part::Own {
                    let ap = &row[pi * k..(pi + 1) * k];
                    let s = side.s[first[r] + u];
                    let at = hoff[r] + u * k;
                    ds += dot(&h_all[at..at + k], ap);
                    axpy(s, ap, &mut dh_all[at..at + k]);
                }
            }
            ds_all[ds_off[r] + u] += ds;
        }
        for (pi, part) in out.parts.iter().enumerate() {
            if *part != Part::Cross {
                continue;
            }
            for h in 0..heads {
                let at = (other * heads + h) * k;
                let ph = &pooled[at..at + k];
                for l in routes.list(t, r, h) {
                    let u = f.link[l] as usize - first[r];
                    let n = side.pos[first[r] + u] as usize;
                    let ap = &a[r][n * cw + pi * k..n * cw + (pi + 1) * k];
                    dg[l - base] += dot(ap, ph);
                    axpy(routes.gate[l], ap, &mut dpool[at..at + k]);
                }
            }
        }
    }
    // The pooling P_r[h] = Σ g·h_r, and s = Σ_h g.
    for r in 0..2 {
        for h in 0..heads {
            let at = (r * heads + h) * k;
            for l in routes.list(t, r, h) {
                let u = f.link[l] as usize - first[r];
                if lay.hidden[r].is_some() {
                    let hu = hoff[r] + u * k;
                    dg[l - base] += dot(&h_all[hu..hu + k], &dpool[at..at + k]);
                    axpy(routes.gate[l], &dpool[at..at + k], &mut dh_all[hu..hu + k]);
                }
                dg[l - base] += ds_all[ds_off[r] + u] + d_uniform[r][routes.id[l] as usize];
            }
        }
    }
    // The auxiliary ambiguity loss, then the softmax over each head's kept logits.
    for r in 0..2 {
        for h in 0..heads {
            let list = routes.list(t, r, h);
            let gates = &routes.gate[list.clone()];
            let d = &mut dg[list.start - base..list.end - base];
            if let Some(m) = (0..gates.len()).reduce(|m, i| if gates[i] > gates[m] { i } else { m }) {
                d[m] += d_max;
            }
            let mean: f32 = gates.iter().zip(d.iter()).map(|(g, d)| g * d).sum();
            d.iter_mut().zip(gates).for_each(|(d, g)| *d = g * (*d - mean));
        }
    }
    // ψ = ReLU²: dpre = 2·ReLU(pre)·dh.
    for r in 0..2 {
        if lay.hidden[r].is_none() {
            continue;
        }
        let side = &f.sides[r];
        for u in 0..count[r] {
            let relu =
                &f.relu[r][side.pos[first[r] + u] as usize * k..(side.pos[first[r] + u] as usize + 1) * k];
            let dh = &dh_all[hoff[r] + u * k..hoff[r] + (u + 1) * k];
            for ((o, rl), dh) in dpre[r][u * k..(u + 1) * k].iter_mut().zip(relu).zip(dh) {
                *o = 2.0 * rl * dh;
            }
        }
    }
}

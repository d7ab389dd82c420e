//! Monet computed sparsely and by hand, for training and inference: only the sub-experts some
//! head keeps are touched, and the factorised sums of [`super::Monet::forward_with`] are written as
//! loops over those (about topk·H of E per side and token).
//!
//! Per token, side r ∈ {1, 2} (the two sub-routers), head h: the kept sub-experts K_rh with gates
//! g_r[h, e] ([`Routes`]); a side's *entries* are the union of its heads' K_rh, each with
//! s_r[e] = Σ_h g_r[h, e] and, where the side owns hidden units, h_r[e] = ψ(x·u_e + c_e) (k units,
//! ψ = ReLU²). The pooled hidden of a head is P_r[h] = Σ_{e∈K_rh} g_r[h, e]·h_r[e]. An output half
//! is a sum over one side's entries of a coefficient row times that sub-expert's block of weights
//! (`[cw, width]`: k rows per part, then the bias row):
//! - VD top (side 1's entries i): coefficients [s1·h1[i] ; Σ_h g1[h,i]·P2[h] ; s1[i]] on
//!   [v11_i ; v12_i ; b1_i];
//! - VD bottom (side 2's entries j): [Σ_h g2[h,j]·P1[h] ; s2·h2[j] ; s2[j]] on [v21_j ; v22_j ; b2_j];
//! - HD (side 2's entries j, hidden on side 1 only, k = m): [Σ_h g2[h,j]·P1[h] ; s2[j]] on
//!   [v_j ; b_j].
//!
//! These equal Σ_{i,j} gate(i,j)·expert_ij(x) because each head's gates sum to one (the tests
//! check them against [`super::explicit`]). Work is split so that it is reproducible: hidden units
//! are computed sub-expert by sub-expert over the tokens routed to it (its weights stay in cache),
//! outputs by tiles of tokens; every sum runs in a fixed order, whatever the thread count. The
//! routing (logits, selection, gates) and the gate floor are in [`super::routes`].

use multiversion::multiversion;
use rayon::prelude::*;

use super::kernels::{dots, gemm_seq};
use super::phases;
pub use super::routes::{GATE_FLOOR, Norm, Routes, batch_norm, codes, logits, select};
use super::{Decomposition, MonetSpec};
use crate::kernels::axpy;

/// Where a coefficient part of an output block comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// s[e]·h[e]: the entry's own side's hidden units.
    Own,
    /// Σ_h g[h, e]·P_other[h]: the other side's pooled hidden units, routed through the heads.
    Cross,
}

/// One output half: which side's entries write it, and its block layout.
#[derive(Clone, Debug)]
pub struct Out {
    pub parts: &'static [Part],
    /// First output column and width.
    pub col: usize,
    pub width: usize,
    /// Coefficients per entry: parts·k + 1 (the bias).
    pub cw: usize,
}

/// The shapes of a Monet as the sparse code walks it.
#[derive(Clone, Debug)]
pub struct Layout {
    pub d: usize,
    pub o: usize,
    pub e: usize,
    pub heads: usize,
    /// Hidden units per sub-expert and side: m (HD) or m/2 (VD).
    pub k: usize,
    /// Per side: whether it owns hidden units (its index into `ut`/`c`).
    pub hidden: [Option<usize>; 2],
    /// Per side: the output half its entries write (its index into `out`).
    pub out: [Option<(usize, Out)>; 2],
    /// Φ⁻¹(1 − topk/E).
    pub sigma: f32,
}

impl Layout {
    pub fn of(spec: &MonetSpec) -> Layout {
        let (d, o, e, heads, sigma) = (spec.d_in, spec.d_out, spec.experts, spec.heads, spec.sigma());
        match spec.decomposition {
            Decomposition::Horizontal => {
                let k = spec.dim;
                let out = Out { parts: &[Part::Cross], col: 0, width: o, cw: k + 1 };
                Layout { d, o, e, heads, k, hidden: [Some(0), None], out: [None, Some((0, out))], sigma }
            }
            Decomposition::Vertical => {
                let (k, w) = (spec.dim / 2, o / 2);
                let top = Out { parts: &[Part::Own, Part::Cross], col: 0, width: w, cw: 2 * k + 1 };
                let bottom = Out { parts: &[Part::Cross, Part::Own], col: w, width: w, cw: 2 * k + 1 };
                Layout {
                    d,
                    o,
                    e,
                    heads,
                    k,
                    hidden: [Some(0), Some(1)],
                    out: [Some((0, top)), Some((1, bottom))],
                    sigma,
                }
            }
        }
    }
}

/// Monet's weights in the layout the sparse code reads (the same struct holds gradients and Adam
/// moments): the router and input projections transposed so that each logit and hidden unit is a
/// contiguous row, each output half as one `[cw, width]` block per sub-expert.
#[derive(Clone, Debug, PartialEq)]
pub struct Params {
    /// `[H·E, d]` per sub-router (row h·E + e).
    pub router: [Vec<f32>; 2],
    /// `[E·k, d]` per hidden side.
    pub ut: Vec<Vec<f32>>,
    /// `[E·k]` per hidden side.
    pub c: Vec<Vec<f32>>,
    /// `[E, cw, width]` per output half.
    pub out: Vec<Vec<f32>>,
}

impl Params {
    /// From the file layout ([`super::Monet::named`] order: router.w1, router.w2, then u…, c…,
    /// v…, b…; `[d, ·]` matrices for the router and u).
    pub fn from_named(lay: &Layout, named: &[Vec<f32>]) -> Params {
        let (d, e, k, he) = (lay.d, lay.e, lay.k, lay.heads * lay.e);
        let t = |v: &[f32], cols: usize| crate::io::transpose(v, d, cols);
        let sides = if lay.hidden[1].is_some() { 2 } else { 1 };
        let router = [t(&named[0], he), t(&named[1], he)];
        let ut = (0..sides).map(|s| t(&named[2 + s], e * k)).collect();
        let c = (0..sides).map(|s| named[2 + sides + s].clone()).collect();
        let vs = &named[2 + 2 * sides..];
        let halves: Vec<&Out> = lay.out.iter().flatten().map(|(_, o)| o).collect();
        let n_parts: usize = halves.iter().map(|o| o.parts.len()).sum();
        let (mut vi, mut bi) = (0, n_parts);
        let out = halves
            .iter()
            .map(|o| {
                let mut block = Vec::with_capacity(e * o.cw * o.width);
                for i in 0..e {
                    for p in 0..o.parts.len() {
                        block.extend_from_slice(&vs[vi + p][i * k * o.width..(i + 1) * k * o.width]);
                    }
                    block.extend_from_slice(&vs[bi][i * o.width..(i + 1) * o.width]);
                }
                vi += o.parts.len();
                bi += 1;
                block
            })
            .collect();
        Params { router, ut, c, out }
    }

    /// Back to the file layout (inverse of [`Params::from_named`]).
    pub fn to_named(&self, lay: &Layout) -> Vec<Vec<f32>> {
        let (d, e, k, he) = (lay.d, lay.e, lay.k, lay.heads * lay.e);
        let t = |v: &[f32], rows: usize| crate::io::transpose(v, rows, d);
        let mut named = vec![t(&self.router[0], he), t(&self.router[1], he)];
        named.extend(self.ut.iter().map(|u| t(u, e * k)));
        named.extend(self.c.iter().cloned());
        let halves: Vec<&Out> = lay.out.iter().flatten().map(|(_, o)| o).collect();
        let mut biases = Vec::new();
        for (o, block) in halves.iter().zip(&self.out) {
            let mut parts = vec![Vec::with_capacity(e * k * o.width); o.parts.len()];
            let mut bias = Vec::with_capacity(e * o.width);
            for b in block.chunks(o.cw * o.width) {
                for (p, part) in parts.iter_mut().enumerate() {
                    part.extend_from_slice(&b[p * k * o.width..(p + 1) * k * o.width]);
                }
                bias.extend_from_slice(&b[(o.cw - 1) * o.width..]);
            }
            named.extend(parts);
            biases.push(bias);
        }
        named.extend(biases);
        named
    }

    pub fn zeros_like(&self) -> Params {
        let z = |v: &Vec<f32>| vec![0.0f32; v.len()];
        Params {
            router: [z(&self.router[0]), z(&self.router[1])],
            ut: self.ut.iter().map(z).collect(),
            c: self.c.iter().map(z).collect(),
            out: self.out.iter().map(z).collect(),
        }
    }

    /// Every buffer, in a fixed order.
    pub fn tensors(&self) -> Vec<&Vec<f32>> {
        self.router.iter().chain(&self.ut).chain(&self.c).chain(&self.out).collect()
    }

    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<f32>> {
        self.router.iter_mut().chain(&mut self.ut).chain(&mut self.c).chain(&mut self.out).collect()
    }
}

/// One side's entries: per token the union of its heads' kept sub-experts (token-major), and the
/// same entries sub-expert by sub-expert (expert-major).
#[derive(Clone, Debug, Default)]
pub struct Side {
    /// Token t's entries are `offsets[t]..offsets[t + 1]`, by ascending sub-expert.
    pub offsets: Vec<u32>,
    pub id: Vec<u32>,
    pub token: Vec<u32>,
    /// s[e] = Σ_h g[h, e].
    pub s: Vec<f32>,
    /// Sub-expert i's entries are `order[starts[i]..starts[i + 1]]`, by token.
    pub starts: Vec<u32>,
    pub order: Vec<u32>,
    /// Each entry's position in `order`.
    pub pos: Vec<u32>,
}

/// Both sides' entries, and for each route entry of [`Routes`] its entry in its side.
pub fn entries(lay: &Layout, routes: &Routes) -> ([Side; 2], Vec<u32>) {
    let (e, heads) = (lay.e, lay.heads);
    let tokens = routes.tokens();
    // Per token and side: the union's ids, their s, and each route entry's place in the union.
    type Union = (Vec<u32>, Vec<f32>, Vec<u32>);
    let per_token: Vec<[Union; 2]> = (0..tokens)
        .into_par_iter()
        .map(|t| {
            std::array::from_fn(|r| {
                let mut ids: Vec<u32> =
                    (0..heads).flat_map(|h| routes.id[routes.list(t, r, h)].iter().copied()).collect();
                ids.sort_unstable();
                ids.dedup();
                let mut s = vec![0.0f32; ids.len()];
                let mut link = Vec::new();
                for h in 0..heads {
                    for l in routes.list(t, r, h) {
                        let u = ids.binary_search(&routes.id[l]).expect("a kept id is in the union");
                        s[u] += routes.gate[l];
                        link.push(u as u32);
                    }
                }
                (ids, s, link)
            })
        })
        .collect();
    let mut sides: [Side; 2] = Default::default();
    let mut link = Vec::with_capacity(routes.id.len());
    for side in sides.iter_mut() {
        side.offsets.push(0);
    }
    for (t, rows) in per_token.into_iter().enumerate() {
        for (r, (ids, s, l)) in rows.into_iter().enumerate() {
            let side = &mut sides[r];
            let base = side.id.len() as u32;
            link.extend(l.iter().map(|u| base + u));
            side.token.extend(std::iter::repeat_n(t as u32, ids.len()));
            side.id.extend(ids);
            side.s.extend(s);
            side.offsets.push(side.id.len() as u32);
        }
    }
    for side in sides.iter_mut() {
        let mut starts = vec![0u32; e + 1];
        side.id.iter().for_each(|&i| starts[i as usize + 1] += 1);
        for i in 0..e {
            starts[i + 1] += starts[i];
        }
        let mut fill = starts.clone();
        side.order = vec![0; side.id.len()];
        side.pos = vec![0; side.id.len()];
        for (n, &i) in side.id.iter().enumerate() {
            let slot = &mut fill[i as usize];
            side.order[*slot as usize] = n as u32;
            side.pos[n] = *slot;
            *slot += 1;
        }
        side.starts = starts;
    }
    (sides, link)
}

/// Cut `buf` into consecutive pieces of `width ×` the given counts (`offsets` cumulative).
pub fn split_rows<'a>(mut buf: &'a mut [f32], offsets: &[u32], width: usize) -> Vec<&'a mut [f32]> {
    let mut out = Vec::with_capacity(offsets.len().saturating_sub(1));
    for w in offsets.windows(2) {
        let (head, rest) = buf.split_at_mut((w[1] - w[0]) as usize * width);
        out.push(head);
        buf = rest;
    }
    out
}

/// ReLU(x·u + c) of every entry of a hidden side, in its expert-major order (`[entries, k]`):
/// sub-expert by sub-expert, so that its k weight rows stay in cache.
pub fn hidden(lay: &Layout, ut: &[f32], c: &[f32], side: &Side, x: &[f32], relu: &mut Vec<f32>) {
    let (d, k) = (lay.d, lay.k);
    relu.resize(side.id.len() * k, 0.0);
    let pieces = split_rows(relu, &side.starts, k);
    pieces.into_par_iter().enumerate().for_each(|(i, out)| {
        let order = &side.order[side.starts[i] as usize..side.starts[i + 1] as usize];
        hidden_block(&ut[i * k * d..(i + 1) * k * d], &c[i * k..(i + 1) * k], x, d, order, &side.token, out);
    });
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn hidden_block(rows: &[f32], c: &[f32], x: &[f32], d: usize, order: &[u32], token: &[u32], out: &mut [f32]) {
    let k = c.len();
    let xrow = |n: u32| {
        let t = token[n as usize] as usize;
        &x[t * d..(t + 1) * d]
    };
    for (ns, o) in order.chunks(4).zip(out.chunks_mut(4 * k)) {
        if let [n0, n1, n2, n3] = *ns {
            let xs = [xrow(n0), xrow(n1), xrow(n2), xrow(n3)];
            for (a, (row, c)) in rows.chunks(d).zip(c).enumerate() {
                let v = dots(row, xs);
                for g in 0..4 {
                    o[g * k + a] = (v[g] + c).max(0.0);
                }
            }
        } else {
            for (&n, o) in ns.iter().zip(o.chunks_mut(k)) {
                for ((o, row), c) in o.iter_mut().zip(rows.chunks(d)).zip(c) {
                    *o = (dots(row, [xrow(n)])[0] + c).max(0.0);
                }
            }
        }
    }
}

/// What the forward pass leaves for the backward one.
#[derive(Default)]
pub struct Forward {
    pub routes: Routes,
    pub sides: [Side; 2],
    /// Each route entry's entry in its side.
    pub link: Vec<u32>,
    /// ReLU(pre-activation) per hidden side, expert-major `[entries, k]` (empty for HD's side 2).
    pub relu: [Vec<f32>; 2],
    /// P_r[h] per token, `[B, 2, H, k]`.
    pub pooled: Vec<f32>,
    /// Output coefficients per side, token-major `[entries, cw]` (empty for HD's side 1).
    pub coef: [Vec<f32>; 2],
}

/// The output `y` (`[B, o]`, resized) of the tokens whose routes, entries and hidden units `f`
/// holds; fills `f.pooled` and `f.coef`.
pub fn output(p: &Params, lay: &Layout, f: &mut Forward, y: &mut Vec<f32>) {
    let (o, k, heads) = (lay.o, lay.k, lay.heads);
    let tokens = f.routes.tokens();
    y.resize(tokens * o, 0.0);
    // Taken out while the token pass writes them (it reads the rest of `f`).
    let (mut pooled, mut coef) = (std::mem::take(&mut f.pooled), std::mem::take(&mut f.coef));
    pooled.resize(tokens * 2 * heads * k, 0.0);
    let cw = |r: usize| lay.out[r].as_ref().map_or(0, |(_, o)| o.cw);
    let [c0, c1] = &mut coef;
    c0.resize(f.sides[0].id.len() * cw(0), 0.0);
    c1.resize(f.sides[1].id.len() * cw(1), 0.0);
    let coef0 = split_rows(c0, &f.sides[0].offsets, cw(0));
    let coef1 = split_rows(c1, &f.sides[1].offsets, cw(1));
    let fr = &*f;
    pooled.par_chunks_mut(2 * heads * k).zip(coef0.into_par_iter().zip(coef1)).enumerate().for_each_init(
        Vec::new,
        |hbuf, (t, (pooled, (c0, c1)))| {
            token_coefficients(lay, fr, t, hbuf, pooled, [c0, c1]);
        },
    );
    phases::mark("coefficients");
    // y by tiles of tokens, sub-expert by sub-expert within a tile: each block is read once per
    // tile (from cache) by one GEMM for all the tile's tokens routed to it.
    let cf = &coef;
    y.par_chunks_mut(TILE * o).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(cg, yg), (ti, ytile)| {
            ytile.fill(0.0);
            let (t0, t1) = (ti * TILE, ti * TILE + ytile.len() / o);
            for ((half, side), coef) in lay.out.iter().zip(&fr.sides).zip(cf) {
                let Some((q, out)) = half else { continue };
                let (cw, w) = (out.cw, out.width);
                for i in 0..lay.e {
                    let order = &side.order[side.starts[i] as usize..side.starts[i + 1] as usize];
                    let lo = order.partition_point(|&n| (side.token[n as usize] as usize) < t0);
                    let hi = order.partition_point(|&n| (side.token[n as usize] as usize) < t1);
                    let block = &p.out[*q][i * cw * w..(i + 1) * cw * w];
                    tile_gemm(block, coef, &order[lo..hi], &side.token, t0, o, out.col, cw, ytile, cg, yg);
                }
            }
        },
    );
    f.pooled = pooled;
    f.coef = coef;
    phases::mark("outputs");
}

/// Tokens per tile of the output pass.
const TILE: usize = 128;

/// The rows of a tile's tokens routed to one sub-expert, as one GEMM: the entries' coefficients
/// gathered (`cg`), coef·block into `yg`, then each row added to its token's.
#[allow(clippy::too_many_arguments)]
fn tile_gemm(
    block: &[f32],
    coef: &[f32],
    order: &[u32],
    token: &[u32],
    t0: usize,
    o: usize,
    col: usize,
    cw: usize,
    ytile: &mut [f32],
    cg: &mut Vec<f32>,
    yg: &mut Vec<f32>,
) {
    let (n, w) = (order.len(), block.len() / cw);
    if n == 0 {
        return;
    }
    cg.clear();
    for &e in order {
        cg.extend_from_slice(&coef[e as usize * cw..(e as usize + 1) * cw]);
    }
    yg.resize(n * w, 0.0);
    gemm_seq((cg, cw, 1), (block, w, 1), (yg, w, 1), n, w, cw);
    for (&e, row) in order.iter().zip(yg.chunks(w)) {
        let t = token[e as usize] as usize - t0;
        add_row(row, &mut ytile[t * o + col..t * o + col + w]);
    }
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn add_row(x: &[f32], y: &mut [f32]) {
    y.iter_mut().zip(x).for_each(|(y, x)| *y += x);
}

/// Token `t`'s hidden units h = ReLU² per side, token-major `[entries of t, k]` into `hbuf`
/// (side 1's first); returns where side 2's start.
pub fn token_hidden(lay: &Layout, f: &Forward, t: usize, hbuf: &mut Vec<f32>) -> usize {
    let k = lay.k;
    hbuf.clear();
    let mut split = 0;
    for r in 0..2 {
        if lay.hidden[r].is_some() {
            let side = &f.sides[r];
            for n in side.offsets[t] as usize..side.offsets[t + 1] as usize {
                let at = side.pos[n] as usize * k;
                hbuf.extend(f.relu[r][at..at + k].iter().map(|v| v * v));
            }
        }
        if r == 0 {
            split = hbuf.len();
        }
    }
    split
}

#[multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
fn token_coefficients(
    lay: &Layout,
    f: &Forward,
    t: usize,
    hbuf: &mut Vec<f32>,
    pooled: &mut [f32],
    coef: [&mut [f32]; 2],
) {
    let (k, heads) = (lay.k, lay.heads);
    let split = token_hidden(lay, f, t, hbuf);
    let (h0, h1) = hbuf.split_at(split);
    let hs = [h0, h1];
    let first = [f.sides[0].offsets[t] as usize, f.sides[1].offsets[t] as usize];
    // P_r[h] = Σ_{e∈K_rh} g·h_r[e].
    pooled.fill(0.0);
    for r in 0..2 {
        if lay.hidden[r].is_none() {
            continue;
        }
        for h in 0..heads {
            let ph = &mut pooled[(r * heads + h) * k..(r * heads + h + 1) * k];
            for l in f.routes.list(t, r, h) {
                let u = f.link[l] as usize - first[r];
                axpy(f.routes.gate[l], &hs[r][u * k..(u + 1) * k], ph);
            }
        }
    }
    let pooled = &*pooled;
    for r in 0..2 {
        let Some((_, out)) = &lay.out[r] else { continue };
        let side = &f.sides[r];
        let cw = out.cw;
        let coef = &mut *coef[r];
        coef.fill(0.0);
        let other = 1 - r;
        for (pi, part) in out.parts.iter().enumerate() {
            match part {
                Part::Own => {
                    for (u, row) in coef.chunks_mut(cw).enumerate() {
                        let s = side.s[first[r] + u];
                        row[pi * k..(pi + 1) * k]
                            .iter_mut()
                            .zip(&hs[r][u * k..(u + 1) * k])
                            .for_each(|(c, h)| *c = s * h);
                    }
                }
                Part::Cross => {
                    for h in 0..heads {
                        let ph = &pooled[(other * heads + h) * k..(other * heads + h + 1) * k];
                        for l in f.routes.list(t, r, h) {
                            let u = f.link[l] as usize - first[r];
                            axpy(f.routes.gate[l], ph, &mut coef[u * cw + pi * k..u * cw + (pi + 1) * k]);
                        }
                    }
                }
            }
        }
        for (u, row) in coef.chunks_mut(cw).enumerate() {
            row[cw - 1] = side.s[first[r] + u];
        }
    }
}

/// Everything up to the output for `x` (`[B, d]`), routing with `norm` (inference: the running
/// statistics); `z` is scratch for the logits.
pub fn forward(
    p: &Params,
    lay: &Layout,
    x: &[f32],
    norm: &Norm,
    z: &mut [Vec<f32>; 2],
    f: &mut Forward,
    y: &mut Vec<f32>,
) {
    logits(p, lay, x, z);
    let routes = select(lay, z, norm);
    forward_routed(p, lay, x, routes, f, y);
}

/// The forward pass for given routes.
pub fn forward_routed(
    p: &Params,
    lay: &Layout,
    x: &[f32],
    routes: Routes,
    f: &mut Forward,
    y: &mut Vec<f32>,
) {
    let (sides, link) = entries(lay, &routes);
    f.routes = routes;
    f.sides = sides;
    f.link = link;
    phases::mark("entries");
    for r in 0..2 {
        match lay.hidden[r] {
            Some(s) => hidden(lay, &p.ut[s], &p.c[s], &f.sides[r], x, &mut f.relu[r]),
            None => f.relu[r].clear(),
        }
    }
    phases::mark("hidden");
    output(p, lay, f, y);
}

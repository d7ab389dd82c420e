//! Monet's routing on plain slices, as training and inference run it: the router's logits (one
//! dense GEMM per sub-router), the BatchNorm statistics, the Gaussian-quantile selection and the
//! softmax of the kept logits ([`super::router`] is the candle reference), and which experts
//! count as active.
//!
//! **Gate floor.** An expert counts as active on a token ([`codes`]) only when its gate exceeds
//! [`GATE_FLOOR`] times the token's total gate mass (Σ of its gates, = H): a kept sub-expert whose
//! softmax weight is ~1e-9 makes experts with gates ~1e-18 that change nothing but would count in
//! L0, dead fraction and co-occurrence. The floor only decides what is active: the output keeps
//! every gate, so reconstruction is exact.

use rayon::prelude::*;

use super::sparse::{Layout, Params};
use crate::kernels::Codes;

/// An expert is active on a token when its gate exceeds this fraction of the token's total gate
/// mass: such an expert weighs ~1e-4 of the token's mixture. (On Gemma 3 layer 6, RESULTS.md, a
/// token's sub-floor experts hold 0.9% of its gate mass together; the output keeps them.)
pub const GATE_FLOOR: f32 = 1e-4;

const BN_EPS: f64 = 1e-5;

/// Per sub-router and head, the BatchNorm statistics the selection normalises with.
#[derive(Clone, Debug, PartialEq)]
pub struct Norm {
    pub mean: [Vec<f32>; 2],
    pub var: [Vec<f32>; 2],
}

/// The kept sub-experts and their gates of a batch: list (t·2 + r)·H + h (token t, side r,
/// head h) holds `id`/`gate` entries `offsets[l]..offsets[l + 1]`, by ascending sub-expert.
#[derive(Clone, Debug, Default)]
pub struct Routes {
    pub heads: usize,
    pub offsets: Vec<u32>,
    pub id: Vec<u32>,
    pub gate: Vec<f32>,
}

impl Routes {
    pub fn tokens(&self) -> usize {
        (self.offsets.len() - 1) / (2 * self.heads)
    }

    pub fn list(&self, t: usize, r: usize, h: usize) -> std::ops::Range<usize> {
        let l = (t * 2 + r) * self.heads + h;
        self.offsets[l] as usize..self.offsets[l + 1] as usize
    }

    /// Token `t`'s entries (both sides, all heads).
    pub fn token(&self, t: usize) -> std::ops::Range<usize> {
        let l = t * 2 * self.heads;
        self.offsets[l] as usize..self.offsets[l + 2 * self.heads] as usize
    }

    /// The non-zero entries of dense gate factors `g1`, `g2` (`[B, H, E]` flattened).
    pub fn from_dense(g1: &[f32], g2: &[f32], heads: usize, e: usize) -> Routes {
        let tokens = g1.len() / (heads * e);
        let mut r = Routes { heads, offsets: vec![0], ..Routes::default() };
        for t in 0..tokens {
            for g in [g1, g2] {
                for h in 0..heads {
                    let row = &g[(t * heads + h) * e..(t * heads + h + 1) * e];
                    for (i, &v) in row.iter().enumerate().filter(|(_, v)| **v != 0.0) {
                        r.id.push(i as u32);
                        r.gate.push(v);
                    }
                    r.offsets.push(r.id.len() as u32);
                }
            }
        }
        r
    }
}

/// The router's logits `z[r]` (`[B, H·E]`) of `x` into `z` (resized).
pub fn logits(p: &Params, lay: &Layout, x: &[f32], z: &mut [Vec<f32>; 2]) {
    let (b, he) = (x.len() / lay.d, lay.heads * lay.e);
    for (zr, w) in z.iter_mut().zip(&p.router) {
        zr.resize(b * he, 0.0);
        crate::kernels::matmul_nt(x, w, zr, b, he, lay.d, false);
    }
}

/// Per side and head, the mean and biased variance of the logits over the batch's tokens and
/// sub-experts (f64 sums, in a fixed order).
pub fn batch_norm(lay: &Layout, z: &[Vec<f32>; 2]) -> Norm {
    let (e, heads) = (lay.e, lay.heads);
    let stats: Vec<(f32, f32)> = (0..2 * heads)
        .into_par_iter()
        .map(|rh| {
            let (zr, h) = (&z[rh / heads], rh % heads);
            let rows = || zr.chunks(heads * e).map(move |row| &row[h * e..(h + 1) * e]);
            let n = (zr.len() / heads) as f64;
            let mean = rows().flatten().map(|&v| v as f64).sum::<f64>() / n;
            let var = rows().flatten().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            (mean as f32, var as f32)
        })
        .collect();
    let pick =
        |r: usize, f: fn(&(f32, f32)) -> f32| stats[r * heads..(r + 1) * heads].iter().map(f).collect();
    Norm { mean: [pick(0, |s| s.0), pick(1, |s| s.0)], var: [pick(0, |s| s.1), pick(1, |s| s.1)] }
}

/// The selection and gates of every token from its logits: per head, a sub-expert is kept where
/// its normalised logit reaches min(row max, σ); the gates are the softmax of the kept raw logits
/// (see [`super::router`]).
pub fn select(lay: &Layout, z: &[Vec<f32>; 2], norm: &Norm) -> Routes {
    let (e, heads) = (lay.e, lay.heads);
    let tokens = z[0].len() / (heads * e);
    let inv_std: Vec<Vec<f32>> = norm
        .var
        .iter()
        .map(|v| v.iter().map(|v| (1.0 / (*v as f64 + BN_EPS).sqrt()) as f32).collect())
        .collect();
    let rows: Vec<(Vec<u32>, Vec<u32>, Vec<f32>)> = (0..tokens)
        .into_par_iter()
        .map(|t| {
            let (mut lens, mut ids, mut gates) = (Vec::with_capacity(2 * heads), Vec::new(), Vec::new());
            for r in 0..2 {
                for h in 0..heads {
                    let row = &z[r][t * heads * e + h * e..t * heads * e + (h + 1) * e];
                    let (mean, inv) = (norm.mean[r][h], inv_std[r][h]);
                    let zmax = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let cut = ((zmax - mean) * inv).min(lay.sigma);
                    let start = ids.len();
                    let mut sum = 0.0f32;
                    for (i, &v) in row.iter().enumerate() {
                        if (v - mean) * inv >= cut {
                            let g = (v - zmax).exp();
                            ids.push(i as u32);
                            gates.push(g);
                            sum += g;
                        }
                    }
                    gates[start..].iter_mut().for_each(|g| *g /= sum);
                    lens.push((ids.len() - start) as u32);
                }
            }
            (lens, ids, gates)
        })
        .collect();
    let mut routes =
        Routes { heads, offsets: Vec::with_capacity(tokens * 2 * heads + 1), ..Routes::default() };
    routes.offsets.push(0);
    for (lens, ids, gates) in rows {
        for l in lens {
            routes.offsets.push(routes.offsets.last().unwrap() + l);
        }
        routes.id.extend(ids);
        routes.gate.extend(gates);
    }
    routes
}

/// Per token, the experts whose gate Σ_h g1[h,i]·g2[h,j] exceeds [`GATE_FLOOR`] times the token's
/// total gate mass, as codes over the E² experts (feature i·E + j), ascending.
pub fn codes(routes: &Routes, e: usize) -> Codes {
    let heads = routes.heads;
    let rows: Vec<Vec<(u32, f32)>> = (0..routes.tokens())
        .into_par_iter()
        .map(|t| {
            let mut pairs: Vec<(u32, f32)> = Vec::new();
            for h in 0..heads {
                for a in routes.list(t, 0, h) {
                    for b in routes.list(t, 1, h) {
                        let f = routes.id[a] * e as u32 + routes.id[b];
                        pairs.push((f, routes.gate[a] * routes.gate[b]));
                    }
                }
            }
            // Stable: a pair's heads are summed in head order.
            pairs.sort_by_key(|p| p.0);
            let mut merged: Vec<(u32, f32)> = Vec::with_capacity(pairs.len());
            for (f, g) in pairs {
                match merged.last_mut() {
                    Some(last) if last.0 == f => last.1 += g,
                    _ => merged.push((f, g)),
                }
            }
            let mass: f32 = merged.iter().map(|p| p.1).sum();
            merged.retain(|p| p.1 > GATE_FLOOR * mass);
            merged
        })
        .collect();
    Codes::from_rows(rows.iter().map(Vec::as_slice))
}
